"""Stock-PyTorch transformer pieces shared by the entropy model and the BLT (BLT_SPEC.md g).

Nothing here depends on the backend switch: both backends run exactly this code.
"""

from __future__ import annotations

import contextlib
import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import PatchCrossAttention, RMSNorm, init_trunc_normal
from .tokenizer import EOS_ID

ATTN_IMPLS = ("sdpa", "flex")

_compiled_flex = None


def _flex_attention(device: torch.device):
    """flex_attention, compiled once per process on CUDA (where it generates a fused kernel);
    eager elsewhere (a plain masked attention, for tests and CPU runs)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    if device.type != "cuda":
        return flex_attention
    if _compiled_flex is None:
        _compiled_flex = torch.compile(flex_attention, dynamic=False)
    return _compiled_flex


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [..., head_dim / 2] (fp32) for integer ``positions`` [...]: angle = pos * theta^(-2i/d)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    return angles.cos(), angles.sin()


def rope_for_length(seq_len: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE cos, sin for positions 0..seq_len-1 (absolute within the row, as the original)."""
    return rope_angles(torch.arange(seq_len, device=device), head_dim, theta)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (x0, x1), (x2, x3), ... of ``x`` [B, S, H, D] (interleaved RoPE).

    ``cos``/``sin`` are [S, D/2] or [B, S, D/2]; computed in fp32 and cast back, as the original.
    """
    xf = x.float().unflatten(-1, (-1, 2))
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)  # broadcast over heads
    if torch.compiler.is_compiling():
        # Real arithmetic, which inductor fuses into one kernel (it generates no code for complex ops).
        x0, x1 = xf[..., 0], xf[..., 1]
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    else:
        # Eager: each pair as x0 + i x1 times cos + i sin (the original's complex form), three kernels
        # where the real form launches eight.
        out = torch.view_as_real(torch.view_as_complex(xf) * torch.complex(cos, sin))
    return out.flatten(-2).type_as(x)


def check_tokens(tokens: torch.Tensor, weight: torch.Tensor, where: str) -> None:
    """Token ids must be an integer [B, T] tensor on the model's device (``weight``'s)."""
    if tokens.dim() != 2:
        raise ValueError(f"{where}: tokens must be [B, T], got {tuple(tokens.shape)}")
    if tokens.dtype.is_floating_point or tokens.dtype.is_complex or tokens.dtype == torch.bool:
        raise TypeError(f"{where}: tokens must be an integer tensor, got {tokens.dtype}")
    if tokens.device != weight.device:
        raise ValueError(f"{where}: tokens are on {tokens.device} but the model is on {weight.device}; "
                         f"move them with tokens.to({str(weight.device)!r})")


def document_ids(tokens: torch.Tensor, eos_id: int = EOS_ID) -> torch.Tensor:
    """[B, T] index of the document of each position: an EOS closes its document (it belongs to it)."""
    eos = (tokens == eos_id).to(torch.int32)
    return torch.cumsum(eos, dim=1) - eos


class AttentionMask(NamedTuple):
    """A self-attention mask in the form its implementation wants (dense bool or flex BlockMask);
    both None: plain causal, which SDPA runs as ``is_causal`` (flash attention where it applies)."""

    dense: torch.Tensor | None  # [B, 1, S, S] bool, True = attend
    block: object | None  # torch.nn.attention.flex_attention.BlockMask
    first_key: int = 0  # with a KV cache: the dense mask covers the cached keys from this one on


def split_document_ids(tokens: torch.Tensor) -> torch.Tensor | None:
    """:func:`document_ids` of ``tokens``, or None when every row is one document (no EOS
    before its last byte), so that masks can be plain causal. One host synchronisation, made
    once per forward; while compiling always the ids (the graph keeps no data dependence)."""
    doc_ids = document_ids(tokens)
    if torch.compiler.is_compiling() or doc_ids.numel() == 0:
        return doc_ids
    return doc_ids if bool((doc_ids[:, -1] != 0).any()) else None  # ids count the EOS before a position


def is_plain_causal(doc_ids: torch.Tensor | None, seq_len: int, window: int | None) -> bool:
    """No documents to separate and a window that does not bind (``window >= seq_len``)."""
    return doc_ids is None and (window is None or window >= seq_len)


def self_attention_mask(
    doc_ids: torch.Tensor | None,
    seq_len: int,
    window: int | None,
    impl: str = "sdpa",
    batch: int = 1,
    device: torch.device | None = None,
) -> AttentionMask:
    """Causal mask, block-diagonal by ``doc_ids`` [B, S] when given, limited to ``window`` keys.

    Query i sees key j iff j <= i, i - j < window and doc(i) == doc(j) (BLT_SPEC.md d, g).
    """
    if impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {impl!r}")
    if doc_ids is not None:
        batch, device = doc_ids.shape[0], doc_ids.device
    if impl == "sdpa":
        if is_plain_causal(doc_ids, seq_len, window):
            return AttentionMask(None, None)
        i = torch.arange(seq_len, device=device)
        rel = i[:, None] - i[None, :]
        allowed = rel >= 0
        if window is not None:
            allowed = allowed & (rel < window)
        allowed = allowed.expand(batch, 1, seq_len, seq_len)
        if doc_ids is not None:
            allowed = allowed & (doc_ids[:, None, :, None] == doc_ids[:, None, None, :])
        return AttentionMask(allowed, None)

    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, k):
        ok = q >= k
        if window is not None:
            ok = ok & (q - k < window)
        if doc_ids is not None:
            ok = ok & (doc_ids[b, q] == doc_ids[b, k])
        return ok

    block = create_block_mask(
        mask_mod, batch if doc_ids is not None else None, None, seq_len, seq_len, device=device
    )
    return AttentionMask(None, block)


class KVCache:
    """Keys and values [R, Hkv, capacity, D] of the attention layers of one model part for R rows,
    each row filled to its own length. The layers of a part always take the same new positions,
    so the rows' lengths and a step's write positions are kept once for all of them. Capacity
    doubles when needed; unused entries stay zero, so the masked keys of shorter rows never bring
    NaN into the attention."""

    def __init__(self, layers: int, rows: int = 1) -> None:
        self.lengths = [0] * rows
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers

    def step(self, rows: list[int], index: torch.Tensor, positions: torch.Tensor, counts: list[int]) -> list[LayerKV]:
        """One :class:`LayerKV` per layer that writes n positions to each of ``rows`` (in the
        batch's order) and lengthens row i by ``counts[i]``: a shorter row's further positions
        are padding, overwritten by its next positions and never attended before. ``index`` [R]
        and ``positions`` [R, n] are the rows and their write positions (each row's length
        onward) on the device, made once by the caller for all the caches of a step."""
        starts = [self.lengths[r] for r in rows]
        n = positions.shape[1]
        end = max(starts) + n
        if len(rows) == 1:
            picked = slice(rows[0], rows[0] + 1)
            write = (picked, slice(starts[0], starts[0] + n))
        else:
            write = (index[:, None], positions)
            picked = slice(None) if rows == list(range(len(self.lengths))) else index  # all rows: a view
        for row, count in zip(rows, counts):
            self.lengths[row] += count
        return [LayerKV(self, layer, write, picked, end) for layer in range(len(self.k))]

    def _reserve(self, layer: int, like: torch.Tensor, end: int) -> None:
        old_k, old_v = self.k[layer], self.v[layer]
        if old_k is not None and end <= old_k.shape[2]:
            return
        shape = (len(self.lengths), like.shape[1], max(2 * end, 64), like.shape[3])
        k, v = like.new_zeros(shape), like.new_zeros(shape)
        if old_k is not None:
            k[:, :, : old_k.shape[2]], v[:, :, : old_v.shape[2]] = old_k, old_v
        self.k[layer], self.v[layer] = k, v


class LayerKV(NamedTuple):
    """One layer's part of a :meth:`KVCache.step`."""

    cache: KVCache
    layer: int
    write: tuple  # (rows, positions) the new keys go to
    picked: slice | torch.Tensor  # the rows read back
    end: int  # the longest selected row's length after the step

    def extend(self, k: torch.Tensor, v: torch.Tensor, first_key: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [R', Hkv, n, D]; returns the selected rows' keys and values from position
        ``first_key`` to the longest row's end."""
        cache, layer = self.cache, self.layer
        cache._reserve(layer, k, self.end)
        rows, positions = self.write
        if isinstance(positions, slice):  # one row
            cache.k[layer][rows, :, positions], cache.v[layer][rows, :, positions] = k, v
        else:  # [R, 1] rows and [R, n] positions index the cache as [R, n, Hkv, D]
            cache.k[layer][rows, :, positions] = k.transpose(1, 2)
            cache.v[layer][rows, :, positions] = v.transpose(1, 2)
        return (cache.k[layer][self.picked, :, first_key : self.end],
                cache.v[layer][self.picked, :, first_key : self.end])


def incremental_mask(
    positions: torch.Tensor, span: tuple[int, int], doc_ids: torch.Tensor | None, window: int | None
) -> AttentionMask:
    """Mask [R, 1, n, S - first] of the new ``positions`` [R, n] of R rows over the positions so
    far (S = the largest position + 1) that a window lets them see (from ``first`` on): causal,
    same document (``doc_ids`` [R, >= S] of every position), at most ``window`` keys back.
    ``span`` is (smallest, largest) of ``positions``, known on the host: reading it from the
    tensor would synchronise with the device at every decoding step."""
    lowest, highest = span
    first = 0 if window is None else max(0, lowest - window + 1)
    keys = torch.arange(first, highest + 1, device=positions.device)
    rel = positions[..., None] - keys
    allowed = rel >= 0
    if window is not None:
        allowed = allowed & (rel < window)
    if doc_ids is not None:
        query_docs = doc_ids.gather(1, positions)
        allowed = allowed & (query_docs[..., None] == doc_ids[:, None, first : first + keys.numel()])
    return AttentionMask(allowed[:, None], None, first)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Masked softmax attention of q [B, H, S, D] over k, v [B, Hkv, S, D] (GQA when Hkv < H)."""
    gqa = k.shape[1] != q.shape[1]
    if mask.block is not None:
        return _flex_attention(q.device)(q, k, v, block_mask=mask.block, enable_gqa=gqa)
    causal = mask.dense is None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=causal, enable_gqa=gqa)


class FeedForward(nn.Module):
    """SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))`` (original w2(silu(w1 x) * w3 x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    def reset_parameters(self) -> None:
        init_trunc_normal(self.gate_proj.weight, self.gate_proj.in_features**-0.5)
        init_trunc_normal(self.up_proj.weight, self.up_proj.in_features**-0.5)
        init_trunc_normal(self.down_proj.weight, self.down_proj.in_features**-0.5)


class SelfAttention(nn.Module):
    """Multi-head (or grouped-query) self-attention with interleaved RoPE, no biases."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None):
        super().__init__()
        self.n_heads = n_heads
        self.n_kv_heads = n_kv_heads or n_heads
        self.head_dim = dim // n_heads
        self.q_proj = nn.Linear(dim, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask, cache: LayerKV | None = None
    ) -> torch.Tensor:
        b, s, _ = x.shape
        q = apply_rope(self.q_proj(x).view(b, s, self.n_heads, self.head_dim), *rope).transpose(1, 2)
        k = apply_rope(self.k_proj(x).view(b, s, self.n_kv_heads, self.head_dim), *rope).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cache is not None:
            k, v = cache.extend(k, v, mask.first_key)
        out = attend(q, k, v, mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))

    def reset_parameters(self) -> None:
        std = self.q_proj.in_features**-0.5
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            init_trunc_normal(proj.weight, std)
        init_trunc_normal(self.o_proj.weight, std)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then h + ffn(norm(h)) (Llama names, as transformers)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None, ffn_dim: int, norm_eps: float):
        super().__init__()
        self.input_layernorm = RMSNorm(dim, norm_eps)
        self.self_attn = SelfAttention(dim, n_heads, n_kv_heads)
        self.post_attention_layernorm = RMSNorm(dim, norm_eps)
        self.mlp = FeedForward(dim, ffn_dim)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask, cache: LayerKV | None = None
    ) -> torch.Tensor:
        """``cache``: earlier positions' keys and values; x then holds only the new positions and
        ``mask`` [B, 1, new, all] relates them to every cached position and to each other."""
        h = x + self.self_attn(self.input_layernorm(x), rope, mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))

    def reset_parameters(self) -> None:
        self.input_layernorm.reset_parameters()
        self.post_attention_layernorm.reset_parameters()
        self.self_attn.reset_parameters()
        self.mlp.reset_parameters()


def compile_layers(model: nn.Module, enabled: bool = True, **compile_kwargs) -> nn.Module:
    """Run every transformer block and cross-attention of ``model`` through ``torch.compile``
    (regional compilation: the layers of one kind share their compiled code), or, with
    ``enabled=False``, eagerly again; returns ``model``. Compiling fuses the fp32 norms, RoPE,
    SwiGLU and residual adds into a few kernels and removes most of the per-op Python work: the
    eager model launches thousands of small kernels per step. Parameters, checkpoints and the
    backend switch are untouched. Each new input shape compiles once (``compile_kwargs`` go to
    ``torch.compile``); within :func:`eager_layers` (generation uses it) the layers run eagerly.
    """
    for module in model.modules():
        if isinstance(module, (TransformerBlock, PatchCrossAttention)):
            # An instance attribute shadows the class's forward; removing it restores eager.
            module.__dict__.pop("forward", None)
            if enabled:
                eager = module.forward
                module.forward = _compiled_unless_eager(eager, torch.compile(eager, **compile_kwargs))
    return model


_eager_state = threading.local()


@contextlib.contextmanager
def eager_layers():
    """Within, layers compiled by :func:`compile_layers` run eagerly (in this thread): for work
    whose shapes change at every call, such as KV-cached decoding or re-running a growing prefix,
    where each call would compile anew (and after torch.compile's recompile limit, warn)."""
    depth = getattr(_eager_state, "depth", 0)
    _eager_state.depth = depth + 1
    try:
        yield
    finally:
        _eager_state.depth = depth


def _compiled_unless_eager(eager, compiled):
    def forward(*args, **kwargs):
        return eager(*args, **kwargs) if getattr(_eager_state, "depth", 0) else compiled(*args, **kwargs)

    return forward
