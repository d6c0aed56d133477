import json

import pytest
import torch

from blt_ext.data import (
    BatchStream,
    default_corpus_paths,
    pack_documents,
    read_documents,
    split_documents,
)
from blt_ext.model.tokenizer import BOS_ID, EOS_ID, OFFSET


def test_default_corpus_is_deterministic_and_sized():
    first = default_corpus_paths(200_000)
    assert first == default_corpus_paths(200_000)
    sizes = [p.stat().st_size for p in first]
    assert sum(sizes[:-1]) < 200_000 <= sum(sizes)
    assert all(p.suffix == ".py" and "test" not in p.parts for p in first)


def test_read_documents_from_files_directories_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"alpha")
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "b.txt").write_bytes(b"\xff\xfebeta")  # not UTF-8: kept as raw bytes
    (sub / "c.jsonl").write_text(json.dumps({"text": "gamma"}) + "\n\n" + json.dumps({"text": "d\u00e9"}) + "\n")
    (sub / "empty.txt").write_bytes(b"")
    docs = read_documents(tmp_path)
    assert docs == [b"alpha", b"\xff\xfebeta", b"gamma", "d\u00e9".encode()]
    assert read_documents([tmp_path / "a.txt", sub / "c.jsonl"]) == [b"alpha", b"gamma", "d\u00e9".encode()]


def test_read_documents_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="path does not exist"):
        read_documents(tmp_path / "missing")
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(ValueError, match="holds no non-empty document"):
        read_documents(tmp_path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: invalid JSON line"):
        read_documents(bad)
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: expected an object with a 'text' field"):
        read_documents(bad)
    bad.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match="must be a string, got int"):
        read_documents(bad)
    raw = tmp_path / "raw.bin"
    raw.write_bytes(b"ok\xff")
    with pytest.raises(ValueError, match="not valid UTF-8 at byte 2"):
        read_documents(raw, require_utf8=True)


def test_split_is_stable_and_disjoint():
    docs = [bytes([65 + i % 26]) * (i + 1) for i in range(45)]
    train, held = split_documents(docs, held_out_every=10)
    assert held == [docs[9], docs[19], docs[29], docs[39]]
    assert len(train) + len(held) == len(docs) and not set(train) & set(held)
    one_train, one_held = split_documents([b"x" * 100])
    assert one_train == [b"x" * 95] and one_held == [b"x" * 5]


def test_pack_documents_layout():
    rows = pack_documents([b"ab", b"c"], seq_len=3)
    stream = [BOS_ID, 97 + OFFSET, 98 + OFFSET, EOS_ID, BOS_ID, 99 + OFFSET, EOS_ID]
    assert rows.tolist() == [stream[:4]]
    with pytest.raises(ValueError, match="fewer than one row"):
        pack_documents([b"a"], seq_len=8)
    with pytest.raises(ValueError, match="seq_len must be >= 1"):
        pack_documents([b"a"], seq_len=0)


def test_batch_stream_resumes_exactly():
    rows = torch.arange(40).view(10, 4)
    stream = BatchStream(rows, batch_size=3, seed=7)
    seen = [stream.next_batch() for _ in range(5)]
    # an epoch visits every row once before the next begins
    first_epoch = torch.cat(seen[:3])[:, 0].tolist()
    assert len(set(first_epoch)) == 9
    resumed = BatchStream(rows, batch_size=3)
    resumed.load_state_dict(stream.state_dict())
    for _ in range(4):
        assert torch.equal(stream.next_batch(), resumed.next_batch())
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 10\]"):
        BatchStream(rows, batch_size=11)
