"""Training the entropy model and the BLT (``blt-ext train``), as a library and a command.

The :class:`Trainer` runs a whole job: AdamW with a linear warm-up and cosine decay, gradient
clipping, gradient accumulation, bf16 autocast on CUDA, held-out loss and bits per byte, a
progress bar with bytes/s, atomic checkpoints (model, optimizer, scheduler, data position, RNG
state) from which a resumed run continues with exactly the losses of an uninterrupted one, and
Ctrl-C handling (save, then raise :class:`TrainingInterrupted`). Two tasks:

- ``task="entropy"``: train the entropy model (a small byte LM) on next-byte prediction;
- ``task="blt"``: train a BLT whose patches come from a frozen entropy model, its entropies
  computed on the fly per batch (``entropies="on-the-fly"``) or once for the whole corpus and
  cached on disk (``entropies="cached"``). Without a ``threshold`` the patching threshold is
  calibrated to ``target_patch_size`` bytes per patch on the training data.

The pieces also work in other training loops: :func:`build_optimizer`, :func:`cosine_schedule`,
:func:`blt_patch_lengths` (patch lengths of a batch from a model or cached entropies),
:func:`atomic_save` / :func:`load_checkpoint`, :func:`save_entropy_model` /
:func:`load_entropy_model`, :class:`Progress`.

Example::

    from blt_ext.train import TrainConfig, Trainer
    Trainer(TrainConfig(task="entropy", steps=100, out="out/entropy")).train()
    Trainer(TrainConfig(task="blt", steps=100, entropy_model="out/entropy/model", out="out/blt")).train()
    Trainer.from_checkpoint("out/blt").train()      # resume (or no-op when it is finished)

The same pieces in a loop of your own (``tokens`` [B, T + 1] rows of byte ids)::

    model = ByteLatentTransformer(config)            # config.entropy_model: a trained patcher
    opt = build_optimizer(model, lr=3e-3)
    sched = cosine_schedule(opt, warmup_steps=100, total_steps=10_000)
    for tokens in loader:
        lengths = blt_patch_lengths(model, tokens[:, :-1])   # frozen entropy model, no grad
        model.loss(tokens, None, lengths).loss.backward()
        opt.step(); sched.step(); opt.zero_grad()
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .data import (
    DEFAULT_CORPUS_BYTES,
    BatchStream,
    default_corpus_paths,
    describe_corpus,
    pack_documents,
    read_documents,
    split_documents,
)
from .model import PRESETS, BLTConfig, ByteLatentTransformer, EntropyModel, EntropyModelConfig, preset
from .model.config import dataclass_from_dict
from .model.layers import compile_layers
from .model.loss import LossOutput, next_byte_loss
from .nn import BACKENDS, backend_ops

CHECKPOINT_NAME = "checkpoint.pt"
MODEL_DIR = "model"
LOG_NAME = "log.jsonl"
ENTROPY_MODEL_TYPE = "blt_ext_entropy_model"
TASKS = ("entropy", "blt")
PRECISIONS = ("auto", "bf16", "fp32")
ENTROPY_SOURCES = ("on-the-fly", "cached")
DEFAULT_PRESETS = {"entropy": "blt-entropy-tiny", "blt": "blt-tiny"}


# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


class ConfigError(ValueError):
    """A setting out of its range; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


# TrainConfig fields a resumed run may change (Trainer.from_checkpoint, blt-ext train --resume)
RESUME_OVERRIDES = frozenset({"device", "precision", "compile", "out", "steps", "eval_every", "checkpoint_every"})


