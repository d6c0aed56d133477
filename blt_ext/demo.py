"""The demo (``blt-ext demo``, ``make demo``): the whole BLT pipeline on a laptop CPU in minutes.

1. trains a tiny entropy model on the default corpus (the Python standard library's sources);
2. calibrates its entropy threshold to a target mean patch size and prints the histogram;
3. trains a tiny BLT patched by the frozen entropy model (held-out bits per byte falling);
4. prints a held-out sample with its patch boundaries and plots its per-byte entropies with the
   threshold and the boundaries (PNG);
5. generates a continuation of a prompt;
6. times BLT steps with ``backend="ext"`` (the kernels) against ``backend="torch"`` (the twins).

Everything goes to one folder (default ``out/demo-TIMESTAMP``): the two training runs (their
checkpoints and exported models), the plots, ``summary.json`` and ``summary.md``. On CUDA the
same demo runs with bf16 autocast and is faster; ``quick=True`` shrinks every stage to a few
steps (a smoke test).
"""

from __future__ import annotations

import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

from .calibrate import format_histogram
from .model import ByteTokenizer
from .train import TrainConfig, Trainer, blt_patch_lengths, build_optimizer, resolve_device


@dataclass(frozen=True)
class DemoSettings:
    corpus_bytes: int = 3_000_000
    seq_len: int = 256
    batch_size: int = 16
    entropy_steps: int = 500
    entropy_lr: float = 4e-3
    blt_steps: int = 500
    blt_lr: float = 3e-3
    eval_every: int = 50
    eval_batches: int = 4
    target_patch_size: float = 4.0
    sample_bytes: int = 128
    prompt_bytes: int = 48
    generate_bytes: int = 96
    timing_steps: int = 5


FULL = DemoSettings()
QUICK = DemoSettings(corpus_bytes=150_000, seq_len=64, batch_size=4, entropy_steps=6, blt_steps=4, eval_every=2,
                     eval_batches=1, sample_bytes=48, prompt_bytes=16, generate_bytes=12, timing_steps=1)


def _say(text: str = "") -> None:
    print(text, flush=True)


def _params(model: torch.nn.Module) -> str:
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.0f}k"


def _time_ms(fn, steps: int, device: torch.device) -> float:
    """Median wall time of ``fn`` in ms after one warm-up call."""
    fn()
    times = []
    for _ in range(steps):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def time_backends(trainer: Trainer, steps: int) -> list[dict]:
    """Step times of the trained BLT with backend "ext" and "torch" on one training batch: the
    training step (forward, backward, AdamW on a copy), the forward alone, entropy patching."""
    device = trainer.device
    rows = trainer.train_rows[: trainer.config.batch_size].to(device)
    inputs = rows[:, :-1]
    model = copy.deepcopy(trainer.model)
    optimizer = build_optimizer(model, 1e-4)
    lengths = blt_patch_lengths(model, inputs)
    losses = {}

    def train_step():
        with trainer.autocast():
            out = model.loss(rows, None, lengths)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    @torch.no_grad()
    def forward():
        with trainer.autocast():
            model(inputs, lengths)

    @torch.no_grad()
    def patching():
        blt_patch_lengths(model, inputs)

    for backend in ("ext", "torch"):  # before the timed steps change the weights
        model.backend = backend
        with torch.no_grad(), trainer.autocast():
            losses[backend] = float(model.loss(rows, None, lengths).loss)
    results = {}
    for backend in ("ext", "torch"):
        model.backend = backend
        results[backend] = [_time_ms(fn, steps, device) for fn in (train_step, forward, patching)]
    b, t = inputs.shape
    names = [f"BLT training step (fwd+bwd+AdamW), B{b} T{t}", f"BLT forward, B{b} T{t}",
             f"entropy patching (model + patch layout), B{b} T{t}"]
    table = [{"workload": name, "ext_ms": results["ext"][i], "torch_ms": results["torch"][i],
              "speedup": results["torch"][i] / results["ext"][i]} for i, name in enumerate(names)]
    table.append({"loss_ext": losses["ext"], "loss_torch": losses["torch"]})
    return table


