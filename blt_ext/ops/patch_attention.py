"""Patch cross-attention between byte rows and patch rows (BLT_SPEC.md d and f).

``torch.ops.blt_ext.patch_cross_attention`` returns (out, lse); its backward is the separate op
``torch.ops.blt_ext.patch_cross_attention_backward``. The mask is never materialised: the
kernels walk the patch offsets (cumulative lengths, ``torch.ops.blt_ext.patch_ends``) directly.
Both ops take those offsets as ``patch_ends`` when they are already computed: on CUDA a call
that will run backward computes them once for both.
"""

import math

import torch

DIRECTIONS = ("encoder", "decoder")


def _check_direction(direction):
    if direction not in DIRECTIONS:
        raise ValueError(
            'blt_ext.patch_cross_attention: direction must be "encoder" or "decoder", '
            f'got "{direction}"'
        )


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


@torch.library.register_fake("blt_ext::patch_ends")
def _patch_ends_fake(patch_lengths):
    torch._check(
        patch_lengths.dim() == 2, lambda: "blt_ext.patch_ends: patch_lengths must be a 2-D tensor [B, P]"
    )
    return torch.empty_like(patch_lengths, memory_format=torch.contiguous_format)


@torch.library.register_fake("blt_ext::patch_cross_attention")
def _patch_cross_attention_fake(q, k, v, patch_lengths, slots, direction, scale, patch_ends=None):
    _check_direction(direction)
    torch._check(q.dim() == 4, lambda: "blt_ext.patch_cross_attention: q must be a 4-D tensor")
    batch, queries, heads, _ = q.shape
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((batch, heads, queries), dtype=_lse_dtype(q.dtype))
    return out, lse


@torch.library.register_fake("blt_ext::patch_cross_attention_backward")
def _patch_cross_attention_backward_fake(
    grad_output, q, k, v, output, lse, patch_lengths, slots, direction, scale, patch_ends=None
):
    _check_direction(direction)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, patch_lengths, slots, direction, scale, patch_ends = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # lse has no gradient: no zeros tensor filled for it
    ctx.save_for_backward(q, k, v, out, lse, patch_lengths, patch_ends)
    ctx.slots, ctx.direction, ctx.scale = slots, direction, scale


def _backward(ctx, grad_out, grad_lse):
    if grad_out is None:  # only lse was used, and lse has no gradient
        return (None,) * 8
    q, k, v, out, lse, patch_lengths, patch_ends = ctx.saved_tensors
    dq, dk, dv = torch.ops.blt_ext.patch_cross_attention_backward(
        grad_out.contiguous(), q, k, v, out, lse, patch_lengths, ctx.slots, ctx.direction, ctx.scale,
        patch_ends,
    )
    return dq, dk, dv, None, None, None, None, None


torch.library.register_autograd(
    "blt_ext::patch_cross_attention", _backward, setup_context=_setup_context
)


def patch_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    patch_lengths: torch.Tensor,
    slots: int,
    direction: str = "encoder",
    scale: float | None = None,
) -> torch.Tensor:
    """Multi-head cross-attention between bytes and patches, masked by patch membership.

    Args:
        q, k, v: contiguous [B, S, H, Dh] tensors (the layout after a Linear and a view), one
            dtype among float32 / float16 / bfloat16 / float64, the same H and Dh <= 256.
            ``direction="encoder"``: q [B, P * slots, H, Dh] holds ``slots`` consecutive query
            rows per patch, k/v [B, T, H, Dh] the bytes. ``direction="decoder"``: q [B, T, H, Dh]
            holds the bytes, k/v [B, P * slots, H, Dh] ``slots`` key rows per patch.
        patch_lengths: [B, P] int64, non-negative, each row summing to T or T + 1 (the last
            patch also holds the not-yet-seen next byte); zero-length patches pad a row.
        slots: rows per patch (BLT's ``cross_attn_k``), at least 1.
        direction: "encoder" (patch rows attend their own bytes: query row j of patch
            p = j // slots sees the bytes [s_p, s_p + len_p) within [0, T)) or "decoder" (byte t
            sees the ``slots`` rows of patch d(t), the last non-empty patch ending at or before
            t + 1: p(t + 1) - 1 of BLT_SPEC.md f).
        scale: score scale, default 1 / sqrt(Dh).

    Returns:
        out [B, Sq, H, Dh] in the input dtype: softmax(q·k * scale) v per head, accumulated in
        float32 (float64 for float64 inputs). Rows that see no key (empty patches, or decoder
        bytes before the first patch ends) are 0. Differentiable in q, k and v.

    Raises:
        ValueError: bad direction, rank, shape (P * slots or T mismatch, Dh > 256), slots < 1,
            non-contiguous inputs, patch_lengths that do not sum to T or T + 1 (CPU).
        TypeError: dtype mismatch or non-floating inputs, patch_lengths not int64.
    """
    _check_direction(direction)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    patch_ends = None
    if q.is_cuda and torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        # The backward walks the same patch offsets: one scan kernel for both ops instead of two.
        patch_ends = torch.ops.blt_ext.patch_ends(patch_lengths)
    return torch.ops.blt_ext.patch_cross_attention(
        q, k, v, patch_lengths, slots, direction, scale, patch_ends
    )[0]
