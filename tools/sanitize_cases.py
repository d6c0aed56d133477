"""Small cases of every CUDA kernel, forward and backward, for compute-sanitizer (memcheck, racecheck).

Shapes are tiny but ragged (odd lengths, a long patch, empty patches) so that tails and bounds are hit.
"""

import torch

from blt_ext import ops
from blt_ext.testing import random_patch_lengths


def main():
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        B, T, D, H, Dh, slots = 2, 67, 40, 2, 24, 2
        tokens = torch.randint(0, 260, (B, T), generator=g).to(dev)
        byte_w = torch.randn(260, D, generator=g).to(dev, dtype).requires_grad_()
        hash_w = torch.randn(6 * 101, D, generator=g).to(dev, dtype).requires_grad_()
        ops.hash_ngram_embedding(tokens, byte_w, hash_w).sum().backward()
        torch.use_deterministic_algorithms(True)
        ops.hash_ngram_embedding(tokens, byte_w, hash_w).sum().backward()
        torch.use_deterministic_algorithms(False)
        ops.hash_ngram_ids(tokens, (1, 3, 16), 3, 7)

        logits = (3 * torch.randn(B, T, 260, generator=g)).to(dev, dtype)
        ops.entropy_patch(logits, max_patch_length=5)
        ops.entropy_patch(logits, 1.0, 0.1, include_next_token=False, max_patch_length=3)
        starts = ops.entropy_patch_starts(ops.entropy(logits), 0.1, monotonicity=True)
        ops.patch_layout(starts, include_next_token=True, max_patch_length=5)
        ops.patch_layout(ops.space_patch_starts(tokens), include_next_token=True)
        # 300 positions: three tiles of the layout kernel a row, so its look-back runs
        long_logits = (3 * torch.randn(B, 300, 260, generator=g)).to(dev, dtype)
        ops.entropy_patch(long_logits)
        ops.patch_layout(ops.entropy_patch_starts(ops.entropy(long_logits), 1.0), max_patch_length=4)

        for layout in ("random", "long_patch", "all_ones"):
            lengths = random_patch_lengths(B, T, layout=layout, generator=g)
            lengths = torch.cat([lengths, torch.zeros(B, 2, dtype=torch.long)], 1).to(dev)
            P = lengths.shape[1]
            x = torch.randn(B, T, D, generator=g).to(dev, dtype).requires_grad_()
            for reduce in ("max", "mean", "min"):
                ops.segment_pool(x, lengths, reduce).sum().backward()
            # Dh 24: lanes split a patch's bytes; H 4 x Dh 64: the 16-byte fast path, one byte a lane group
            for heads, head_dim in ((H, Dh), (4, 64)):
                q = torch.randn(B, P * slots, heads, head_dim, generator=g).to(dev, dtype).requires_grad_()
                kv = torch.randn(B, T, heads, head_dim, generator=g).to(dev, dtype).requires_grad_()
                ops.patch_cross_attention(q, kv, kv, lengths, slots, "encoder").sum().backward()
                qd = torch.randn(B, T, heads, head_dim, generator=g).to(dev, dtype).requires_grad_()
                kvd = torch.randn(B, P * slots, heads, head_dim, generator=g).to(dev, dtype).requires_grad_()
                ops.patch_cross_attention(qd, kvd, kvd, lengths, slots, "decoder").sum().backward()
    torch.cuda.synchronize()
    print("sanitize cases: all kernels ran")


if __name__ == "__main__":
    main()