def _show(text: str) -> str:
    return {" ": "␣", "\n": "↵", "\t": "⇥"}.get(text, text if text.isprintable() else "·")


def plot_entropies(path: Path, data: bytes, entropies: list[float], lengths: list[int], threshold: float,
                   title: str) -> None:
    """Per-byte entropy of ``data`` with the threshold line and a line at every patch start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(data)
    fig, ax = plt.subplots(figsize=(max(10, n * 0.11), 4.2), dpi=110)
    x = list(range(n))
    ax.plot(x, entropies, color="#1f77b4", marker="o", markersize=2.5, linewidth=1, label="entropy of the byte (nats)")
    ax.axhline(threshold, color="#d62728", linestyle="--", linewidth=1, label=f"threshold {threshold:.3f}")
    start = 0
    for i, length in enumerate(lengths):
        ax.axvline(start - 0.5, color="#2ca02c", alpha=0.45, linewidth=0.8, label="patch start" if i == 0 else None)
        start += length
    ax.set_xticks(x)
    ax.set_xticklabels([_show(chr(b)) if b < 128 else "·" for b in data], fontsize=6, fontfamily="monospace")
    ax.set_xlim(-1, n)
    ax.set_ylabel("entropy (nats)")
    ax.set_title(title, fontsize=10, loc="right")
    ax.legend(loc="lower left", bbox_to_anchor=(0, 1.0), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_bits_per_byte(path: Path, curves: dict[str, list[tuple[int, float]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    for name, points in curves.items():
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("held-out bits per byte")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _sample(trainer: Trainer, size: int) -> bytes:
    """A held-out stretch of text: ``size`` bytes from the first line start of a held-out row."""
    tok = ByteTokenizer()
    row = tok.decode_bytes(trainer.held_rows[min(1, trainer.held_rows.shape[0] - 1)])
    start = row.find(b"\n") + 1
    text = row[start:] if len(row) - start >= size else row
    return text[:size]


def _markdown(summary: dict) -> str:
    lines = [f"# blt_ext demo ({summary['started']})", "",
             f"Device: {summary['device']}; torch {summary['torch']}; total wall time {summary['wall_s']:.0f} s.", "",
             "## Held-out bits per byte", "", "| step | entropy model | BLT |", "| ---: | ---: | ---: |"]
    for step, e, b in summary["bits_per_byte_table"]:
        lines.append(f"| {step} | {'' if e is None else f'{e:.3f}'} | {'' if b is None else f'{b:.3f}'} |")
    cal = summary["calibration"]
    lines += ["", "## Patching", "",
              f"Threshold {cal['threshold']:.4f} nats for a target mean patch size of {cal['target']} bytes "
              f"(achieved {cal['mean_patch_size']:.2f}).", "", "```", summary["sample"]["marked"], "```", "",
              "![entropies](entropy_patches.png)", "", "## Generation", "", "```",
              summary["generation"]["prompt"] + summary["generation"]["continuation"], "```", "",
              "## Step time, backend ext vs torch", "", "| workload | ext (ms) | torch (ms) | speedup |",
              "| --- | ---: | ---: | ---: |"]
    for row in summary["timing"]:
        lines.append(f"| {row['workload']} | {row['ext_ms']:.1f} | {row['torch_ms']:.1f} | {row['speedup']:.2f}x |")
    return "\n".join(lines) + "\n"


def run_demo(out=None, device: str = "auto", quick: bool = False, progress: bool = True,
             settings: DemoSettings | None = None) -> dict:
    """Run the demo; returns the summary (also written to ``out/summary.json``)."""
    from .cli import patch_bytes, render_patches, split_patches

    s = settings or (QUICK if quick else FULL)
    started = datetime.now()
    wall = time.perf_counter()
    out = Path(out) if out is not None else Path("out") / f"demo-{started.strftime('%Y%m%d-%H%M%S')}"
    out.mkdir(parents=True, exist_ok=True)
    dev = resolve_device(device)
    colour = sys.stdout.isatty()
    where = f"{dev}" + (f" ({torch.cuda.get_device_name(dev)}, bf16 autocast)" if dev.type == "cuda"
                        else f" ({torch.get_num_threads()} threads)")
    _say(f"blt_ext demo on {where}, torch {torch.__version__}; output folder {out}")
    phases = {}
    common = dict(corpus_bytes=s.corpus_bytes, seq_len=s.seq_len, batch_size=s.batch_size,
                  eval_every=s.eval_every, eval_batches=s.eval_batches, checkpoint_every=0, device=device)

    # 1. entropy model
    t0 = time.perf_counter()
    entropy_cfg = TrainConfig(task="entropy", steps=s.entropy_steps, lr=s.entropy_lr,
                              warmup_steps=max(1, s.entropy_steps // 20), out=str(out / "entropy_model"), **common)
    entropy_trainer = Trainer(entropy_cfg, progress=progress)
    _say(f"\n[1/6] Entropy model ({entropy_trainer.config.preset or 'blt-entropy-tiny'}, "
         f"{_params(entropy_trainer.model)} parameters): {s.entropy_steps} steps of {s.batch_size} x {s.seq_len} bytes")
    entropy_result = entropy_trainer.train()
    phases["entropy_model_s"] = time.perf_counter() - t0
    _say(f"      held-out {entropy_result.evals[0].bits_per_byte:.3f} -> {entropy_result.evals[-1].bits_per_byte:.3f} "
         f"bits/byte in {phases['entropy_model_s']:.0f} s")

    # 2-3. BLT with the frozen entropy model; its threshold is calibrated on the training rows
    t0 = time.perf_counter()
    blt_cfg = TrainConfig(task="blt", steps=s.blt_steps, lr=s.blt_lr, warmup_steps=max(1, s.blt_steps // 20),
                          entropy_model=str(entropy_result.model_dir), target_patch_size=s.target_patch_size,
                          out=str(out / "blt"), **common)
    blt_trainer = Trainer(blt_cfg, progress=progress)
    cal = blt_trainer.calibration
    threshold = cal.threshold
    _say(f"\n[2/6] Threshold calibration: {threshold:.4f} nats gives a mean patch size of {cal.mean_patch_size:.2f} "
         f"bytes (target {cal.target:g}) on {cal.num_bytes} training bytes")
    _say("\n".join("      " + line for line in format_histogram(cal.histogram, width=30).splitlines()))

    _say(f"\n[3/6] BLT (blt-tiny, {_params(blt_trainer.model)} trainable parameters, entropy model frozen): "
         f"{s.blt_steps} steps")
    blt_result = blt_trainer.train()
    phases["blt_s"] = time.perf_counter() - t0
    _say(f"      held-out {blt_result.evals[0].bits_per_byte:.3f} -> {blt_result.evals[-1].bits_per_byte:.3f} "
         f"bits/byte in {phases['blt_s']:.0f} s")
    e_curve = {e.step: e.bits_per_byte for e in entropy_result.evals}
    b_curve = {e.step: e.bits_per_byte for e in blt_result.evals}
    table = [(step, e_curve.get(step), b_curve.get(step)) for step in sorted(set(e_curve) | set(b_curve))]
    _say("\n      held-out bits per byte (the same held-out rows for both models)")
    _say(f"      {'step':>6}  {'entropy model':>13}  {'BLT':>7}")
    for step, e, b in table:
        _say(f"      {step:>6}  {'' if e is None else f'{e:.3f}':>13}  {'' if b is None else f'{b:.3f}':>7}")
    plot_bits_per_byte(out / "bits_per_byte.png", {"entropy model": sorted(e_curve.items()),
                                                   "BLT": sorted(b_curve.items())})

    # 4. patches of a held-out sample
    t0 = time.perf_counter()
    model = blt_trainer.model.eval()
    sample = _sample(blt_trainer, s.sample_bytes)
    lengths, sample_entropies = patch_bytes(model.patcher, sample, dev)
    texts = split_patches(sample, lengths)
    _say(f"\n[4/6] A held-out sample cut into {len(lengths)} patches "
         f"({len(sample) / len(lengths):.2f} bytes per patch){'' if colour else ', | between patches'}:")
    _say(render_patches(texts, colour))
    plot_entropies(out / "entropy_patches.png", sample, sample_entropies, lengths, threshold,
                   f"entropy model: per-byte entropy, threshold {threshold:.3f}, patch starts (green)")
    _say(f"      plot: {out / 'entropy_patches.png'}")

    # 5. generation
    prompt = sample[: s.prompt_bytes].decode("utf-8", errors="ignore")
    generated = model.generate([prompt], s.generate_bytes, temperature=0.7, top_k=20, seed=0)
    _say(f"\n[5/6] Generation (temperature 0.7, top-k 20, seed 0) after the prompt {prompt!r}:")
    _say(prompt + generated.texts[0])
    phases["patches_and_generation_s"] = time.perf_counter() - t0

    # 6. ext vs torch
    t0 = time.perf_counter()
    timing = time_backends(blt_trainer, s.timing_steps)
    losses = timing.pop()
    phases["timing_s"] = time.perf_counter() - t0
    _say(f"\n[6/6] Step time with backend=\"ext\" vs backend=\"torch\" on {dev} (median of {s.timing_steps}); "
         f"the same loss either way ({losses['loss_ext']:.6f} vs {losses['loss_torch']:.6f})")
    width = max(len(r["workload"]) for r in timing)
    _say(f"      {'workload':<{width}}  {'ext':>9}  {'torch':>9}  {'speedup':>7}")
    for r in timing:
        _say(f"      {r['workload']:<{width}}  {r['ext_ms']:>7.1f}ms  {r['torch_ms']:>7.1f}ms  {r['speedup']:>6.2f}x")

    summary = {
        "started": started.isoformat(timespec="seconds"),
        "device": where,
        "torch": torch.__version__,
        "settings": asdict(s),
        "wall_s": time.perf_counter() - wall,
        "phases_s": phases,
        "corpus": blt_trainer.corpus_description,
        "entropy_model": {"dir": str(entropy_result.model_dir), "evals": [e._asdict() for e in entropy_result.evals]},
        "blt": {"dir": str(blt_result.model_dir), "evals": [e._asdict() for e in blt_result.evals],
                "trainable_parameters": _params(blt_trainer.model)},
        "bits_per_byte_table": table,
        "calibration": cal.to_dict(),
        "sample": {"text": sample.decode("utf-8", errors="replace"), "patch_lengths": lengths,
                   "entropies": sample_entropies, "marked": render_patches(texts, False)},
        "generation": {"prompt": prompt, "continuation": generated.texts[0], "temperature": 0.7, "top_k": 20,
                       "seed": 0},
        "timing": timing,
        "timing_losses": losses,
        "files": sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and "/." not in str(p)),
    }
    summary["files"] += ["summary.json", "summary.md"]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
    (out / "summary.md").write_text(_markdown(summary))
    _say(f"\nDone in {summary['wall_s']:.0f} s. Everything is in {out}/: entropy_patches.png, bits_per_byte.png, "
         f"summary.md, summary.json, entropy_model/ and blt/ (checkpoints and models).")
    _say(f"Next: blt-ext generate {out / 'blt'} \"def \"   |   blt-ext patch --model {out / 'blt'} \"some text\"")
    return summary
