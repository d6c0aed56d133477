"""The Byte Latent Transformer (BLT_SPEC.md d-g): local encoder, global transformer, local decoder."""

from __future__ import annotations

import torch
from torch import nn

from ..nn import (
    BackendModule,
    EntropyPatcher,
    HashNgramEmbedding,
    PatchCrossAttention,
    PatchPooling,
    RMSNorm,
    backend_ops,
    init_trunc_normal,
)
from .config import BLTConfig
from .entropy_model import EntropyModel
from .layers import (
    ATTN_IMPLS,
    AttentionMask,
    LayerKV,
    TransformerBlock,
    check_tokens,
    compile_layers,
    rope_angles,
    rope_for_length,
    self_attention_mask,
    split_document_ids,
)
from .loss import LossOutput, next_byte_loss
from .tokenizer import EOS_ID


class LocalEncoder(nn.Module):
    """Hash embeddings -> byte transformer layers -> patch slots by pooling + cross-attention.

    ``forward(tokens, patch_lengths [B, P], mask) -> (h [B, T, De], slots [B, P*k, De])``. After the
    layer that carries cross-attention (the last one, or every one with
    ``cross_attn_all_layers_encoder``) the patch slots are initialised once by pooling that
    layer's output per patch and projecting it to k slots, then updated by each cross-attention
    with the double residual ``slots <- 2 slots + o_proj(attn)`` (BLT_SPEC.md d, j.1, j.6, j.7).
    No final norm; ``h`` (the last layer's byte states) also feeds the decoder.
    """

    def __init__(self, config: BLTConfig, backend: str = "ext"):
        super().__init__()
        c = config
        self.dim, self.k = c.dim_local_encoder, c.cross_attn_k
        self.head_dim = c.dim_local_encoder // c.n_heads_local_encoder
        self.rope_theta = c.rope_theta
        self.all_layers = c.cross_attn_all_layers_encoder
        self.embedding = HashNgramEmbedding(
            c.dim_local_encoder,
            num_embeddings=c.vocab_size,
            ngram_sizes=c.encoder_hash_byte_group_size,
            num_functions=c.encoder_hash_byte_group_nb_functions,
            hash_vocab=c.encoder_hash_byte_group_vocab,
            backend=backend,
        )
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim_local_encoder, c.n_heads_local_encoder, c.n_kv_heads_local,
                             c.ffn_dim_local_encoder, c.norm_eps)
            for _ in range(c.n_layers_local_encoder)
        )
        self.pooling = PatchPooling(c.pooling, backend=backend)
        self.patch_embedding_projection = nn.Linear(c.dim_local_encoder, c.dim_local_encoder * c.cross_attn_k, bias=False)
        n_cross = c.n_layers_local_encoder if self.all_layers else 1
        self.cross_attn_layers = nn.ModuleList(
            PatchCrossAttention(c.dim_local_encoder, c.n_heads_local_encoder, slots=c.cross_attn_k,
                                direction="encoder", norm_eps=c.norm_eps, backend=backend)
            for _ in range(n_cross)
        )

    def reset_parameters(self) -> None:
        self.embedding.reset_parameters()
        for module in (*self.layers, *self.cross_attn_layers):
            module.reset_parameters()
        init_trunc_normal(self.patch_embedding_projection.weight, self.dim**-0.5)

    def forward(self, tokens: torch.Tensor, patch_lengths: torch.Tensor, mask: AttentionMask):
        rope = rope_for_length(tokens.shape[1], self.head_dim, self.rope_theta, tokens.device)
        layer_states = self.byte_states(self.embedding(tokens), rope, mask)
        return layer_states[-1], self.patch_slots(layer_states, patch_lengths)

    def byte_states(self, h: torch.Tensor, rope, mask: AttentionMask, caches: list[LayerKV] | None = None):
        """Every layer's output [B, T, De] from the embeddings ``h`` (with ``caches``: the new
        positions' outputs, earlier positions read from the caches)."""
        states = []
        for i, layer in enumerate(self.layers):
            h = layer(h, rope, mask, None if caches is None else caches[i])
            states.append(h)
        return states

    def patch_slots(self, layer_states: list[torch.Tensor], patch_lengths: torch.Tensor) -> torch.Tensor:
        """[B, P*k, De] slots from the byte states of the layers that carry cross-attention: pooled
        and projected once (the first such layer), then updated by each cross-attention. The
        slots never feed back into the byte states, so this can run after all layers."""
        b, num_patches = patch_lengths.shape
        slots = None
        last = len(self.layers) - 1
        for i, h in enumerate(layer_states):
            if self.all_layers or i == last:
                if slots is None:
                    pooled = self.pooling(h, patch_lengths)
                    slots = self.patch_embedding_projection(pooled).view(b, num_patches * self.k, self.dim)
                cross = self.cross_attn_layers[i if self.all_layers else 0]
                slots = slots + cross(slots, h, patch_lengths)
        return slots


