"""Drop-in ``torch.nn`` modules for the BLT-specific parts of a model.

Each module takes ``backend="ext"`` (the compiled ``blt_ext.ops`` kernels) or ``backend="torch"``
(the pure-PyTorch twins in ``blt_ext.reference``); the attribute can be changed at any time and
nothing else differs between the two paths. The BLT model (:mod:`blt_ext.model`) is built from
these modules; they also work on their own:

- :class:`HashNgramEmbedding`: byte embedding + hashed n-gram embeddings (BLT_SPEC.md b).
- :class:`EntropyPatcher`: patch layout from a byte LM's entropies, or space/static/byte patching
  (BLT_SPEC.md c).
- :class:`PatchPooling`: max/mean/min of byte states per patch, empty patch = 0 (BLT_SPEC.md d).
- :class:`PatchCrossAttention`: patch slots attending their bytes (encoder) or bytes attending
  their patch's slots with the decoder shift (BLT_SPEC.md d, f), normalised q and kv, no RoPE.
- :class:`RMSNorm`: the fp32-accumulating RMSNorm the modules above use.

Example, the whole BLT patch path on random states::

    import torch
    from blt_ext.nn import HashNgramEmbedding, EntropyPatcher, PatchPooling, PatchCrossAttention

    tokens = torch.randint(4, 260, (2, 40))
    tokens[:, 0] = 1                                               # BOS
    layout = EntropyPatcher(mode="space")(tokens)                  # per-row patches
    lengths = layout.patch_lengths[:, : int(layout.patch_counts.max())]
    h = HashNgramEmbedding(64, hash_vocab=1000)(tokens)            # [2, 40, 64]
    slots = PatchPooling("max")(h, lengths).repeat_interleave(2, 1)  # 2 query slots per patch
    patches = PatchCrossAttention(64, 4, slots=2, direction="encoder")(slots, h, lengths)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn

from .reference.entropy_patch import RELEASED_THRESHOLD

BACKENDS = ("ext", "torch")
PATCHING_MODES = ("entropy", "space", "static", "byte")


def backend_ops(backend: str) -> ModuleType:
    """The op namespace of a backend: ``blt_ext.ops`` for "ext", ``blt_ext.reference`` for "torch"."""
    if backend == "ext":
        from . import ops

        return ops
    if backend == "torch":
        from . import reference

        return reference
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


class BackendModule(nn.Module):
    """A module whose BLT ops come from ``blt_ext.ops`` or ``blt_ext.reference`` (``backend``)."""

    def __init__(self, backend: str = "ext"):
        super().__init__()
        self.backend = backend

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        backend_ops(value)  # validates the name
        self._backend = value

    @property
    def ops(self) -> ModuleType:
        return backend_ops(self._backend)

    def extra_repr(self) -> str:
        return f"backend={self._backend!r}"


def init_trunc_normal(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (weight included) and cast back, as the original Llama code does.

    >>> RMSNorm(8)(torch.ones(2, 8)).shape
    torch.Size([2, 8])
    """

    def __init__(self, dim: int, eps: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32: on CUDA one fused kernel each way instead of
        # a chain of small ones (the eager model is bound by launching them)
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class HashNgramEmbedding(BackendModule):
    """Byte embedding plus one hashed embedding per (hash function, n-gram size) (BLT_SPEC.md b).

    ``forward(tokens [B, T] int64) -> [B, T, dim]`` in the weights' dtype:
    ``byte_weight[tokens] + sum_i hash_weight[i * hash_vocab + hash_i(tokens)]``, hashes over the
    n bytes ending at each position (left-padded with 0) with the rolling polynomial hash of the
    original. ``hash_weight`` packs the tables row-wise, table ``f * len(ngram_sizes) + k`` at rows
    ``[i * hash_vocab, (i + 1) * hash_vocab)`` (the transformers layout). Token ids must lie in
    ``[0, num_embeddings)``.

    Example::

        emb = HashNgramEmbedding(64, ngram_sizes=(3, 4, 5), hash_vocab=30000)
        x = emb(torch.tensor([[1, 76, 105, 112]]))      # [1, 4, 64]
        emb.hash_ids(torch.tensor([[1, 76, 105, 112]]))  # [1, 4, 3] ids in [0, 30000)
    """

    def __init__(
        self,
        dim: int,
        num_embeddings: int = 260,
        ngram_sizes: Sequence[int] = (3, 4, 5, 6, 7, 8),
        num_functions: int = 1,
        hash_vocab: int = 500002,
        backend: str = "ext",
        device=None,
        dtype=None,
    ):
        super().__init__(backend)
        self.dim = dim
        self.ngram_sizes = tuple(int(n) for n in ngram_sizes)
        self.num_functions = num_functions
        self.hash_vocab = hash_vocab
        tables = num_functions * len(self.ngram_sizes)
        factory = {"device": device, "dtype": dtype}
        self.byte_weight = nn.Parameter(torch.empty(num_embeddings, dim, **factory))
        self.hash_weight = nn.Parameter(torch.empty(tables * hash_vocab, dim, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_trunc_normal(self.byte_weight, self.dim**-0.5)
        init_trunc_normal(self.hash_weight, self.dim**-0.5)

    def hash_ids(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T, tables] int64 hash ids, each in [0, hash_vocab) (no table offset)."""
        return self.ops.hash_ngram_ids(tokens, self.ngram_sizes, self.num_functions, self.hash_vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.ops.hash_ngram_embedding(
            tokens, self.byte_weight, self.hash_weight, self.ngram_sizes, self.num_functions
        )

    def extra_repr(self) -> str:
        return (
            f"{self.byte_weight.shape[0]}, {self.dim}, ngram_sizes={self.ngram_sizes}, "
            f"num_functions={self.num_functions}, hash_vocab={self.hash_vocab}, {super().extra_repr()}"
        )


class PatchPooling(BackendModule):
    """Pool byte states per patch: ``forward(x [B, T, D], patch_lengths [B, P]) -> [B, P, D]``.

    ``reduce`` is "max" (BLT's patch init), "mean" or "min"; a patch with no bytes (a zero-length
    padding patch, or a last patch that holds only the virtual next byte) gives exactly 0. Rows of
    ``patch_lengths`` sum to T or T + 1.

    Example::

        x = torch.randn(1, 5, 8)
        PatchPooling("max")(x, torch.tensor([[1, 3, 2]]))  # patches {0}, {1,2,3}, {4} -> [1, 3, 8]
    """

    def __init__(self, reduce: str = "max", backend: str = "ext"):
        super().__init__(backend)
        if reduce not in ("max", "mean", "min"):
            raise ValueError(f"PatchPooling: reduce must be 'max', 'mean' or 'min', got {reduce!r}")
        self.reduce = reduce

    def forward(self, x: torch.Tensor, patch_lengths: torch.Tensor) -> torch.Tensor:
        return self.ops.segment_pool(x, patch_lengths, self.reduce)

    def extra_repr(self) -> str:
        return f"reduce={self.reduce!r}, {super().extra_repr()}"


class PatchCrossAttention(BackendModule):
    """BLT cross-attention between bytes and patch slots, driven by patch lengths (no dense mask).

    ``forward(x, kv, patch_lengths) -> x + o_proj(attention)``, like the original module; the BLT
    encoder and decoder then add ``x`` once more (the double residual of BLT_SPEC.md j.1).
    Queries are ``q_proj(q_norm(x))``, keys and values ``k_proj/v_proj(k_norm(kv))``, ``n_heads``
    heads of ``dim / n_heads``, no RoPE, scale ``1/sqrt(head_dim)``, no biases.

    - ``direction="encoder"``: ``x`` [B, P*slots, dim] holds ``slots`` consecutive query rows per
      patch, ``kv`` [B, T, dim] the byte states; slot rows of patch p see exactly the bytes of p.
    - ``direction="decoder"``: ``x`` [B, T, dim] holds byte states, ``kv`` [B, P*slots, dim] the
      patch slots; byte t sees the slots of patch p(t+1) - 1 (the latest patch that ends at or
      before t; BLT_SPEC.md f).

    Rows with nothing to attend (empty patches, bytes before the first completed patch) get a zero
    attention output. ``patch_lengths`` [B, P] int64, rows summing to T or T + 1.

    Example::

        attn = PatchCrossAttention(64, 4, slots=2, direction="decoder")
        bytes_ = torch.randn(1, 6, 64)
        slots = torch.randn(1, 4 * 2, 64)              # 4 patches x 2 slots
        out = attn(bytes_, slots, torch.tensor([[1, 3, 2, 1]]))   # [1, 6, 64]
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        slots: int = 1,
        direction: str = "encoder",
        norm_eps: float = 1e-5,
        backend: str = "ext",
        device=None,
        dtype=None,
    ):
        super().__init__(backend)
        if direction not in ("encoder", "decoder"):
            raise ValueError(f"PatchCrossAttention: direction must be 'encoder' or 'decoder', got {direction!r}")
        if dim % n_heads:
            raise ValueError(f"PatchCrossAttention: dim {dim} must be divisible by n_heads {n_heads}")
        self.dim, self.n_heads, self.slots, self.direction = dim, n_heads, slots, direction
        self.head_dim = dim // n_heads
        factory = {"device": device, "dtype": dtype}
        self.q_norm = RMSNorm(dim, norm_eps, **factory)
        self.k_norm = RMSNorm(dim, norm_eps, **factory)
        self.q_proj = nn.Linear(dim, dim, bias=False, **factory)
        self.k_proj = nn.Linear(dim, dim, bias=False, **factory)
        self.v_proj = nn.Linear(dim, dim, bias=False, **factory)
        self.o_proj = nn.Linear(dim, dim, bias=False, **factory)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.dim**-0.5
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
            init_trunc_normal(proj.weight, std)
        self.q_norm.reset_parameters()
        self.k_norm.reset_parameters()

    def forward(self, x: torch.Tensor, kv: torch.Tensor, patch_lengths: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_proj(self.q_norm(x)).view(b, s, self.n_heads, self.head_dim)
        kv = self.k_norm(kv)
        k = self.k_proj(kv).view(b, kv.shape[1], self.n_heads, self.head_dim)
        v = self.v_proj(kv).view(b, kv.shape[1], self.n_heads, self.head_dim)
        out = self.ops.patch_cross_attention(
            q, k, v, patch_lengths, self.slots, self.direction, 1.0 / math.sqrt(self.head_dim)
        )
        return x + self.o_proj(out.reshape(b, s, self.dim))

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, n_heads={self.n_heads}, slots={self.slots}, "
            f"direction={self.direction!r}, {super().extra_repr()}"
        )


class EntropyPatcher(BackendModule):
    """Patch layout of a byte sequence, each batch row patched on its own (BLT_SPEC.md c).

    ``forward(tokens [B, T], include_next_token=True) -> PatchLayout`` (``patch_ids`` [B, T],
    ``patch_lengths`` [B, T + 1] zero padded, ``patch_counts`` [B]); with ``include_next_token``
    the lengths cover the virtual next byte and sum to T + 1 (the model forward and generation),
    without it they sum to T (whole documents, as in training-data preprocessing).

    Modes: ``"entropy"`` runs ``entropy_model`` (any module or callable mapping tokens [B, T] to
    logits [B, T, V]; it runs without gradients) and starts a patch at p >= 2 where the entropy
    of predicting byte p exceeds ``threshold`` (``monotonicity`` / ``threshold_add`` select the
    relative rules); ``"space"`` starts after space-like bytes; ``"static"`` uses patches of
    ``patch_size`` bytes after a first one-byte patch (the model needs that first patch; the
    original training packer rewrites static layouts the same way); ``"byte"`` makes every
    patch one byte. ``max_patch_length`` splits longer patches left to right.

    Example::

        byte_lm = torch.nn.Sequential(torch.nn.Embedding(260, 16), torch.nn.Linear(16, 260))
        tokens = torch.tensor([[1, 76, 105, 112, 101, 115]])
        layout = EntropyPatcher(byte_lm, threshold=1.335442066192627, max_patch_length=16)(tokens)
        lengths = layout.patch_lengths[:, : int(layout.patch_counts.max())]  # sum T + 1
    """

    def __init__(
        self,
        entropy_model: nn.Module | Callable[[torch.Tensor], torch.Tensor] | None = None,
        *,
        mode: str = "entropy",
        threshold: float = RELEASED_THRESHOLD,
        threshold_add: float | None = None,
        monotonicity: bool = False,
        max_patch_length: int | None = None,
        patch_size: int = 4,
        backend: str = "ext",
    ):
        super().__init__(backend)
        if mode not in PATCHING_MODES:
            raise ValueError(f"EntropyPatcher: mode must be one of {PATCHING_MODES}, got {mode!r}")
        self.entropy_model = entropy_model
        self.mode = mode
        self.threshold = threshold
        self.threshold_add = threshold_add
        self.monotonicity = monotonicity
        self.max_patch_length = max_patch_length
        self.patch_size = patch_size

    def _logits(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.entropy_model is None:
            raise RuntimeError("EntropyPatcher: mode 'entropy' needs an entropy_model, none was given")
        with torch.no_grad():
            return self.entropy_model(tokens)

    def entropies(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, T] fp32 entropies (nats) of the entropy model's next-byte predictions."""
        return self.ops.entropy(self._logits(tokens))

    def forward(self, tokens: torch.Tensor, include_next_token: bool = True):
        ops = self.ops
        if self.mode == "entropy":
            return ops.entropy_patch(
                self._logits(tokens),
                threshold=self.threshold,
                threshold_add=self.threshold_add,
                monotonicity=self.monotonicity,
                include_next_token=include_next_token,
                max_patch_length=self.max_patch_length,
            )
        batch, num_bytes = tokens.shape
        if self.mode == "space":
            starts = ops.space_patch_starts(tokens, include_next_token=include_next_token)
        elif self.mode == "static":
            starts = ops.static_patch_starts(
                batch, num_bytes, self.patch_size, include_next_token=include_next_token, device=tokens.device
            )
            if num_bytes + int(include_next_token) > 1:
                starts[:, 1] = True
        else:
            starts = torch.ones(batch, num_bytes + 1, dtype=torch.bool, device=tokens.device)
            starts[:, num_bytes] = include_next_token
        return ops.patch_layout(starts, include_next_token=include_next_token, max_patch_length=self.max_patch_length)

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, threshold={self.threshold}, threshold_add={self.threshold_add}, "
            f"monotonicity={self.monotonicity}, max_patch_length={self.max_patch_length}, "
            f"{super().extra_repr()}"
        )
