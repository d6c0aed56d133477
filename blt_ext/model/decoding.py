"""KV-cached BLT decoding, one row at a time.

A new byte costs one position in the entropy model, the local encoder and the local decoder,
and one position in the global transformer each time a patch completes, instead of a forward
over the whole prefix. It gives the logits of the full forward because everything the last byte
reads is final once computed:

- every self-attention is causal (window and documents included), so earlier positions' keys
  and values never change;
- patching is causal: whether byte t + 1 starts a patch depends on the entropies up to t, so
  the layout of the prefix never changes as bytes arrive (only its last patch grows);
- byte t's decoder reads the global output of patch p(t + 1) - 1, which is complete (the patch
  holding t when t + 1 starts a new one, the one before otherwise). So the global transformer
  only ever needs complete patches, each computed once, from encoder slots that are final
  because they pool and attend the patch's own bytes only.

Arithmetic differs from the full forward only in summation order (other matrix shapes).
"""

from __future__ import annotations

import torch

from .blt import ByteLatentTransformer, patch_document_ids
from .entropy_model import EntropyModel
from .layers import GrowingTensor, KVCache, document_ids, incremental_mask, rope_angles


class RowDecoder:
    """The caches of one sequence; :meth:`extend` appends bytes and returns their next-byte logits."""

    def __init__(self, model: ByteLatentTransformer):
        self.model = model
        device = model.lm_head.weight.device
        self.tokens = torch.empty(0, dtype=torch.long, device=device)
        patcher, entropy_model = model.patcher, model.entropy_model
        self.cached_entropies = patcher.mode == "entropy" and isinstance(entropy_model, EntropyModel)
        self.entropies = torch.empty(0, dtype=torch.float32, device=device)
        self.entropy_caches = [KVCache() for _ in entropy_model.layers] if self.cached_entropies else None
        self.encoder_caches = [KVCache() for _ in model.local_encoder.layers]
        self.encoder_states = [GrowingTensor(dim=1) for _ in model.local_encoder.layers]  # [1, T, De] each
        self.global_caches = [KVCache() for _ in model.global_transformer.layers]
        self.patch_outputs = GrowingTensor(dim=1)  # [1, complete patches, Dg]
        self.decoder_caches = [KVCache() for _ in model.local_decoder.layers]
        self.context = max(model.local_encoder.embedding.ngram_sizes) - 1  # bytes a hash n-gram looks back

    @property
    def length(self) -> int:
        return self.tokens.shape[0]

    def extend(self, new_ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, V] of the bytes after each of the ``new_ids`` [n] appended to the sequence.

        The first call takes the whole prompt at once; later calls go one byte at a time.
        """
        if new_ids.dim() != 1 or new_ids.numel() == 0:
            raise ValueError(f"RowDecoder.extend: new_ids must be 1-D and non-empty, got shape {tuple(new_ids.shape)}")
        if self.length > 0 and new_ids.numel() > 1:
            return torch.cat([self.extend(new_ids[i : i + 1]) for i in range(new_ids.numel())])
        start = self.length
        self.tokens = torch.cat([self.tokens, new_ids.to(self.tokens.device, torch.long)])
        row = self.tokens[None]
        positions = torch.arange(start, self.length, device=row.device)
        doc_ids = document_ids(row)[0]
        patch_lengths = self._patch_lengths(row, positions, doc_ids)
        states = self._encode_bytes(row, positions, doc_ids)
        self._complete_patches(row, patch_lengths)
        return self._decode(states[-1], positions, doc_ids, patch_lengths)

    def _patch_lengths(self, row, positions, doc_ids) -> torch.Tensor:
        """[1, P] lengths of the whole row (summing to T + 1), from the cached entropies."""
        patcher = self.model.patcher
        if self.cached_entropies:
            entropy_model = self.model.entropy_model
            mask = incremental_mask(positions, doc_ids, entropy_model.config.sliding_window)
            logits = entropy_model.run_layers(row[:, positions], positions, mask, self.entropy_caches)
            self.entropies = torch.cat([self.entropies, patcher.ops.entropy(logits)[0]])
            starts = patcher.ops.entropy_patch_starts(
                self.entropies[None], patcher.threshold, patcher.threshold_add, patcher.monotonicity, True
            )
            layout = patcher.ops.patch_layout(starts, True, patcher.max_patch_length)
        else:
            layout = patcher(row, include_next_token=True)
        return layout.patch_lengths[:, : int(layout.patch_counts[0])]

    def _encode_bytes(self, row, positions, doc_ids) -> list[torch.Tensor]:
        encoder, config = self.model.local_encoder, self.model.config
        first = int(positions[0])
        window = row[:, max(0, first - self.context) :]  # the new bytes' n-grams reach back this far
        h = encoder.embedding(window)[:, window.shape[1] - positions.numel() :]
        mask = incremental_mask(positions, doc_ids, config.local_attention_window_len)
        rope = rope_angles(positions, encoder.head_dim, encoder.rope_theta)
        new = encoder.byte_states(h, rope, mask, self.encoder_caches)
        for states, layer_new in zip(self.encoder_states, new):
            states.append(layer_new)
        return new

    def _complete_patches(self, row, patch_lengths) -> None:
        """Run the global transformer on the patches that have completed since the last call
        (all but the last patch, which holds the virtual next byte)."""
        done = self.patch_outputs.length
        complete = patch_lengths.shape[1] - 1
        if complete <= done:
            return
        encoder, config = self.model.local_encoder, self.model.config
        ends = torch.cumsum(patch_lengths[0], 0)
        first_byte, last_byte = int(ends[done] - patch_lengths[0, done]), int(ends[complete - 1])
        lengths = patch_lengths[:, done:complete]
        slots = encoder.patch_slots([s.value()[:, first_byte:last_byte] for s in self.encoder_states], lengths)
        positions = torch.arange(done, complete, device=row.device)
        doc_ids = patch_document_ids(row, patch_lengths)[0, :complete] if config.global_block_causal else None
        mask = incremental_mask(positions, doc_ids, None)
        x = slots.view(1, complete - done, config.global_input_dim)
        out = self.model.global_transformer.run_layers(x, positions, mask, self.global_caches)
        self.patch_outputs.append(out)

    def _decode(self, h, positions, doc_ids, patch_lengths) -> torch.Tensor:
        """Logits of the new bytes. A prompt reads the complete patches through the row's own
        layout; a single new byte t reads patch p(t + 1) - 1 = P - 2, given as the only patch of
        the layout [1, 1] (the byte, then its virtual next byte)."""
        model = self.model
        outputs = self.patch_outputs.value()
        if positions.numel() == 1:
            patch = patch_lengths.shape[1] - 2
            outputs, patch_lengths = outputs[:, patch : patch + 1], patch_lengths.new_ones(1, 2)
        # the last patch's output is never read (no byte's p(t + 1) - 1 reaches it): zeros
        patches = torch.cat([outputs, outputs.new_zeros(1, 1, outputs.shape[2])], dim=1)
        mask = incremental_mask(positions, doc_ids, model.config.local_attention_window_len)
        out = model.local_decoder(h, patches, patch_lengths, mask, positions, self.decoder_caches)
        return model.lm_head(out).float()[0]