class GlobalTransformer(nn.Module):
    """Patch-level transformer: [B, P, k*De] -> [B, P, Dg], causal (or block-causal at EOS patches).

    The input projection exists only when k * De differs from Dg; no final norm (the decoder's
    cross-attention kv-norm normalises its output; BLT_SPEC.md e).
    """

    def __init__(self, config: BLTConfig):
        super().__init__()
        c = config
        self.head_dim = c.dim_global // c.n_heads_global
        self.rope_theta = c.rope_theta
        self.block_causal = c.global_block_causal
        self.token_embedding_projection = (
            nn.Linear(c.global_input_dim, c.dim_global, bias=False) if c.global_input_dim != c.dim_global else None
        )
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim_global, c.n_heads_global, c.n_kv_heads_global, c.ffn_dim_global, c.norm_eps)
            for _ in range(c.n_layers_global)
        )

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()
        if self.token_embedding_projection is not None:
            proj = self.token_embedding_projection
            init_trunc_normal(proj.weight, proj.in_features**-0.5)

    def forward(self, x: torch.Tensor, doc_ids: torch.Tensor | None, attn_impl: str) -> torch.Tensor:
        b, num_patches, _ = x.shape
        mask = self_attention_mask(doc_ids, num_patches, None, attn_impl, batch=b, device=x.device)
        return self.run_layers(x, torch.arange(num_patches, device=x.device), mask)

    def run_layers(self, x: torch.Tensor, positions: torch.Tensor, mask: AttentionMask,
                   caches: list[LayerKV] | None = None) -> torch.Tensor:
        """The projection and every layer on patches at ``positions`` [P] (with ``caches``: the
        new patches, earlier ones read from the caches)."""
        if self.token_embedding_projection is not None:
            x = self.token_embedding_projection(x)
        rope = rope_angles(positions, self.head_dim, self.rope_theta)
        for i, layer in enumerate(self.layers):
            x = layer(x, rope, mask, None if caches is None else caches[i])
        return x


class LocalDecoder(nn.Module):
    """Byte decoder: encoder byte states + global patch states -> normalised byte states.

    Global outputs are projected to k slots per patch; before each decoder layer that carries
    cross-attention (all, or only the first) byte t attends the slots of patch p(t+1) - 1 with the
    double residual, then the self-attention block runs; a final RMSNorm ends it (BLT_SPEC.md f).
    """

    def __init__(self, config: BLTConfig, backend: str = "ext"):
        super().__init__()
        c = config
        self.dim, self.k = c.dim_local_decoder, c.cross_attn_k
        self.head_dim = c.dim_local_decoder // c.n_heads_local_decoder
        self.rope_theta = c.rope_theta
        self.all_layers = c.cross_attn_all_layers_decoder
        self.patch_embedding_projection = nn.Linear(c.dim_global, c.dim_local_decoder * c.cross_attn_k, bias=False)
        self.layers = nn.ModuleList(
            TransformerBlock(c.dim_local_decoder, c.n_heads_local_decoder, c.n_kv_heads_local,
                             c.ffn_dim_local_decoder, c.norm_eps)
            for _ in range(c.n_layers_local_decoder)
        )
        n_cross = c.n_layers_local_decoder if self.all_layers else 1
        self.cross_attn_layers = nn.ModuleList(
            PatchCrossAttention(c.dim_local_decoder, c.n_heads_local_decoder, slots=c.cross_attn_k,
                                direction="decoder", norm_eps=c.norm_eps, backend=backend)
            for _ in range(n_cross)
        )
        self.norm = RMSNorm(c.dim_local_decoder, c.norm_eps)

    def reset_parameters(self) -> None:
        for module in (*self.layers, *self.cross_attn_layers, self.norm):
            module.reset_parameters()
        proj = self.patch_embedding_projection
        init_trunc_normal(proj.weight, proj.in_features**-0.5)

    def forward(self, h: torch.Tensor, patches: torch.Tensor, patch_lengths: torch.Tensor, mask: AttentionMask,
                positions: torch.Tensor | None = None, caches: list[LayerKV] | None = None):
        """``positions`` [T] of the bytes in ``h`` (0..T-1 by default); with ``caches`` h holds the
        new bytes only and earlier ones are read from the caches."""
        b, seq_len, _ = h.shape
        slots = self.patch_embedding_projection(patches).view(b, patches.shape[1] * self.k, self.dim)
        if positions is None:
            positions = torch.arange(seq_len, device=h.device)
        rope = rope_angles(positions, self.head_dim, self.rope_theta)
        for i, layer in enumerate(self.layers):
            if self.all_layers or i == 0:
                h = h + self.cross_attn_layers[i](h, slots, patch_lengths)
            h = layer(h, rope, mask, None if caches is None else caches[i])
        return self.norm(h)


