"""Byte tokenizer of BLT (BLT_SPEC.md a): ids are UTF-8 bytes + 4, below them four specials.

>>> tok = ByteTokenizer()
>>> tok.encode("Hi")
[1, 76, 109, 2]
>>> tok.decode([1, 76, 109, 2])
'Hi'
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

BOE_ID = 0  # beginning of example: padding filler, hash left-padding
BOS_ID = 1
EOS_ID = 2
BPE_ID = 3  # delimiter of the optional bpe_delim mode
OFFSET = 4
PAD_ID = -1  # not embeddable; only marks empty slots of generation buffers
VOCAB_SIZE = 256 + OFFSET


class BatchEncoding(NamedTuple):
    """A padded batch: ``ids`` [B, L] int64, ``mask`` [B, L] bool (True on real ids), ``lengths`` [B]."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def _to_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        # The original drops unencodable characters (lone surrogates) instead of failing.
        return text.encode("utf-8", errors="ignore")
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise TypeError(f"ByteTokenizer: text must be str or bytes, got {type(text).__name__}")


class ByteTokenizer:
    """Text <-> ids with the BLT specials (BOE=0, BOS=1, EOS=2, BPE=3) and the +4 byte offset."""

    boe_id = BOE_ID
    bos_id = BOS_ID
    eos_id = EOS_ID
    bpe_id = BPE_ID
    offset = OFFSET
    pad_id = PAD_ID
    vocab_size = VOCAB_SIZE

    def encode(self, text: str | bytes, add_bos: bool = True, add_eos: bool = True) -> list[int]:
        """Ids of ``text`` (str as UTF-8, or raw bytes), with BOS first and EOS last by default."""
        ids = [b + OFFSET for b in _to_bytes(text)]
        return ([BOS_ID] if add_bos else []) + ids + ([EOS_ID] if add_eos else [])

    def decode(self, ids: Sequence[int] | torch.Tensor, cut_at_eos: bool = False) -> str:
        """Text of ``ids``: specials dropped, invalid UTF-8 dropped; stops at the first EOS if asked."""
        return self.decode_bytes(ids, cut_at_eos).decode("utf-8", errors="ignore")

    def decode_bytes(self, ids: Sequence[int] | torch.Tensor, cut_at_eos: bool = False) -> bytes:
        """The raw bytes of ``ids`` (specials and PAD dropped)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = bytearray()
        for i in ids:
            if cut_at_eos and i == EOS_ID:
                break
            if i >= OFFSET:
                if i >= VOCAB_SIZE:
                    raise ValueError(f"ByteTokenizer.decode: id {i} is outside [0, {VOCAB_SIZE})")
                out.append(i - OFFSET)
        return bytes(out)

    def batch_encode(
        self,
        texts: Sequence[str | bytes | Sequence[int]],
        add_bos: bool = True,
        add_eos: bool = True,
        pad_id: int = BOE_ID,
        device: torch.device | str | None = None,
    ) -> BatchEncoding:
        """Encode several texts (or already-encoded id lists, taken as they are) and right-pad.

        Padding uses BOE (0), as in training: the mask marks the real ids, and the model never
        lets a real position see the padding after it (every mask is causal).
        """
        rows = [
            list(t) if not isinstance(t, (str, bytes, bytearray)) else self.encode(t, add_bos, add_eos)
            for t in texts
        ]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, r in enumerate(rows):
            ids[b, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[b, : len(r)] = True
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        return BatchEncoding(ids.to(device), mask.to(device), lengths.to(device))
