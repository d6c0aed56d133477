"""Pure-PyTorch twins of the entropy patching ops (BLT_SPEC.md c, "Patch ids").

Written for clarity and exactness: every rule below is the spec's rule, applied with plain
tensor operations, each batch row patched on its own (the original flattens the batch and lets
rows bleed into each other, a known bug we do not reproduce).

Positions p = 0 .. T of a row of T bytes: p < T are the bytes, p = T is the not-yet-seen next
byte, which belongs to the sequence only with ``include_next_token``. A start mask [B, T + 1]
marks the first position of every patch.
"""

from typing import NamedTuple, Optional

import torch
from torch import Tensor

# The global entropy threshold of the released BLT models, in nats.
RELEASED_THRESHOLD = 1.335442066192627

# Byte ids are byte + OFFSET; ids below OFFSET are the specials (BOE, BOS, EOS, BPE).
OFFSET = 4


class PatchLayout(NamedTuple):
    """Where the patches of each row are.

    patch_ids: [B, T] int64, index of the patch holding byte t.
    patch_lengths: [B, T + 1] int64, patch lengths left to right, zero padded on the right; a
        row sums to T + 1 with include_next_token (the last patch also holds the next byte),
        else to T.
    patch_counts: [B] int64, number of patches of each row.
    """

    patch_ids: Tensor
    patch_lengths: Tensor
    patch_counts: Tensor


def _check_threshold(value, name):
    if value != value:
        raise ValueError(f"blt_ext.entropy_patch_starts: {name} must not be NaN, got {value}")


def _check_2d(tensor, op, name, layout):
    if tensor.dim() != 2:
        raise ValueError(
            f"blt_ext.{op}: {name} must be a 2-D tensor {layout}, got shape {list(tensor.shape)}"
        )


def entropy(logits: Tensor) -> Tensor:
    """Entropy in nats of softmax(logits) over the last dim: [..., V] -> [...].

    float32 result (float64 for float64 logits); 0 · log 0 counts as 0 (logits at -inf).
    Not differentiable by design of the op, but this twin is (plain autograd).
    """
    if logits.dim() < 1:
        raise ValueError("blt_ext.entropy: logits must be a tensor [..., V], got a 0-D tensor")
    if not logits.is_floating_point():
        raise TypeError(f"blt_ext.entropy: logits must be a floating tensor, got {logits.dtype}")
    x = logits.double() if logits.dtype == torch.float64 else logits.float()
    log_probs = torch.log_softmax(x, dim=-1)
    probs = log_probs.exp()
    p_log_p = torch.where(probs == 0, 0.0, probs * log_probs)
    return -p_log_p.sum(dim=-1)


def entropy_patch_starts(
    entropies: Tensor,
    threshold: float = RELEASED_THRESHOLD,
    threshold_add: Optional[float] = None,
    monotonicity: bool = False,
    include_next_token: bool = True,
) -> Tensor:
    """Patch start mask [B, T + 1] (bool) of entropies [B, T] (BLT_SPEC.md c).

    Positions 0 and 1 always start a patch; H[0] is never used. For p >= 2 the rule sees
    H[p - 1] (the entropy of predicting byte p) and H[p - 2]:

    - global (default): H[p-1] > threshold;
    - monotonicity: p = 2 starts; p >= 3 iff H[p-1] - H[p-2] > threshold;
    - threshold_add set (and monotonicity off, which takes precedence as in the original):
      p = 2 starts, p = 3 never; p >= 4 iff H[p-1] > threshold and H[p-1] - H[p-2] > threshold_add.

    Comparisons and differences are in the entropies' dtype (the threshold is rounded to it), as
    ``entropies > threshold`` does. Column T follows the same rule with include_next_token, else
    it is False.
    """
    _check_2d(entropies, "entropy_patch_starts", "entropies", "[B, T]")
    _check_threshold(threshold, "threshold")
    if threshold_add is not None:
        _check_threshold(threshold_add, "threshold_add")
    batch, num_bytes = entropies.shape
    # Candidates for p = 2 .. T: current = H[p-1], previous = H[p-2].
    current, previous = entropies[:, 1:], entropies[:, :-1]
    if monotonicity:
        rule = current - previous > threshold
        rule[:, :1] = True
    elif threshold_add is not None:
        rule = (current > threshold) & (current - previous > threshold_add)
        rule[:, :1] = True
        rule[:, 1:2] = False
    else:
        rule = current > threshold
    starts = torch.zeros(batch, num_bytes + 1, dtype=torch.bool, device=entropies.device)
    starts[:, :2] = True
    starts[:, 2:] = rule
    if not include_next_token:
        starts[:, num_bytes] = False
    return starts


def _space_like(tokens: Tensor) -> Tensor:
    """Bytes that end a word: not [0-9A-Za-z], not a UTF-8 continuation byte; specials too."""
    byte = tokens - OFFSET
    alnum = (
        ((byte >= ord("0")) & (byte <= ord("9")))
        | ((byte >= ord("A")) & (byte <= ord("Z")))
        | ((byte >= ord("a")) & (byte <= ord("z")))
    )
    continuation = (byte >= 0x80) & (byte < 0xC0)
    return ~alnum & ~continuation


