"""Run the kernels worth profiling once each at the benchmark shapes, for Nsight Compute: patch
cross-attention per direction and pass (B=4, T=8192, 16 heads x 64, k=2, bf16) and entropy
patching (B=8, T=8192, V=260 bf16 logits; the one-launch layout kernel):

    ncu --clock-control none -k regex:"(encoder|decoder)_(forward|backward)|patch_layout" \\
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \\
        python tools/ncu_kernels.py

(or ``NCU=1 benchmarks/gpu_check.sh LOGDIR``)
"""

import torch

from blt_ext import ops
from blt_ext.testing.entropy_patch import random_logits
from blt_ext.testing.patch_attention import attention_inputs


def main():
    for direction in ("encoder", "decoder"):
        q, k, v, lengths = attention_inputs(
            4, 8192, 16, 64, 2, direction, dtype=torch.bfloat16, device="cuda",
            generator=torch.Generator().manual_seed(0), requires_grad=True,
        )
        out = ops.patch_cross_attention(q, k, v, lengths, 2, direction)
        out.backward(torch.randn_like(out))
    logits = random_logits(8, 8192, dtype=torch.bfloat16, device="cuda",
                           generator=torch.Generator().manual_seed(0))
    ops.entropy_patch(logits)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
