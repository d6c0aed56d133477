"""Run the patch cross-attention kernels once per direction and pass at the benchmark shape
(B=4, T=8192, 16 heads x 64, k=2, bf16), for Nsight Compute:

    ncu --clock-control none -k regex:"(encoder|decoder)_(forward|backward)" \\
        --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \\
        python tools/ncu_attention.py

(or ``NCU=1 benchmarks/gpu_check.sh LOGDIR``)
"""

import torch

from blt_ext import ops
from blt_ext.testing.patch_attention import attention_inputs


def main():
    for direction in ("encoder", "decoder"):
        q, k, v, lengths = attention_inputs(
            4, 8192, 16, 64, 2, direction, dtype=torch.bfloat16, device="cuda",
            generator=torch.Generator().manual_seed(0), requires_grad=True,
        )
        out = ops.patch_cross_attention(q, k, v, lengths, 2, direction)
        out.backward(torch.randn_like(out))
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
