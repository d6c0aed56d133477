"""Pure-PyTorch segment pooling, as the original BLT code writes it (BLT_SPEC.md d)."""

import torch
from torch import Tensor

__all__ = ["segment_pool"]

_SCATTER_REDUCE = {"max": "amax", "mean": "mean", "min": "amin"}


def patch_ids_from_lengths(patch_lengths: Tensor, num_bytes: int) -> Tensor:
    """Patch id [B, T] of every real byte: the last patch starting at or before it."""
    starts = torch.cumsum(patch_lengths, dim=-1) - patch_lengths
    positions = torch.arange(num_bytes, device=patch_lengths.device)
    return (starts.unsqueeze(-1) <= positions).sum(dim=-2) - 1


def segment_pool(x: Tensor, patch_lengths: Tensor, reduce: str = "max") -> Tensor:
    """Reference twin of ``blt_ext.ops.segment_pool`` (same arguments, same result).

    Scatter-reduces the byte states onto a zero tensor with ``include_self=False``, so empty
    patches stay exactly 0. Differentiable through autograd (which splits a tie's gradient
    between the tied bytes, where the kernel gives it all to the first).
    """
    if reduce not in _SCATTER_REDUCE:
        choices = ", ".join(f'"{r}"' for r in _SCATTER_REDUCE)
        raise ValueError(f'blt_ext.segment_pool: reduce must be one of {choices}, got "{reduce}"')
    batch, num_bytes, dim = x.shape
    ids = patch_ids_from_lengths(patch_lengths, num_bytes)
    index = ids.unsqueeze(-1).expand(batch, num_bytes, dim)
    pooled = x.new_zeros(batch, patch_lengths.shape[1], dim)
    return pooled.scatter_reduce(1, index, x, reduce=_SCATTER_REDUCE[reduce], include_self=False)
