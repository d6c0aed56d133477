"""Inputs of patch cross-attention, shared by the tests and the benchmarks."""

import torch

from . import random_patch_lengths


def attention_shapes(direction, num_patches, num_bytes, slots):
    """(query rows, key rows) of ``direction``: encoder (P * slots, T), decoder (T, P * slots)."""
    if direction == "encoder":
        return num_patches * slots, num_bytes
    return num_bytes, num_patches * slots


def attention_inputs(
    batch,
    num_bytes,
    heads,
    head_dim,
    slots,
    direction,
    *,
    layout="random",
    include_next_token=True,
    patch_lengths=None,
    extra_patches=0,
    dtype=torch.float32,
    device="cpu",
    generator=None,
    requires_grad=False,
):
    """(q, k, v, patch_lengths) for ``direction``, drawn on the CPU from ``generator``.

    ``patch_lengths`` [B, P] may be given; otherwise it is drawn with ``layout`` and
    ``include_next_token`` and padded with ``extra_patches`` zero-length patches. q, k, v are
    standard normal in ``dtype`` (contiguous [B, S, H, Dh]).
    """
    if patch_lengths is None:
        patch_lengths = random_patch_lengths(
            batch, num_bytes, layout=layout, include_next_token=include_next_token,
            generator=generator,
        )
        patch_lengths = torch.nn.functional.pad(patch_lengths, (0, extra_patches))
    queries, keys = attention_shapes(direction, patch_lengths.shape[1], num_bytes, slots)

    def draw(rows):
        x = torch.randn(batch, rows, heads, head_dim, generator=generator)
        return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)

    return draw(queries), draw(keys), draw(keys), patch_lengths.to(device)
