"""KV-cached BLT decoding for a batch of rows.

A new byte costs one position in the entropy model, the local encoder and the local decoder,
and one position in the global transformer each time a patch completes, instead of a forward
over the whole prefix; the rows of a batch take their step together, and their prompts run
together too. It gives the logits of the full forward because everything the last byte reads is
final once computed:

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
import torch.nn.functional as F

from .blt import ByteLatentTransformer, patch_document_ids
from .entropy_model import EntropyModel
from .layers import KVCache, document_ids, eager_layers, incremental_mask, rope_angles
from .tokenizer import BOE_ID


class _Row:
    """What one row keeps on the host besides its parts of the batch's caches and buffers: its
    length, patch layout and how far the global transformer has run."""

    def __init__(self):
        self.length = 0  # bytes so far
        self.complete = 0  # patches the global transformer has run on
        self.patch_lengths: torch.Tensor | None = None  # [1, P], summing to T + 1
        self.last_patch_length = 0  # of patch_lengths, on the host
        self.complete_bytes = 0  # bytes of the patches the global transformer has run on


class RowBuffer:
    """[rows, capacity, ...] values of the first write's dtype and trailing shape, each row filled
    to its own length; the rest holds ``fill``. Capacity doubles when needed."""

    def __init__(self, rows: int, fill) -> None:
        self.rows, self.fill = rows, fill
        self.data: torch.Tensor | None = None

    def write(self, picked: torch.Tensor, positions: torch.Tensor, values: torch.Tensor, end: int) -> torch.Tensor:
        """Write ``values`` [R, n, ...] of rows ``picked`` [R] at ``positions`` [R, n]; returns
        those rows up to ``end`` (beyond each row's length: ``fill``)."""
        if self.data is None or end > self.data.shape[1]:
            grown = values.new_full((self.rows, max(2 * end, 64), *values.shape[2:]), self.fill)
            if self.data is not None:
                grown[:, : self.data.shape[1]] = self.data
            self.data = grown
        self.data[picked[:, None], positions] = values
        return self.data[picked, :end]


class BatchDecoder:
    """KV caches for ``rows`` sequences. :meth:`prefill` takes a row's prompt, :meth:`step` one
    new byte for each of several rows at once; both return next-byte logits."""

    def __init__(self, model: ByteLatentTransformer, rows: int = 1):
        if not isinstance(model, ByteLatentTransformer):
            raise TypeError(f"BatchDecoder: model must be a ByteLatentTransformer, got {type(model).__name__}")
        if rows < 1:
            raise ValueError(f"BatchDecoder: rows must be >= 1, got {rows}")
        self.model = model
        self.device = model.lm_head.weight.device
        entropy_model = model.entropy_model
        self.cached_entropies = model.patcher.mode == "entropy" and isinstance(entropy_model, EntropyModel)
        self.entropy_cache = KVCache(len(entropy_model.layers), rows) if self.cached_entropies else None
        self.encoder_cache = KVCache(len(model.local_encoder.layers), rows)
        self.global_cache = KVCache(len(model.global_transformer.layers), rows)
        self.decoder_cache = KVCache(len(model.local_decoder.layers), rows)
        self.rows = [_Row() for _ in range(rows)]
        # Per position of every row, so that a step reads and writes all rows in one op: bytes
        # (BOE past a row's end), entropies, each encoder layer's byte states (they feed the slots
        # of the patch being built), and the global transformer's output per complete patch.
        self.tokens = RowBuffer(rows, BOE_ID)
        self.entropies = RowBuffer(rows, 0.0)
        self.encoder_states = [RowBuffer(rows, 0.0) for _ in model.local_encoder.layers]
        self.patch_outputs = RowBuffer(rows, 0.0)
        self.context = max(model.local_encoder.embedding.ngram_sizes) - 1  # bytes a hash n-gram looks back

    def length(self, row: int) -> int:
        return self.rows[row].length

    def patch_lengths(self, row: int) -> torch.Tensor:
        """[1, P] patch lengths of the row so far (summing to its length + 1)."""
        return self.rows[row].patch_lengths

    def complete_patches(self, row: int) -> int:
        return self.rows[row].complete

    def prefill(self, row: int, ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits [n, V] after each of the prompt ``ids`` [n] of an empty ``row``."""
        return self.prefill_rows([row], [ids])[0]

    @torch.inference_mode()
    @eager_layers()  # compiled layers would compile anew for every step's shapes
    def prefill_rows(self, rows: list[int], prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """fp32 logits [n_i, V] after each id of ``prompts[i]`` (1-D, n_i ids) for the empty
        ``rows[i]``, all rows in one batch (right padded to the longest prompt)."""
        self._check_rows("prefill", rows)
        if len(prompts) != len(rows) or len(set(rows)) != len(rows):
            raise ValueError(f"BatchDecoder.prefill: rows must be distinct, one per prompt, got {rows} "
                             f"for {len(prompts)} prompts")
        for row, ids in zip(rows, prompts):
            if ids.dim() != 1 or ids.numel() == 0:
                raise ValueError(f"BatchDecoder.prefill: ids must be 1-D and non-empty, got shape {tuple(ids.shape)}")
            if self.length(row) > 0:
                raise ValueError(f"BatchDecoder.prefill: row {row} already holds {self.length(row)} bytes; use step")
        counts = [ids.numel() for ids in prompts]
        ids = self._padded([ids.to(self.device, torch.long) for ids in prompts], BOE_ID)
        logits = self._advance(rows, ids, counts)
        return [row_logits[:count] for row_logits, count in zip(logits, counts)]

    @torch.inference_mode()
    @eager_layers()
    def step(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        """fp32 logits [R, V] after appending ``ids`` [R] (one byte each) to ``rows`` (prefilled)."""
        self._check_rows("step", rows)
        if ids.shape != (len(rows),):
            raise ValueError(f"BatchDecoder.step: ids must be [{len(rows)}] (one per row), got {tuple(ids.shape)}")
        if any(self.length(r) == 0 for r in rows) or len(set(rows)) != len(rows):
            raise ValueError(f"BatchDecoder.step: rows must be distinct and prefilled, got {rows}")
        return self._advance(rows, ids[:, None], [1] * len(rows))[:, 0]

    def _check_rows(self, where: str, rows: list[int]) -> None:
        if not rows or any(not 0 <= r < len(self.rows) for r in rows):
            raise ValueError(f"BatchDecoder.{where}: rows must be indices in [0, {len(self.rows)}), got {rows}")

    # Either prompts of empty rows (right padded to the longest) or one new byte for each row.
    # A shorter prompt's padding runs through every part like its bytes; what it writes past the
    # row's end is overwritten by the row's next bytes before anything attends to it.
    def _advance(self, rows: list[int], ids: torch.Tensor, counts: list[int]) -> torch.Tensor:
        ids = ids.to(self.device, torch.long)
        states = [self.rows[r] for r in rows]
        starts = [s.length for s in states]
        span = (min(starts), max(starts) + ids.shape[1] - 1)
        picked = torch.tensor(rows, device=self.device)
        positions = torch.tensor(starts, device=self.device)[:, None] + torch.arange(ids.shape[1], device=self.device)
        for state, count in zip(states, counts):
            state.length += count
        tokens = self.tokens.write(picked, positions, ids, span[1] + 1)
        doc_ids = document_ids(tokens)
        step = (picked, positions, span, doc_ids, counts)
        self._patch(rows, states, ids, step)
        byte_states = self._encode(rows, states, step)
        self._complete_patches(rows, states)
        return self._decode(rows, states, byte_states[-1], step)

    def _padded(self, rows: list[torch.Tensor], value) -> torch.Tensor:
        width = max(r.shape[-1] for r in rows)
        return torch.stack([F.pad(r, (0, width - r.shape[-1]), value=value) for r in rows])

    def _patch(self, rows, states, ids, step) -> None:
        """Each row's patch layout, from the batch's cached entropies (or the patcher on each row's
        bytes)."""
        patcher = self.model.patcher
        if not self.cached_entropies:
            layouts = [patcher(self.tokens.data[r : r + 1, : s.length], include_next_token=True)
                       for r, s in zip(rows, states)]
            lengths = self._padded([layout.patch_lengths[0] for layout in layouts], 0)
            self._set_layouts(states, lengths)
            return
        picked, positions, span, doc_ids, counts = step
        entropy_model = self.model.entropy_model
        mask = incremental_mask(positions, span, doc_ids, entropy_model.config.sliding_window)
        caches = self.entropy_cache.step(rows, picked, positions, counts)
        entropies = patcher.ops.entropy(entropy_model.run_layers(ids, positions, mask, caches))
        entropies = self.entropies.write(picked, positions, entropies, span[1] + 1)
        # Rows end at their own lengths L: a start forced just past each row's virtual byte L makes
        # its patches those of the row alone (patching is causal), whatever follows in the padding.
        starts = patcher.ops.entropy_patch_starts(entropies, patcher.threshold, patcher.threshold_add,
                                                  patcher.monotonicity, True)
        if all(count == ids.shape[1] for count in counts):
            ends = positions[:, -1:] + 2  # L + 1
        else:
            ends = torch.tensor([[s.length + 1] for s in states], device=self.device)
        starts = F.pad(starts, (0, 1)).scatter_(1, ends, True)
        self._set_layouts(states, patcher.ops.patch_layout(starts, True, patcher.max_patch_length).patch_lengths, ends)

    def _set_layouts(self, states, patch_lengths, ends=None) -> None:
        """Each row's patches from a batch's [R, P] lengths: those up to ``ends`` [R, 1] (default:
        all of them), counted and the last one's length read in one transfer from the device."""
        within = patch_lengths > 0
        if ends is not None:
            within &= patch_lengths.cumsum(1) <= ends
        counts = within.sum(1)
        last = patch_lengths.gather(1, counts[:, None] - 1)[:, 0]
        for i, (state, (count, last_length)) in enumerate(zip(states, torch.stack([counts, last], 1).tolist())):
            state.patch_lengths = patch_lengths[i : i + 1, :count]
            state.last_patch_length = last_length

    def _encode(self, rows, states, step) -> list[torch.Tensor]:
        """Every encoder layer's states [R, n, De] of the new bytes (also kept per row)."""
        picked, positions, span, doc_ids, counts = step
        encoder, config = self.model.local_encoder, self.model.config
        n = positions.shape[1]
        # the new bytes' hash n-grams reach `context` bytes back; before a row's start they see
        # BOE, the hash's own left padding
        back = positions[:, :1] - self.context + torch.arange(n + self.context, device=self.device)
        windows = self.tokens.data[picked[:, None], back.clamp(min=0)].masked_fill_(back < 0, BOE_ID)
        h = encoder.embedding(windows)[:, self.context :]
        mask = incremental_mask(positions, span, doc_ids, config.local_attention_window_len)
        rope = rope_angles(positions, encoder.head_dim, encoder.rope_theta)
        new = encoder.byte_states(h, rope, mask, self.encoder_cache.step(rows, picked, positions, counts))
        for kept, layer_states in zip(self.encoder_states, new):
            kept.write(picked, positions, layer_states, span[1] + 1)
        return new

    def _complete_patches(self, rows, states) -> None:
        """The global transformer on the patches completed by the new bytes: all but each row's
        last patch (it holds the virtual next byte). A prompt may complete many; a step at most
        one per row. The rows run together, padded to the most patches."""
        config = self.model.config
        ready, spans, dones, news, doc_ids = [], [], [], [], []
        for row, state in zip(rows, states):
            done, complete = state.complete, state.patch_lengths.shape[1] - 1
            if complete <= done:
                continue
            # the last patch holds the virtual next byte and the real ones before it
            first, last = state.complete_bytes, state.length + 1 - state.last_patch_length
            state.complete_bytes = last
            ready.append((row, state))
            spans.append((first, last))
            dones.append(done)
            news.append(complete - done)
            if config.global_block_causal:
                tokens = self.tokens.data[row : row + 1, : state.length]
                doc_ids.append(patch_document_ids(tokens, state.patch_lengths)[0, :complete])
        if not ready:
            return
        new = max(news)
        if len(ready) == 1:  # the row's own bytes and patches, as views
            (row, state), (first, last) = ready[0], spans[0]
            byte_states = [kept.data[row : row + 1, first:last] for kept in self.encoder_states]
            x = self.model.local_encoder.patch_slots(byte_states, state.patch_lengths[:, dones[0] : dones[0] + new])
        else:  # one patch per row (a step, or one-byte prompts): its length is last - first
            lengths = None if new == 1 else self._padded(
                [state.patch_lengths[0, done : done + k] for (_, state), done, k in zip(ready, dones, news)], 0)
            x = self._slots([row for row, _ in ready], spans, lengths)[:, : new * config.cross_attn_k]
        x = x.reshape(len(ready), new, config.global_input_dim)
        positions = torch.tensor(dones, device=self.device)[:, None] + torch.arange(new, device=self.device)
        span = (min(dones), max(dones) + new - 1)
        mask = incremental_mask(positions, span, self._padded(doc_ids, -1) if doc_ids else None, None)
        ready_rows = torch.tensor([row for row, _ in ready], device=self.device)
        caches = self.global_cache.step([row for row, _ in ready], ready_rows, positions, news)
        out = self.model.global_transformer.run_layers(x, positions, mask, caches)
        self.patch_outputs.write(ready_rows, positions, out, span[1] + 1)
        for (_, state), k in zip(ready, news):
            state.complete += k

    def _slots(self, rows, spans, lengths=None) -> torch.Tensor:
        """[R, (N + 1) * k, De] slots of the patches each of ``rows`` completed, its bytes [first,
        last) with patch ``lengths`` [R, N] (None: one patch), in one batch: the rows' bytes
        padded with zeros to the longest, each row's padding a last patch."""
        encoder = self.model.local_encoder
        width = max(last - first for first, last in spans)
        # rows, firsts and lengths reach the device in one transfer
        table = [[row, first, last - first] for row, (first, last) in zip(rows, spans)]
        picked, first, length = torch.tensor(table, device=self.device).unbind(1)
        back = first[:, None] + torch.arange(width, device=self.device)
        padding = back >= (first + length)[:, None]
        back = back.clamp(max=self.encoder_states[0].data.shape[1] - 1)  # a padding index may pass the end
        layer_states = [kept.data[picked[:, None], back].masked_fill_(padding[..., None], 0)
                        for kept in self.encoder_states]
        lengths = length[:, None] if lengths is None else lengths
        return encoder.patch_slots(layer_states, torch.cat([lengths, (width - length)[:, None]], 1))

    def _decode(self, rows, states, h, step) -> torch.Tensor:
        """Logits [R, n, V] of the new bytes. Prompts read the complete patches through each
        row's own layout (and a last patch over its padding); a single new byte t reads patch
        p(t + 1) - 1 = P - 2, given as the only patch of the layout [1, 1] (the byte, then its
        virtual next byte)."""
        picked, positions, span, doc_ids, counts = step
        model = self.model
        n = positions.shape[1]
        if n > 1:  # prompts of empty rows
            patch_lengths = self._padded([s.patch_lengths[0] for s in states], 0)
            padding = torch.tensor([[n - s.length] for s in states], device=self.device)
            patch_lengths = torch.cat([patch_lengths, padding], 1)
            # past each row's complete patches the buffer's values are never read
            outputs = self.patch_outputs.data[picked, : patch_lengths.shape[1] - 1]
        else:  # patch P - 2 of each row
            last = torch.tensor([s.complete - 1 for s in states], device=self.device)
            outputs = self.patch_outputs.data[picked, last][:, None]
            patch_lengths = torch.ones(len(rows), 2, dtype=torch.long, device=self.device)
        # the layout's last patch is never read either (no byte's p(t + 1) - 1 reaches it): zeros
        patches = torch.cat([outputs, outputs.new_zeros(outputs.shape[0], 1, outputs.shape[2])], dim=1)
        mask = incremental_mask(positions, span, doc_ids, model.config.local_attention_window_len)
        caches = self.decoder_cache.step(rows, picked, positions, counts)
        return model.lm_head(model.local_decoder(h, patches, patch_lengths, mask, positions, caches)).float()
