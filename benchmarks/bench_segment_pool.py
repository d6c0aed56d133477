"""Segment pooling of byte states into patches: forward and forward + backward, max and mean.

CUDA: the released BLT-1B encoder shape (B=4, T=8192, D=1024, bf16, mean patch length 4.5,
~1800 patches per row). CPU: B=2, T=4096, D=512 in float32 and bfloat16.
"""

import pytest
import torch
from common import DEVICE, ON_CUDA, compiled, run_benchmark

from blt_ext import ops, reference
from blt_ext.testing.segment_pool import segment_pool_inputs

if ON_CUDA:
    SHAPE, DTYPES = (4, 8192, 1024), (torch.bfloat16,)
else:
    SHAPE, DTYPES = (2, 4096, 512), (torch.float32, torch.bfloat16)

PROVIDERS = {
    "ext": ops.segment_pool,
    "torch": reference.segment_pool,
    "compile": compiled(reference.segment_pool),
}


def bytes_moved(x, num_patches, reduce, backward):
    """x read + out written (+ arg_index written); the backward adds grad_out read
    (+ arg_index read) + grad_x written."""
    batch, _, dim = x.shape
    out = batch * num_patches * dim * x.element_size()
    arg = batch * num_patches * dim * 4 if reduce != "mean" else 0
    forward = x.numel() * x.element_size() + out + arg
    return forward + (out + arg + x.numel() * x.element_size() if backward else 0)


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("reduce", ["max", "mean"])
def test_segment_pool(benchmark, reduce, dtype, backward, provider):
    batch, num_bytes, dim = SHAPE
    x, lengths = segment_pool_inputs(
        batch,
        num_bytes,
        dim,
        dtype=dtype,
        device=DEVICE,
        distinct=False,
        generator=torch.Generator().manual_seed(0),
    )
    pool = PROVIDERS[provider]
    if backward:
        x.requires_grad_()
        grad = torch.randn(batch, lengths.shape[1], dim, device=DEVICE, dtype=dtype)

        def fn():
            return torch.autograd.grad(pool(x, lengths, reduce), x, grad)
    else:

        def fn():
            return pool(x, lengths, reduce)

    name = str(dtype).removeprefix("torch.").replace("float", "fp").replace("bfp", "bf")
    direction = "fwd+bwd" if backward else "fwd"
    run_benchmark(
        benchmark,
        fn,
        provider=provider,
        group=f"segment_pool {reduce} {direction} B{batch} T{num_bytes} D{dim} {name}",
        bytes_moved=bytes_moved(x, lengths.shape[1], reduce, backward),
    )
