"""Every op on the GPU at the released BLT-1B shapes, under CUDA graphs, and run to run.

Collected only where CUDA exists (conftest.py). The per-family test files cover ragged and edge
layouts at small sizes on every device; this file adds what only a GPU run can show: the
released shapes (B=8, T=8192, D=1024, six 500002-row tables; 16 heads x 64, k=2), capture by
torch.compile(mode="reduce-overhead"), and bitwise-identical repeats in deterministic mode.
"""

import pytest
import torch

from blt_ext import ops, reference
from blt_ext.testing import (
    assert_close_to_reference,
    deterministic_algorithms,
    random_patch_lengths,
)
from blt_ext.testing.segment_pool import first_winner_grad

# Released shapes (6 GB of hash tables and their gradients): one worker under pytest-xdist.
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.xdist_group("released-shapes"),
    pytest.mark.usefixtures("release_gpu_memory"),
]
CUDA = torch.device("cuda")
BF16 = torch.bfloat16


def released_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(4, 260, (8, 8192), generator=g).to(CUDA)
    lengths = random_patch_lengths(4, 8192, generator=g).to(CUDA)
    return g, tokens, lengths


def hash_tables(seed, scale=1.0):
    """The released byte table [260, 1024] and six 500002-row hash tables [3000012, 1024], bf16,
    drawn on the GPU (3.07e9 values: torch.randn on two CPU threads takes ~18 s for them)."""
    g = torch.Generator(device=CUDA).manual_seed(seed)
    return [(torch.randn(rows, 1024, generator=g, device=CUDA) * scale).to(BF16).requires_grad_()
            for rows in (260, 6 * 500002)]


def test_hash_ngram_embedding_released_shapes_forward_and_backward():
    g, tokens, _ = released_inputs()
    byte_w, hash_w = hash_tables(0, scale=0.03)
    out = ops.hash_ngram_embedding(tokens, byte_w, hash_w)
    byte_ref = byte_w.detach().float().requires_grad_()
    hash_ref = hash_w.detach().float().requires_grad_()
    expected = reference.hash_ngram_embedding(tokens, byte_ref, hash_ref)
    assert_close_to_reference(out, expected, BF16)
    grad = (torch.randn(out.shape, generator=g) * 0.01).to(CUDA, BF16)
    out.backward(grad)
    expected.backward(grad.float())
    # the byte table's rows sum ~65k contributions in float32, then round once to bf16
    assert_close_to_reference(byte_w.grad, byte_ref.grad, BF16)
    touched = torch.unique(hash_ref.grad.abs().sum(1).nonzero().flatten())
    assert_close_to_reference(hash_w.grad[touched], hash_ref.grad[touched], BF16, scale=8)


def test_hash_ngram_deterministic_backward_repeats_bitwise():
    _, tokens, _ = released_inputs(1)
    byte_w, hash_w = hash_tables(1)
    grads = []
    with deterministic_algorithms():
        for _ in range(2):
            byte_w.grad = hash_w.grad = None
            ops.hash_ngram_embedding(tokens, byte_w, hash_w).sum().backward()
            grads.append((byte_w.grad.clone(), hash_w.grad.clone()))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


def test_entropy_patch_released_shapes_equal_the_reference():
    g, _, _ = released_inputs(2)
    logits = (3 * torch.randn(8, 8192, 260, generator=g)).to(CUDA, BF16)
    entropies = ops.entropy(logits)
    assert_close_to_reference(entropies, reference.entropy(logits.double()), torch.float32, scale=10)
    # decisions are compared on the op's own entropies (summation order moves the last bits)
    threshold = entropies.median().item()  # about half the positions start a patch
    for max_patch_length in (None, 16):
        got = ops.entropy_patch(logits, threshold, max_patch_length=max_patch_length)
        starts = reference.entropy_patch_starts(entropies, threshold)
        expected = reference.patch_layout(starts, max_patch_length=max_patch_length)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_segment_pool_released_shapes(reduce):
    g, _, lengths = released_inputs(3)
    x = torch.randn(4, 8192, 1024, generator=g).to(CUDA, BF16).requires_grad_()
    x_ref = x.detach().double().requires_grad_()
    out = ops.segment_pool(x, lengths, reduce)
    expected = reference.segment_pool(x_ref, lengths, reduce)
    assert_close_to_reference(out, expected, BF16)
    grad = torch.randn(out.shape, generator=g).to(CUDA, BF16)
    out.backward(grad)
    if reduce == "max":  # bfloat16 states tie often here; the kernel's rule is stated exactly
        assert torch.equal(x.grad, first_winner_grad(x.detach(), out.detach(), lengths, grad))
    else:
        expected.backward(grad.double())
        assert_close_to_reference(x.grad, x_ref.grad, BF16)