def space_patch_starts(tokens: Tensor, include_next_token: bool = True) -> Tensor:
    """Patch start mask [B, T + 1] of token ids [B, T] (int64 in [0, 260)), "space" patching.

    Positions 0 and 1 start; p >= 2 starts iff byte p - 1 is the first space-like byte of a run
    of them, or a special id (< 4). Column T is False without include_next_token.
    """
    _check_2d(tokens, "space_patch_starts", "tokens", "[B, T]")
    batch, num_bytes = tokens.shape
    space = _space_like(tokens)
    run_initial = space.clone()
    run_initial[:, 1:] &= ~space[:, :-1]
    ends = run_initial | (tokens < OFFSET)
    starts = torch.zeros(batch, num_bytes + 1, dtype=torch.bool, device=tokens.device)
    starts[:, :2] = True
    starts[:, 2:] = ends[:, 1:]
    if not include_next_token:
        starts[:, num_bytes] = False
    return starts


def static_patch_starts(
    batch: int,
    num_bytes: int,
    patch_size: int,
    include_next_token: bool = True,
    device=None,
) -> Tensor:
    """Patch start mask [batch, num_bytes + 1] of fixed-size patches: every multiple of
    ``patch_size`` within the sequence (num_bytes + 1 positions with include_next_token)."""
    if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
        raise ValueError(
            f"blt_ext.static_patch_starts: patch_size must be an integer >= 1, got {patch_size!r}"
        )
    if batch < 0 or num_bytes < 0:
        raise ValueError(
            f"blt_ext.static_patch_starts: batch and num_bytes must be >= 0, got {batch} and "
            f"{num_bytes}"
        )
    positions = torch.arange(num_bytes + 1, device=device)
    row = (positions % patch_size == 0) & (positions < num_bytes + int(include_next_token))
    return row.expand(batch, -1).clone()


def _split_long_patches(starts: Tensor, max_patch_length: int) -> Tensor:
    """Split every patch longer than m into m, m, ..., remainder, as the original splits its
    list of lengths; one row at a time."""
    out = torch.zeros_like(starts)
    for row, starts_row in enumerate(starts.cpu()):
        positions = starts_row.nonzero().flatten().tolist() + [starts_row.numel()]
        lengths = []
        for begin, end in zip(positions[:-1], positions[1:]):
            length = end - begin
            while length > max_patch_length:
                lengths.append(max_patch_length)
                length -= max_patch_length
            lengths.append(length)
        split_starts = torch.tensor([0] + lengths[:-1], dtype=torch.long).cumsum(0)
        out[row, split_starts.to(starts.device)] = True
    return out


def patch_layout(
    starts: Tensor,
    include_next_token: bool = True,
    max_patch_length: Optional[int] = None,
) -> PatchLayout:
    """Patch ids, lengths and counts of a start mask [B, T + 1] (see PatchLayout).

    starts[:, 0] must be True (when the sequence is not empty) and, without
    include_next_token, starts[:, T] False. With max_patch_length m every patch longer than m is
    split greedily into m, m, ..., remainder. This twin does not check the values.
    """
    _check_2d(starts, "patch_layout", "starts", "[B, T + 1]")
    if starts.dtype != torch.bool:
        raise TypeError(
            f"blt_ext.patch_layout: starts must have dtype torch.bool, got {starts.dtype}"
        )
    if max_patch_length is not None and max_patch_length < 1:
        raise ValueError(
            f"blt_ext.patch_layout: max_patch_length must be >= 1, got {max_patch_length}"
        )
    batch, width = starts.shape
    num_bytes = width - 1
    seq_len = num_bytes + int(include_next_token)
    starts = starts[:, :seq_len]
    if max_patch_length is not None and batch > 0 and seq_len > 0:
        starts = _split_long_patches(starts, max_patch_length)
    # Patch of each position = number of starts at or before it, minus one.
    patch_of = starts.long().cumsum(dim=1) - 1
    patch_lengths = torch.zeros(batch, width, dtype=torch.long, device=starts.device)
    patch_lengths.scatter_add_(1, patch_of, torch.ones_like(patch_of))
    return PatchLayout(patch_of[:, :num_bytes], patch_lengths, starts.sum(dim=1))


def entropy_patch(
    logits: Tensor,
    threshold: float = RELEASED_THRESHOLD,
    threshold_add: Optional[float] = None,
    monotonicity: bool = False,
    include_next_token: bool = True,
    max_patch_length: Optional[int] = None,
) -> PatchLayout:
    """Patch layout of entropy-model logits [B, T, V]: entropy -> start mask -> layout."""
    if logits.dim() != 3:
        raise ValueError(
            f"blt_ext.entropy_patch: logits must be a 3-D tensor [B, T, V], got shape "
            f"{list(logits.shape)}"
        )
    starts = entropy_patch_starts(
        entropy(logits), threshold, threshold_add, monotonicity, include_next_token
    )
    return patch_layout(starts, include_next_token, max_patch_length)
