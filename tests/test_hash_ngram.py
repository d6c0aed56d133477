"""hash_ngram_ids / hash_ngram_embedding (BLT_SPEC.md b): the spec's worked examples, an
independent Python-integer oracle, the reference twins, gradients, opcheck, torch.compile and
argument errors."""

import pytest
import torch

from blt_ext import ops, reference
from blt_ext.reference.hash_ngram import HASH_PRIMES
from blt_ext.testing import assert_close_to_reference, deterministic_algorithms
from blt_ext.testing.hash_ngram import embedding_weights, random_tokens

RELEASED = (3, 4, 5, 6, 7, 8)
INT64_MAX = 2**63 - 1


def python_ids(tokens, ngram_sizes, num_functions, vocab):
    """The hash rules in exact Python integers: reduce to a signed 64-bit value, then floor-mod."""
    out = []
    for row in tokens.tolist():
        for j in range(len(row)):
            for f in range(num_functions):
                for n in ngram_sizes:
                    window = [row[j - n + 1 + i] if j - n + 1 + i >= 0 else 0 for i in range(n)]
                    h = sum(w * HASH_PRIMES[f] ** i for i, w in enumerate(window)) % 2**64
                    h = h - 2**64 if h >= 2**63 else h
                    out.append(h % vocab)  # Python % is floored
    shape = (*tokens.shape, num_functions * len(ngram_sizes))
    return torch.tensor(out, dtype=torch.long).reshape(shape)


# (tokens, hash_vocab, position -> expected id): the worked examples of BLT_SPEC.md b, n=3, f=0.
SPEC_EXAMPLES = [
    ([72, 101, 108], 500002, {0: 352928, 1: 37501, 2: 126171}),  # raw bytes "Hel"
    ([72, 101, 108], 30000, {0: 7064, 1: 17373, 2: 16375}),
    ([76, 105, 112], 500002, {0: 128868, 1: 393969, 2: 386145}),  # byte + 4, what the model hashes
    ([76, 105, 112], 30000, {0: 7260, 1: 5981, 2: 26603}),
    ([1, 76, 105, 112], 500002, {1: 124875}),  # with a leading BOS
]


@pytest.mark.parametrize("example", SPEC_EXAMPLES, ids=lambda e: f"{e[0]}%{e[1]}")
@pytest.mark.parametrize("impl", [ops, reference], ids=["ext", "reference"])
def test_spec_worked_examples(device, impl, example):
    tokens, vocab, expected = example
    ids = impl.hash_ngram_ids(torch.tensor([tokens], device=device), [3], 1, vocab)
    assert ids.shape == (1, len(tokens), 1) and ids.dtype == torch.long
    for pos, value in expected.items():
        assert ids[0, pos, 0].item() == value


# (ngram_sizes, num_functions, hash_vocab): the released and debug configs, the extreme sizes,
# all 11 functions, a single-row table and the largest vocab (every hash is its own floor-mod).
CONFIGS = [
    (RELEASED, 1, 500002),
    ((4,), 3, 50002),
    ((1,), 1, 260),
    ((16,), 2, 2**40 + 1),
    ((1, 16, 2), 11, 30000),
    ((2, 3), 11, 1),
    ((5, 9), 1, INT64_MAX),
]
SHAPES = [(2, 37), (1, 3), (3, 1), (2, 0), (0, 4)]  # (1, 3): T shorter than n


@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_ids_match_python_oracle(device, generator, config):
    tokens = random_tokens(2, 21, generator=generator)
    expected = python_ids(tokens, *config)
    assert torch.equal(ops.hash_ngram_ids(tokens.to(device), *config).cpu(), expected)
    assert torch.equal(reference.hash_ngram_ids(tokens, *config), expected)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("config", CONFIGS, ids=str)
def test_ids_match_reference(device, generator, config, shape):
    tokens = random_tokens(*shape, generator=generator, device=device)
    ids = ops.hash_ngram_ids(tokens, *config)
    assert ids.shape == (*shape, config[1] * len(config[0]))
    assert torch.equal(ids, reference.hash_ngram_ids(tokens, *config))


def test_ids_defaults_and_noncontiguous(device, generator):
    tokens = random_tokens(40, 3, text=True, generator=generator, device=device).t()
    assert not tokens.is_contiguous()
    assert torch.equal(ops.hash_ngram_ids(tokens), reference.hash_ngram_ids(tokens.contiguous()))


