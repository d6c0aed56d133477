"""Entropy patching from entropy-model logits: entropy -> start mask -> patch ids, lengths, counts.

CUDA: B=8 rows of T=8192 bytes, V=260, bf16 logits (the released entropy model's output).
CPU: B=4, T=2048, V=260 in float32 and bfloat16. Global threshold, next byte included.
"""

import pytest
import torch
from common import DEVICE, ON_CUDA, compiled, run_benchmark

from blt_ext import ops, reference
from blt_ext.testing.entropy_patch import random_logits

if ON_CUDA:
    SHAPE, DTYPES = (8, 8192, 260), (torch.bfloat16,)
else:
    SHAPE, DTYPES = (4, 2048, 260), (torch.float32, torch.bfloat16)

PROVIDERS = {
    "ext": ops.entropy_patch,
    "torch": reference.entropy_patch,
    "compile": compiled(reference.entropy_patch),
}


def bytes_moved(logits):
    """Logits read + patch ids, lengths and counts (int64) written."""
    batch, num_bytes, _ = logits.shape
    outputs = batch * num_bytes + batch * (num_bytes + 1) + batch
    return logits.numel() * logits.element_size() + 8 * outputs


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_entropy_patch(benchmark, dtype, provider):
    batch, num_bytes, vocab = SHAPE
    logits = random_logits(batch, num_bytes, vocab, dtype=dtype, device=DEVICE,
                           generator=torch.Generator().manual_seed(0))
    patch = PROVIDERS[provider]

    def fn():
        return patch(logits)

    name = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
    run_benchmark(
        benchmark,
        fn,
        provider=provider,
        group=f"entropy_patch fwd B{batch} T{num_bytes} V{vocab} {name}",
        bytes_moved=bytes_moved(logits),
    )
