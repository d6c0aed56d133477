"""Inputs for the entropy patching ops, shared by tests and benchmarks."""

import torch

from blt_ext.reference.entropy_patch import RELEASED_THRESHOLD

# Threshold modes of entropy_patch_starts as keyword arguments. Entropies from random_entropies
# lie on a grid of 1/8 with some values at RELEASED_THRESHOLD, so every mode meets exact ties.
START_MODES = {
    "global": dict(threshold=RELEASED_THRESHOLD),
    "global_grid": dict(threshold=1.5),
    "monotonicity": dict(threshold=0.25, monotonicity=True),
    "threshold_add": dict(threshold=1.25, threshold_add=0.125),
    "monotonicity_and_add": dict(threshold=0.5, threshold_add=0.25, monotonicity=True),
}


def random_logits(batch, num_bytes, vocab=260, *, dtype=torch.float32, device="cpu", scale=4.0,
                  generator=None):
    """Logits [B, T, V] whose softmax ranges from flat to peaked (per-position temperatures)."""
    logits = torch.randn(batch, num_bytes, vocab, generator=generator, dtype=torch.float64)
    temperature = torch.rand(batch, num_bytes, 1, generator=generator, dtype=torch.float64)
    return (logits * scale * temperature).to(device=device, dtype=dtype)


def random_entropies(batch, num_bytes, *, dtype=torch.float32, device="cpu", tie_fraction=0.2,
                     generator=None):
    """Entropies [B, T] in [0, 3] on a grid of 1/8 (exact in every float dtype, so differences
    are exact too), with ``tie_fraction`` of them at the released threshold rounded to ``dtype``
    or at its neighbours in ``dtype``."""
    grid = torch.randint(0, 25, (batch, num_bytes), generator=generator).double() / 8
    entropies = grid.to(dtype)
    threshold = torch.tensor(RELEASED_THRESHOLD, dtype=dtype)
    near = torch.stack([
        threshold,
        torch.nextafter(threshold, torch.tensor(0.0, dtype=dtype)),
        torch.nextafter(threshold, torch.tensor(3.0, dtype=dtype)),
    ])
    pick = torch.randint(0, 3, (batch, num_bytes), generator=generator)
    tie = torch.rand(batch, num_bytes, generator=generator) < tie_fraction
    return torch.where(tie, near[pick], entropies).to(device)


def random_tokens(batch, num_bytes, *, device="cpu", generator=None):
    """Token ids [B, T] in [0, 260): mostly letters and digits, with runs of spaces and
    punctuation, UTF-8 lead and continuation bytes, and specials."""
    alnum = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    punctuation = " \n\t.,;:!?-_()[]{}'\"/\\@#~`^|"
    pools = [
        torch.tensor([ord(c) for c in alnum]),
        torch.tensor([ord(c) for c in punctuation]),
        torch.arange(0x80, 0x100),
    ]
    # 60% letters and digits, 30% spaces and punctuation, 10% bytes >= 0x80
    draw = torch.rand(batch * num_bytes, generator=generator)
    kind = torch.bucketize(draw, torch.tensor([0.6, 0.9]))
    tokens = torch.empty(batch * num_bytes, dtype=torch.long)
    for k, pool in enumerate(pools):
        chosen = kind == k
        index = torch.randint(0, len(pool), (int(chosen.sum()),), generator=generator)
        tokens[chosen] = pool[index] + 4
    special = torch.rand(batch * num_bytes, generator=generator) < 0.03
    tokens[special] = torch.randint(0, 4, (int(special.sum()),), generator=generator)
    return tokens.view(batch, num_bytes).to(device)


def starts_from_lengths(patch_lengths, num_bytes):
    """Start mask [B, T + 1] of patch lengths [B, P] (zero padded) covering T or T + 1 positions."""
    batch = patch_lengths.shape[0]
    starts = torch.zeros(batch, num_bytes + 1, dtype=torch.bool)
    begins = patch_lengths.cumsum(dim=1) - patch_lengths
    for b in range(batch):
        starts[b, begins[b][patch_lengths[b] > 0]] = True
    return starts


def random_starts(batch, num_bytes, *, include_next_token=True, density=0.3, device="cpu",
                  generator=None):
    """A valid start mask [B, T + 1]: position 0 starts, others with probability ``density``;
    column T is False without include_next_token."""
    starts = torch.rand(batch, num_bytes + 1, generator=generator) < density
    starts[:, 0] = True
    if not include_next_token:
        starts[:, num_bytes] = False
    return starts.to(device)