def make_inputs(device, generator, config, shape=(2, 40), dim=24, dtype=torch.float32):
    sizes, functions, vocab = config
    tokens = random_tokens(*shape, generator=generator, device=device)
    byte_weight, hash_weight = embedding_weights(
        functions * len(sizes), vocab, dim, dtype=dtype, std=1.0, generator=generator, device=device
    )
    return tokens, byte_weight, hash_weight


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]
# (ngram_sizes, num_functions, V), D: D = 24 takes the CUDA vector path, D = 5 the scalar one;
# V = 1 sends every position to one row per table; 33 tables are more than a warp's lanes.
EMBEDDING_CASES = [
    ((RELEASED, 1, 61), 24),
    (((1, 16), 3, 13), 5),
    (((4,), 2, 1), 16),
    (((1, 2, 3), 11, 3), 8),
]


@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_embedding_matches_reference(device, generator, dtype, case):
    config, dim = case
    tokens, byte_weight, hash_weight = make_inputs(device, generator, config, dim=dim, dtype=dtype)
    out = ops.hash_ngram_embedding(tokens, byte_weight, hash_weight, config[0], config[1])
    assert out.dtype == dtype and out.shape == (*tokens.shape, dim) and out.device == tokens.device
    expected = reference.hash_ngram_embedding(
        tokens, byte_weight.double(), hash_weight.double(), *config[:2]
    )
    assert_close_to_reference(out, expected, dtype)


def test_embedding_unaligned_storage(device, generator):
    """Contiguous weights at an odd storage offset: the CUDA kernels fall back to scalar loads."""
    tokens, byte_weight, hash_weight = make_inputs(device, generator, (RELEASED, 1, 9), dim=16)

    def shifted(w):
        storage = torch.empty(w.numel() + 1, dtype=w.dtype, device=device)
        view = storage[1:].view_as(w)
        view.copy_(w)
        return view

    args = (tokens, shifted(byte_weight), shifted(hash_weight), RELEASED)
    assert_close_to_reference(
        ops.hash_ngram_embedding(*args), reference.hash_ngram_embedding(*args)
    )


@pytest.mark.parametrize("shape", [(1, 3), (2, 0), (0, 5)], ids=str)
def test_embedding_short_and_empty(device, generator, shape):
    tokens, byte_weight, hash_weight = make_inputs(
        device, generator, (RELEASED, 1, 7), shape=shape, dim=8
    )
    out = ops.hash_ngram_embedding(tokens, byte_weight, hash_weight, RELEASED)
    assert out.shape == (*shape, 8)
    assert_close_to_reference(
        out, reference.hash_ngram_embedding(tokens, byte_weight, hash_weight, RELEASED)
    )


def test_embedding_noncontiguous(device, generator):
    tokens, byte_weight, hash_weight = make_inputs(device, generator, (RELEASED, 1, 11), dim=16)
    args = (tokens.t().contiguous().t(), byte_weight[:, ::2], hash_weight[:, 8:], RELEASED)
    assert not any(a.is_contiguous() for a in args[:3])
    expected = reference.hash_ngram_embedding(*args)
    assert_close_to_reference(ops.hash_ngram_embedding(*args), expected)


def weight_grads(fn, tokens, byte_weight, hash_weight, config, grad_output):
    byte_weight = byte_weight.detach().requires_grad_()
    hash_weight = hash_weight.detach().requires_grad_()
    out = fn(tokens, byte_weight, hash_weight, *config[:2])
    return torch.autograd.grad(out, (byte_weight, hash_weight), grad_output)


