"""Patch cross-attention, encoder and decoder directions, forward and forward + backward.

Providers: ext (our op), torch (the dense-mask reference), compile (the reference compiled),
sdpa (scaled_dot_product_attention with a prebuilt dense boolean mask; it gives NaN for fully
masked rows), and on CUDA flex (flex_attention compiled, BlockMask from patch ids prebuilt) and
flex+mask (the BlockMask built in every call, as the original BLT code does).
"""

import functools

import pytest
import torch
import torch.nn.functional as F
from common import DEVICE, ON_CUDA, compiled, run_benchmark

from blt_ext import ops, reference
from blt_ext.reference.patch_attention import (
    cross_attention_mask,
    decoder_patch_ids,
    encoder_patch_ids,
)
from blt_ext.testing.patch_attention import attention_inputs, attention_shapes

if ON_CUDA:  # PERFORMANCE.md: ~1800 patches of mean 4.5 bytes per 8192-byte row, BLT-1B heads
    B, T, H, DH, SLOTS, DTYPE = 4, 8192, 16, 64, 2, torch.bfloat16
else:
    B, T, H, DH, SLOTS, DTYPE = 2, 1024, 8, 64, 2, torch.float32

PROVIDERS = ["ext", "torch", "compile", "sdpa"] + (["flex", "flex+mask"] if ON_CUDA else [])
DIRECTIONS = ["encoder", "decoder"]
PASSES = ["fwd", "fwd+bwd"]


@functools.cache
def inputs(direction):
    q, k, v, lengths = attention_inputs(
        B, T, H, DH, SLOTS, direction, dtype=DTYPE, device=DEVICE,
        generator=torch.Generator().manual_seed(0), requires_grad=True,
    )
    return q, k, v, lengths, torch.randn_like(q)


def bytes_moved(q, k, with_backward):
    """Fewest bytes: forward reads q, k, v and writes out and lse; the backward reads dO, q, k,
    v and lse and writes dq, dk, dv."""
    q_bytes, k_bytes = q.numel() * q.element_size(), k.numel() * k.element_size()
    lse_bytes = q.shape[0] * q.shape[1] * q.shape[2] * 4
    forward = 2 * q_bytes + 2 * k_bytes + lse_bytes
    backward = 3 * q_bytes + 4 * k_bytes + lse_bytes
    return forward + (backward if with_backward else 0)


def flex_block_mask(lengths, direction, queries, keys):
    from torch.nn.attention.flex_attention import create_block_mask

    if direction == "encoder":
        ids = encoder_patch_ids(lengths, keys)

        def mask_mod(b, h, q_idx, kv_idx):
            return q_idx // SLOTS == ids[b, kv_idx]
    else:
        ids = decoder_patch_ids(lengths, queries)

        def mask_mod(b, h, q_idx, kv_idx):
            return ids[b, q_idx] == kv_idx // SLOTS

    batch = lengths.shape[0]
    return create_block_mask(mask_mod, batch, None, queries, keys, device=DEVICE, _compile=True)


def attention_fn(provider, direction, lengths):
    """fn(q, k, v) -> out [B, Sq, H, Dh] for ``provider``."""
    if provider == "ext":
        return lambda q, k, v: ops.patch_cross_attention(q, k, v, lengths, SLOTS, direction)
    if provider == "torch":
        return lambda q, k, v: reference.patch_cross_attention(q, k, v, lengths, SLOTS, direction)
    if provider == "compile":
        fn = compiled(reference.patch_cross_attention)
        return lambda q, k, v: fn(q, k, v, lengths, SLOTS, direction)
    heads_first = lambda x: x.transpose(1, 2)  # noqa: E731  [B, S, H, Dh] -> [B, H, S, Dh] view
    if provider == "sdpa":
        mask = cross_attention_mask(lengths, T, SLOTS, direction).unsqueeze(1)
        return lambda q, k, v: F.scaled_dot_product_attention(
            heads_first(q), heads_first(k), heads_first(v), attn_mask=mask
        ).transpose(1, 2)
    from torch.nn.attention.flex_attention import flex_attention

    # Static shapes, as `compiled` gives the references: the encoder and decoder calls share
    # flex_attention's code, and without it the second direction is recompiled with dynamic
    # shapes (12-17% slower on the H200).
    flex = torch.compile(flex_attention, dynamic=False)
    queries, keys = attention_shapes(direction, lengths.shape[1], T, SLOTS)
    if provider == "flex":
        block_mask = flex_block_mask(lengths, direction, queries, keys)
        return lambda q, k, v: flex(
            heads_first(q), heads_first(k), heads_first(v), block_mask=block_mask
        ).transpose(1, 2)
    assert provider == "flex+mask"
    return lambda q, k, v: flex(
        heads_first(q), heads_first(k), heads_first(v),
        block_mask=flex_block_mask(lengths, direction, queries, keys),
    ).transpose(1, 2)


def workload(provider, direction, pass_):
    """run() for one provider, direction and pass ("fwd" or "fwd+bwd") on the shared inputs."""
    q, k, v, lengths, grad_out = inputs(direction)
    fn = attention_fn(provider, direction, lengths)
    if pass_ == "fwd":
        def run():
            with torch.no_grad():
                return fn(q, k, v)
    else:
        def run():
            return torch.autograd.grad(fn(q, k, v), (q, k, v), grad_out)
    return run


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_patch_cross_attention(benchmark, direction, pass_, provider):
    run = workload(provider, direction, pass_)
    q, k = inputs(direction)[:2]
    dtype = str(DTYPE).removeprefix("torch.")
    group = f"patch_cross_attention {direction} {pass_} B{B} T{T} H{H} Dh{DH} k{SLOTS} {dtype}"
    run_benchmark(
        benchmark, run, group=group, provider=provider,
        bytes_moved=bytes_moved(q, k, pass_ == "fwd+bwd"),
    )
