"""Pure-PyTorch hash n-gram ids and embedding (BLT_SPEC.md b), twins of ``blt_ext.ops.hash_ngram``.

Written the way the original BLT code and the transformers port compute them: unfold the
zero-left-padded token rows into n-byte windows, a polynomial hash in torch int64 (which wraps
modulo 2^64), ``torch.remainder`` (floored modulo), then one embedding lookup per table summed
onto the byte embedding.
"""

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# Hash function f uses HASH_PRIMES[f] as its polynomial base.
HASH_PRIMES = [
    1000000007,
    5915587277,
    1500450271,
    3267000013,
    5754853343,
    4093082899,
    9576890767,
    3628273133,
    2860486313,
    5463458053,
    3367900313,
]
MAX_NGRAM_SIZE = 16
DEFAULT_NGRAM_SIZES = (3, 4, 5, 6, 7, 8)
DEFAULT_HASH_VOCAB = 500002


def _check_config(op, ngram_sizes, num_functions):
    if len(ngram_sizes) == 0 or not all(1 <= n <= MAX_NGRAM_SIZE for n in ngram_sizes):
        raise ValueError(
            f"blt_ext.{op}: ngram_sizes must be non-empty, each in [1, 16], got {list(ngram_sizes)}"
        )
    if not 1 <= num_functions <= len(HASH_PRIMES):
        raise ValueError(f"blt_ext.{op}: num_functions must be in [1, 11], got {num_functions}")


def _prime_powers(prime: int, n: int, device) -> Tensor:
    """prime^0 .. prime^(n-1) as int64, each product wrapping modulo 2^64 like the original."""
    powers = [torch.ones((), dtype=torch.long, device=device)]
    for _ in range(n - 1):
        powers.append(powers[-1] * prime)
    return torch.stack(powers)


def hash_ngram_ids(
    tokens: Tensor,
    ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES,
    num_functions: int = 1,
    hash_vocab: int = DEFAULT_HASH_VOCAB,
) -> Tensor:
    """ids [B, T, num_functions * len(ngram_sizes)] int64 in [0, hash_vocab).

    Table ``f * len(ngram_sizes) + k`` hashes n-grams of size ``ngram_sizes[k]`` with prime f.
    """
    _check_config("hash_ngram_ids", ngram_sizes, num_functions)
    if hash_vocab < 1:
        raise ValueError(f"blt_ext.hash_ngram_ids: hash_vocab must be >= 1, got {hash_vocab}")
    num_tables = num_functions * len(ngram_sizes)
    if tokens.size(-1) == 0:  # unfold needs at least one window
        return tokens.new_zeros((*tokens.shape, num_tables))
    tables = []
    for f in range(num_functions):
        for n in ngram_sizes:
            # Window at position j: (x[j-n+1], ..., x[j]), oldest first, x[negative] = 0 (BOE).
            windows = F.pad(tokens, (n - 1, 0)).unfold(-1, n, 1)
            hashes = (windows * _prime_powers(HASH_PRIMES[f], n, tokens.device)).sum(-1)
            tables.append(torch.remainder(hashes, hash_vocab))
    return torch.stack(tables, dim=-1)


def hash_ngram_embedding(
    tokens: Tensor,
    byte_weight: Tensor,
    hash_weight: Tensor,
    ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES,
    num_functions: int = 1,
) -> Tensor:
    """byte_weight[tokens] + sum_i hash_weight[i * V + ids[..., i]].

    hash_weight is the fused [num_tables * V, D] table of the transformers checkpoint.
    """
    _check_config("hash_ngram_embedding", ngram_sizes, num_functions)
    num_tables = num_functions * len(ngram_sizes)
    if hash_weight.size(0) == 0 or hash_weight.size(0) % num_tables != 0:
        raise ValueError(
            f"blt_ext.hash_ngram_embedding: hash_weight.size(0) must be a positive multiple of the "
            f"{num_tables} tables, got {hash_weight.size(0)}"
        )
    vocab = hash_weight.size(0) // num_tables
    with torch.no_grad():
        ids = hash_ngram_ids(tokens, ngram_sizes, num_functions, vocab)
    out = F.embedding(tokens, byte_weight)
    for i in range(num_tables):
        out = out + F.embedding(ids[..., i] + i * vocab, hash_weight)
    return out
