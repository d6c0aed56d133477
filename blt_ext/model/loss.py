"""Next-byte loss of a byte LM: mean cross-entropy over unmasked bytes and bits per byte."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F


class LossOutput(NamedTuple):
    loss: torch.Tensor  # mean nats per counted byte (what to backpropagate)
    nll_sum: torch.Tensor  # total nats over counted bytes
    num_bytes: torch.Tensor  # counted bytes (targets where the mask is True)
    bits_per_byte: torch.Tensor  # nll_sum / ln 2 / num_bytes


def next_byte_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> LossOutput:
    """Cross-entropy of ``logits`` [B, T, V] against ``targets`` [B, T], counting only ``mask``.

    As the original trainer: padding (BOE) targets are masked out, special targets (EOS) count.
    A batch without counted bytes gives a loss of 0 (not NaN) so accumulation stays finite.
    """
    nll = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), reduction="none").view_as(targets)
    if mask is None:
        mask = torch.ones_like(targets, dtype=torch.bool)
    weights = mask.to(nll.dtype)
    nll_sum = (nll * weights).sum()
    num_bytes = weights.sum()
    denom = num_bytes.clamp_min(1.0)
    return LossOutput(nll_sum / denom, nll_sum, num_bytes, nll_sum / math.log(2) / denom)
