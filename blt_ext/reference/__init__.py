"""Pure-PyTorch twins of every blt_ext op, written for clarity and exactness.

Each function has the name and signature of its kernel-backed counterpart in
``blt_ext.ops``; the tests and benchmarks compare the two.
"""

from .entropy_patch import (
    PatchLayout,
    entropy,
    entropy_patch,
    entropy_patch_starts,
    patch_layout,
    space_patch_starts,
    static_patch_starts,
)
from .hash_ngram import hash_ngram_embedding, hash_ngram_ids
from .patch_attention import patch_cross_attention
from .segment_pool import segment_pool

__all__ = [
    "PatchLayout",
    "entropy",
    "entropy_patch",
    "entropy_patch_starts",
    "hash_ngram_embedding",
    "hash_ngram_ids",
    "patch_cross_attention",
    "patch_layout",
    "segment_pool",
    "space_patch_starts",
    "static_patch_starts",
]
