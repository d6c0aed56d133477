"""The entropy model (BLT's patcher LM, BLT_SPEC.md c): a small causal byte LM."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import RMSNorm, init_trunc_normal
from .config import EntropyModelConfig
from .layers import (
    AttentionMask,
    LayerKV,
    TransformerBlock,
    check_tokens,
    rope_angles,
    self_attention_mask,
    split_document_ids,
)


class EntropyModel(nn.Module):
    """Llama-style byte LM: embedding, pre-norm blocks, final RMSNorm, untied head.

    ``forward(tokens [B, T] int64) -> logits [B, T, vocab]`` in fp32. Self-attention is causal,
    block-diagonal at EOS and limited to ``config.sliding_window`` keys, with RoPE (theta
    ``config.rope_theta``, 10000 for the released model) at absolute row positions. Rows are
    independent: the batch is never flattened (the original's batch bleed is not reproduced),
    and rows are not cut into 8192-byte chunks (the original restarts the context there; with
    the window the chunk start is the only place that differs).
    """

    def __init__(self, config: EntropyModelConfig, attn_impl: str = "sdpa"):
        super().__init__()
        self.config = config
        self.attn_impl = attn_impl
        c = config
        self.embed_tokens = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim, c.n_heads, c.n_kv_heads, c.ffn_dim, c.norm_eps) for _ in range(c.n_layers)
        )
        self.norm = RMSNorm(c.dim, c.norm_eps)
        self.lm_head = nn.Linear(c.dim, c.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.config.dim**-0.5
        init_trunc_normal(self.embed_tokens.weight, std)
        init_trunc_normal(self.lm_head.weight, std)
        self.norm.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        check_tokens(tokens, self.embed_tokens.weight, "EntropyModel.forward")
        seq_len = tokens.shape[1]
        mask = self_attention_mask(split_document_ids(tokens), seq_len, self.config.sliding_window, self.attn_impl,
                                   tokens.shape[0], tokens.device)
        return self.run_layers(tokens, torch.arange(seq_len, device=tokens.device), mask)

    def run_layers(self, tokens: torch.Tensor, positions: torch.Tensor, mask: AttentionMask,
                   caches: list[LayerKV] | None = None) -> torch.Tensor:
        """fp32 logits of ``tokens`` at ``positions`` [T] (with ``caches``: the new positions only,
        earlier ones read from the caches)."""
        c = self.config
        rope = rope_angles(positions, c.dim // c.n_heads, c.rope_theta)
        h = self.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i])
        return self.lm_head(self.norm(h)).float()
