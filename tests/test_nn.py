"""Drop-in modules of blt_ext.nn against independent dense formulations, on both backends."""

import re
import textwrap

import pytest
import torch

import blt_ext.nn as bnn
from blt_ext.nn import (
    BackendModule,
    EntropyPatcher,
    HashNgramEmbedding,
    PatchCrossAttention,
    PatchPooling,
    RMSNorm,
    backend_ops,
)
from blt_ext.testing import random_patch_lengths

BACKENDS = ("ext", "torch")


def patch_of_positions(lengths, n):
    """Index of the patch holding each of n bytes: the number of patches ending at or before it."""
    ends = torch.cumsum(lengths, 0)
    return torch.tensor([int((ends <= t).sum()) for t in range(n)])


def dense_cross_attention(module, x, kv, lengths, direction):
    """x + o_proj(softmax attention under an explicit [B, Q, K] mask), empty rows -> 0."""
    b, s, d = x.shape
    h, k = module.n_heads, module.slots
    q = module.q_proj(module.q_norm(x)).view(b, s, h, -1).transpose(1, 2)
    kvn = module.k_norm(kv)
    key = module.k_proj(kvn).view(b, kv.shape[1], h, -1).transpose(1, 2)
    val = module.v_proj(kvn).view(b, kv.shape[1], h, -1).transpose(1, 2)
    masks = []
    for row in lengths:
        if direction == "encoder":  # slot rows of patch p see the bytes of p
            byte_patch = patch_of_positions(row, kv.shape[1])
            masks.append(torch.arange(s)[:, None] // k == byte_patch[None, :])
        else:  # byte t sees the slots of p(t+1) - 1: the latest patch ending at or before t
            ends = torch.cumsum(row, 0)[row > 0]
            target = torch.tensor([int((ends <= t + 1).sum()) - 1 for t in range(s)])
            masks.append(target[:, None] == torch.arange(kv.shape[1])[None, :] // k)
    mask = torch.stack(masks)[:, None].to(x.device)
    scores = (q @ key.transpose(-1, -2)) / module.head_dim**0.5
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    out = (probs @ val).transpose(1, 2).reshape(b, s, d)
    return x + module.o_proj(out)


@pytest.mark.parametrize("direction", ["encoder", "decoder"])
@pytest.mark.parametrize("include_next_token", [True, False])
def test_patch_cross_attention_matches_a_dense_mask(device, direction, include_next_token):
    g = torch.Generator().manual_seed(0)
    n, slots, dim = 23, 2, 16
    lengths = random_patch_lengths(3, n, include_next_token=include_next_token, generator=g)
    lengths = torch.cat([lengths, torch.zeros(3, 2, dtype=torch.long)], 1)  # padding patches too
    num_slots = lengths.shape[1] * slots
    torch.manual_seed(0)
    module = PatchCrossAttention(dim, 4, slots=slots, direction=direction, backend="torch").to(device)
    x_len, kv_len = (num_slots, n) if direction == "encoder" else (n, num_slots)
    x, kv = torch.randn(3, x_len, dim, device=device), torch.randn(3, kv_len, dim, device=device)
    expected = dense_cross_attention(module, x, kv, lengths, direction)
    for backend in BACKENDS:
        module.backend = backend
        torch.testing.assert_close(module(x, kv, lengths.to(device)), expected, atol=1e-5, rtol=1e-5)


def test_patch_cross_attention_gradients_agree_across_backends(device):
    torch.manual_seed(0)
    module = PatchCrossAttention(16, 2, slots=2, direction="decoder").to(device)
    lengths = torch.tensor([[1, 4, 3, 2], [1, 1, 8, 0]], device=device)
    x = torch.randn(2, 9, 16, device=device, requires_grad=True)
    kv = torch.randn(2, 8, 16, device=device, requires_grad=True)
    grads = []
    for backend in BACKENDS:
        module.backend = backend
        module.zero_grad()
        out = module(x, kv, lengths)
        grads.append(torch.autograd.grad(out.square().sum(), [x, kv, *module.parameters()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_patch_pooling_max_mean_min_and_empty_patches(device):
    x = torch.randn(2, 7, 5, device=device)
    # row 0: a zero-length padding patch; row 1: a last patch holding only the virtual next byte
    lengths = torch.tensor([[1, 4, 2, 0], [1, 6, 1, 0]], device=device)
    spans = [[(0, 1), (1, 5), (5, 7), None], [(0, 1), (1, 7), None, None]]
    for reduce, fn in (("max", torch.amax), ("mean", torch.mean), ("min", torch.amin)):
        expected = torch.stack([
            torch.stack([fn(x[b, span[0] : span[1]], 0) if span else torch.zeros(5, device=device) for span in row])
            for b, row in enumerate(spans)
        ])
        for backend in BACKENDS:
            torch.testing.assert_close(PatchPooling(reduce, backend=backend)(x, lengths), expected)
    with pytest.raises(ValueError, match="reduce must be"):
        PatchPooling("sum")


def test_hash_ngram_embedding_follows_the_worked_example(device):
    # BLT_SPEC.md b, table (2): ids [76, 105, 112] ("Hel" + 4), n = 3, one function, V = 500002
    emb = HashNgramEmbedding(4, ngram_sizes=(3,), hash_vocab=500002).to(device)
    tokens = torch.tensor([[76, 105, 112]], device=device)
    assert emb.hash_ids(tokens).flatten().tolist() == [128868, 393969, 386145]
    expected = emb.byte_weight[tokens] + emb.hash_weight[torch.tensor([128868, 393969, 386145], device=device)]
    for backend in BACKENDS:
        emb.backend = backend
        torch.testing.assert_close(emb(tokens), expected)


def test_hash_ngram_embedding_packs_tables_function_major(device):
    torch.manual_seed(0)
    sizes, functions, vocab = (2, 3), 2, 11
    emb = HashNgramEmbedding(8, ngram_sizes=sizes, num_functions=functions, hash_vocab=vocab).to(device)
    tokens = torch.randint(0, 260, (2, 9), device=device)
    ids = emb.hash_ids(tokens)
    assert ids.shape == (2, 9, 4) and ids.min() >= 0 and ids.max() < vocab
    expected = emb.byte_weight[tokens] + sum(emb.hash_weight[i * vocab + ids[..., i]] for i in range(4))
    grads = []
    for backend in BACKENDS:
        emb.backend = backend
        out = emb(tokens)
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
        grads.append(torch.autograd.grad(out.square().sum(), [emb.byte_weight, emb.hash_weight]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_entropy_patcher_runs_any_byte_lm_without_gradients(device):
    torch.manual_seed(0)
    lm = torch.nn.Sequential(torch.nn.Embedding(260, 16), torch.nn.Linear(16, 260)).to(device)
    with torch.no_grad():
        lm[1].weight.mul_(8)
    grad_modes = []
    lm.register_forward_hook(lambda *_: grad_modes.append(torch.is_grad_enabled()))
    tokens = torch.randint(4, 260, (3, 30), device=device)
    tokens[:, 0] = 1
    for backend in BACKENDS:
        patcher = EntropyPatcher(lm, threshold=2.0, max_patch_length=5, backend=backend)
        layout = patcher(tokens)
        expected = backend_ops("torch").entropy_patch(lm(tokens).detach(), threshold=2.0, max_patch_length=5)
        assert torch.equal(layout.patch_lengths, expected.patch_lengths)
        assert torch.equal(layout.patch_ids, expected.patch_ids)
        torch.testing.assert_close(patcher.entropies(tokens), backend_ops("torch").entropy(lm(tokens).detach()))
    assert grad_modes and not any(grad_modes[::2])  # the patcher's own calls run without grad
    with pytest.raises(RuntimeError, match="needs an entropy_model"):
        EntropyPatcher()(tokens)
    with pytest.raises(ValueError, match="mode must be one of"):
        EntropyPatcher(mode="bpe")


def test_rmsnorm_computes_in_fp32(device):
    x = torch.randn(3, 8, device=device).to(torch.bfloat16).requires_grad_()
    norm = RMSNorm(8, device=device)
    with torch.no_grad():
        norm.weight.uniform_()
    out = norm(x)
    out.float().square().sum().backward()
    xf = x.detach().float().requires_grad_()
    weight = norm.weight.detach().clone().requires_grad_()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5) * weight).to(torch.bfloat16)
    expected.float().square().sum().backward()
    if device.type == "cpu":  # the same fp32 operations
        assert torch.equal(out, expected)
    else:  # one fused kernel: its own fp32 summation order, so at most a bf16 rounding apart
        torch.testing.assert_close(out, expected)
    torch.testing.assert_close(x.grad, xf.grad.to(torch.bfloat16))
    torch.testing.assert_close(norm.weight.grad, weight.grad)


def test_backend_is_validated():
    with pytest.raises(ValueError, match="backend must be one of"):
        BackendModule(backend="triton")
    module = PatchPooling()
    with pytest.raises(ValueError, match="backend must be one of"):
        module.backend = "cuda"
    assert module.backend == "ext"


def _docstring_examples():
    docs = [bnn.__doc__] + [obj.__doc__ for obj in vars(bnn).values() if isinstance(obj, type) and obj.__doc__]
    for doc in docs:
        for block in re.findall(r"::\n\n((?:[ ]{4,}.*\n|\n)+)", doc):
            yield textwrap.dedent(block)


@pytest.mark.parametrize("code", list(_docstring_examples()))
def test_docstring_examples_run(code):
    exec(code, {"torch": torch, **vars(bnn)})
