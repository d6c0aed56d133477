"""Entropy patching from entropy-model logits: entropy -> start mask -> patch ids, lengths, counts.

The whole pipeline (ext: the fused entropy_patch op, one dispatch), then each stage alone on the
same inputs (entropy of the logits; entropy_patch_starts of those entropies; patch_layout of those
starts), so that a run shows where the pipeline's time goes.

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

STAGES = ["entropy_patch", "entropy", "entropy_patch_starts", "patch_layout"]
PROVIDERS = {
    "ext": ops,
    "torch": reference,
    "compile": None,  # torch.compile of the reference stage
}


def layout_bytes(batch, num_bytes):
    """Patch ids, lengths and counts (int64) written."""
    return 8 * (batch * num_bytes + batch * (num_bytes + 1) + batch)


def stage_case(stage, logits):
    """(the stage's input tensor, bytes the stage must move at least)."""
    batch, num_bytes, _ = logits.shape
    logits_bytes = logits.numel() * logits.element_size()
    if stage == "entropy_patch":
        return logits, logits_bytes + layout_bytes(batch, num_bytes)
    entropies = ops.entropy(logits)
    if stage == "entropy":
        return logits, logits_bytes + entropies.numel() * entropies.element_size()
    starts = ops.entropy_patch_starts(entropies)
    if stage == "entropy_patch_starts":
        return entropies, entropies.numel() * entropies.element_size() + starts.numel()
    return starts, starts.numel() + layout_bytes(batch, num_bytes)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("stage", STAGES)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_entropy_patch(benchmark, dtype, stage, provider):
    batch, num_bytes, vocab = SHAPE
    logits = random_logits(batch, num_bytes, vocab, dtype=dtype, device=DEVICE,
                           generator=torch.Generator().manual_seed(0))
    x, moved = stage_case(stage, logits)
    module = PROVIDERS[provider]
    fn_of = getattr(module or reference, stage)
    fn_of = compiled(fn_of) if module is None else fn_of

    def fn():
        return fn_of(x)

    name = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
    what = "entropy_patch fwd" if stage == "entropy_patch" else f"entropy_patch stage {stage}"
    run_benchmark(
        benchmark,
        fn,
        provider=provider,
        group=f"{what} B{batch} T{num_bytes} V{vocab} {name}",
        bytes_moved=moved,
    )
