"""Inputs of segment_pool for the tests and the benchmarks."""

import torch

from ..reference.segment_pool import patch_ids_from_lengths
from . import random_patch_lengths

# Largest |integer| every test dtype holds exactly (bfloat16 keeps 8 significant bits).
_EXACT_INTEGERS = 256


def segment_pool_inputs(
    batch,
    num_bytes,
    dim,
    *,
    dtype=torch.float32,
    device="cpu",
    layout="random",
    include_next_token=True,
    extra_patches=0,
    distinct=True,
    generator=None,
):
    """Byte states x [B, T, D] and patch lengths [B, P] (P = widest row + ``extra_patches``).

    With ``distinct`` the values of each column x[b, :, d] are k / 4 for T distinct random
    nonzero integers k in [-T, T], exact in every float dtype (that needs T <= 256), so max
    and min have no ties and the kernel's gradient (all to the first winner) equals the
    reference's autograd (split between tied winners, and with the zero the scatter starts
    from when a patch's extremum is exactly 0). Without it x is standard normal.
    """
    lengths = random_patch_lengths(
        batch, num_bytes, layout=layout, include_next_token=include_next_token, generator=generator
    )
    if extra_patches:
        lengths = torch.cat([lengths, lengths.new_zeros(batch, extra_patches)], dim=1)
    if distinct:
        if num_bytes > _EXACT_INTEGERS:
            raise ValueError(
                f"distinct states need num_bytes <= {_EXACT_INTEGERS}, got {num_bytes}"
            )
        keys = torch.rand(batch, num_bytes, dim, generator=generator, dtype=torch.float64)
        ranks = keys.argsort(dim=1).argsort(dim=1)
        # Spread ranks over [-T, T) in steps of 2 so that the values are not just consecutive.
        k = 2 * ranks - num_bytes + torch.randint(0, 2, ranks.shape, generator=generator)
        x = torch.where(k >= 0, k + 1, k) / 4
    else:
        x = torch.randn(batch, num_bytes, dim, generator=generator, dtype=torch.float64)
    return x.to(device=device, dtype=dtype).contiguous(), lengths.to(device)


def first_winner_grad(x, pooled, patch_lengths, grad_pooled):
    """Gradient of max or min pooling by the kernel's rule, from the inputs and the pooled result.

    Each (patch, column) sends its gradient to the first byte of the patch that equals the
    pooled value; tied later bytes get 0 (autograd of the reference would split it instead).
    This is the expectation where ties are unavoidable, as in bfloat16 at the released shapes.
    """
    batch, num_bytes, dim = x.shape
    ids = patch_ids_from_lengths(patch_lengths, num_bytes)
    by_byte = ids.unsqueeze(-1).expand(batch, num_bytes, dim)
    winner = x == pooled.gather(1, by_byte)
    winners_before = winner.long().cumsum(1) - winner.long()
    starts = torch.cumsum(patch_lengths, dim=-1) - patch_lengths
    patch_start = starts.gather(1, ids).unsqueeze(-1).expand(batch, num_bytes, dim)
    first = winner & (winners_before == winners_before.gather(1, patch_start))
    return torch.where(first, grad_pooled.gather(1, by_byte), torch.zeros_like(x))