@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
@pytest.mark.parametrize("case", EMBEDDING_CASES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_backward_matches_reference(device, generator, dtype, case, deterministic):
    config, dim = case
    tokens, byte_weight, hash_weight = make_inputs(device, generator, config, dim=dim, dtype=dtype)
    grad_output = torch.randn(*tokens.shape, dim, generator=generator).to(
        device=device, dtype=dtype
    )
    with deterministic_algorithms(deterministic):
        grads = weight_grads(
            ops.hash_ngram_embedding, tokens, byte_weight, hash_weight, config, grad_output
        )
    expected = weight_grads(
        reference.hash_ngram_embedding,
        tokens,
        byte_weight.double(),
        hash_weight.double(),
        config,
        grad_output.double(),
    )
    # CUDA's default hash-table path adds with native fp16/bf16 atomics, rounding after every add.
    half_atomics = device.type == "cuda" and not deterministic and dtype.itemsize == 2
    for grad, want, scale in zip(grads, expected, (1, 8 if half_atomics else 1)):
        assert grad.dtype == dtype and grad.shape == want.shape
        assert_close_to_reference(grad, want, dtype, scale=scale)


def test_gradcheck(device, generator):
    config = ((1, 2, 3), 2, 5)  # 5 rows per table: many positions share a row
    tokens, byte_weight, hash_weight = make_inputs(
        device, generator, config, shape=(2, 7), dim=3, dtype=torch.float64
    )
    byte_weight.requires_grad_()
    hash_weight.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda b, h: ops.hash_ngram_embedding(tokens, b, h, config[0], config[1]),
        (byte_weight, hash_weight),
    )


@pytest.mark.parametrize("deterministic", [False, True])
def test_opcheck(device, generator, deterministic):
    config = ((3, 4), 2, 17)
    tokens, byte_weight, hash_weight = make_inputs(device, generator, config, dim=8)
    torch.library.opcheck(torch.ops.blt_ext.hash_ngram_ids.default, (tokens, [3, 4], 2, 17))
    torch.library.opcheck(
        torch.ops.blt_ext.hash_ngram_embedding.default,
        (tokens, byte_weight.requires_grad_(), hash_weight.requires_grad_(), [3, 4], 2),
    )
    grad_output = torch.randn(*tokens.shape, 8, generator=generator).to(device)
    torch.library.opcheck(
        torch.ops.blt_ext.hash_ngram_embedding_backward.default,
        (grad_output, tokens, 260, hash_weight.size(0), [3, 4], 2, deterministic),
    )


def test_compile_matches_eager(device, generator):
    torch._dynamo.reset()
    config = (RELEASED, 1, 23)

    def step(tokens, byte_weight, hash_weight):
        out = ops.hash_ngram_embedding(tokens, byte_weight, hash_weight, RELEASED, 1)
        ids = ops.hash_ngram_ids(tokens, RELEASED, 1, 23)
        return out, ids

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for shape in [(2, 19), (3, 31)]:
        tokens, byte_weight, hash_weight = make_inputs(
            device, generator, config, shape=shape, dim=16
        )
        byte_weight.requires_grad_()
        hash_weight.requires_grad_()
        grad_output = torch.randn(*shape, 16, generator=generator).to(device)
        results = []
        for fn in (step, compiled):
            out, ids = fn(tokens, byte_weight, hash_weight)
            results.append(
                (out, ids, *torch.autograd.grad(out, (byte_weight, hash_weight), grad_output))
            )
        for eager, comp in zip(*results):
            torch.testing.assert_close(comp, eager, rtol=1e-6, atol=1e-6)


def test_deterministic_backward_is_bitwise_reproducible(device, generator):
    # Text-like tokens and 7-row tables: every row sums many contributions.
    tokens = random_tokens(4, 512, text=True, generator=generator, device=device)
    grad_output = torch.randn(4, 512, 64, generator=generator).to(device)
    args = (grad_output, tokens, 260, 6 * 7, list(RELEASED), 1, True)
    first = torch.ops.blt_ext.hash_ngram_embedding_backward(*args)
    second = torch.ops.blt_ext.hash_ngram_embedding_backward(*args)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    # Autograd takes the deterministic path when torch asks for deterministic algorithms.
    byte_weight, hash_weight = embedding_weights(6, 7, 64, generator=generator, device=device)
    with deterministic_algorithms(True):
        grads = weight_grads(
            ops.hash_ngram_embedding, tokens, byte_weight, hash_weight, (RELEASED, 1), grad_output
        )
    assert all(torch.equal(a, b) for a, b in zip(grads, first))
    expected = weight_grads(
        reference.hash_ngram_embedding,
        tokens,
        byte_weight.double(),
        hash_weight.double(),
        (RELEASED, 1),
        grad_output.double(),
    )
    for grad, want in zip(first, expected):
        assert_close_to_reference(grad, want, scale=4)


