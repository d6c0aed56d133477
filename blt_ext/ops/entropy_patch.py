"""Entropy patching (BLT_SPEC.md c): entropies of entropy-model logits, patch start masks and
patch layouts, backed by ``torch.ops.blt_ext`` kernels.

Positions p = 0 .. T of a row of T bytes: p < T are the bytes, p = T is the not-yet-seen next
byte, which belongs to the sequence only with ``include_next_token`` (as in the model forward
and in generation; whole training documents are patched without it). A start mask [B, T + 1]
(bool) marks the first position of every patch. Every batch row is patched on its own (the
original flattens the batch, which lets rows bleed into each other).

No op here synchronizes the host or has a data-dependent output shape, so they run inside
``torch.compile(fullgraph=True)`` graphs and CUDA graphs. None is differentiable.
``entropy_patch`` is the whole pipeline from logits as one op.
"""

from typing import Optional

import torch
from torch import Tensor

from blt_ext.reference.entropy_patch import RELEASED_THRESHOLD, PatchLayout, static_patch_starts

__all__ = [
    "RELEASED_THRESHOLD",
    "PatchLayout",
    "entropy",
    "entropy_patch",
    "entropy_patch_starts",
    "patch_layout",
    "space_patch_starts",
    "static_patch_starts",
]

_ops = torch.ops.blt_ext


@torch.library.register_fake("blt_ext::entropy")
def _entropy_fake(logits):
    torch._check(logits.dim() >= 1, lambda: "blt_ext.entropy: logits must be a tensor [..., V]")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    return logits.new_empty(logits.shape[:-1], dtype=dtype)


@torch.library.register_fake("blt_ext::entropy_patch_starts")
def _entropy_patch_starts_fake(entropies, threshold, threshold_add, monotonicity,
                               include_next_token):
    torch._check(entropies.dim() == 2,
                 lambda: "blt_ext.entropy_patch_starts: entropies must be [B, T]")
    batch, num_bytes = entropies.shape
    return entropies.new_empty((batch, num_bytes + 1), dtype=torch.bool)


@torch.library.register_fake("blt_ext::space_patch_starts")
def _space_patch_starts_fake(tokens, include_next_token):
    torch._check(tokens.dim() == 2, lambda: "blt_ext.space_patch_starts: tokens must be [B, T]")
    batch, num_bytes = tokens.shape
    return tokens.new_empty((batch, num_bytes + 1), dtype=torch.bool)


@torch.library.register_fake("blt_ext::patch_layout")
def _patch_layout_fake(starts, include_next_token, max_patch_length):
    torch._check(starts.dim() == 2, lambda: "blt_ext.patch_layout: starts must be [B, T + 1]")
    batch, width = starts.shape
    return (
        starts.new_empty((batch, width - 1), dtype=torch.long),
        starts.new_empty((batch, width), dtype=torch.long),
        starts.new_empty((batch,), dtype=torch.long),
    )


@torch.library.register_fake("blt_ext::entropy_patch")
def _entropy_patch_fake(logits, threshold, threshold_add, monotonicity, include_next_token,
                        max_patch_length):
    torch._check(logits.dim() == 3, lambda: "blt_ext.entropy_patch: logits must be [B, T, V]")
    batch, num_bytes, _ = logits.shape
    return (
        logits.new_empty((batch, num_bytes), dtype=torch.long),
        logits.new_empty((batch, num_bytes + 1), dtype=torch.long),
        logits.new_empty((batch,), dtype=torch.long),
    )


def entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) over the last dimension.

    Args:
        logits: [..., V] float32, float16, bfloat16 or float64, V >= 1, any strides.

    Returns:
        [...] float32 (float64 for float64 logits), accumulated in float32:
        H = logsumexp(z) - sum_v softmax(z)_v z_v, with 0 · log 0 = 0 for logits at -inf. A row
        with a NaN or +inf logit, or only -inf logits, gives NaN.

    Not differentiable: entropies only decide patch boundaries; no autograd is registered.

    Raises:
        TypeError: logits not floating. ValueError: logits 0-D or V = 0.
    """
    return _ops.entropy(logits)


def entropy_patch_starts(
    entropies: Tensor,
    threshold: float = RELEASED_THRESHOLD,
    threshold_add: Optional[float] = None,
    monotonicity: bool = False,
    include_next_token: bool = True,
) -> Tensor:
    """Patch start mask of per-byte entropies (BLT_SPEC.md c, ``find_entropy_patch_start_ids``).

    Args:
        entropies: [B, T] float (H[t]: entropy of the prediction of byte t + 1), any strides.
        threshold: global threshold (nats); the released models use RELEASED_THRESHOLD. With
            ``monotonicity`` it bounds the entropy increase instead.
        threshold_add: with it (and monotonicity off) a start needs both H[p-1] > threshold and
            H[p-1] - H[p-2] > threshold_add.
        monotonicity: approximate monotonic constraint; takes precedence over threshold_add, as in
            the original.
        include_next_token: column T (the next byte) follows the rule too; else it is False.

    Returns:
        [B, T + 1] bool. Positions 0 and 1 always start; H[0] is never used. For p >= 2:
        global: H[p-1] > threshold. monotonicity: p = 2 starts; p >= 3 iff
        H[p-1] - H[p-2] > threshold. threshold_add: p = 2 starts, p = 3 never; p >= 4 iff
        H[p-1] > threshold and H[p-1] - H[p-2] > threshold_add. Comparisons and differences are
        in the entropies' dtype (thresholds rounded to it), exactly as ``entropies > threshold``.

    Raises:
        ValueError: entropies not 2-D, threshold or threshold_add NaN. TypeError: not floating.
    """
    return _ops.entropy_patch_starts(
        entropies, threshold, threshold_add, monotonicity, include_next_token
    )


def space_patch_starts(tokens: Tensor, include_next_token: bool = True) -> Tensor:
    """Patch start mask of "space" patching (BLT_SPEC.md c, alternatives).

    Args:
        tokens: [B, T] int64 token ids (byte + 4; specials 0-3) in [0, 260).
        include_next_token: column T (the next byte) follows the rule too; else it is False.

    Returns:
        [B, T + 1] bool: positions 0 and 1 start; p >= 2 starts iff byte p - 1 is a special or
        the first of a run of space-like bytes (not [0-9A-Za-z], not a UTF-8 continuation byte).

    Raises:
        ValueError: tokens not 2-D, or (CPU only) a token outside [0, 260). TypeError: not int64.
    """
    return _ops.space_patch_starts(tokens, include_next_token)


def patch_layout(
    starts: Tensor,
    include_next_token: bool = True,
    max_patch_length: Optional[int] = None,
) -> PatchLayout:
    """Patch ids, lengths and counts of a start mask.

    Args:
        starts: [B, T + 1] bool; starts[:, 0] must be True (unless the sequence is empty) and,
            without include_next_token, starts[:, T] False. These two are checked on CPU only:
            on CUDA position 0 always starts and column T is ignored without include_next_token.
        include_next_token: whether position T (the next byte) belongs to the last patch.
        max_patch_length: m >= 1: every patch longer than m is split greedily left to right
            into m, m, ..., remainder; ids, lengths and counts follow the split.

    Returns:
        PatchLayout(patch_ids [B, T] int64, patch_lengths [B, T + 1] int64 zero padded on the
        right (rows sum to T + 1 with include_next_token, else T), patch_counts [B] int64).

    Raises:
        ValueError: starts not 2-D or of width 0, max_patch_length < 1, the value rules above
        (CPU). TypeError: starts not bool.
    """
    return PatchLayout(*_ops.patch_layout(starts, include_next_token, max_patch_length))


def entropy_patch(
    logits: Tensor,
    threshold: float = RELEASED_THRESHOLD,
    threshold_add: Optional[float] = None,
    monotonicity: bool = False,
    include_next_token: bool = True,
    max_patch_length: Optional[int] = None,
) -> PatchLayout:
    """Patch layout of entropy-model logits: ``patch_layout(entropy_patch_starts(entropy(logits),
    threshold, threshold_add, monotonicity, include_next_token), include_next_token,
    max_patch_length)`` in one op (one dispatch; on CUDA the start mask is never materialized).

    Args:
        logits: [B, T, V] float32, float16, bfloat16 or float64, V >= 1, any strides.
        threshold, threshold_add, monotonicity, include_next_token: as entropy_patch_starts; the
            rule is applied to the float32 (float64 for float64 logits) entropies of ``entropy``.
        max_patch_length: as patch_layout.

    Returns:
        PatchLayout, equal bit for bit to the three ops applied in sequence.

    Raises:
        ValueError: logits not 3-D or V = 0, threshold or threshold_add NaN, max_patch_length < 1.
        TypeError: logits not floating.
    """
    return PatchLayout(*_ops.entropy_patch(
        logits, threshold, threshold_add, monotonicity, include_next_token, max_patch_length
    ))
