"""Entropy patching ops (BLT_SPEC.md c) against their pure-PyTorch twins and hand-worked cases."""

import math

import pytest
import torch

from blt_ext import ops
from blt_ext import reference as ref
from blt_ext.reference.entropy_patch import RELEASED_THRESHOLD
from blt_ext.testing import assert_close_to_reference, random_patch_lengths
from blt_ext.testing.entropy_patch import (
    START_MODES,
    random_entropies,
    random_logits,
    random_starts,
    random_tokens,
    starts_from_lengths,
)

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def ids(*chars):
    """Token ids of a string (byte + 4), specials given as ints."""
    out = []
    for c in chars:
        out.extend([b + 4 for b in c.encode()] if isinstance(c, str) else [c])
    return out


def mask(width, positions):
    starts = torch.zeros(1, width, dtype=torch.bool)
    starts[0, positions] = True
    return starts


def poison_allocator(device, *shapes):
    """Free int64 blocks of these shapes full of -7, where the caching allocator places the next
    outputs of those shapes, so that an output element a kernel fails to write shows up."""
    blocks = [torch.full(shape, -7, dtype=torch.long, device=device) for shape in shapes]
    del blocks


def assert_layout_equal(actual, expected):
    for name, a, e in zip(expected._fields, actual, expected):
        assert a.dtype == e.dtype == torch.long, name
        torch.testing.assert_close(a.cpu(), e.cpu(), rtol=0, atol=0, msg=lambda m: f"{name}: {m}")


