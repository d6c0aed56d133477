"""Pure-PyTorch patch cross-attention (BLT_SPEC.md d "Cross-attention", f "the shift").

Written like the original: patch ids per byte, a dense boolean mask [B, Sq, Sk] built from
them, and masked softmax attention over all keys. Differentiable through autograd.
"""

import math

import torch

DIRECTIONS = ("encoder", "decoder")


def encoder_patch_ids(patch_lengths, num_bytes):
    """Patch of each byte, [B, T] int64: p(t) = number of patches ending at or before t.

    This is ``patch_ids_from_lengths`` of the original (cumulative lengths against arange); with
    non-negative lengths it is the index of the (non-empty) patch that holds byte t.
    """
    ends = patch_lengths.cumsum(-1)
    t = torch.arange(num_bytes, device=patch_lengths.device)
    return (ends.unsqueeze(-1) <= t).sum(-2)


def decoder_patch_ids(patch_lengths, num_bytes):
    """Patch whose slots byte t reads in the decoder, [B, T] int64, -1 for none.

    d(t) = the last non-empty patch q whose end s_q + len_q is at most t + 1: p(t + 1) - 1 of
    BLT_SPEC.md f (the decoder shift) when zero-length patches only pad the end of a row, as
    patch layouts do. -1 (no patch yet) happens only when the first patch is longer than 1.
    """
    batch, num_patches = patch_lengths.shape
    ends = patch_lengths.cumsum(-1)
    t = torch.arange(num_bytes, device=patch_lengths.device)
    ready = (patch_lengths > 0).unsqueeze(-1) & (ends.unsqueeze(-1) <= t + 1)  # [B, P, T]
    index = torch.arange(num_patches, device=patch_lengths.device).view(1, -1, 1)
    candidates = torch.where(ready, index, -1)
    none = torch.full((batch, 1, num_bytes), -1, dtype=torch.long, device=patch_lengths.device)
    return torch.cat([none, candidates], dim=1).amax(dim=1)


def cross_attention_mask(patch_lengths, num_bytes, slots, direction="encoder"):
    """Dense boolean attention mask [B, Sq, Sk] of patch cross-attention.

    encoder: [B, P * slots, T], query row j (patch j // slots) sees the bytes of its patch.
    decoder: [B, T, P * slots], byte t sees the ``slots`` rows of patch d(t).
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'encoder' or 'decoder', got {direction!r}")
    num_patches = patch_lengths.shape[1]
    slot_patch = torch.arange(num_patches * slots, device=patch_lengths.device) // slots
    if direction == "encoder":
        ids = encoder_patch_ids(patch_lengths, num_bytes)
        return slot_patch.view(1, -1, 1) == ids.unsqueeze(1)
    ids = decoder_patch_ids(patch_lengths, num_bytes)
    return ids.unsqueeze(2) == slot_patch.view(1, 1, -1)


def masked_attention(q, k, v, mask, scale):
    """softmax(q·k * scale) v per head under ``mask`` [B, Sq, Sk]; returns (out, lse).

    q [B, Sq, H, Dh], k/v [B, Sk, H, Dh]; out [B, Sq, H, Dh], lse [B, H, Sq] (natural log).
    Fully masked rows give out = 0 and lse = -inf. Masked scores are filled with the dtype's
    most negative finite value rather than -inf, so no NaN appears forwards or backwards.
    """
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * scale
    keep = mask.unsqueeze(1)
    filled = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = torch.where(keep, torch.softmax(filled, dim=-1), 0)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v)
    lse = torch.logsumexp(scores.masked_fill(~keep, float("-inf")), dim=-1)
    return out, lse


def patch_cross_attention(q, k, v, patch_lengths, slots, direction="encoder", scale=None):
    """Reference twin of :func:`blt_ext.ops.patch_cross_attention` (same arguments and result)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be 'encoder' or 'decoder', got {direction!r}")
    num_bytes = k.shape[1] if direction == "encoder" else q.shape[1]
    mask = cross_attention_mask(patch_lengths, num_bytes, slots, direction)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return masked_attention(q, k, v, mask, scale)[0]
