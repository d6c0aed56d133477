"""Entropy threshold calibration (``blt-ext calibrate``): the threshold for a target patch size.

The entropy threshold decides BLT's compute: fewer, longer patches mean fewer global steps. A
released threshold fits only its own entropy model; this module finds, for any entropy model
and corpus, the threshold whose patches have a given mean size (bytes per patch), by bisection
over entropies computed once (the mean patch size never decreases as the threshold rises), and
reports the histogram of patch sizes it gives.

Patches are counted per row of bytes as in training data (``include_next_token=False``: every
row's first byte is a patch of its own, then the entropy rule decides), so the mean patch size is
``bytes / patches`` over all rows.

Example::

    from blt_ext.calibrate import find_threshold
    cal = find_threshold(entropies, target=4.5)          # entropies [N, T] fp32
    print(cal.threshold, cal.mean_patch_size, format_histogram(cal.histogram))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .nn import backend_ops

# histogram buckets: each size up to 16, then powers of two
_BUCKETS = [(n, n) for n in range(1, 17)] + [(17, 32), (33, 64), (65, 128), (129, None)]


class Calibration(NamedTuple):
    threshold: float  # nats (rounded to fp32, as the patching ops compare)
    mean_patch_size: float  # bytes per patch achieved with it
    target: float
    num_bytes: int
    num_patches: int
    histogram: dict[int, int]  # patch length -> number of patches
    iterations: int  # bisection steps taken

    def to_dict(self) -> dict:
        d = self._asdict()
        d["histogram"] = {str(k): v for k, v in self.histogram.items()}
        return d


def patch_layout_at(entropies: torch.Tensor, threshold: float, *, threshold_add: float | None = None,
                    monotonicity: bool = False, max_patch_length: int | None = None, backend: str = "ext"):
    """PatchLayout of rows of bytes with entropies [N, T] under ``threshold`` (lengths sum to T)."""
    ops = backend_ops(backend)
    starts = ops.entropy_patch_starts(entropies, threshold, threshold_add, monotonicity, False)
    return ops.patch_layout(starts, False, max_patch_length)


def patch_size_histogram(patch_lengths: torch.Tensor) -> dict[int, int]:
    """{length: count} of the non-zero entries of ``patch_lengths``."""
    lengths = patch_lengths[patch_lengths > 0]
    counts = torch.bincount(lengths.cpu())
    return {int(n): int(counts[n]) for n in torch.nonzero(counts).flatten()}


def find_threshold(entropies: torch.Tensor, target: float, *, tolerance: float = 0.005, max_iterations: int = 64,
                   threshold_add: float | None = None, monotonicity: bool = False,
                   max_patch_length: int | None = None, backend: str = "ext") -> Calibration:
    """The threshold whose mean patch size over ``entropies`` [N, T] is closest to ``target``.

    Bisection stops once the mean is within ``tolerance`` (relative) of the target or the
    interval is below fp32 resolution; the best threshold seen is returned. The patching rule is
    the one selected by ``threshold_add`` / ``monotonicity`` (as in BLTConfig), with
    ``max_patch_length``. Raises ValueError when the target lies outside the range these
    entropies can reach (every byte a patch .. only the forced patches).
    """
    if entropies.dim() != 2 or entropies.shape[1] < 2:
        raise ValueError(f"find_threshold: entropies must be [N, T] with T >= 2, got {tuple(entropies.shape)}")
    if not (target >= 1 and math.isfinite(target)):
        raise ValueError(f"find_threshold: target must be a finite number >= 1, got {target}")
    entropies = entropies.float()
    rules = {"threshold_add": threshold_add, "monotonicity": monotonicity, "max_patch_length": max_patch_length,
             "backend": backend}
    num_bytes = entropies.numel()

    def mean_size(threshold: float) -> float:
        return num_bytes / int(patch_layout_at(entropies, threshold, **rules).patch_counts.sum())

    # the rules compare entropies and their differences: beyond +-span nothing changes
    span = 2 * float(entropies.abs().max()) + 1
    lo, hi = -span, span
    smallest, largest = mean_size(lo), mean_size(hi)
    if target < smallest * (1 - tolerance) or target > largest * (1 + tolerance):
        raise ValueError(f"find_threshold: target {target} is outside the mean patch sizes these entropies reach, "
                         f"[{smallest:.3f}, {largest:.3f}] bytes (rows of {entropies.shape[1]} bytes"
                         f"{f', max_patch_length {max_patch_length}' if max_patch_length else ''})")
    best = min(((lo, smallest), (hi, largest)), key=lambda tm: abs(tm[1] - target))
    iterations = 0
    while iterations < max_iterations and abs(best[1] - target) > tolerance * target:
        mid = float(torch.tensor((lo + hi) / 2, dtype=torch.float32))
        if mid in (lo, hi):  # the interval is below fp32 resolution
            break
        iterations += 1
        size = mean_size(mid)
        if abs(size - target) < abs(best[1] - target):
            best = (mid, size)
        if size < target:
            lo = mid
        else:
            hi = mid
    threshold = float(torch.tensor(best[0], dtype=torch.float32))
    layout = patch_layout_at(entropies, threshold, **rules)
    num_patches = int(layout.patch_counts.sum())
    return Calibration(threshold, num_bytes / num_patches, float(target), num_bytes, num_patches,
                       patch_size_histogram(layout.patch_lengths), iterations)


def format_histogram(histogram: dict[int, int], width: int = 40) -> str:
    """Text bars of a patch-size histogram (sizes 1-16 one by one, then power-of-two buckets),
    with each bucket's share of the patches and of the bytes."""
    total = sum(histogram.values())
    total_bytes = sum(n * c for n, c in histogram.items())
    largest = max(histogram, default=0)
    rows = []
    for lo, hi in _BUCKETS:
        if lo > largest:
            break
        count = sum(c for n, c in histogram.items() if n >= lo and (hi is None or n <= hi))
        size_bytes = sum(n * c for n, c in histogram.items() if n >= lo and (hi is None or n <= hi))
        label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f"{lo}+")
        rows.append((label, count, size_bytes))
    peak = max((r[1] for r in rows), default=1) or 1
    lines = [f"{'size':>7}  {'patches':>9}  {'share':>6}  {'bytes':>6}"]
    for label, count, size_bytes in rows:
        bar = "#" * round(width * count / peak)
        lines.append(f"{label:>7}  {count:>9}  {100 * count / max(1, total):5.1f}%  "
                     f"{100 * size_bytes / max(1, total_bytes):5.1f}%  {bar}")
    return "\n".join(lines)


def calibrate(entropy_model: torch.nn.Module, rows: torch.Tensor, target: float, *, batch_size: int = 16,
              backend: str = "ext", device=None, progress=None, **rules) -> Calibration:
    """Compute the entropies of ``rows`` [N, T] with ``entropy_model`` once, then
    :func:`find_threshold` (``rules``: threshold_add, monotonicity, max_patch_length, tolerance)."""
    from .train import compute_entropies

    entropies = compute_entropies(entropy_model, rows, batch_size, backend, device, progress)
    return find_threshold(entropies, target, backend=backend, **rules)
