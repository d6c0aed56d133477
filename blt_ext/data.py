"""Byte datasets for training BLT and its entropy model.

Documents come from text files, directories (every regular file below them, sorted; ``.jsonl``
files are read as JSON lines) or JSONL files (one document per line, its text in a field).
Bytes are kept as they are: BLT models bytes, so a file that is not valid UTF-8 is still a
valid document (``read_documents(..., require_utf8=True)`` rejects it instead). Each document
becomes ``BOS bytes+4 EOS``; documents are concatenated into one stream that is cut into rows of
``seq_len + 1`` ids (inputs and next-byte targets). A held-out split takes whole documents.

The default corpus needs no download: the Python standard library's own ``.py`` sources
(tests and site-packages excluded), every file in sorted order until ``max_bytes``. Its exact
content depends on the Python version; ``describe_corpus`` reports what was taken.
"""

from __future__ import annotations

import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

from .model.tokenizer import BOS_ID, EOS_ID, OFFSET

DEFAULT_CORPUS_BYTES = 3_000_000


def default_corpus_paths(max_bytes: int = DEFAULT_CORPUS_BYTES) -> list[Path]:
    """Standard-library sources, sorted by path, taken in order until ``max_bytes``."""
    if max_bytes <= 0:
        raise ValueError(f"default_corpus_paths: max_bytes must be positive, got {max_bytes}")
    root = Path(sysconfig.get_paths()["stdlib"])
    candidates = sorted(
        p for p in root.rglob("*.py")
        if not {"site-packages", "test", "tests", "idle_test"} & set(p.relative_to(root).parts)
    )
    chosen, total = [], 0
    for path in candidates:
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    if not chosen:
        raise ValueError(f"default corpus: no Python sources found under {root}")
    return chosen


def _jsonl_documents(path: Path, field: str) -> list[bytes]:
    docs = []
    with path.open("rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ValueError(f"{path}:{lineno}: invalid JSON line ({exc})") from None
            if not isinstance(record, dict) or field not in record:
                raise ValueError(f"{path}:{lineno}: expected an object with a {field!r} field")
            if not isinstance(record[field], str):
                raise ValueError(f"{path}:{lineno}: field {field!r} must be a string, "
                                 f"got {type(record[field]).__name__}")
            docs.append(record[field].encode("utf-8", errors="ignore"))
    return docs


def read_documents(sources, *, jsonl_field: str = "text", require_utf8: bool = False) -> list[bytes]:
    """Documents (as bytes) from files, directories and JSONL files, in a stable order.

    Raises FileNotFoundError for a missing path and ValueError for an empty corpus, an invalid
    JSON line (with file and line number) or, with ``require_utf8``, bytes that are not UTF-8.
    """
    if isinstance(sources, (str, Path)):
        sources = [sources]
    docs: list[bytes] = []
    for source in sources:
        source = Path(source)
        if not source.exists():
            raise FileNotFoundError(f"data: path does not exist: {source}")
        files = sorted(p for p in source.rglob("*") if p.is_file()) if source.is_dir() else [source]
        for path in files:
            if path.suffix == ".jsonl":
                docs.extend(_jsonl_documents(path, jsonl_field))
                continue
            data = path.read_bytes()
            if require_utf8:
                try:
                    data.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ValueError(f"{path}: not valid UTF-8 at byte {exc.start}") from None
            docs.append(data)
    docs = [d for d in docs if d]
    if not docs:
        raise ValueError(f"data: the corpus {[str(s) for s in sources]} holds no non-empty document")
    return docs


def split_documents(docs: list[bytes], held_out_every: int = 20) -> tuple[list[bytes], list[bytes]]:
    """(train, held_out): every ``held_out_every``-th document is held out (a corpus of one
    document gives up its last 5% instead), so the split is the same on every run."""
    if held_out_every < 2:
        raise ValueError(f"split_documents: held_out_every must be >= 2, got {held_out_every}")
    if len(docs) == 1:
        cut = max(1, len(docs[0]) * 19 // 20)
        return [docs[0][:cut]], [docs[0][cut:] or docs[0][-1:]]
    held = [d for i, d in enumerate(docs) if i % held_out_every == held_out_every - 1] or docs[-1:]
    train = [d for i, d in enumerate(docs) if i % held_out_every != held_out_every - 1]
    return train, held


def pack_documents(docs: list[bytes], seq_len: int) -> torch.Tensor:
    """Rows [N, seq_len + 1] int64 of the stream ``BOS doc EOS BOS doc EOS ...``; the tail that
    does not fill a row is dropped (a stream shorter than one row raises ValueError)."""
    if seq_len < 1:
        raise ValueError(f"pack_documents: seq_len must be >= 1, got {seq_len}")
    pieces = []
    for doc in docs:
        pieces += [torch.tensor([BOS_ID]), torch.frombuffer(bytearray(doc), dtype=torch.uint8).long() + OFFSET,
                   torch.tensor([EOS_ID])]
    stream = torch.cat(pieces)
    rows = stream.numel() // (seq_len + 1)
    if rows == 0:
        raise ValueError(f"pack_documents: {stream.numel()} ids are fewer than one row of seq_len + 1 = "
                         f"{seq_len + 1}")
    return stream[: rows * (seq_len + 1)].view(rows, seq_len + 1)


@dataclass
class BatchStream:
    """Endless shuffled batches of packed rows; its position is part of a checkpoint.

    Each epoch visits every row once in an order drawn from ``seed`` and the epoch number, so
    ``state_dict`` (epoch, position) is all it takes to continue exactly where it stopped.
    """

    rows: torch.Tensor
    batch_size: int
    seed: int = 0
    epoch: int = 0
    position: int = 0

    def __post_init__(self):
        if self.batch_size < 1 or self.batch_size > self.rows.shape[0]:
            raise ValueError(f"BatchStream: batch_size must be in [1, {self.rows.shape[0]}] (the number of "
                             f"packed rows), got {self.batch_size}")

    def _order(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(self.rows.shape[0], generator=g)

    def next_batch(self) -> torch.Tensor:
        if self.position + self.batch_size > self.rows.shape[0]:
            self.epoch, self.position = self.epoch + 1, 0
        index = self._order()[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return self.rows[index]

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]


def describe_corpus(docs: list[bytes]) -> str:
    total = sum(len(d) for d in docs)
    return f"{len(docs)} documents, {total / 1e6:.2f} MB"