@dataclass
class TrainConfig:
    """Every setting of a training run (stored in its checkpoints, so a resume needs none).

    ``data`` lists files, directories or JSONL files (None: the default corpus of
    :mod:`blt_ext.data`, ``corpus_bytes`` of it). A step is ``grad_accum`` micro-batches of
    ``batch_size`` rows of ``seq_len + 1`` ids. ``lr`` decays from ``warmup_steps`` on along a
    cosine to ``lr * min_lr_ratio`` at ``steps``. ``eval_every`` / ``checkpoint_every`` are in
    steps (0: only at the end); evaluation reads ``eval_batches`` batches of the held-out split.
    """

    task: str = "entropy"
    preset: str | None = None  # None: blt-entropy-tiny / blt-tiny
    data: list[str] | None = None
    corpus_bytes: int = DEFAULT_CORPUS_BYTES
    seq_len: int = 256
    batch_size: int = 16
    grad_accum: int = 1
    steps: int = 200
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0  # 0: no clipping
    eval_every: int = 50
    eval_batches: int = 4
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available
    precision: str = "auto"  # "auto": bf16 autocast on CUDA, fp32 elsewhere
    backend: str = "ext"  # BLT ops: "ext" kernels or "torch" twins
    compile: bool = False  # the model's layers through torch.compile (blt_ext.model.layers.compile_layers)
    out: str | None = None  # run directory (checkpoint, log, exported model)
    # BLT only
    entropy_model: str | None = None  # entropy model dir (ours) or a BLT checkpoint dir
    entropies: str = "on-the-fly"
    threshold: float | None = None
    target_patch_size: float = 4.0  # used when threshold is None
    max_patch_length: int | None = None

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if self.data is not None:
            self.data = [str(p) for p in ([self.data] if isinstance(self.data, (str, Path)) else self.data)]
        if self.out is not None:
            self.out = str(self.out)
        if self.entropy_model is not None:
            self.entropy_model = str(self.entropy_model)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first setting out of its range."""

        def need(cond, name, rule):
            if not cond:
                raise ConfigError(name, f"TrainConfig: {name} must be {rule}, got {getattr(self, name)!r}")

        need(self.task in TASKS, "task", f"one of {TASKS}")
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_batches", "corpus_bytes"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name, "an integer >= 1")
        for name in ("warmup_steps", "eval_every", "checkpoint_every", "seed"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, "an integer >= 0")
        need(self.lr > 0 and math.isfinite(self.lr), "lr", "a finite number > 0")
        need(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "in [0, 1]")
        need(self.weight_decay >= 0, "weight_decay", ">= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        need(self.grad_clip >= 0, "grad_clip", ">= 0")
        need(self.precision in PRECISIONS, "precision", f"one of {PRECISIONS}")
        need(self.backend in BACKENDS, "backend", f"one of {BACKENDS}")
        need(isinstance(self.compile, bool), "compile", "True or False")
        need(self.entropies in ENTROPY_SOURCES, "entropies", f"one of {ENTROPY_SOURCES}")
        need(self.threshold is None or math.isfinite(self.threshold), "threshold", "None or a finite number")
        need(self.target_patch_size >= 1, "target_patch_size", ">= 1")
        need(self.max_patch_length is None or self.max_patch_length >= 1, "max_patch_length", "None or >= 1")
        need(self.task != "blt" or self.entropy_model is not None, "entropy_model",
             "a directory when task='blt' (the frozen patcher)")
        if self.preset is not None:
            kind = EntropyModelConfig if self.task == "entropy" else BLTConfig
            names = [n for n in PRESETS if isinstance(preset(n), kind)]
            need(self.preset in names, "preset", f"one of {names} for task {self.task!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return dataclass_from_dict(cls, d)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for but torch sees no CUDA device")
    return dev


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device (None: full fp32)."""
    if precision == "bf16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


