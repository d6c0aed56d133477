"""hash_ngram_embedding, forward and forward + backward: ext vs the eager reference (the
transformers port's per-table loop) vs torch.compile of the reference.

CUDA: the released BLT-1B shape (PERFORMANCE.md rows 1-2): B=8, T=8192, D=1024, byte table of 260
rows + six 500002-row tables (n = 3..8), bf16. CPU: B=2, T=2048, D=256, six 50002-row tables.
"""

import functools

import pytest
import torch
from common import DEVICE, ON_CUDA, compiled, run_benchmark

from blt_ext import ops, reference
from blt_ext.testing.hash_ngram import TOKEN_VOCAB, embedding_weights, random_tokens

NGRAM_SIZES = (3, 4, 5, 6, 7, 8)
TABLES = len(NGRAM_SIZES)
if ON_CUDA:
    BATCH, SEQ, DIM, VOCAB = 8, 8192, 1024, 500002
    CASES = [("fwd", torch.bfloat16), ("fwd+bwd", torch.bfloat16)]
else:
    BATCH, SEQ, DIM, VOCAB = 2, 2048, 256, 50002
    CASES = [("fwd", torch.float32), ("fwd", torch.bfloat16), ("fwd+bwd", torch.float32)]

PROVIDERS = {
    "ext": ops.hash_ngram_embedding,
    "torch": reference.hash_ngram_embedding,
    "compile": compiled(reference.hash_ngram_embedding),
}


@functools.cache
def inputs(dtype):
    """Text-like tokens (printable ASCII + 4 after a BOS) and BLT-initialised tables, per dtype."""
    generator = torch.Generator().manual_seed(0)
    tokens = random_tokens(BATCH, SEQ, text=True, generator=generator, device=DEVICE)
    byte_weight, hash_weight = embedding_weights(TABLES, VOCAB, DIM, dtype=dtype, device=DEVICE)
    grad_output = torch.randn(BATCH, SEQ, DIM, dtype=dtype, device=DEVICE)
    return tokens, byte_weight.requires_grad_(), hash_weight.requires_grad_(), grad_output


def bytes_moved(direction, dtype):
    """The fewest bytes each direction must move. Forward: write the output and read the byte row
    and the six hash rows of every position (B*T*D*size*(1 + 7)); tokens are negligible.
    Backward adds: read grad_output once and write both dense gradients (the 6 GB of table
    gradients at the CUDA shape dominate)."""
    size = torch.finfo(dtype).bits // 8
    forward = BATCH * SEQ * DIM * size * (1 + 1 + TABLES)
    if direction == "fwd":
        return forward
    return forward + BATCH * SEQ * DIM * size + (TOKEN_VOCAB + TABLES * VOCAB) * DIM * size


@pytest.mark.parametrize("provider", list(PROVIDERS))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-{str(c[1]).removeprefix('torch.')}")
def test_hash_ngram_embedding(benchmark, case, provider):
    direction, dtype = case
    fn = PROVIDERS[provider]
    tokens, byte_weight, hash_weight, grad_output = inputs(dtype)

    if direction == "fwd":

        def step():
            with torch.no_grad():
                return fn(tokens, byte_weight, hash_weight, NGRAM_SIZES, 1)

    else:

        def step():
            out = fn(tokens, byte_weight, hash_weight, NGRAM_SIZES, 1)
            return torch.autograd.grad(out, (byte_weight, hash_weight), grad_output)

    dtype_name = str(dtype).removeprefix("torch.")
    group = f"hash_ngram_embedding {direction} B{BATCH} T{SEQ} D{DIM} 6x{VOCAB} {dtype_name}"
    run_benchmark(
        benchmark, step, group=group, provider=provider, bytes_moved=bytes_moved(direction, dtype)
    )