@pytest.mark.parametrize("direction", ["encoder", "decoder"])
def test_patch_cross_attention_released_shapes(direction):
    g, _, lengths = released_inputs(4)
    patches, slots, heads, dim = lengths.shape[1], 2, 16, 64
    q_rows, kv_rows = (patches * slots, 8192) if direction == "encoder" else (8192, patches * slots)
    q = torch.randn(4, q_rows, heads, dim, generator=g).to(CUDA, BF16).requires_grad_()
    k = torch.randn(4, kv_rows, heads, dim, generator=g).to(CUDA, BF16).requires_grad_()
    v = torch.randn(4, kv_rows, heads, dim, generator=g).to(CUDA, BF16).requires_grad_()
    refs = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out = ops.patch_cross_attention(q, k, v, lengths, slots, direction)
    expected = reference.patch_cross_attention(*refs, lengths, slots, direction)
    assert_close_to_reference(out, expected, BF16)
    grad = torch.randn(out.shape, generator=g).to(CUDA, BF16)
    out.backward(grad)
    expected.backward(grad.float())
    for t, ref in zip((q, k, v), refs):
        assert_close_to_reference(t.grad, ref.grad, BF16, scale=4)


def small_cases():
    """(name, fn, inputs) for every differentiable op family plus patching, at moderate sizes."""
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(4, 260, (2, 1000), generator=g).to(CUDA)
    lengths = random_patch_lengths(2, 1000, generator=g).to(CUDA)
    p = lengths.shape[1]
    byte_w = torch.randn(260, 128, generator=g).to(CUDA)
    hash_w = torch.randn(6 * 1001, 128, generator=g).to(CUDA)
    x = torch.randn(2, 1000, 128, generator=g).to(CUDA)
    q = torch.randn(2, 2 * p, 4, 32, generator=g).to(CUDA)
    kv = torch.randn(2, 1000, 4, 32, generator=g).to(CUDA)
    logits = (3 * torch.randn(2, 1000, 260, generator=g)).to(CUDA)
    return [
        ("hash_ngram_embedding", lambda t, b, h: ops.hash_ngram_embedding(t, b, h), (tokens, byte_w, hash_w)),
        ("entropy_patch", lambda z: ops.entropy_patch(z).patch_lengths, (logits,)),
        ("segment_pool", lambda a, n: ops.segment_pool(a, n, "max"), (x, lengths)),
        ("patch_cross_attention", lambda a, b, n: ops.patch_cross_attention(a, b, b, n, 2, "encoder"),
         (q, kv, lengths)),
    ]


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in small_cases()] if torch.cuda.is_available() else None)
def test_cuda_graphs_reduce_overhead_equals_eager(case):
    name, fn, inputs = small_cases()[case]
    eager = fn(*inputs)
    compiled = torch.compile(fn, fullgraph=True, mode="reduce-overhead")
    for _ in range(3):  # the first calls record, later ones replay the graph
        got = compiled(*inputs)
        torch.cuda.synchronize()
        assert torch.equal(got, eager), name


@pytest.mark.parametrize("case", range(4), ids=[c[0] for c in small_cases()] if torch.cuda.is_available() else None)
def test_deterministic_mode_repeats_bitwise(case):
    name, fn, inputs = small_cases()[case]
    differentiable = name != "entropy_patch"  # patching has no gradient
    inputs = [t.requires_grad_() if differentiable and t.is_floating_point() else t for t in inputs]
    results = []
    with deterministic_algorithms():
        for _ in range(2):
            for t in inputs:
                t.grad = None
            out = fn(*inputs)
            if differentiable:
                out.sum().backward()
            results.append([out.detach().clone()] + [t.grad.clone() for t in inputs if t.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*results)), name
