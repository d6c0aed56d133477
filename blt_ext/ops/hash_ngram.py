"""Hash n-gram ids and embedding (BLT_SPEC.md b) on the blt_ext kernels.

Twins of ``blt_ext.reference.hash_ngram`` with the same names and signatures. The embedding
hashes in the kernel (no ids tensor), sums the byte row and every table's row of a position in
one pass with float32 accumulation (float64 for float64 weights), and has a fused backward.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ..reference.hash_ngram import DEFAULT_HASH_VOCAB, DEFAULT_NGRAM_SIZES

__all__ = ["hash_ngram_embedding", "hash_ngram_ids"]

_ops = torch.ops.blt_ext


@torch.library.register_fake("blt_ext::hash_ngram_ids")
def _hash_ngram_ids_fake(tokens, ngram_sizes, num_functions, hash_vocab):
    return tokens.new_empty((tokens.size(0), tokens.size(1), num_functions * len(ngram_sizes)))


@torch.library.register_fake("blt_ext::hash_ngram_embedding")
def _hash_ngram_embedding_fake(tokens, byte_weight, hash_weight, ngram_sizes, num_functions):
    # Mixed devices where one is "meta" dispatch here rather than to a device kernel.
    for name, weight in (("byte_weight", byte_weight), ("hash_weight", hash_weight)):
        if weight.device != tokens.device:
            raise ValueError(
                f"blt_ext.hash_ngram_embedding: tokens and {name} must be on the same device, "
                f"got {tokens.device} and {weight.device}"
            )
    return byte_weight.new_empty(
        (tokens.size(0), tokens.size(1), byte_weight.size(1)), device=tokens.device
    )


@torch.library.register_fake("blt_ext::hash_ngram_embedding_backward")
def _hash_ngram_embedding_backward_fake(
    grad_output, tokens, byte_rows, hash_rows, ngram_sizes, num_functions, deterministic
):
    if grad_output.device != tokens.device:
        raise ValueError(
            "blt_ext.hash_ngram_embedding_backward: grad_output and tokens must be on the same "
            f"device, got {grad_output.device} and {tokens.device}"
        )
    dim = grad_output.size(2)
    return grad_output.new_empty((byte_rows, dim)), grad_output.new_empty((hash_rows, dim))


def _embedding_setup_context(ctx, inputs, output):
    tokens, byte_weight, hash_weight, ngram_sizes, num_functions = inputs
    ctx.save_for_backward(tokens)
    ctx.byte_rows = byte_weight.size(0)
    ctx.hash_rows = hash_weight.size(0)
    ctx.ngram_sizes = ngram_sizes
    ctx.num_functions = num_functions


def _embedding_backward(ctx, grad_output):
    (tokens,) = ctx.saved_tensors
    grad_byte, grad_hash = _ops.hash_ngram_embedding_backward(
        grad_output,
        tokens,
        ctx.byte_rows,
        ctx.hash_rows,
        ctx.ngram_sizes,
        ctx.num_functions,
        torch.are_deterministic_algorithms_enabled(),
    )
    return None, grad_byte, grad_hash, None, None


torch.library.register_autograd(
    "blt_ext::hash_ngram_embedding", _embedding_backward, setup_context=_embedding_setup_context
)


def hash_ngram_ids(
    tokens: Tensor,
    ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES,
    num_functions: int = 1,
    hash_vocab: int = DEFAULT_HASH_VOCAB,
) -> Tensor:
    """Hash n-gram ids of every position, for every (hash function, n-gram size) table.

    Args:
        tokens: [B, T] int64 local-encoder ids (byte + 4, specials 0..3), values in [0, 260).
        ngram_sizes: 1 to 16 n-gram sizes, each in [1, 16].
        num_functions: hash functions, in [1, 11]; function f uses ``HASH_PRIMES[f]``.
        hash_vocab: rows V of each table, >= 1.

    Returns:
        [B, T, num_functions * len(ngram_sizes)] int64 in [0, hash_vocab). Table
        ``f * len(ngram_sizes) + k`` holds, at position j, the hash of the window
        ``(x[j-n+1], ..., x[j])`` with ``n = ngram_sizes[k]`` and ``x[negative] = 0``:
        ``sum_i w[i] * p^i`` (oldest byte times p^0) wrapped modulo 2^64 as int64, floored
        modulo ``hash_vocab``.

    Raises:
        TypeError: tokens not int64. ValueError: tokens not 2-D or a value outside [0, 260)
        (checked on CPU only: a CUDA check would synchronize), a bad ngram size,
        num_functions or hash_vocab.
    """
    return _ops.hash_ngram_ids(tokens, list(ngram_sizes), num_functions, hash_vocab)


def hash_ngram_embedding(
    tokens: Tensor,
    byte_weight: Tensor,
    hash_weight: Tensor,
    ngram_sizes: Sequence[int] = DEFAULT_NGRAM_SIZES,
    num_functions: int = 1,
) -> Tensor:
    """Byte embedding plus the hash n-gram embeddings of every table (the BLT encoder input).

    ``out[b, t] = byte_weight[tokens[b, t]] + sum_i hash_weight[i * V + ids[b, t, i]]`` with
    ``ids = hash_ngram_ids(tokens, ngram_sizes, num_functions, V)`` and
    ``V = hash_weight.size(0) // num_tables`` (the transformers checkpoint's fused table: table i
    at rows ``[i * V, (i + 1) * V)``).

    Args:
        tokens: [B, T] int64, values in [0, byte_weight.size(0)).
        byte_weight: [byte_rows, D] float32, float16, bfloat16 or float64.
        hash_weight: [num_tables * V, D], same dtype, D and device as byte_weight;
            num_tables = num_functions * len(ngram_sizes).
        ngram_sizes, num_functions: as in :func:`hash_ngram_ids`.

    Returns:
        [B, T, D] in the weights' dtype, summed in float32 (float64 for float64 weights).
        Differentiable with respect to both weights (dense gradients). The backward is
        deterministic on CPU; on CUDA the byte table's gradient always is, and the hash
        tables' is when ``torch.use_deterministic_algorithms(True)`` is set (a sort and
        float32 segment sums), else it is added with atomics in the weights' dtype.

    Raises:
        TypeError: tokens not int64, weights not floating or of different dtypes.
        ValueError: a wrong rank, D mismatch, a different device, hash_weight rows not a
        positive multiple of num_tables, a bad config, or (CPU only: a CUDA check would
        synchronize) a token out of the byte table; CUDA hashes such a token as it is and
        leaves its byte row out. On CUDA the backward takes at most 12288 byte rows (6144 in
        float64).
    """
    return _ops.hash_ngram_embedding(
        tokens, byte_weight, hash_weight, list(ngram_sizes), num_functions
    )