def embedding_call(
    device, tokens=None, byte_weight=None, hash_weight=None, ngram_sizes=RELEASED, num_functions=1
):
    defaults = make_inputs(
        device, torch.Generator().manual_seed(0), (ngram_sizes, num_functions, 3), dim=8
    )
    tokens, byte_weight, hash_weight = [
        given if given is not None else default
        for given, default in zip((tokens, byte_weight, hash_weight), defaults)
    ]
    return ops.hash_ngram_embedding(tokens, byte_weight, hash_weight, ngram_sizes, num_functions)


def test_errors_ids(device):
    tokens = torch.zeros(2, 5, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match=r"hash_ngram_ids: tokens must have dtype Long, got Float"):
        ops.hash_ngram_ids(tokens.float())
    with pytest.raises(
        ValueError, match=r"hash_ngram_ids: tokens must be a 2-D tensor \[B, T\], got shape \[10\]"
    ):
        ops.hash_ngram_ids(tokens.flatten())
    for sizes in ([0], [3, 17]):
        with pytest.raises(
            ValueError, match=r"ngram_sizes must each be in \[1, 16\], got \[" + str(sizes[0])
        ):
            ops.hash_ngram_ids(tokens, sizes)
    for sizes in ([], [3] * 17):
        with pytest.raises(ValueError, match=r"ngram_sizes must have 1 to 16 entries"):
            ops.hash_ngram_ids(tokens, sizes)
    for functions in (0, 12):
        with pytest.raises(
            ValueError, match=rf"num_functions must be in \[1, 11\], got {functions}"
        ):
            ops.hash_ngram_ids(tokens, RELEASED, functions)
    with pytest.raises(ValueError, match=r"hash_vocab must be >= 1, got 0"):
        ops.hash_ngram_ids(tokens, RELEASED, 1, 0)


def test_errors_embedding(device):
    def weights(rows, dim=8, dtype=torch.float32, on=device):
        return torch.zeros(rows, dim, dtype=dtype, device=on)

    tokens = torch.zeros(2, 5, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match=r"tokens must have dtype Long, got Float"):
        embedding_call(device, tokens=tokens.float())
    with pytest.raises(
        ValueError, match=r"tokens must be a 2-D tensor \[B, T\], got shape \[2, 5, 1\]"
    ):
        embedding_call(device, tokens=tokens[..., None])
    with pytest.raises(
        ValueError, match=r"byte_weight must be a 2-D tensor \[byte_rows, D\], got shape \[260\]"
    ):
        embedding_call(device, byte_weight=weights(260)[:, 0])
    with pytest.raises(TypeError, match=r"byte_weight must be a floating tensor .* got Long"):
        embedding_call(
            device,
            byte_weight=weights(260, dtype=torch.long),
            hash_weight=weights(18, dtype=torch.long),
        )
    with pytest.raises(
        TypeError,
        match=r"byte_weight and hash_weight must have the same dtype, got Float and BFloat16",
    ):
        embedding_call(device, hash_weight=weights(18, dtype=torch.bfloat16))
    with pytest.raises(
        ValueError,
        match=r"hash_weight.size\(1\) \(embedding dim D of byte_weight\) must be 8, got 4",
    ):
        embedding_call(device, hash_weight=weights(18, dim=4))
    with pytest.raises(
        ValueError,
        match=r"hash_weight.size\(0\) must be a positive multiple of the number of "
        r"tables num_functions \* len\(ngram_sizes\) = 6, got 20",
    ):
        embedding_call(device, hash_weight=weights(20))
    with pytest.raises(ValueError, match=r"num_functions must be in \[1, 11\], got 12"):
        embedding_call(device, num_functions=12)
    with pytest.raises(ValueError, match=r"ngram_sizes must each be in \[1, 16\]"):
        embedding_call(device, ngram_sizes=(0, 3))
    # A second device: CPU beside CUDA, or "meta" (no data) on a CPU-only machine.
    other = "cpu" if device.type == "cuda" else "meta"
    with pytest.raises(
        ValueError, match=rf"tokens and byte_weight must be on the same device, got {device}"
    ):
        embedding_call(device, byte_weight=weights(260, on=other))
    with pytest.raises(
        ValueError, match=rf"tokens and hash_weight must be on the same device, got {device}"
    ):
        embedding_call(device, hash_weight=weights(18, on=other))