def patch_document_ids(tokens: torch.Tensor, patch_lengths: torch.Tensor) -> torch.Tensor:
    """[B, P] document index per patch: a patch holding an EOS byte closes its document."""
    ends = torch.cumsum(patch_lengths, dim=1)
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1).contiguous()
    byte_patch = torch.searchsorted(ends, positions, right=True).clamp_max(patch_lengths.shape[1] - 1)
    eos = torch.zeros(patch_lengths.shape, dtype=torch.int32, device=tokens.device)
    eos.scatter_reduce_(1, byte_patch, (tokens == EOS_ID).to(torch.int32), reduce="amax")
    return torch.cumsum(eos, dim=1) - eos


class ByteLatentTransformer(nn.Module):
    """BLT: ``forward(tokens [B, T], patch_lengths=None) -> logits [B, T, vocab]`` (fp32).

    Logit t predicts byte t + 1. Without ``patch_lengths`` the patcher computes them per row
    (entropy model + entropy patching, or the configured space/static/byte mode; lengths cover
    the virtual next byte and sum to T + 1) and trims them to the widest row's patch count.
    Explicit ``patch_lengths`` [B, P] (rows summing to T + 1, or T as in training data, first
    patch one byte, zero padding on the right) are used as given.

    ``backend`` ("ext" or "torch") selects the BLT ops (hash embedding, pooling, cross-attention,
    patching) for every submodule; ``attn_impl`` the stock self-attention: "sdpa" (a dense mask,
    or ``is_causal`` when the window does not bind and each row is one document) or "flex"
    (flex_attention with a block mask, compiled on CUDA; forward only on CPU).
    The entropy model is frozen (its parameters do not require gradients).
    """

    def __init__(self, config: BLTConfig, backend: str = "ext", attn_impl: str = "sdpa"):
        super().__init__()
        c = self.config = config
        self.local_encoder = LocalEncoder(c, backend)
        self.global_transformer = GlobalTransformer(c)
        self.local_decoder = LocalDecoder(c, backend)
        self.lm_head = nn.Linear(c.dim_local_decoder, c.vocab_size, bias=False)
        entropy_model = EntropyModel(c.entropy_model) if c.entropy_model is not None else None
        if entropy_model is not None:
            entropy_model.requires_grad_(False)
        self.patcher = EntropyPatcher(
            entropy_model,
            mode=c.patching_mode,
            threshold=c.patching_threshold,
            threshold_add=c.patching_threshold_add,
            monotonicity=c.monotonicity,
            max_patch_length=c.max_patch_length,
            patch_size=c.patch_size,
            backend=backend,
        )
        self.backend = backend
        self.attn_impl = attn_impl
        self.reset_parameters()

    # ---- switches -------------------------------------------------------------------------
    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, value: str) -> None:
        backend_ops(value)
        self._backend = value
        for module in self.modules():
            if isinstance(module, BackendModule):
                module.backend = value

    @property
    def attn_impl(self) -> str:
        return self._attn_impl

    @attn_impl.setter
    def attn_impl(self, value: str) -> None:
        if value not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {value!r}")
        self._attn_impl = value
        if isinstance(self.entropy_model, EntropyModel):
            self.entropy_model.attn_impl = value

    @property
    def entropy_model(self) -> nn.Module | None:
        return self.patcher.entropy_model

    def compile_layers(self, enabled: bool = True, **compile_kwargs) -> ByteLatentTransformer:
        """Every transformer block and cross-attention (the entropy model's too) through
        ``torch.compile``, or eager again with ``enabled=False``: see
        :func:`blt_ext.model.layers.compile_layers`. Returns the model."""
        return compile_layers(self, enabled, **compile_kwargs)

    def reset_parameters(self) -> None:
        """Original init: truncated normals (±3σ), σ = fan_in^-0.5 (dim^-0.5 for embeddings), norms 1."""
        self.local_encoder.reset_parameters()
        self.global_transformer.reset_parameters()
        self.local_decoder.reset_parameters()
        init_trunc_normal(self.lm_head.weight, self.config.dim_local_decoder**-0.5)
        if isinstance(self.entropy_model, EntropyModel):
            self.entropy_model.reset_parameters()

    # ---- patching -------------------------------------------------------------------------
    def patch(self, tokens: torch.Tensor):
        """Per-row PatchLayout of ``tokens`` with the lengths trimmed to the widest row's count.

        ``patch_lengths`` [B, P] sum to T + 1 per row (the virtual next byte); the trim reads the
        patch count on the host (one synchronisation).
        """
        check_tokens(tokens, self.lm_head.weight, "ByteLatentTransformer.patch")
        layout = self.patcher(tokens, include_next_token=True)
        width = int(layout.patch_counts.max()) if tokens.shape[0] > 0 else 0
        return type(layout)(layout.patch_ids, layout.patch_lengths[:, :width], layout.patch_counts)

    def _check_patch_lengths(self, patch_lengths: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        where = "ByteLatentTransformer.forward"
        if patch_lengths.dim() != 2 or patch_lengths.shape[0] != tokens.shape[0]:
            raise ValueError(f"{where}: patch_lengths must be [B, P] with B = {tokens.shape[0]}, got {tuple(patch_lengths.shape)}")
        if patch_lengths.dtype.is_floating_point or patch_lengths.dtype == torch.bool:
            raise TypeError(f"{where}: patch_lengths must be an integer tensor, got {patch_lengths.dtype}")
        if patch_lengths.device != tokens.device:
            raise ValueError(f"{where}: patch_lengths is on {patch_lengths.device} but tokens on {tokens.device}")
        patch_lengths = patch_lengths.long()
        # value checks would sync a GPU and break a compiled graph: eager CPU only
        if patch_lengths.device.type == "cpu" and tokens.shape[1] > 0 and not torch.compiler.is_compiling():
            n = tokens.shape[1]
            sums = patch_lengths.sum(1)
            if (patch_lengths < 0).any():
                raise ValueError(f"{where}: patch_lengths must be >= 0")
            if not ((sums == n) | (sums == n + 1)).all():
                raise ValueError(f"{where}: each row of patch_lengths must sum to T={n} or T+1, got {sums.tolist()}")
            if (patch_lengths[:, 0] != 1).any():
                raise ValueError(f"{where}: the first patch of every row must be one byte (the decoder shift needs it)")
            nonzero = patch_lengths > 0
            if (nonzero[:, 1:] & ~nonzero[:, :-1]).any():
                raise ValueError(f"{where}: patch_lengths must not have a non-zero length after a zero (padding on the right)")
        return patch_lengths

    # ---- forward ----------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, patch_lengths: torch.Tensor | None = None) -> torch.Tensor:
        check_tokens(tokens, self.lm_head.weight, "ByteLatentTransformer.forward")
        if patch_lengths is None:
            patch_lengths = self.patch(tokens).patch_lengths
        else:
            patch_lengths = self._check_patch_lengths(patch_lengths, tokens)
        c = self.config
        b, seq_len = tokens.shape
        doc_ids = split_document_ids(tokens)  # None: one document per row
        mask = self_attention_mask(doc_ids, seq_len, c.local_attention_window_len, self.attn_impl, b, tokens.device)
        h, slots = self.local_encoder(tokens, patch_lengths, mask)
        num_patches = patch_lengths.shape[1]
        patch_doc_ids = patch_document_ids(tokens, patch_lengths) if c.global_block_causal and doc_ids is not None else None
        patches = self.global_transformer(slots.reshape(b, num_patches, c.global_input_dim), patch_doc_ids, self.attn_impl)
        h = self.local_decoder(h, patches, patch_lengths, mask)
        return self.lm_head(h).float()

    def loss(
        self, tokens: torch.Tensor, mask: torch.Tensor | None = None, patch_lengths: torch.Tensor | None = None
    ) -> LossOutput:
        """Next-byte loss of ``tokens`` [B, T]: inputs tokens[:, :-1], targets tokens[:, 1:].

        ``mask`` [B, T] marks real tokens (padding False); ``patch_lengths`` if given describe
        the T - 1 inputs.
        """
        logits = self(tokens[:, :-1], patch_lengths)
        return next_byte_loss(logits, tokens[:, 1:], None if mask is None else mask[:, 1:])

    # ---- generation and checkpoints ----------------------------------------------------------
    def generate(self, prompts, max_new_bytes: int = 64, **kwargs):
        """See :func:`blt_ext.model.generate.generate`."""
        from .generate import generate

        return generate(self, prompts, max_new_bytes, **kwargs)

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> ByteLatentTransformer:
        """See :func:`blt_ext.model.checkpoint.load_pretrained`."""
        from .checkpoint import load_pretrained

        return load_pretrained(path, **kwargs)

    def save_pretrained(self, path) -> None:
        """Write the transformers format; see :func:`blt_ext.model.checkpoint.save_transformers`."""
        from .checkpoint import save_transformers

        save_transformers(self, path)
