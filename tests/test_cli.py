"""The blt-ext command line: train (and resume, and Ctrl-C), calibrate, patch, generate, errors."""

import json

import pytest
import torch

from blt_ext.cli import TextStream, main, split_patches
from blt_ext.model import EOS_ID, ByteLatentTransformer, EntropyModel, preset
from blt_ext.model.tokenizer import OFFSET
from blt_ext.train import Trainer, load_checkpoint, save_entropy_model

TEXT = "def add(a, b):\n    return a + b  # the sum, naïvely\n"


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_corpus")
    for i in range(25):
        (root / f"f{i}.py").write_text(f"def f{i}(x):\n    return x * {i} + {i * 7}\n" * 8)
    return root


@pytest.fixture(scope="module")
def entropy_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("em") / "entropy"
    save_entropy_model(EntropyModel(preset("blt-entropy-tiny")), path)
    return path


@pytest.fixture(scope="module")
def blt_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = ByteLatentTransformer(preset("blt-tiny"), backend="torch")
    model.config.patching_threshold = model.patcher.threshold = 5.5
    path = tmp_path_factory.mktemp("blt") / "blt"
    model.save_pretrained(path)
    return path


def run(capsys, *argv):
    """(exit code, stdout, stderr) of ``blt-ext argv`` (argparse errors exit through SystemExit)."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


TRAIN = ["--seq-len", 32, "--batch-size", 2, "--eval-batches", 1, "--eval-every", 2, "--warmup", 1,
         "--checkpoint-every", 0, "--no-progress"]


def test_train_entropy_then_resume_longer(capsys, corpus, tmp_path):
    code, out, err = run(capsys, "train", "entropy", "--data", corpus, "--out", tmp_path, "--steps", 3, *TRAIN)
    assert code == 0, err
    assert "entropy: 3 steps, held-out" in out and str(tmp_path / "model") in out
    assert (tmp_path / "checkpoint.pt").is_file() and (tmp_path / "model" / "model.safetensors").is_file()
    code, _, err = run(capsys, "train", "--resume", tmp_path, "--lr", 1)
    assert code == 2 and "argument --lr: cannot be changed when resuming" in err
    code, _, err = run(capsys, "train", "--resume", tmp_path, "--out", tmp_path / "elsewhere")
    assert code == 2 and "argument --out: cannot be changed when resuming" in err
    code, out, err = run(capsys, "train", "--resume", tmp_path, "--steps", 5, "--no-progress")
    assert code == 0, err
    assert "entropy: 5 steps" in out
    assert load_checkpoint(tmp_path)["step"] == 5


def test_train_blt_with_an_entropy_model(capsys, corpus, entropy_dir, tmp_path):
    code, out, err = run(capsys, "train", "blt", "--data", corpus, "--entropy-model", entropy_dir, "--out", tmp_path,
                         "--steps", 2, "--target-patch-size", 3, "--entropies", "cached", *TRAIN)
    assert code == 0, err
    assert "patching threshold" in err and "mean patch size" in err
    assert ByteLatentTransformer.from_pretrained(tmp_path / "model").config.entropy_model is not None


def test_ctrl_c_saves_and_exits_130(capsys, corpus, tmp_path, monkeypatch):
    real = Trainer.train_step

    def step(self):
        if self.step == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "train_step", step)
    code, out, err = run(capsys, "train", "entropy", "--data", corpus, "--out", tmp_path, "--steps", 5, *TRAIN)
    assert code == 130
    assert f"interrupted after step 2: checkpoint saved to {tmp_path / 'checkpoint.pt'}" in err
    assert f"blt-ext train --resume {tmp_path}" in err
    assert "Traceback" not in err
    assert load_checkpoint(tmp_path)["step"] == 2


@pytest.mark.parametrize("argv,argument,message", [
    (["train", "entropy", "--steps", "-3"], "--steps", "must be an integer >= 1, got '-3'"),
    (["train", "entropy", "--lr", "fast"], "--lr", "must be a number > 0, got 'fast'"),
    (["train", "entropy", "--data", "/no/such/corpus"], "--data", "path does not exist: /no/such/corpus"),
    (["train", "blt", "--steps", "2"], "--entropy-model", "required for 'blt'"),
    (["train", "entropy", "--preset", "blt-tiny"], "--preset", "must be one of"),
    (["train"], "task", "give 'entropy' or 'blt'"),
    (["calibrate", "/no/such/model", "--target", "4"], "MODEL", "path does not exist"),
    (["patch", "text", "--threshold", "nan"], "--threshold", "must be a finite number"),
    (["patch"], "TEXT", "give a text or --file PATH"),
    (["patch", "some text", "--mode", "entropy"], "--model", "entropy patching needs an entropy model"),
    (["generate", "/no/such/model", "hi"], "MODEL", "path does not exist"),
])
def test_bad_arguments_give_one_line_naming_the_argument(capsys, argv, argument, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert f"argument {argument}" in lines[0] and message in lines[0]
    assert lines[0].startswith(f"blt-ext {argv[0]}: error:")


def test_semantic_errors_after_parsing(capsys, corpus, entropy_dir, tmp_path):
    code, _, err = run(capsys, "train", "--resume", tmp_path, "--steps", 2)
    assert code == 2 and "argument --resume: no training checkpoint" in err
    code, _, err = run(capsys, "calibrate", entropy_dir, "--target", 500, "--data", corpus, "--seq-len", 32)
    assert code == 2 and "argument --target: target 500.0 is outside" in err
    code, _, err = run(capsys, "patch", "abc", "--model", entropy_dir)
    assert code == 2 and "argument --threshold: this entropy model directory carries no threshold" in err
    code, _, err = run(capsys, "generate", tmp_path, "hi")
    assert code == 2 and "argument MODEL: not a BLT checkpoint directory" in err
    code, _, err = run(capsys, "generate", entropy_dir, "hi", "--top-p", 2)
    assert code == 2 and "argument --top-p: must be a number > 0 and <= 1" in err
    assert "Traceback" not in err


def test_calibrate_json(capsys, corpus, entropy_dir):
    code, out, err = run(capsys, "calibrate", entropy_dir, "--target", 3, "--data", corpus, "--seq-len", 64,
                         "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["mean_patch_size"] == pytest.approx(3, rel=0.01)
    assert sum(result["histogram"].values()) == result["num_patches"]
    code, out, _ = run(capsys, "calibrate", entropy_dir, "--target", 3, "--data", corpus, "--seq-len", 64)
    assert code == 0 and "patch sizes" in out and f"--threshold {result['threshold']:.6g}" in out


def test_patch_json_follows_the_threshold_rule(capsys, blt_dir):
    code, out, err = run(capsys, "patch", TEXT, "--model", blt_dir, "--json", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    data = TEXT.encode()
    lengths = [p["length"] for p in result["patches"]]
    assert sum(lengths) == len(data) == result["num_bytes"] == len(result["entropies"])
    assert "".join(p["text"] for p in result["patches"]) == TEXT
    starts = {p["start"] for p in result["patches"]}
    # byte 0 always starts a patch; byte j >= 1 starts one iff its entropy exceeds the threshold
    expected = {0} | {j for j in range(1, len(data)) if result["entropies"][j] > result["threshold"]}
    assert starts == expected
    assert result["threshold"] == 5.5


def test_patch_text_colour_and_space_mode(capsys, tmp_path):
    code, out, _ = run(capsys, "patch", "hello big world", "--color", "never")
    assert code == 0
    assert out.splitlines()[0] == "hello |big |world"  # a space ends its patch
    assert "15 bytes, 3 patches" in out
    code, out, _ = run(capsys, "patch", "hello big world", "--color", "always")
    assert "\033[30;46mhello \033[0m\033[30;43mbig \033[0m" in out
    (tmp_path / "in.txt").write_bytes(b"a b")
    code, out, _ = run(capsys, "patch", "--file", tmp_path / "in.txt", "--mode", "byte", "--json")
    assert [p["text"] for p in json.loads(out)["patches"]] == ["a", " ", "b"]


def test_split_patches_keeps_multibyte_characters_whole():
    data = "aé€b".encode()  # 1 + 2 + 3 + 1 bytes
    assert split_patches(data, [2, 2, 3]) == ["a", "é", "€b"]


def test_generate_matches_the_model(capsys, blt_dir):
    code, out, err = run(capsys, "generate", blt_dir, "--prompt", "def ", "--max-new-bytes", 6, "--json",
                         "--no-stop-at-eos", "--device", "cpu")
    assert code == 0, err
    result = json.loads(out)
    expected = ByteLatentTransformer.from_pretrained(blt_dir).generate(["def "], 6, stop_at_eos=False)
    assert result["ids"] == expected.ids[0] and len(result["ids"]) == 6
    code, out, err = run(capsys, "generate", blt_dir, "def ", "--max-new-bytes", 6, "--json", "--no-stop-at-eos",
                         "--no-cache", "--device", "cpu")
    assert code == 0 and json.loads(out)["ids"] == expected.ids[0], err
    code, out, _ = run(capsys, "generate", blt_dir, "def ", "--max-new-bytes", 3, "--temperature", 0.8,
                       "--top-k", 5, "--seed", 1)
    assert code == 0 and out.startswith("def ")
    # text mode streams the bytes as they come; what it prints in the end is prompt + text
    code, out, _ = run(capsys, "generate", blt_dir, "def ", "--max-new-bytes", 6, "--no-stop-at-eos",
                       "--device", "cpu")
    assert code == 0 and out == "def " + expected.texts[0] + "\n"


def test_text_stream_prints_whole_characters_and_stops_at_eos(capsys):
    stream = TextStream("é: ")
    for byte in "→ ok".encode():  # a three-byte character first
        stream([0], [byte + OFFSET])
        if byte == 0x86:  # the arrow's second byte: nothing of it printed yet
            assert capsys.readouterr().out == "é: "
    stream([0], [EOS_ID])
    stream([0], [ord("x") + OFFSET])  # after EOS nothing more
    stream.close()
    assert capsys.readouterr().out == "→ ok\n"


def test_ops_and_env(capsys):
    code, out, _ = run(capsys, "ops")
    assert code == 0 and "patch_cross_attention" in out
    code, out, _ = run(capsys, "env")
    assert code == 0 and "built against torch" in out
    code, out, _ = run(capsys, "ops", "--check", "--reps", 1, "--device", "cpu")
    assert code == 0 and out.count(" yes ") == 4 and "speedup" in out


def test_a_real_sigint_saves_a_checkpoint_and_exits_130(corpus, tmp_path):
    """Ctrl-C sent to a running ``python -m blt_ext train``: checkpoint, message, exit 130."""
    import os
    import signal
    import subprocess
    import sys

    import blt_ext

    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(blt_ext.__file__)))
    proc = subprocess.Popen(
        [sys.executable, "-m", "blt_ext", "train", "entropy", "--data", str(corpus), "--out", str(tmp_path),
         "--steps", "100000", "--seq-len", "32", "--batch-size", "2", "--eval-every", "0", "--checkpoint-every", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
        # Ctrl-C's default, whatever this process's own: a job started in the background of a
        # script ignores SIGINT, and its children inherit that (the run would then never stop).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # the bar's first line: training has started
            if line.startswith("train entropy"):
                break
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
    finally:
        proc.kill()
    assert "interrupted after step" in err and "Traceback" not in err
    assert load_checkpoint(tmp_path)["step"] >= 1
