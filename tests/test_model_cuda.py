"""The model at the released blt-1b shapes on a GPU: the ext kernels against the reference twins.

Random weights (the released ones are not downloadable here), explicit patch lengths of mean 4.5
bytes as the real patcher produces, float32 weights with TF32 off so that the two backends can
only differ by the kernels' own rounding.
"""

import pytest
import torch

from blt_ext.model import ByteLatentTransformer, preset
from blt_ext.testing import random_patch_lengths

# The two 1B models fill tens of GB: under pytest-xdist they run one after the other in one worker.
pytestmark = [
    pytest.mark.cuda,
    pytest.mark.xdist_group("blt-1b"),
    pytest.mark.usefixtures("release_gpu_memory"),
]


def relative_error(a, b):
    """||a - b|| / ||b|| in float32: a float64 copy of the hash tables' gradients (3.07e9 elements) would
    need 24 GB per operand."""
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def no_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


def test_blt_1b_ext_matches_torch_logits_and_gradients(no_tf32):
    torch.manual_seed(0)
    # 4.6e9 weights initialised on the GPU: trunc_normal_ on two CPU threads takes ~60 s per 1e9
    with torch.device("cuda"):
        model = ByteLatentTransformer(preset("blt-1b"), backend="ext")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 260, (2, 2049), generator=g).cuda()
    lengths = random_patch_lengths(2, 2048, generator=g).cuda()
    checked = ["local_encoder", "local_decoder", "hash"]
    results = {}
    for backend in ("ext", "torch"):
        model.backend = backend
        model.zero_grad(set_to_none=True)
        logits = model(tokens[:, :-1], lengths)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
                 if p.grad is not None and any(k in n for k in checked)}
        results[backend] = (logits.detach(), grads)
    (logits_ext, grads_ext), (logits_torch, grads_torch) = results["ext"], results["torch"]
    assert relative_error(logits_ext, logits_torch) < 1e-4
    assert grads_ext.keys() == grads_torch.keys() and len(grads_ext) > 10
    worst = max(grads_ext, key=lambda n: relative_error(grads_ext[n], grads_torch[n]))
    assert relative_error(grads_ext[worst], grads_torch[worst]) < 1e-3, worst
    print(f"blt-1b ext vs torch: logits rel err {relative_error(logits_ext, logits_torch):.2e}, "
          f"worst grad {worst} rel err {relative_error(grads_ext[worst], grads_torch[worst]):.2e}")


def test_blt_1b_bf16_forward_agrees_between_backends():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = ByteLatentTransformer(preset("blt-1b"), backend="ext").to(torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(4, 260, (4, 4096), generator=g).cuda()
    lengths = random_patch_lengths(4, 4096, generator=g).cuda()
    with torch.no_grad():
        logits_ext = model(tokens, lengths)
        model.backend = "torch"
        logits_torch = model(tokens, lengths)
    assert torch.isfinite(logits_ext).all()
    assert relative_error(logits_ext, logits_torch) < 3e-2