# ---- entropy ----


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize(
    "shape", [(2, 37, 260), (2, 3, 1000), (3, 5, 1), (4, 9), (7,), (2, 0, 260)]
)
def test_entropy_matches_float64_reference(device, generator, dtype, shape):
    logits = torch.randn(shape, generator=generator, dtype=torch.float64) * 6
    logits = logits.to(device=device, dtype=dtype)
    h = ops.entropy(logits)
    assert h.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert h.shape == logits.shape[:-1]
    expected = ref.entropy(logits.double())
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_to_reference(h, expected, dtype=acc, scale=4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_entropy_peaked_masked_and_strided_logits(device, generator, dtype):
    logits = random_logits(3, 50, 300, scale=40.0, dtype=torch.float64, generator=generator)
    logits[:, ::3, ::7] = -math.inf  # masked vocabulary entries: 0 · log 0 = 0
    logits = logits.to(device=device, dtype=dtype).transpose(0, 1)  # not contiguous
    expected = ref.entropy(logits.double())
    assert torch.isfinite(expected).all()
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_to_reference(ops.entropy(logits), expected, dtype=acc, scale=4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_entropy_rows_at_any_alignment(device, generator, dtype):
    # rows of an odd V at an odd storage offset: every row starts at a different alignment
    rows, vocab = 16, 37
    flat = torch.randn(1 + rows * vocab, generator=generator, dtype=torch.float64) * 5
    logits = flat.to(device=device, dtype=dtype)[1:].view(rows, vocab)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert_close_to_reference(ops.entropy(logits), ref.entropy(logits.double()), dtype=acc, scale=4)


def test_entropy_closed_forms(device):
    v = 260
    logits = torch.zeros(4, v, device=device)
    logits[1] = -math.inf
    logits[1, 17] = 3.0  # one reachable byte: entropy 0
    logits[2, :2] = 5.0
    logits[2, 2:] = -math.inf  # two equal bytes: log 2
    logits[3, 9] = math.nan
    h = ops.entropy(logits).cpu()
    expected = torch.tensor([math.log(v), 0.0, math.log(2)])
    torch.testing.assert_close(h[:3], expected, rtol=1e-6, atol=1e-6)
    assert h[3].isnan()


# ---- entropy_patch_starts ----


@pytest.mark.parametrize("mode", sorted(START_MODES))
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("include_next_token", [True, False])
def test_entropy_patch_starts_matches_reference(device, generator, mode, dtype, include_next_token):
    for num_bytes in (0, 1, 2, 3, 4, 257):
        entropies = random_entropies(3, num_bytes, dtype=dtype, device=device, generator=generator)
        kwargs = dict(START_MODES[mode], include_next_token=include_next_token)
        starts = ops.entropy_patch_starts(entropies, **kwargs)
        assert starts.dtype == torch.bool and starts.shape == (3, num_bytes + 1)
        expected = ref.entropy_patch_starts(entropies, **kwargs)
        torch.testing.assert_close(starts, expected, rtol=0, atol=0)


def test_threshold_is_rounded_to_the_entropy_dtype(device):
    # bf16(1.335442...) = 1.3359375: a bf16 entropy of exactly that value is not above the
    # threshold in bf16, while the same value in float32 is.
    h = torch.tensor([[0.0, 0.0, 1.3359375, 0.0]], device=device)
    assert ops.entropy_patch_starts(h)[0, 3].item()
    assert not ops.entropy_patch_starts(h.bfloat16())[0, 3].item()
    # float16(1.335442...) = 1.3349609375 rounds down: the float16 tie is not a start either way.
    assert not ops.entropy_patch_starts(h.half() * 0 + 1.3349609375)[0, 3].item()


def test_global_threshold_worked_example(device):
    # BLT_SPEC.md f: [BOS, H, e, l, l, o] with H_3 and H_5 above the threshold (H_0 ignored).
    h = torch.tensor([[5.0, 0.5, 1.0, 2.0, 0.25, 1.5]], device=device)
    starts = ops.entropy_patch_starts(h)
    assert starts.cpu().nonzero()[:, 1].tolist() == [0, 1, 4, 6]
    layout = ops.patch_layout(starts)
    # the last patch holds only the next byte
    assert layout.patch_lengths.tolist() == [[1, 3, 2, 1, 0, 0, 0]]
    assert layout.patch_ids.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert layout.patch_counts.tolist() == [4]

    starts = ops.entropy_patch_starts(h, include_next_token=False)
    assert starts.cpu().nonzero()[:, 1].tolist() == [0, 1, 4]
    layout = ops.patch_layout(starts, include_next_token=False)
    assert layout.patch_lengths.tolist() == [[1, 3, 2, 0, 0, 0, 0]]
    assert layout.patch_ids.tolist() == [[0, 1, 1, 1, 2, 2]]
    assert layout.patch_counts.tolist() == [3]


def test_monotonicity_worked_example(device):
    h = torch.tensor([[9.0, 0.5, 1.0, 0.25, 2.0, 2.125]], device=device)
    # p = 2 forced; p = 3: 0.5 > 0.375; p = 4: -0.75; p = 5: 1.75; p = 6 (next byte): 0.125.
    starts = ops.entropy_patch_starts(h, threshold=0.375, monotonicity=True)
    assert starts.cpu().nonzero()[:, 1].tolist() == [0, 1, 2, 3, 5]
    # monotonicity takes precedence over threshold_add, as in the original
    both = ops.entropy_patch_starts(h, threshold=0.375, threshold_add=100.0, monotonicity=True)
    assert torch.equal(both, starts)


def test_threshold_add_worked_example(device):
    h = torch.tensor([[9.0, 0.0, 5.0, 5.0, 1.0, 3.0, 3.5]], device=device)
    # p = 2 forced; p = 3 never (it would pass: 5 > 2, 5 - 0 > 1); p = 4: diff 0; p = 5: 1 < 2;
    # p = 6: 3 > 2 and 2 > 1; p = 7 (next byte): diff 0.5.
    starts = ops.entropy_patch_starts(h, threshold=2.0, threshold_add=1.0)
    assert starts.cpu().nonzero()[:, 1].tolist() == [0, 1, 2, 6]


def test_short_rows(device):
    for include_next_token, expected in ((True, [[True]]), (False, [[False]])):
        h = torch.zeros(1, 0, device=device)
        starts = ops.entropy_patch_starts(h, include_next_token=include_next_token)
        assert starts.tolist() == expected
    h = torch.zeros(1, 1, device=device)
    assert ops.entropy_patch_starts(h).tolist() == [[True, True]]
    assert ops.entropy_patch_starts(h, include_next_token=False).tolist() == [[True, False]]


# ---- space and static patching ----


@pytest.mark.parametrize("include_next_token", [True, False])
def test_space_patch_starts_matches_reference(device, generator, include_next_token):
    for num_bytes in (0, 1, 2, 3, 300):
        tokens = random_tokens(4, num_bytes, device=device, generator=generator)
        starts = ops.space_patch_starts(tokens, include_next_token)
        assert starts.shape == (4, num_bytes + 1)
        expected = ref.space_patch_starts(tokens, include_next_token)
        torch.testing.assert_close(starts, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "tokens, expected",
    [
        # BOS ends a patch; "," is run-initial, the space after it is not; "!" starts the next byte.
        (ids(1, "Hi, you!"), [0, 1, 4, 9]),
        # a UTF-8 lead byte is space-like, its continuation byte is not.
        (ids(1, "a\u00e9 b"), [0, 1, 3, 5]),
        # a special counts even right after a space-like byte.
        (ids(1, "a ", 2, "b"), [0, 1, 3, 4]),
    ],
)
def test_space_patch_starts_worked_examples(device, tokens, expected):
    starts = ops.space_patch_starts(torch.tensor([tokens], device=device))
    assert starts.cpu().nonzero()[:, 1].tolist() == expected
    starts = ops.space_patch_starts(torch.tensor([tokens], device=device), include_next_token=False)
    assert starts.cpu().nonzero()[:, 1].tolist() == [p for p in expected if p < len(tokens)]


@pytest.mark.parametrize("module", [ops, ref])
def test_static_patch_starts(device, module):
    starts = module.static_patch_starts(2, 9, 4, device=device)
    assert starts.device.type == device.type
    assert starts.tolist() == [[p % 4 == 0 for p in range(10)]] * 2
    starts = module.static_patch_starts(1, 8, 4, include_next_token=False, device=device)
    assert starts.cpu().nonzero()[:, 1].tolist() == [0, 4]
    layout = ops.patch_layout(starts, include_next_token=False)
    assert layout.patch_lengths.tolist() == [[4, 4] + [0] * 7]
    with pytest.raises(ValueError, match="patch_size must be an integer >= 1, got 0"):
        module.static_patch_starts(1, 8, 0)


# ---- patch_layout ----


@pytest.mark.parametrize("include_next_token", [True, False])
@pytest.mark.parametrize("max_patch_length", [None, 1, 3, 50])
def test_patch_layout_matches_reference(device, generator, include_next_token, max_patch_length):
    cases = [(0, 0.3), (1, 0.3), (2, 0.3), (3, 0.9), (40, 0.05), (333, 0.3), (333, 0.0)]
    for num_bytes, density in cases:
        starts = random_starts(3, num_bytes, include_next_token=include_next_token, density=density,
                               device=device, generator=generator)
        poison_allocator(device, (3, num_bytes), (3, num_bytes + 1), (3,))
        layout = ops.patch_layout(starts, include_next_token, max_patch_length)
        assert layout.patch_ids.shape == (3, num_bytes)
        assert layout.patch_lengths.shape == (3, num_bytes + 1)
        assert layout.patch_counts.shape == (3,)
        assert_layout_equal(layout, ref.patch_layout(starts, include_next_token, max_patch_length))
        assert (layout.patch_lengths.sum(1) == num_bytes + include_next_token).all()
        if max_patch_length is not None:
            assert (layout.patch_lengths <= max_patch_length).all()


@pytest.mark.parametrize("layout_kind", ["random", "one_patch", "all_ones", "long_patch"])
@pytest.mark.parametrize("max_patch_length", [None, 7])
def test_patch_layout_round_trips_patch_lengths(device, generator, layout_kind, max_patch_length):
    # 25000 positions span 199 tiles of the CUDA scan: three look-back windows of 96 tiles.
    num_bytes = 25000
    lengths = random_patch_lengths(2, num_bytes, layout=layout_kind, generator=generator)
    starts = starts_from_lengths(lengths, num_bytes).to(device)
    layout = ops.patch_layout(starts, True, max_patch_length)
    assert_layout_equal(layout, ref.patch_layout(starts, True, max_patch_length))
    if max_patch_length is None:
        width = lengths.shape[1]
        assert torch.equal(layout.patch_lengths[:, :width].cpu(), lengths)
        assert (layout.patch_counts.cpu() == (lengths > 0).sum(1)).all()


@pytest.mark.parametrize("include_next_token", [True, False])
def test_patch_layout_across_tiles(device, generator, include_next_token):
    # The CUDA layout works on tiles of 126 positions: patches here span several tiles (up to the
    # whole row), and max_patch_length splits land on, just before and just after tile boundaries.
    num_bytes = 5000
    for density in (0.0, 0.0005, 0.01, 0.3):
        starts = random_starts(3, num_bytes, include_next_token=include_next_token, density=density,
                               device=device, generator=generator)
        for max_patch_length in (None, 1, 125, 126, 127, 252, 1025, 2500):
            poison_allocator(device, (3, num_bytes), (3, num_bytes + 1), (3,))
            layout = ops.patch_layout(starts, include_next_token, max_patch_length)
            assert_layout_equal(layout, ref.patch_layout(starts, include_next_token, max_patch_length))


def test_patch_layout_max_patch_length_worked_example(device):
    starts = mask(8, [0, 1]).to(device)  # patches [1, 7] over 7 bytes + the next byte
    cases = {
        1: ([1] * 8, list(range(7)), 8),
        3: ([1, 3, 3, 1], [0, 1, 1, 1, 2, 2, 2], 4),
        7: ([1, 7], [0, 1, 1, 1, 1, 1, 1], 2),  # a patch of exactly m is not split
        100: ([1, 7], [0, 1, 1, 1, 1, 1, 1], 2),
    }
    for m, (lengths, patch_ids, count) in cases.items():
        layout = ops.patch_layout(starts, True, m)
        assert layout.patch_lengths.tolist() == [lengths + [0] * (8 - len(lengths))]
        assert layout.patch_ids.tolist() == [patch_ids]
        assert layout.patch_counts.tolist() == [count]
    # a split restarts at every natural start: [1, 5 | 2] -> [1, 3, 2 | 2]
    layout = ops.patch_layout(mask(9, [0, 1, 6]).to(device), False, 3)
    assert layout.patch_lengths.tolist() == [[1, 3, 2, 2, 0, 0, 0, 0, 0]]


def test_patch_layout_empty_rows(device):
    cases = ((True, [[1], [1]], [1, 1]), (False, [[0], [0]], [0, 0]))
    for include_next_token, lengths, count in cases:
        starts = torch.full((2, 1), include_next_token, dtype=torch.bool, device=device)
        layout = ops.patch_layout(starts, include_next_token, 2)
        assert layout.patch_ids.shape == (2, 0)
        assert layout.patch_lengths.tolist() == lengths
        assert layout.patch_counts.tolist() == count
    layout = ops.patch_layout(torch.zeros(0, 5, dtype=torch.bool, device=device))
    assert [t.shape for t in layout] == [(0, 4), (0, 5), (0,)]


def test_invalid_starts(device):
    starts = mask(6, [1, 3]).to(device)  # position 0 does not start
    fixed = mask(6, [0, 1, 3]).to(device)
    tail = mask(6, [0, 2, 5]).to(device)  # the next byte starts without include_next_token
    if device.type == "cpu":
        with pytest.raises(ValueError, match=r"starts\[:, 0\] must be True .* in row 0"):
            ops.patch_layout(starts)
        with pytest.raises(ValueError, match=r"starts\[:, T\] \(the next byte\) must be False"):
            ops.patch_layout(tail, include_next_token=False)
    else:  # documented CUDA behaviour: position 0 always starts, column T ignored
        assert_layout_equal(ops.patch_layout(starts), ref.patch_layout(fixed))
        assert_layout_equal(ops.patch_layout(tail, False), ref.patch_layout(mask(6, [0, 2]), False))


def test_strided_inputs(device, generator):
    entropies = random_entropies(3, 40, device=device, generator=generator)[:, ::2]
    tokens = random_tokens(3, 40, device=device, generator=generator)[:, 1::2]
    starts = random_starts(3, 41, device=device, generator=generator)[:, ::2]
    assert not (entropies.is_contiguous() or tokens.is_contiguous() or starts.is_contiguous())
    assert torch.equal(ops.entropy_patch_starts(entropies), ref.entropy_patch_starts(entropies))
    assert torch.equal(ops.space_patch_starts(tokens), ref.space_patch_starts(tokens))
    assert_layout_equal(ops.patch_layout(starts, True, 3), ref.patch_layout(starts, True, 3))


# ---- the whole pipeline, batch independence ----


@pytest.mark.parametrize("mode", ["global", "monotonicity", "threshold_add"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entropy_patch_matches_reference(device, generator, mode, dtype):
    kwargs = dict(START_MODES[mode])
    if mode == "global":
        kwargs["threshold"] = 1.0
    logits = random_logits(3, 200, dtype=dtype, device=device, generator=generator)
    for include_next_token in (True, False):
        for max_patch_length in (None, 4):
            got = ops.entropy_patch(logits, include_next_token=include_next_token,
                                    max_patch_length=max_patch_length, **kwargs)
            # the reference starts from the kernel's entropies: entropies are compared with
            # tolerances above; the boundaries built on them must then agree exactly.
            starts = ref.entropy_patch_starts(
                ops.entropy(logits), include_next_token=include_next_token, **kwargs
            )
            assert_layout_equal(got, ref.patch_layout(starts, include_next_token, max_patch_length))
    counts = ops.entropy_patch(logits, threshold=1.0).patch_counts
    assert (counts > 2).all() and (counts < 201).all()  # a real mix of patch sizes


def tied_logits(batch, num_bytes, dtype, device, generator):
    """Logits [B, T, 260] where every third position repeats the logits of the one before (equal
    entropies, so differences of exactly 0) and one row is uniform (every entropy log 260)."""
    logits = random_logits(batch, num_bytes, dtype=torch.float64, generator=generator)
    logits[:, 2::3] = logits[:, 1:num_bytes - 1:3]
    logits[-1] = 0.5
    return logits.to(device=device, dtype=dtype)


def tie_threshold(entropies):
    """A threshold equal to an entropy of the first (random) row, exactly: ties at the threshold."""
    num_bytes = entropies.shape[1]
    return float(entropies[0, num_bytes // 2]) if num_bytes else RELEASED_THRESHOLD


def fused_mode_kwargs(mode, entropies):
    # thresholds that the entropies (global, threshold_add) and their differences (0: repeated
    # positions; monotonicity, threshold_add) meet exactly
    if mode == "global":
        return dict(threshold=tie_threshold(entropies))
    if mode == "monotonicity":
        return dict(threshold=0.0, monotonicity=True)
    return dict(threshold=tie_threshold(entropies), threshold_add=0.0)


@pytest.mark.parametrize("mode", ["global", "monotonicity", "threshold_add"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("include_next_token", [True, False])
def test_fused_entropy_patch_equals_composition(device, generator, mode, dtype, include_next_token):
    # 5000 bytes span several tiles of the CUDA layout, which decides starts from the entropies.
    for num_bytes in (0, 1, 2, 5000):
        logits = tied_logits(2, num_bytes, dtype, device, generator)
        entropies = ops.entropy(logits)
        kwargs = dict(fused_mode_kwargs(mode, entropies), include_next_token=include_next_token)
        starts = ref.entropy_patch_starts(entropies, **kwargs)
        for max_patch_length in (None, 1, 7, 10**6):
            poison_allocator(device, (2, num_bytes), (2, num_bytes + 1), (2,))
            got = ops.entropy_patch(logits, max_patch_length=max_patch_length, **kwargs)
            assert isinstance(got, ref.PatchLayout)
            expected = ref.patch_layout(starts, include_next_token, max_patch_length)
            assert_layout_equal(got, expected)
            composed = ops.patch_layout(
                ops.entropy_patch_starts(entropies, **kwargs), include_next_token, max_patch_length
            )
            assert_layout_equal(got, composed)
    if mode == "global":
        # the tie threshold left some positions exactly at it (not starts) and some above it
        at = (entropies[:, 1:] == kwargs["threshold"]).sum().item()
        assert at > 0 and 0 < starts[:, 2:].sum().item() < starts[:, 2:].numel() - at


@pytest.mark.parametrize("mode", ["global", "monotonicity"])
def test_fused_entropy_patch_long_rows(device, generator, mode):
    # 25000 bytes: the CUDA layout's look-back spans three windows of 96 tiles.
    logits = tied_logits(2, 25000, torch.bfloat16, device, generator)
    entropies = ops.entropy(logits)
    kwargs = fused_mode_kwargs(mode, entropies)
    starts = ops.entropy_patch_starts(entropies, **kwargs)
    for max_patch_length in (None, 7):
        assert_layout_equal(ops.entropy_patch(logits, max_patch_length=max_patch_length, **kwargs),
                            ops.patch_layout(starts, True, max_patch_length))


def test_fused_entropy_patch_strided_logits(device, generator):
    logits = random_logits(40, 3, 300, device=device, generator=generator).transpose(0, 1)[:, ::2]
    assert not logits.is_contiguous()
    starts = ops.entropy_patch_starts(ops.entropy(logits), 1.0, include_next_token=False)
    assert_layout_equal(ops.entropy_patch(logits, 1.0, include_next_token=False, max_patch_length=3),
                        ref.patch_layout(starts, False, 3))


def test_rows_are_patched_independently(device, generator):
    logits = random_logits(4, 64, device=device, generator=generator)
    logits[2] *= 0.05  # near-uniform row: all boundaries
    logits[3] *= 100.0  # peaked row: few boundaries
    tokens = random_tokens(4, 64, device=device, generator=generator)
    batched = ops.entropy_patch(logits, threshold=2.0, max_patch_length=5)
    batched_space = ops.space_patch_starts(tokens)
    for b in range(4):
        alone = ops.entropy_patch(logits[b : b + 1], threshold=2.0, max_patch_length=5)
        for whole, single in zip(batched, alone):
            assert torch.equal(whole[b : b + 1], single)
        assert torch.equal(batched_space[b : b + 1], ops.space_patch_starts(tokens[b : b + 1]))


# ---- opcheck, torch.compile ----


def test_opcheck(device, generator):
    logits = random_logits(2, 9, 31, device=device, generator=generator)
    entropies = random_entropies(2, 9, device=device, generator=generator)
    tokens = random_tokens(2, 9, device=device, generator=generator)
    starts = random_starts(2, 9, device=device, generator=generator)
    ex = torch.ops.blt_ext
    torch.library.opcheck(ex.entropy.default, (logits,))
    torch.library.opcheck(ex.entropy.default, (logits.bfloat16(),))
    torch.library.opcheck(
        ex.entropy_patch_starts.default, (entropies, RELEASED_THRESHOLD, None, False, True)
    )
    torch.library.opcheck(ex.entropy_patch_starts.default, (entropies, 0.5, 0.25, False, False))
    torch.library.opcheck(ex.space_patch_starts.default, (tokens, True))
    torch.library.opcheck(ex.patch_layout.default, (starts, True, None))
    torch.library.opcheck(ex.patch_layout.default, (starts, True, 2))
    torch.library.opcheck(ex.entropy_patch.default, (logits, RELEASED_THRESHOLD, None, False, True, None))
    torch.library.opcheck(ex.entropy_patch.default, (logits.bfloat16(), 0.5, 0.25, False, False, 2))
    torch.library.opcheck(ex.entropy_patch.default, (logits.half(), 0.1, None, True, True, 3))


def test_torch_compile_fullgraph_dynamic(device, generator):
    def pipeline(logits, tokens):
        layout = ops.entropy_patch(logits, threshold=1.0, max_patch_length=6)
        monotonic = ops.entropy_patch(logits, 0.1, monotonicity=True, include_next_token=False)
        space = ops.patch_layout(ops.space_patch_starts(tokens, False), False)
        return (*layout, *monotonic, *space)

    compiled = torch.compile(pipeline, fullgraph=True, dynamic=True)
    for num_bytes in (30, 45):
        logits = random_logits(2, num_bytes, device=device, generator=generator)
        tokens = random_tokens(2, num_bytes, device=device, generator=generator)
        for got, expected in zip(compiled(logits, tokens), pipeline(logits, tokens)):
            assert torch.equal(got, expected)


# ---- errors ----


def test_errors(device):
    logits = torch.randn(2, 3, 5, device=device)
    with pytest.raises(TypeError, match="blt_ext.entropy: logits must be a floating tensor"):
        ops.entropy(torch.ones(2, 5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="logits must be a tensor .* got a 0-D tensor"):
        ops.entropy(torch.tensor(1.0, device=device))
    with pytest.raises(ValueError, match=r"logits.size\(-1\) \(vocabulary size V\) must be >= 1"):
        ops.entropy(torch.randn(2, 0, device=device))
    with pytest.raises(ValueError, match=r"entropy_patch: logits must be a 3-D tensor \[B, T, V\]"):
        ops.entropy_patch(logits[0, 0])
    with pytest.raises(TypeError, match="blt_ext.entropy_patch: logits must be a floating tensor"):
        ops.entropy_patch(logits.long())
    with pytest.raises(ValueError, match=r"entropy_patch: logits.size\(2\) \(vocabulary size V\) must be >= 1"):
        ops.entropy_patch(logits[:, :, :0])
    with pytest.raises(ValueError, match="blt_ext.entropy_patch: threshold must not be NaN"):
        ops.entropy_patch(logits, math.nan)
    with pytest.raises(ValueError, match="blt_ext.entropy_patch: threshold_add must not be NaN"):
        ops.entropy_patch(logits, 1.0, math.nan)
    with pytest.raises(ValueError, match=r"entropy_patch: max_patch_length must be >= 1 \(or None\), got 0"):
        ops.entropy_patch(logits, max_patch_length=0)

    h = torch.rand(2, 6, device=device)
    with pytest.raises(ValueError, match=r"entropies must be a 2-D tensor \[B, T\], got shape"):
        ops.entropy_patch_starts(logits)
    with pytest.raises(TypeError, match="entropies must be a floating tensor"):
        ops.entropy_patch_starts(h.long())
    with pytest.raises(ValueError, match="blt_ext.entropy_patch_starts: threshold must not be NaN"):
        ops.entropy_patch_starts(h, math.nan)
    with pytest.raises(ValueError, match="threshold_add must not be NaN"):
        ops.entropy_patch_starts(h, 1.0, math.nan)
    with pytest.raises(ValueError, match="threshold must not be NaN"):
        ref.entropy_patch_starts(h, math.nan)

    with pytest.raises(TypeError, match="blt_ext.space_patch_starts: tokens must have dtype Long"):
        ops.space_patch_starts(torch.ones(2, 3, dtype=torch.int32, device=device))
    with pytest.raises(ValueError, match=r"tokens must be a 2-D tensor \[B, T\]"):
        ops.space_patch_starts(torch.ones(3, dtype=torch.long, device=device))

    starts = torch.ones(2, 4, dtype=torch.bool, device=device)
    with pytest.raises(TypeError, match="patch_layout: starts must have dtype Bool, got Long"):
        ops.patch_layout(starts.long())
    with pytest.raises(ValueError, match=r"starts must be a 2-D tensor \[B, T \+ 1\]"):
        ops.patch_layout(starts[0])
    with pytest.raises(ValueError, match=r"starts.size\(1\) \(T \+ 1, .*\) must be >= 1"):
        ops.patch_layout(starts[:, :0])
    with pytest.raises(ValueError, match="max_patch_length must be >= 1 \\(or None\\), got 0"):
        ops.patch_layout(starts, True, 0)
    with pytest.raises(ValueError, match="max_patch_length must be >= 1"):
        ref.patch_layout(starts, True, -2)


@pytest.mark.parametrize("bad", [-1, 260])
def test_tokens_out_of_range(device, bad):
    tokens = torch.tensor([[5, 6, bad, 7]], device=device)
    if device.type == "cpu":
        message = rf"tokens must be in \[0, 260\), got {bad} at \[0, 2\]"
        with pytest.raises(ValueError, match=message):
            ops.space_patch_starts(tokens)
    else:  # not checked on CUDA (it would need a host sync); the rule still applies, in bounds
        assert torch.equal(ops.space_patch_starts(tokens), ref.space_patch_starts(tokens))