# ---------------------------------------------------------------------------------------------
# optimizer and schedule
# ---------------------------------------------------------------------------------------------


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.1,
                    betas: Sequence[float] = (0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices and embeddings decay, vectors (norm
    weights) do not. Frozen parameters (the BLT's entropy model) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = all(p.is_cuda for p in params) or None  # the fused kernel exists for CUDA tensors only
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=fused)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                    min_lr_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up from lr/warmup to lr over ``warmup_steps``, then a cosine to
    ``lr * min_lr_ratio`` at ``total_steps`` (held there after). Call ``step()`` per optimizer step."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        span = max(1, total_steps - warmup_steps)
        progress = min(1.0, (step - warmup_steps) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


# ---------------------------------------------------------------------------------------------
# checkpoints and model files
# ---------------------------------------------------------------------------------------------


def atomic_save(obj, path) -> Path:
    """``torch.save`` to a temporary file beside ``path``, flushed, then renamed over ``path``:
    a crash or Ctrl-C during the write leaves the previous file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def _replace_dir(write: Callable[[Path], None], path: Path) -> Path:
    """Write a directory with ``write(tmp_dir)`` then swap it in for ``path`` (the old one is
    removed only once the new one is complete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def load_checkpoint(path, map_location="cpu") -> dict:
    """A training checkpoint: ``path`` is the file or the run directory holding checkpoint.pt."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no training checkpoint at {path}")
    state = torch.load(path, map_location=map_location, weights_only=True)
    if not isinstance(state, dict) or state.get("format") != "blt_ext.train/1":
        raise ValueError(f"{path}: not a blt_ext training checkpoint")
    return state


def save_entropy_model(model: EntropyModel, path) -> Path:
    """Write ``config.json`` (model_type "blt_ext_entropy_model") + ``model.safetensors``."""
    from safetensors.torch import save_file

    def write(tmp: Path):
        meta = {"model_type": ENTROPY_MODEL_TYPE, "config": model.config.to_dict()}
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})

    return _replace_dir(write, Path(path))


def load_entropy_model(path, device=None) -> EntropyModel:
    """A frozen :class:`EntropyModel` (eval mode, no gradients) from a directory written by
    :func:`save_entropy_model`, from a run directory of ``task="entropy"`` (its ``model/``), or
    the patcher of a BLT checkpoint in either format. Raises FileNotFoundError / ValueError."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"entropy model: not a directory: {path}")
    if (path / MODEL_DIR / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / MODEL_DIR
    config_file = path / "config.json"
    meta = json.loads(config_file.read_text()) if config_file.is_file() else {}
    if meta.get("model_type") == ENTROPY_MODEL_TYPE:
        from safetensors.torch import load_file

        model = EntropyModel(EntropyModelConfig(**meta["config"]))
        model.load_state_dict(load_file(str(path / "model.safetensors")))
    else:
        from .model.checkpoint import load_pretrained

        model = load_pretrained(path).entropy_model
        if model is None:
            raise ValueError(f"{path}: this BLT checkpoint has no entropy model")
    model.requires_grad_(False)
    return model.to(device).eval()


def load_model_dir(path, **kwargs) -> ByteLatentTransformer:
    """A BLT from a checkpoint directory in either format, or from a BLT run directory (its
    ``model/``); keyword arguments as :func:`blt_ext.model.checkpoint.load_pretrained`."""
    from .model.checkpoint import load_pretrained

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"not a directory: {path}")
    if (path / MODEL_DIR).is_dir() and not any((path / n).exists() for n in ("config.json", "params.json")):
        path = path / MODEL_DIR
    return load_pretrained(path, **kwargs)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# entropies and patch lengths
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_entropies(entropy_model: torch.nn.Module, rows: torch.Tensor, batch_size: int = 16,
                      backend: str = "ext", device=None, progress: Progress | None = None) -> torch.Tensor:
    """[N, T] fp32 next-byte entropies (nats) of ``rows`` [N, T] (on the CPU), ``batch_size``
    rows at a time on ``device`` (the model's by default)."""
    device = device or next(entropy_model.parameters()).device
    ops = backend_ops(backend)
    out = torch.empty(rows.shape, dtype=torch.float32)
    for start in range(0, rows.shape[0], batch_size):
        batch = rows[start : start + batch_size].to(device)
        out[start : start + batch.shape[0]] = ops.entropy(entropy_model(batch)).float().cpu()
        if progress is not None:
            progress.update(batch.numel())
    return out


def blt_patch_lengths(model: ByteLatentTransformer, inputs: torch.Tensor,
                      entropies: torch.Tensor | None = None) -> torch.Tensor:
    """Patch lengths [B, P] (rows summing to T + 1) of BLT ``inputs`` [B, T].

    Without ``entropies`` the model's patcher runs (its entropy model, no gradients); with
    ``entropies`` [B, T] (e.g. cached by :func:`compute_entropies`) the same patching rules are
    applied to them. Lengths are trimmed to the widest row's patch count.
    """
    if entropies is None:
        return model.patch(inputs).patch_lengths
    p = model.patcher
    ops = p.ops
    starts = ops.entropy_patch_starts(entropies, p.threshold, p.threshold_add, p.monotonicity, True)
    layout = ops.patch_layout(starts, True, p.max_patch_length)
    return layout.patch_lengths[:, : int(layout.patch_counts.max())]


# ---------------------------------------------------------------------------------------------
# progress bar
# ---------------------------------------------------------------------------------------------


def _format_rate(rate: float) -> str:
    for unit, scale in (("MB/s", 1e6), ("kB/s", 1e3)):
        if rate >= scale:
            return f"{rate / scale:.1f} {unit}"
    return f"{rate:.0f} B/s"


def _format_time(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 60:d}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on stderr: ``label  42% |####    | 84/200 [0:12<0:17, 1.2 MB/s] loss=...``.

    ``update(steps, bytes=...)`` advances it; ``postfix`` holds extra fields shown after the
    rate. On a terminal the line is redrawn in place (at most 10 times a second); elsewhere a
    line is written every 10% so logs stay short. ``enabled=False`` makes it silent.
    """

    def __init__(self, total: int, label: str, *, unit_bytes: int = 0, enabled: bool = True, stream=None):
        self.total, self.label, self.unit_bytes = max(1, total), label, unit_bytes
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.count = self.start_count = 0
        self.bytes = 0
        self.postfix: dict[str, str] = {}
        self.start = time.perf_counter()
        self._last_draw = 0.0
        self._last_decile = -1
        self._closed = False

    def reset_clock(self, count: int) -> None:
        """Start timing from ``count`` (a resumed run counts only the work it does)."""
        self.count = self.start_count = count
        self.bytes = 0
        self.start = time.perf_counter()

    def update(self, n: int = 1, bytes: int | None = None, **postfix) -> None:
        self.count += n
        self.bytes += n * self.unit_bytes if bytes is None else bytes
        self.postfix.update({k: v if isinstance(v, str) else f"{v:.4g}" for k, v in postfix.items()})
        self._draw()

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        frac = min(1.0, self.count / self.total)
        width = 24
        filled = int(frac * width)
        bar = "#" * filled + "-" * (width - filled)
        rate = self.bytes / elapsed if elapsed > 0 else 0.0
        done = self.count - self.start_count
        eta = (self.total - self.count) * elapsed / done if done > 0 else 0.0
        extra = " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return (f"{self.label} {100 * frac:3.0f}% |{bar}| {self.count}/{self.total} "
                f"[{_format_time(elapsed)}<{_format_time(eta)}, {_format_rate(rate)}] {extra}").rstrip()

    def _draw(self, force: bool = False) -> None:
        if not self.enabled or self._closed:
            return
        now = time.perf_counter()
        if self.tty:
            if force or now - self._last_draw >= 0.1 or self.count >= self.total:
                self.stream.write("\r\033[K" + self.line())
                self.stream.flush()
                self._last_draw = now
        else:
            decile = int(10 * self.count / self.total)
            if force or decile > self._last_decile:
                self.stream.write(self.line() + "\n")
                self.stream.flush()
                self._last_decile = decile

    def write(self, message: str) -> None:
        """Print ``message`` on its own line above the bar."""
        live = self.tty and not self._closed
        if live:
            self.stream.write("\r\033[K")
        print(message, file=self.stream, flush=True)
        if live:
            self._draw(force=True)

    def close(self) -> None:
        if self._closed:
            return
        if self.enabled and self.tty:
            self._draw(force=True)
            self.stream.write("\n")
            self.stream.flush()
        self._closed = True


# ---------------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------------


class StepInfo(NamedTuple):
    step: int  # optimizer steps done
    loss: float  # mean training loss of the step (nats per byte)
    lr: float  # learning rate the step used
    grad_norm: float  # gradient norm before clipping
    seconds: float  # wall time of the step


class EvalResult(NamedTuple):
    step: int
    loss: float  # nats per byte on the held-out rows
    bits_per_byte: float
    num_bytes: int


@dataclass
class TrainResult:
    steps: int
    train_losses: list[float]  # one per optimizer step, from step 1
    evals: list[EvalResult]
    checkpoint: Path | None
    model_dir: Path | None
    wall_s: float  # this call's wall time
    threshold: float | None = None  # BLT: the patching threshold used
    info: dict = field(default_factory=dict)


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :meth:`Trainer.train` after Ctrl-C once the checkpoint is written (a
    KeyboardInterrupt, so an outer loop stops as on any Ctrl-C)."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"interrupted after step {step}" + (f"; checkpoint {checkpoint}" if checkpoint else ""))
        self.step, self.checkpoint = step, checkpoint


@contextlib.contextmanager
def _sigint_deferred():
    """Hold Ctrl-C until the block ends, so an optimizer update is never left half applied."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if pending:
        raise KeyboardInterrupt


def _fingerprint(*tensors: torch.Tensor) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


Callback = Callable[["Trainer", StepInfo], None]


class Trainer:
    """One training run of the entropy model or the BLT; see the module docstring.

    ``callbacks`` are called after every optimizer step with ``(trainer, StepInfo)``; one that
    raises KeyboardInterrupt stops the run as Ctrl-C does. ``progress`` shows the bar,
    ``verbose`` the messages (evaluations, checkpoints) on stderr. ``checkpoint`` (a state from
    :func:`load_checkpoint`) continues that run: its model is rebuilt and every state restored
    (what :meth:`from_checkpoint` does). Attributes: ``model``, ``optimizer``, ``scheduler``,
    ``stream`` (row indices), ``step``, ``history`` (train losses, learning rates, evaluations),
    ``calibration`` (BLT: the :class:`~blt_ext.calibrate.Calibration` that chose the threshold).
    """

    def __init__(self, config: TrainConfig, *, callbacks: Sequence[Callback] = (), progress: bool = True,
                 verbose: bool = True, checkpoint: dict | None = None):
        config.validate()
        self.config = c = config
        self.callbacks = list(callbacks)
        self.progress, self.verbose = progress, verbose
        self.out = Path(c.out) if c.out is not None else None
        self.device = resolve_device(c.device)
        self.amp_dtype = autocast_dtype(c.precision, self.device)
        self._bar: Progress | None = None
        torch.manual_seed(c.seed)
        self._load_data()
        self.model = self._build_model(None if checkpoint is None else checkpoint["model_config"])
        if checkpoint is not None:  # the entropy cache below needs the trained entropy model
            self.model.load_state_dict(checkpoint["model"])
        self.model.to(self.device)
        if c.compile:
            compile_layers(self.model)
        self.optimizer = build_optimizer(self.model, c.lr, c.weight_decay, c.betas)
        self.scheduler = cosine_schedule(self.optimizer, c.warmup_steps, c.steps, c.min_lr_ratio)
        self.stream = BatchStream(torch.arange(self.train_rows.shape[0]).unsqueeze(1), c.batch_size, c.seed)
        self.step = 0
        self.history: dict[str, list] = {"train_loss": [], "lr": [], "evals": []}
        self._step_start: dict | None = None
        self.entropy_cache: dict[str, torch.Tensor] | None = None
        self.calibration = None
        if c.task == "blt":
            if c.entropies == "cached":
                self.entropy_cache = self._entropy_cache()
            if checkpoint is None:
                self._set_threshold()
        if checkpoint is not None:
            self.load_state_dict(checkpoint)

    # ---- setup --------------------------------------------------------------------------------
    def _log(self, message: str) -> None:
        if not self.verbose:
            return
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, file=sys.stderr, flush=True)

    def _load_data(self) -> None:
        c = self.config
        paths = default_corpus_paths(c.corpus_bytes) if c.data is None else c.data
        docs = read_documents(paths)
        train_docs, held_docs = split_documents(docs)
        self.train_rows = pack_documents(train_docs, c.seq_len)
        try:
            held = pack_documents(held_docs, c.seq_len)
        except ValueError:
            raise ValueError(f"the held-out split ({describe_corpus(held_docs)}) is shorter than one row of "
                             f"seq_len + 1 = {c.seq_len + 1} ids: give more data or a smaller seq_len") from None
        self.held_rows = held[: c.eval_batches * c.batch_size]
        if self.train_rows.shape[0] < c.batch_size:
            raise ValueError(f"the training split packs into {self.train_rows.shape[0]} rows of {c.seq_len + 1} ids, "
                             f"fewer than batch_size={c.batch_size}")
        self.corpus_description = (f"{'default corpus' if c.data is None else ', '.join(c.data)}: "
                                   f"{describe_corpus(docs)}; {self.train_rows.shape[0]} training rows, "
                                   f"{self.held_rows.shape[0]} held-out rows of {c.seq_len} bytes")
        self.data_fingerprint = _fingerprint(self.train_rows, self.held_rows)

    def _build_model(self, model_config: dict | None) -> torch.nn.Module:
        c = self.config
        name = c.preset or DEFAULT_PRESETS[c.task]
        if c.task == "entropy":
            return EntropyModel(EntropyModelConfig(**model_config) if model_config is not None else preset(name))
        if model_config is not None:
            return ByteLatentTransformer(BLTConfig.from_dict(model_config), backend=c.backend)
        cfg = preset(name)
        entropy = load_entropy_model(c.entropy_model)
        cfg.entropy_model = entropy.config
        cfg.patching_mode = "entropy"
        cfg.max_patch_length = c.max_patch_length
        model = ByteLatentTransformer(cfg, backend=c.backend)
        model.entropy_model.load_state_dict(entropy.state_dict())
        return model

    def _entropy_cache(self) -> dict[str, torch.Tensor]:
        """Entropies of every training and held-out row, computed once and kept in the run
        directory under a name that fingerprints the entropy model and the rows."""
        c = self.config
        inputs = {"train": self.train_rows[:, :-1], "held_out": self.held_rows[:, :-1]}
        entropy_model = self.model.entropy_model
        key = _fingerprint(*entropy_model.state_dict().values(), self.train_rows, self.held_rows)
        path = self.out / f"entropies-{key}.pt" if self.out is not None else None
        if path is not None and path.is_file():
            self._log(f"entropies: cached in {path}")
            return torch.load(path, weights_only=True)
        total = sum(t.numel() for t in inputs.values())
        bar = Progress(total, "entropies", unit_bytes=1, enabled=self.progress)
        cache = {split: compute_entropies(entropy_model, rows, c.batch_size, c.backend, self.device, bar)
                 for split, rows in inputs.items()}
        bar.close()
        if path is not None:
            atomic_save(cache, path)
            self._log(f"entropies: {total} bytes computed and cached in {path}")
        return cache

    def _set_threshold(self) -> None:
        c = self.config
        if c.threshold is not None:
            threshold = c.threshold
        else:
            from .calibrate import find_threshold

            # up to 256 rows spread over the training split
            n = self.train_rows.shape[0]
            index = torch.arange(0, n, max(1, n // 256))[:256]
            if self.entropy_cache is not None:
                entropies = self.entropy_cache["train"][index]
            else:
                entropies = compute_entropies(self.model.entropy_model, self.train_rows[index, :-1], c.batch_size,
                                              c.backend)
            cal = self.calibration = find_threshold(entropies, c.target_patch_size,
                                                    max_patch_length=c.max_patch_length, backend=c.backend)
            threshold = cal.threshold
            self._log(f"patching threshold {threshold:.4f} nats: mean patch size {cal.mean_patch_size:.2f} bytes "
                      f"on {entropies.numel()} training bytes (target {c.target_patch_size})")
        self.model.config.patching_threshold = float(threshold)
        self.model.patcher.threshold = float(threshold)

    @property
    def threshold(self) -> float | None:
        return self.model.patcher.threshold if self.config.task == "blt" else None

    # ---- steps --------------------------------------------------------------------------------
    def autocast(self):
        """The autocast context of the run's precision (a no-op in fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def batch_loss(self, split: str, index: torch.Tensor) -> LossOutput:
        """Next-byte loss of rows ``index`` of ``split`` ("train" or "held_out")."""
        rows = (self.train_rows if split == "train" else self.held_rows)[index].to(self.device)
        if self.config.task == "entropy":
            with self.autocast():
                return next_byte_loss(self.model(rows[:, :-1]), rows[:, 1:])
        entropies = None if self.entropy_cache is None else self.entropy_cache[split][index].to(self.device)
        # patching stays in fp32, outside autocast: the same patches whether cached or not
        lengths = blt_patch_lengths(self.model, rows[:, :-1], entropies)
        with self.autocast():
            return self.model.loss(rows, None, lengths)

    def train_step(self) -> StepInfo:
        """One optimizer step over ``grad_accum`` micro-batches; returns its StepInfo."""
        c = self.config
        start = time.perf_counter()
        self._step_start = self.stream.state_dict()
        self.model.train()
        lr = self.optimizer.param_groups[0]["lr"]
        total = torch.zeros((), device=self.device)
        for _ in range(c.grad_accum):
            out = self.batch_loss("train", self.stream.next_batch()[:, 0])
            (out.loss / c.grad_accum).backward()
            total += out.loss.detach()
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, c.grad_clip or float("inf"))
        with _sigint_deferred():
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self._step_start = None
            loss = float(total) / c.grad_accum
            self.history["train_loss"].append(loss)
            self.history["lr"].append(lr)
        return StepInfo(self.step, loss, lr, float(grad_norm), time.perf_counter() - start)

    @torch.no_grad()
    def evaluate(self) -> EvalResult:
        """Loss and bits per byte over the held-out rows (recorded in ``history``)."""
        self.model.eval()
        nll = torch.zeros((), dtype=torch.float64, device=self.device)
        count = torch.zeros((), dtype=torch.float64, device=self.device)
        n = self.held_rows.shape[0]
        for start in range(0, n, self.config.batch_size):
            out = self.batch_loss("held_out", torch.arange(start, min(n, start + self.config.batch_size)))
            nll += out.nll_sum.double()
            count += out.num_bytes.double()
        loss = float(nll / count)
        result = EvalResult(self.step, loss, loss / math.log(2), int(count))
        self.history["evals"].append(tuple(result))
        return result

    # ---- checkpoints --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": "blt_ext.train/1",
            "config": self.config.to_dict(),
            "model_config": self.model.config.to_dict(),
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "stream": self.stream.state_dict(),
            "step": self.step,
            "history": self.history,
            "rng": rng_state(),
            "data_fingerprint": self.data_fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["data_fingerprint"] != self.data_fingerprint:
            raise ValueError("the checkpoint was trained on other data (its rows differ from this corpus): "
                             "resume with the same data, seq_len and batch_size")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.stream.load_state_dict(state["stream"])
        self.step = state["step"]
        self.history = {k: list(v) for k, v in state["history"].items()}
        set_rng_state(state["rng"])

    def save_checkpoint(self, path=None) -> Path:
        """Write the training state atomically to ``path`` (default ``out/checkpoint.pt``)."""
        if path is None:
            if self.out is None:
                raise ValueError("Trainer.save_checkpoint: no path given and the config has no out directory")
            path = self.out / CHECKPOINT_NAME
        return atomic_save(self.state_dict(), path)

    @classmethod
    def from_checkpoint(cls, path, *, callbacks: Sequence[Callback] = (), progress: bool = True,
                        verbose: bool = True, **overrides) -> Trainer:
        """A trainer continuing the run saved at ``path`` (checkpoint file or run directory).

        ``overrides`` may change ``device``, ``precision``, ``compile``, ``out`` (default: the
        checkpoint's directory), ``steps`` (to train longer), ``eval_every`` and ``checkpoint_every``.
        """
        bad = sorted(set(overrides) - RESUME_OVERRIDES)
        if bad:
            raise ValueError(f"Trainer.from_checkpoint: cannot override {bad}; allowed: {sorted(RESUME_OVERRIDES)}")
        state = load_checkpoint(path)
        cfg = dict(state["config"])
        file = Path(path) / CHECKPOINT_NAME if Path(path).is_dir() else Path(path)
        cfg["out"] = str(file.parent)
        cfg.update(overrides)
        return cls(TrainConfig.from_dict(cfg), callbacks=callbacks, progress=progress, verbose=verbose,
                   checkpoint=state)

    def export(self, path=None) -> Path:
        """Write the model in its loadable format (default ``out/model``): an entropy model by
        :func:`save_entropy_model`, a BLT by ``save_pretrained`` (the transformers format)."""
        if path is None:
            if self.out is None:
                raise ValueError("Trainer.export: no path given and the config has no out directory")
            path = self.out / MODEL_DIR
        if self.config.task == "entropy":
            return save_entropy_model(self.model, path)
        return _replace_dir(self.model.save_pretrained, Path(path))

    # ---- the loop -----------------------------------------------------------------------------
    def _append_log(self, record: dict) -> None:
        if self.out is not None:
            self.out.mkdir(parents=True, exist_ok=True)
            with (self.out / LOG_NAME).open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate_and_report(self) -> EvalResult:
        result = self.evaluate()
        self._append_log({"step": result.step, "eval_loss": result.loss, "eval_bits_per_byte": result.bits_per_byte})
        self._log(f"step {result.step:>5}: held-out loss {result.loss:.4f} nats/byte, "
                  f"{result.bits_per_byte:.4f} bits/byte")
        return result

    def train(self) -> TrainResult:
        """Train until ``config.steps``; evaluate, checkpoint and export (with ``out``) on the way
        and at the end. On Ctrl-C (or a callback raising KeyboardInterrupt) save a checkpoint of
        the last completed step and raise :class:`TrainingInterrupted`."""
        c = self.config
        wall = time.perf_counter()
        bytes_per_step = c.batch_size * c.grad_accum * c.seq_len
        self._log(self.corpus_description)
        bar = self._bar = Progress(c.steps, f"train {c.task}", unit_bytes=bytes_per_step, enabled=self.progress)
        bar.reset_clock(self.step)
        try:
            if self.step == 0 and not self.history["evals"] and c.eval_every:
                self._evaluate_and_report()
            while self.step < c.steps:
                info = self.train_step()
                bar.update(1, loss=f"{info.loss:.3f}", lr=f"{info.lr:.2e}")
                self._append_log({"step": info.step, "loss": info.loss, "lr": info.lr,
                                  "grad_norm": info.grad_norm, "seconds": info.seconds})
                if c.eval_every and info.step % c.eval_every == 0 and info.step < c.steps:
                    self._evaluate_and_report()
                if c.checkpoint_every and info.step % c.checkpoint_every == 0 and info.step < c.steps and self.out:
                    self.save_checkpoint()
                for callback in self.callbacks:
                    callback(self, info)
        except KeyboardInterrupt:
            bar.close()
            self._bar = None
            if self._step_start is not None:  # the step in flight never reached the optimizer
                self.stream.load_state_dict(self._step_start)
                self.optimizer.zero_grad(set_to_none=True)
                self._step_start = None
            path = self.save_checkpoint() if self.out is not None else None
            raise TrainingInterrupted(self.step, path) from None
        if not self.history["evals"] or self.history["evals"][-1][0] != self.step:
            self._evaluate_and_report()
        bar.close()
        self._bar = None
        checkpoint = model_dir = None
        if self.out is not None:
            checkpoint = self.save_checkpoint()
            model_dir = self.export()
            self._log(f"checkpoint {checkpoint}; model {model_dir}")
        return TrainResult(
            steps=self.step,
            train_losses=list(self.history["train_loss"]),
            evals=[EvalResult(*e) for e in self.history["evals"]],
            checkpoint=checkpoint,
            model_dir=model_dir,
            wall_s=time.perf_counter() - wall,
            threshold=self.threshold,
            info={"bytes_per_step": bytes_per_step, "device": str(self.device),
                  "precision": str(self.amp_dtype or torch.float32).removeprefix("torch.")},
        )
