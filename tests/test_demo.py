"""The demo, in its quick form, through the command line: every output it promises exists."""

import json

import torch

from blt_ext.cli import main, split_patches
from blt_ext.demo import FULL, QUICK
from blt_ext.model import ByteLatentTransformer


def test_quick_demo_writes_everything_to_one_folder(capsys, tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    stdout = capsys.readouterr().out
    for heading in ("[1/6] Entropy model", "[2/6] Threshold calibration", "[3/6] BLT", "[4/6] A held-out sample",
                    "[5/6] Generation", "[6/6] Step time with backend=\"ext\" vs backend=\"torch\""):
        assert heading in stdout
    assert stdout.rstrip().splitlines()[-2].startswith("Done in") and f"Everything is in {out}/" in stdout

    for png in ("entropy_patches.png", "bits_per_byte.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["blt_steps"] == QUICK.blt_steps
    for name in ("entropy_model", "blt"):
        bpb = [e["bits_per_byte"] for e in summary[name]["evals"]]
        assert bpb[-1] < bpb[0]  # held-out bits per byte fell
    steps = [row[0] for row in summary["bits_per_byte_table"]]
    assert steps == sorted(steps) and steps[0] == 0

    sample = summary["sample"]
    assert sum(sample["patch_lengths"]) == len(sample["text"].encode()) == len(sample["entropies"])
    assert sample["marked"] == "|".join(split_patches(sample["text"].encode(), sample["patch_lengths"]))
    assert summary["calibration"]["threshold"] == ByteLatentTransformer.from_pretrained(
        out / "blt" / "model").config.patching_threshold

    assert [r["workload"].split(",")[0] for r in summary["timing"]] == [
        "BLT training step (fwd+bwd+AdamW)", "BLT forward", "entropy patching (model + patch layout)"]
    assert all(r["ext_ms"] > 0 and r["torch_ms"] > 0 for r in summary["timing"])
    torch.testing.assert_close(summary["timing_losses"]["loss_ext"], summary["timing_losses"]["loss_torch"],
                               rtol=1e-5, atol=1e-5)
    for f in summary["files"]:
        assert (out / f).is_file(), f
    assert "| step | entropy model | BLT |" in (out / "summary.md").read_text()


def test_the_default_demo_is_the_full_one():
    assert FULL.entropy_steps >= 200 and FULL.blt_steps >= 200 and FULL.corpus_bytes >= 1_000_000
