"""The trainer: schedule, optimizer groups, learning, exact resume, Ctrl-C, atomic checkpoints,
cached entropies, threshold calibration, export and reload."""

import io
import math
import random

import pytest
import torch

from blt_ext.model import ByteLatentTransformer, EntropyModel, preset
from blt_ext.train import (
    CHECKPOINT_NAME,
    Progress,
    TrainConfig,
    Trainer,
    TrainingInterrupted,
    atomic_save,
    blt_patch_lengths,
    build_optimizer,
    compute_entropies,
    cosine_schedule,
    load_checkpoint,
    load_entropy_model,
    save_entropy_model,
)

WORDS = ("the quick brown fox jumps over lazy dog while patches of bytes carry entropy into a "
         "latent transformer that reads text one byte at a time").split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """40 small documents of pseudo-sentences: enough structure for a byte LM to learn fast."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    for i in range(40):
        sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))).capitalize() + "."
                     for _ in range(12)]
        (root / f"doc{i:02d}.txt").write_text(" ".join(sentences) + "\n")
    return root


def small(corpus, **kw):
    cfg = dict(data=[str(corpus)], seq_len=48, batch_size=4, steps=6, warmup_steps=2, eval_every=3,
               eval_batches=1, checkpoint_every=0, lr=3e-3)
    cfg.update(kw)
    return TrainConfig(**cfg)


@pytest.fixture(scope="module")
def entropy_dir(corpus, tmp_path_factory):
    """A briefly trained entropy model (its directory), the patcher of the BLT tests."""
    out = tmp_path_factory.mktemp("entropy_run")
    Trainer(small(corpus, steps=8, out=str(out)), progress=False, verbose=False).train()
    return out / "model"


def test_cosine_schedule_warmup_then_cosine_to_floor():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = cosine_schedule(opt, warmup_steps=4, total_steps=14, min_lr_ratio=0.1)
    lrs = []
    for _ in range(16):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[:4] == pytest.approx([0.5, 1.0, 1.5, 2.0])
    # halfway through the decay the cosine is at the mean of peak and floor
    assert lrs[9] == pytest.approx(0.2 + 1.8 * 0.5)
    assert lrs[14] == pytest.approx(0.2) and lrs[15] == pytest.approx(0.2)
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))


def test_optimizer_skips_frozen_entropy_model_and_decays_only_matrices():
    model = ByteLatentTransformer(preset("blt-tiny"), backend="torch")
    opt = build_optimizer(model, 1e-3, weight_decay=0.1)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not any(id(p) in in_opt for p in model.entropy_model.parameters())
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(in_opt) == len(trainable)
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() == 1 for p in no_decay["params"])


def test_entropy_training_lowers_held_out_bits_per_byte(corpus, tmp_path):
    result = Trainer(small(corpus, steps=30, eval_every=10, out=str(tmp_path)), progress=False,
                     verbose=False).train()
    bpb = [e.bits_per_byte for e in result.evals]
    assert [e.step for e in result.evals] == [0, 10, 20, 30]
    assert bpb[0] > 7.5  # a random byte LM: about log2(260) bits
    assert bpb[-1] < bpb[0] - 2.0
    assert len(result.train_losses) == 30
    # bits per byte is the loss in nats over ln 2
    assert all(e.bits_per_byte == pytest.approx(e.loss / math.log(2)) for e in result.evals)
    records = (tmp_path / "log.jsonl").read_text().splitlines()
    assert len(records) == 30 + 4
    model = load_entropy_model(result.model_dir)
    assert isinstance(model, EntropyModel) and not any(p.requires_grad for p in model.parameters())


def test_compiled_layers_train_with_the_eager_losses(corpus):
    runs = {}
    for compile_layers in (False, True):
        trainer = Trainer(small(corpus, steps=3, eval_every=0, compile=compile_layers), progress=False, verbose=False)
        blocks = list(trainer.model.layers)
        assert all(("forward" in vars(b)) == compile_layers for b in blocks)
        runs[compile_layers] = trainer.train().train_losses
    # Compiled kernels round at other places than eager ones: within fp32 noise, or within a
    # small fraction of bf16's resolution (2^-8) under autocast on CUDA.
    assert runs[True] == pytest.approx(runs[False], rel=1e-4 if trainer.amp_dtype is None else 1e-3)


def _stop_after(k):
    def callback(trainer, info):
        if info.step == k:
            raise KeyboardInterrupt

    return callback


@pytest.mark.parametrize("task", ["entropy", "blt", "blt-cached"])
def test_interrupted_and_resumed_run_has_the_losses_of_an_uninterrupted_one(task, corpus, entropy_dir, tmp_path):
    extra = {"grad_accum": 2}
    if task.startswith("blt"):
        extra.update(task="blt", entropy_model=str(entropy_dir), target_patch_size=3.0)
    if task == "blt-cached":  # the resumed run reads the cache written before the interruption
        extra.update(entropies="cached")
    full = Trainer(small(corpus, out=str(tmp_path / "full"), **extra), progress=False, verbose=False)
    expected = full.train()

    part = Trainer(small(corpus, out=str(tmp_path / "part"), **extra), callbacks=[_stop_after(3)],
                   progress=False, verbose=False)
    with pytest.raises(TrainingInterrupted) as info:
        part.train()
    assert info.value.step == 3 and isinstance(info.value, KeyboardInterrupt)
    assert info.value.checkpoint == tmp_path / "part" / CHECKPOINT_NAME
    assert load_checkpoint(tmp_path / "part")["step"] == 3

    if task == "blt-cached":  # make the resumed run compute the cache again, from the restored entropy model
        (next((tmp_path / "part").glob("entropies-*.pt"))).rename(tmp_path / "part" / "entropies-0.pt")
    resumed = Trainer.from_checkpoint(tmp_path / "part", progress=False, verbose=False)
    assert resumed.step == 3
    result = resumed.train()
    losses, eval_losses = expected.train_losses, [e.loss for e in expected.evals]
    exact = full.device.type == "cpu"  # on CUDA the hash-embedding backward adds with atomics
    assert result.train_losses == (losses if exact else pytest.approx(losses, rel=1e-5))
    assert [e.loss for e in result.evals] == (eval_losses if exact else pytest.approx(eval_losses, rel=1e-5))
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        if exact:
            assert torch.equal(a, b), name
        else:
            torch.testing.assert_close(a, b, msg=name)


def test_interrupt_inside_a_step_rolls_back_to_the_last_completed_step(corpus, tmp_path, monkeypatch):
    expected = Trainer(small(corpus, out=str(tmp_path / "full")), progress=False, verbose=False).train()
    trainer = Trainer(small(corpus, out=str(tmp_path / "part")), progress=False, verbose=False)
    real, calls = trainer.batch_loss, []

    def interrupting(split, index):
        if split == "train":
            calls.append(1)
            if len(calls) == 5:  # the first micro-batch of step 5
                raise KeyboardInterrupt
        return real(split, index)

    monkeypatch.setattr(trainer, "batch_loss", interrupting)
    with pytest.raises(TrainingInterrupted):
        trainer.train()
    assert load_checkpoint(tmp_path / "part")["step"] == 4
    result = Trainer.from_checkpoint(tmp_path / "part", progress=False, verbose=False).train()
    assert result.train_losses == expected.train_losses


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    atomic_save({"step": 1, "w": torch.arange(5)}, path)

    def crashing_save(obj, f):
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crashing_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"step": 2, "w": torch.zeros(5)}, path)
    monkeypatch.undo()
    state = torch.load(path, weights_only=True)
    assert state["step"] == 1 and torch.equal(state["w"], torch.arange(5))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]  # no temporary file left


def test_cached_entropies_give_the_patches_and_losses_of_on_the_fly_patching(corpus, entropy_dir, tmp_path):
    common = dict(task="blt", entropy_model=str(entropy_dir), target_patch_size=3.0, steps=3, eval_every=0)
    fly = Trainer(small(corpus, out=str(tmp_path / "fly"), **common), progress=False, verbose=False)
    cached = Trainer(small(corpus, out=str(tmp_path / "cached"), entropies="cached", **common),
                     progress=False, verbose=False)
    rows = fly.train_rows[:4, :-1].to(fly.device)
    ent = cached.entropy_cache["train"][:4]  # the cache lives on the CPU
    torch.testing.assert_close(ent, compute_entropies(fly.model.entropy_model, rows, batch_size=4))
    ent = ent.to(fly.device)
    assert fly.threshold == cached.threshold
    lengths = blt_patch_lengths(fly.model, rows)
    assert torch.equal(lengths, blt_patch_lengths(cached.model, rows, ent))
    assert lengths.max() > 1  # patches of several bytes: the entropies matter
    a, b = fly.train(), cached.train()
    assert a.train_losses == pytest.approx(b.train_losses, rel=1e-5)
    assert len(list((tmp_path / "cached").glob("entropies-*.pt"))) == 1


def test_bf16_autocast_trains_with_both_backends_alike(corpus, entropy_dir):
    """precision="bf16" is the CUDA default; on the CPU the same autocast runs the same code."""
    losses = {}
    for backend in ("ext", "torch"):
        trainer = Trainer(small(corpus, task="blt", entropy_model=str(entropy_dir), target_patch_size=3.0, steps=3,
                                eval_every=0, precision="bf16", backend=backend), progress=False, verbose=False)
        assert trainer.amp_dtype == torch.bfloat16
        result = trainer.train()
        losses[backend] = result.train_losses + [result.evals[-1].loss]
        assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # autocast, not a cast
    assert losses["ext"] == pytest.approx(losses["torch"], rel=2e-3)


def test_blt_threshold_is_calibrated_to_the_target_patch_size(corpus, entropy_dir):
    trainer = Trainer(small(corpus, task="blt", entropy_model=str(entropy_dir), target_patch_size=3.0),
                      progress=False, verbose=False)
    rows = trainer.train_rows[:, :-1].to(trainer.device)
    lengths = blt_patch_lengths(trainer.model, rows)
    # lengths cover T + 1 positions (the next byte); count patches over the T bytes
    mean = rows.numel() / int((lengths > 0).sum())
    assert trainer.threshold == trainer.model.config.patching_threshold
    assert mean == pytest.approx(3.0, rel=0.1)


def test_exported_blt_reloads_with_the_same_outputs(corpus, entropy_dir, tmp_path):
    trainer = Trainer(small(corpus, task="blt", entropy_model=str(entropy_dir), threshold=2.0, steps=2,
                            out=str(tmp_path)), progress=False, verbose=False)
    result = trainer.train()
    loaded = ByteLatentTransformer.from_pretrained(result.model_dir).to(trainer.device)
    assert loaded.config.patching_threshold == pytest.approx(2.0)
    tokens = trainer.held_rows[:2, :-1].to(trainer.device)
    trainer.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens), trainer.model(tokens))


def test_entropy_model_files_round_trip(tmp_path):
    model = EntropyModel(preset("blt-entropy-tiny"))
    save_entropy_model(model, tmp_path / "em")
    save_entropy_model(model, tmp_path / "em")  # replacing a directory works too
    loaded = load_entropy_model(tmp_path / "em")
    tokens = torch.randint(4, 260, (2, 16))
    with torch.no_grad():
        assert torch.equal(loaded(tokens), model(tokens))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_entropy_model(tmp_path / "missing")


def test_resume_refuses_other_data(corpus, tmp_path):
    Trainer(small(corpus, steps=2, out=str(tmp_path)), progress=False, verbose=False).train()
    with pytest.raises(ValueError, match="other data"):
        Trainer.from_checkpoint(tmp_path, progress=False, verbose=False, **{"out": str(tmp_path)}).load_state_dict(
            {**load_checkpoint(tmp_path), "data_fingerprint": "0"})
    with pytest.raises(ValueError, match="cannot override"):
        Trainer.from_checkpoint(tmp_path, lr=1.0)


@pytest.mark.parametrize("field,value,match", [
    ("steps", 0, "steps must be an integer >= 1"),
    ("lr", -1.0, "lr must be a finite number > 0"),
    ("task", "gpt", "task must be one of"),
    ("entropies", "lazy", "entropies must be one of"),
    ("task", "blt", "entropy_model must be a directory"),
    ("compile", "yes", "compile must be True or False"),
])
def test_bad_settings_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**{field: value})


def test_progress_bar_reports_rate_and_fields_without_a_terminal():
    stream = io.StringIO()
    bar = Progress(4, "train", unit_bytes=1000, stream=stream)
    for _ in range(4):
        bar.update(1, loss=1.5)
    bar.close()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4  # one line per 10% at most, never redrawn in place
    assert lines[-1].startswith("train 100% |") and "4/4" in lines[-1] and "B/s" in lines[-1]
    assert lines[-1].endswith("loss=1.5")