def test_errors_backward(device):
    tokens = torch.zeros(2, 5, dtype=torch.long, device=device)
    grad = torch.zeros(2, 5, 8, device=device)
    backward = torch.ops.blt_ext.hash_ngram_embedding_backward
    with pytest.raises(
        ValueError, match=r"grad_output.size\(1\) \(sequence length T of tokens\) must be 5, got 4"
    ):
        backward(grad[:, :4], tokens, 260, 6, list(RELEASED), 1, False)
    with pytest.raises(ValueError, match=r"hash_rows must be a positive multiple .* = 6, got 0"):
        backward(grad, tokens, 260, 0, list(RELEASED), 1, False)
    with pytest.raises(ValueError, match=r"byte_rows must be >= 1, got 0"):
        backward(grad, tokens, 0, 6, list(RELEASED), 1, False)
    other = "cpu" if device.type == "cuda" else "meta"
    with pytest.raises(ValueError, match=r"grad_output and tokens must be on the same device"):
        backward(grad.to(other), tokens, 260, 6, list(RELEASED), 1, False)


def test_token_values_out_of_range(device, generator):
    """CPU kernels reject tokens outside the byte table; CUDA kernels (which cannot check without
    a host synchronisation) hash them as they are and leave their byte row out, both directions."""
    tokens, byte_weight, hash_weight = make_inputs(
        device, generator, (RELEASED, 1, 5), shape=(2, 6), dim=8
    )
    bad = tokens.clone()
    bad[1, 3] = -1
    bad[0, 2] = 260
    if device.type == "cpu":
        with pytest.raises(
            ValueError,
            match=r"hash_ngram_ids: tokens must be in \[0, 260\) .*, got 260 at \[0, 2\]",
        ):
            ops.hash_ngram_ids(bad)
        with pytest.raises(
            ValueError, match=r"hash_ngram_ids: tokens must be in \[0, 260\) .*, got -1 at \[1, 3\]"
        ):
            ops.hash_ngram_ids(bad.clamp(max=259))
        small = tokens.clamp(max=99)
        small[1, 1] = 100
        with pytest.raises(
            ValueError,
            match=r"tokens must be in \[0, 100\) \(rows of byte_weight\), got 100 at \[1, 1\]",
        ):
            ops.hash_ngram_embedding(small, byte_weight[:100], hash_weight)
        with pytest.raises(
            ValueError, match=r"backward: tokens must be in \[0, 260\) .*, got 260 at \[0, 2\]"
        ):
            torch.ops.blt_ext.hash_ngram_embedding_backward(
                torch.zeros(2, 6, 8), bad, 260, hash_weight.size(0), list(RELEASED), 1, False
            )
        return
    ids = reference.hash_ngram_ids(bad, RELEASED, 1, 5)  # the reference hashes any int64
    assert torch.equal(ops.hash_ngram_ids(bad, RELEASED, 1, 5), ids)
    rows = (ids + 5 * torch.arange(6, device=device)).flatten()
    valid = (bad >= 0) & (bad < 260)
    expected = byte_weight[bad.clamp(0, 259)] * valid[..., None] + hash_weight[rows].view(
        2, 6, 6, 8
    ).sum(-2)
    assert_close_to_reference(
        ops.hash_ngram_embedding(bad, byte_weight, hash_weight), expected.double()
    )
    grad_output = torch.randn(2, 6, 8, generator=generator).to(device)
    grad_byte, grad_hash = torch.ops.blt_ext.hash_ngram_embedding_backward(
        grad_output, bad, 260, hash_weight.size(0), list(RELEASED), 1, False
    )
    g = grad_output.double()
    expected_byte = torch.zeros(260, 8, dtype=torch.float64, device=device).index_add_(
        0, bad[valid], g[valid]
    )
    expected_hash = torch.zeros(30, 8, dtype=torch.float64, device=device).index_add_(
        0, rows, g[:, :, None].expand(2, 6, 6, 8).reshape(-1, 8)
    )
    assert_close_to_reference(grad_byte, expected_byte)
    assert_close_to_reference(grad_hash, expected_hash)
