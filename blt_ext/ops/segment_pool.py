"""Segment pooling of byte states into patches (BLT_SPEC.md d, patch representation init).

``torch.ops.blt_ext.segment_pool`` pools each patch's byte states; its backward is the
separately registered ``torch.ops.blt_ext.segment_pool_backward``.
"""

import torch
from torch import Tensor

__all__ = ["segment_pool"]

REDUCTIONS = ("max", "mean", "min")


def _check_reduce(op, reduce):
    if reduce not in REDUCTIONS:
        choices = ", ".join(f'"{r}"' for r in REDUCTIONS)
        raise ValueError(f'blt_ext.{op}: reduce must be one of {choices}, got "{reduce}"')


@torch.library.register_fake("blt_ext::segment_pool")
def _segment_pool_fake(x, patch_lengths, reduce):
    _check_reduce("segment_pool", reduce)
    torch._check(
        x.dim() == 3,
        lambda: f"blt_ext.segment_pool: x must be a 3-D tensor [B, T, D], got {x.shape}",
    )
    torch._check(
        patch_lengths.dim() == 2,
        lambda: (
            f"blt_ext.segment_pool: patch_lengths must be a 2-D tensor [B, P], "
            f"got {patch_lengths.shape}"
        ),
    )
    batch, _, dim = x.shape
    shape = (batch, patch_lengths.shape[1], dim)
    arg_shape = (0,) if reduce == "mean" else shape
    return x.new_empty(shape), x.new_empty(arg_shape, dtype=torch.int32)


@torch.library.register_fake("blt_ext::segment_pool_backward")
def _segment_pool_backward_fake(grad_output, arg_index, patch_lengths, num_bytes, reduce):
    _check_reduce("segment_pool_backward", reduce)
    batch, _, dim = grad_output.shape
    return grad_output.new_empty((batch, num_bytes, dim))


def _setup_context(ctx, inputs, output):
    x, patch_lengths, reduce = inputs
    _, arg_index = output
    ctx.save_for_backward(arg_index, patch_lengths)
    ctx.num_bytes = x.shape[1]
    ctx.reduce = reduce


def _backward(ctx, grad_out, _grad_arg_index):
    arg_index, patch_lengths = ctx.saved_tensors
    grad_x = torch.ops.blt_ext.segment_pool_backward(
        grad_out.contiguous(), arg_index, patch_lengths, ctx.num_bytes, ctx.reduce
    )
    return grad_x, None, None


torch.library.register_autograd("blt_ext::segment_pool", _backward, setup_context=_setup_context)


def segment_pool(x: Tensor, patch_lengths: Tensor, reduce: str = "max") -> Tensor:
    """Pool byte states into patches: out[b, p] = reduce(x[b, t] for the real bytes t of patch p).

    Args:
        x: byte states [B, T, D], float32 / float16 / bfloat16 / float64, contiguous.
        patch_lengths: [B, P] int64 on x's device, non-negative; each row sums to T, or to T + 1
            when the last patch also holds the not-yet-seen next byte (that virtual byte at
            position T is never pooled). Patch p covers bytes [s_p, s_p + len_p) clipped to
            [0, T), s being the exclusive cumulative sum of the row's lengths.
        reduce: "max" (BLT's released setting), "mean" or "min".

    Returns:
        [B, P, D] in x's dtype. A patch with no real byte (zero-length padding, or a last patch
        holding only the virtual byte) is exactly 0, as BLT's scatter_reduce on zeros gives.
        "mean" divides by the number of real bytes, accumulating in float32 (float64 for float64).

    Gradient (x only): max/min route each output gradient to the byte that won (the first one
    on ties), mean spreads it evenly over the patch's real bytes.

    Raises:
        ValueError: bad reduce, x not 3-D or not contiguous, patch_lengths not [B, P] with
            x's batch size, negative lengths or rows not summing to T or T + 1 (values are
            checked on CPU only: on CUDA that would need a host synchronisation; there the
            kernel clips patches to [0, T) and never reads or writes out of bounds).
        TypeError: x not floating, patch_lengths not int64.
    """
    return torch.ops.blt_ext.segment_pool(x, patch_lengths, reduce)[0]
