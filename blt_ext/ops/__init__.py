"""Typed wrappers of the ``torch.ops.blt_ext`` ops, with fakes and autograd registered.

Every function here has a pure-PyTorch twin of the same name and signature in
``blt_ext.reference``.
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
