"""Input factories and tolerances shared by the tests and the benchmarks.

Each op family has a module here (``blt_ext.testing.hash_ngram`` ...) that builds its inputs;
this module holds what several families share: random patch layouts and float tolerances.
"""

import contextlib

import torch

# Absolute and relative tolerance of an op's output against a float64 reference, by input dtype.
# The kernels accumulate in float32, so the error is the rounding of the inputs and the output.
TOLERANCES = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

PATCH_LAYOUTS = ("random", "one_patch", "all_ones", "long_patch")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True):
    """``torch.use_deterministic_algorithms(enabled)`` for the block, the previous setting after."""
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous)


def assert_close_to_reference(actual, expected, dtype=None, scale=1.0, msg=""):
    """Compare ``actual`` (any float dtype) with a float64 ``expected`` at ``dtype``'s tolerance.

    ``scale`` widens the tolerance for results that sum many rounded terms. ``expected`` may live
    on another device (a float64 reference is often computed on the CPU).
    """
    atol, rtol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(
        actual.double(),
        expected.to(actual.device, torch.float64),
        atol=atol * scale,
        rtol=rtol * scale,
        msg=msg or None,
    )


def random_patch_lengths(
    batch,
    num_bytes,
    *,
    layout="random",
    mean_length=4.5,
    include_next_token=True,
    num_patches=None,
    generator=None,
):
    """Patch lengths [B, P] (int64, zero padded on the right) that cover ``num_bytes`` bytes.

    Rows sum to ``num_bytes + 1`` with ``include_next_token`` (the last patch also holds the
    not-yet-seen next byte) and to ``num_bytes`` without. Layouts: ``random`` (a first patch of
    one byte as BLT requires, then lengths of mean ``mean_length``), ``one_patch`` (a single
    patch), ``all_ones`` (every patch one byte), ``long_patch`` (a first byte, then one patch
    holding all but the last few bytes, longer than any kernel tile). ``num_patches`` pads
    the result to that width; by default it is the widest row.
    """
    if layout not in PATCH_LAYOUTS:
        raise ValueError(f"layout must be one of {PATCH_LAYOUTS}, got {layout!r}")
    total = num_bytes + int(include_next_token)
    rows = []
    for _ in range(batch):
        if total == 0:
            lengths = []
        elif layout == "one_patch":
            lengths = [total]
        elif layout == "all_ones":
            lengths = [1] * total
        elif layout == "long_patch":
            tail = min(3, max(total - 2, 0))
            lengths = [1, total - 1 - tail] + [1] * tail if total > 1 else [1]
            lengths = [n for n in lengths if n > 0]
        else:
            lengths = [1]
            remaining = total - 1
            p = 1.0 / max(mean_length, 1.0)
            while remaining > 0:
                draw = int(torch.empty(1).geometric_(p, generator=generator).item())
                n = min(max(draw, 1), remaining)
                lengths.append(n)
                remaining -= n
        rows.append(lengths)
    width = max((len(r) for r in rows), default=0)
    if num_patches is not None:
        if num_patches < width:
            raise ValueError(f"num_patches={num_patches} is fewer than the {width} patches drawn")
        width = num_patches
    out = torch.zeros(batch, max(width, 1) if total else width, dtype=torch.long)
    for b, lengths in enumerate(rows):
        out[b, : len(lengths)] = torch.tensor(lengths, dtype=torch.long)
    return out


def one_byte_patches_with_gaps(batch, num_bytes, gaps):
    """Lengths [B, P]: one-byte patches over ``num_bytes + 1`` positions (the last holds the next
    byte), with a zero-length patch inserted before each patch index in ``gaps``. Thousands of
    patches a row, with empty ones where a test wants them (e.g. on a kernel's tile edges)."""
    row = [1] * (num_bytes + 1)
    for index in sorted(gaps, reverse=True):
        row.insert(index, 0)
    return torch.tensor([row] * batch)
