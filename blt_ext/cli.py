"""blt-ext, the command line of blt_ext (also: python -m blt_ext).

    blt-ext demo        the main job: train a tiny entropy model and a tiny BLT, show patches,
                        plot entropies, generate, time ext vs torch; writes one output folder
    blt-ext train       train an entropy model, or a BLT with a frozen entropy model
    blt-ext calibrate   the entropy threshold that gives a target mean patch size, with a histogram
    blt-ext patch       patches of a text or file (coloured on a terminal, --json for data)
    blt-ext generate    continue a prompt with a BLT checkpoint (transformers or original format)
    blt-ext ops         the registered ops (--check: each op checked and timed against its twin)
    blt-ext env         what this build was compiled against and what torch sees

Bad arguments give a one-line error naming the argument and exit code 2; an interrupted
training run saves a checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
import time
from datetime import datetime
from pathlib import Path

import torch

import blt_ext
from blt_ext.model.tokenizer import EOS_ID, OFFSET

OPS = [
    "hash_ngram_ids",
    "hash_ngram_embedding",
    "hash_ngram_embedding_backward",
    "entropy",
    "entropy_patch_starts",
    "space_patch_starts",
    "patch_layout",
    "entropy_patch",
    "segment_pool",
    "segment_pool_backward",
    "patch_cross_attention",
    "patch_cross_attention_backward",
]


class CLIError(Exception):
    """A bad argument found after parsing: reported as ``error: argument NAME: message``."""

    def __init__(self, argument: str, message: str):
        super().__init__(f"argument {argument}: {message}")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block), exit code 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


# ---- argument types: errors name the rule and the value ----------------------------------------


def int_at_least(lo: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}") from None
        if value < lo:
            raise argparse.ArgumentTypeError(f"must be an integer >= {lo}, got {text!r}")
        return value

    return parse


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False):
    rule = " and ".join(r for r in (
        None if lo is None else f"{'>' if lo_open else '>='} {lo}", None if hi is None else f"<= {hi}") if r)
    rule = f"a number {rule}" if rule else "a finite number"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}") from None
        bad = value != value or value in (float("inf"), float("-inf"))
        bad |= lo is not None and (value <= lo if lo_open else value < lo)
        bad |= hi is not None and value > hi
        if bad:
            raise argparse.ArgumentTypeError(f"must be {rule}, got {text!r}")
        return value

    return parse


def existing_path(text: str) -> Path:
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"path does not exist: {text}")
    return path


def existing_dir(text: str) -> Path:
    path = existing_path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"not a directory: {text}")
    return path


def device_name(text: str) -> str:
    if text == "auto":
        return text
    try:
        dev = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"must be 'auto', 'cpu' or 'cuda[:N]', got {text!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for but torch sees no CUDA device")
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"must be 'auto', 'cpu' or 'cuda[:N]', got {text!r}")
    return text


def _device(text: str) -> torch.device:
    from .train import resolve_device

    return resolve_device(text)


# ---- ops / env ------------------------------------------------------------------------------------


def op_table():
    rows = []
    for name in OPS:
        qualname = f"blt_ext::{name}"
        kernels = [key for key in ("CPU", "CUDA") if torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)]
        schema = str(getattr(torch.ops.blt_ext, name).default._schema)
        rows.append((name, ", ".join(kernels) or "none", schema.removeprefix("blt_ext::")))
    width = max(len(r[0]) for r in rows)
    lines = [f"{'op':<{width}}  kernels    schema"]
    lines += [f"{name:<{width}}  {kernels:<9}  {schema}" for name, kernels, schema in rows]
    return "\n".join(lines)


def _median_ms(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    times.sort()
    return 1e3 * times[len(times) // 2]


def op_check_cases(device):
    """(name, call(ops module), comparison) on inputs a 2-core CPU handles in a second."""
    from .testing import random_patch_lengths

    g = torch.Generator().manual_seed(0)
    B, T, D, H, Dh, slots = 2, 2048, 256, 8, 32, 2
    tokens = torch.randint(4, 260, (B, T), generator=g).to(device)
    byte_w = torch.randn(260, D, generator=g).to(device)
    hash_w = torch.randn(6 * 50002, D, generator=g).to(device)
    logits = (3 * torch.randn(B, T, 260, generator=g)).to(device)
    lengths = random_patch_lengths(B, T, generator=g).to(device)
    P = lengths.shape[1]
    x = torch.randn(B, T, D, generator=g).to(device)
    q = torch.randn(B, P * slots, H, Dh, generator=g).to(device)
    kv = torch.randn(B, T, H, Dh, generator=g).to(device)

    def same(a, b):
        return all(torch.equal(u, v) for u, v in zip(a, b))

    return [
        ("hash_ngram_embedding", lambda m: m.hash_ngram_embedding(tokens, byte_w, hash_w),
         lambda a, b: torch.allclose(a, b, atol=1e-4, rtol=1e-4)),
        ("entropy_patch", lambda m: m.entropy_patch(logits), same),
        ("segment_pool (max)", lambda m: m.segment_pool(x, lengths, "max"), torch.equal),
        ("patch_cross_attention (encoder)",
         lambda m: m.patch_cross_attention(q, kv, kv, lengths, slots, "encoder"),
         lambda a, b: torch.allclose(a, b, atol=1e-4, rtol=1e-4)),
    ]


def cmd_ops(args):
    print(op_table())
    if not args.check:
        return 0
    from . import ops, reference

    device = _device(args.device)
    print(f"\next kernels vs pure-PyTorch references on {device} (median of {args.reps} runs)")
    print(f"{'workload':<34} {'matches':>8} {'ext':>10} {'torch':>10} {'speedup':>8}")
    ok = True
    for name, call, agree in op_check_cases(device):
        match = bool(agree(call(ops), call(reference)))
        ok &= match
        t_ext = _median_ms(lambda: call(ops), args.reps)
        t_ref = _median_ms(lambda: call(reference), args.reps)
        print(f"{name:<34} {'yes' if match else 'NO':>8} {t_ext:>8.2f}ms {t_ref:>8.2f}ms {t_ref / t_ext:>7.1f}x")
    return 0 if ok else 1


def cmd_env(args):
    from . import _build_info

    print(f"blt_ext {blt_ext.__version__} built against torch {_build_info.TORCH_VERSION}"
          f" (CUDA kernels: {'yes, ' + _build_info.CUDA_ARCHITECTURES if _build_info.WITH_CUDA else 'no'})")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"CUDA device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    return 0


# ---- train ----------------------------------------------------------------------------------------

# CLI option -> TrainConfig field; None defaults mean "the TrainConfig default"
_TRAIN_FIELDS = {
    "preset": "preset", "data": "data", "corpus_bytes": "corpus_bytes", "seq_len": "seq_len",
    "batch_size": "batch_size", "grad_accum": "grad_accum", "steps": "steps", "lr": "lr",
    "min_lr_ratio": "min_lr_ratio", "warmup": "warmup_steps", "weight_decay": "weight_decay",
    "grad_clip": "grad_clip", "eval_every": "eval_every", "eval_batches": "eval_batches",
    "checkpoint_every": "checkpoint_every", "seed": "seed", "device": "device", "precision": "precision",
    "backend": "backend", "compile": "compile", "entropy_model": "entropy_model", "entropies": "entropies",
    "threshold": "threshold", "target_patch_size": "target_patch_size", "max_patch_length": "max_patch_length",
}


def _option(field: str) -> str:
    """The option of a TrainConfig field."""
    dest = next((k for k, v in _TRAIN_FIELDS.items() if v == field), field)
    return "--" + dest.replace("_", "-")


def cmd_train(args):
    from .train import RESUME_OVERRIDES, ConfigError, TrainConfig, Trainer, TrainingInterrupted

    given = {dest: getattr(args, dest) for dest in _TRAIN_FIELDS if getattr(args, dest) is not None}
    progress = not args.no_progress
    if args.resume is not None:
        if args.task is not None:
            raise CLIError("task", "leave it out with --resume (the checkpoint's task is used)")
        if args.out is not None:
            raise CLIError("--out", "cannot be changed when resuming (the run continues in its directory)")
        fixed = sorted(dest for dest in given if _TRAIN_FIELDS[dest] not in RESUME_OVERRIDES)
        if fixed:
            raise CLIError(_option(_TRAIN_FIELDS[fixed[0]]),
                           "cannot be changed when resuming (the checkpoint's settings are used)")
        try:
            trainer = Trainer.from_checkpoint(args.resume, progress=progress,
                                              **{_TRAIN_FIELDS[k]: v for k, v in given.items()})
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError("--resume", str(exc)) from None
    else:
        if args.task is None:
            raise CLIError("task", "give 'entropy' or 'blt' (or --resume DIR)")
        fields = {_TRAIN_FIELDS[k]: v for k, v in given.items()}
        if "data" in fields:
            fields["data"] = [str(p) for p in fields["data"]]
        if "entropy_model" in fields:
            fields["entropy_model"] = str(fields["entropy_model"])
        if args.task == "entropy" and "entropy_model" in fields:
            raise CLIError("--entropy-model", "only for 'blt' (the BLT's frozen patcher)")
        if args.task == "blt":
            if "entropy_model" not in fields:
                raise CLIError("--entropy-model", "required for 'blt': the directory of a trained entropy model")
            _load_entropy(fields["entropy_model"], "cpu", "--entropy-model")
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        fields["out"] = str(args.out or Path("out") / f"train-{args.task}-{stamp}")
        try:
            config = TrainConfig(task=args.task, **fields)
        except ConfigError as exc:
            raise CLIError(_option(exc.field), str(exc).removeprefix("TrainConfig: ")) from None
        try:
            trainer = Trainer(config, progress=progress)
        except (FileNotFoundError, ValueError) as exc:
            raise CLIError("--data", str(exc)) from None
    try:
        result = trainer.train()
    except TrainingInterrupted as exc:
        where = exc.checkpoint.parent if exc.checkpoint else None
        print(f"interrupted after step {exc.step}: checkpoint saved to {exc.checkpoint}; "
              f"continue with: blt-ext train --resume {where}", file=sys.stderr)
        return 130
    last = result.evals[-1]
    print(f"{trainer.config.task}: {result.steps} steps, held-out {last.bits_per_byte:.4f} bits/byte "
          f"(from {result.evals[0].bits_per_byte:.4f}); model in {result.model_dir}")
    return 0


# ---- calibrate ------------------------------------------------------------------------------------


def _load_entropy(path, device, argument="MODEL"):
    from .train import load_entropy_model

    try:
        return load_entropy_model(path, device=device)
    except (FileNotFoundError, ValueError, OSError, KeyError) as exc:
        raise CLIError(argument, f"not an entropy model or BLT checkpoint directory: {exc}") from None


def _corpus_rows(data, corpus_bytes: int, seq_len: int, max_bytes: int):
    from .data import default_corpus_paths, describe_corpus, pack_documents, read_documents

    try:
        docs = read_documents(default_corpus_paths(corpus_bytes) if data is None else data)
        rows = pack_documents(docs, seq_len)[:, :-1]
    except (FileNotFoundError, ValueError) as exc:
        raise CLIError("--data", str(exc)) from None
    keep = max(1, max_bytes // seq_len)
    if rows.shape[0] > keep:  # rows spread over the whole corpus
        rows = rows[torch.linspace(0, rows.shape[0] - 1, keep).long()]
    name = "default corpus" if data is None else ", ".join(str(p) for p in data)
    return rows, f"{name}: {describe_corpus(docs)}"


def cmd_calibrate(args):
    from .calibrate import calibrate, format_histogram
    from .train import Progress

    device = _device(args.device)
    model = _load_entropy(args.model, device)
    rows, corpus = _corpus_rows(args.data, args.corpus_bytes, args.seq_len, args.max_bytes)
    bar = Progress(rows.numel(), "entropies", unit_bytes=1, enabled=not args.json)
    try:
        cal = calibrate(model, rows, args.target, batch_size=args.batch_size, backend=args.backend, device=device,
                        progress=bar, threshold_add=args.threshold_add, monotonicity=args.monotonicity,
                        max_patch_length=args.max_patch_length)
    except ValueError as exc:
        raise CLIError("--target", str(exc).removeprefix("find_threshold: ")) from None
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"model": str(args.model), "corpus": corpus, "rows": rows.shape[0],
                          "seq_len": rows.shape[1], **cal.to_dict()}, indent=2))
        return 0
    c = model.config
    print(f"entropy model: {args.model} (dim {c.dim}, {c.n_layers} layers)")
    print(f"corpus: {corpus}; {rows.shape[0]} rows of {rows.shape[1]} bytes = {cal.num_bytes} bytes")
    print(f"target mean patch size {cal.target:g} bytes -> threshold {cal.threshold:.6g} nats: mean patch size "
          f"{cal.mean_patch_size:.3f} bytes ({cal.num_patches} patches, {cal.iterations} bisection steps)")
    print("\npatch sizes\n" + format_histogram(cal.histogram))
    print(f"\nuse it with: blt-ext train blt --entropy-model {args.model} --threshold {cal.threshold:.6g}")
    return 0


# ---- patch ----------------------------------------------------------------------------------------

_COLOURS = ("\033[30;46m", "\033[30;43m", "\033[30;42m", "\033[30;45m")
_RESET = "\033[0m"


def _read_input(args) -> bytes:
    if (args.text is None) == (args.file is None):
        raise CLIError("TEXT", "give a text or --file PATH (one of them)")
    if args.text is not None:
        return args.text.encode("utf-8", errors="ignore")
    if str(args.file) == "-":
        return sys.stdin.buffer.read()
    try:
        return Path(args.file).read_bytes()
    except OSError as exc:
        raise CLIError("--file", f"cannot read {args.file}: {exc.strerror}") from None


def _patcher_for(args, device):
    """The EntropyPatcher that --model / --mode / --threshold / --max-patch-length describe."""
    from .nn import EntropyPatcher
    from .train import ENTROPY_MODEL_TYPE, load_model_dir

    entropy_model, settings = None, {}
    if args.model is not None:
        config_file = args.model / "config.json"
        ours = config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == ENTROPY_MODEL_TYPE
        ours |= (args.model / "model" / "config.json").is_file() and json.loads(
            (args.model / "model" / "config.json").read_text()).get("model_type") == ENTROPY_MODEL_TYPE
        if ours:
            entropy_model = _load_entropy(args.model, device, "--model")
        else:
            try:
                blt = load_model_dir(args.model, device=device, backend=args.backend)
            except (FileNotFoundError, ValueError, OSError, KeyError) as exc:
                raise CLIError("--model", f"not an entropy model or BLT checkpoint directory: {exc}") from None
            entropy_model, c = blt.entropy_model, blt.config
            settings = {"mode": c.patching_mode, "threshold": c.patching_threshold,
                        "threshold_add": c.patching_threshold_add, "monotonicity": c.monotonicity,
                        "max_patch_length": c.max_patch_length, "patch_size": c.patch_size}
    mode = args.mode or settings.get("mode") or ("entropy" if entropy_model is not None else "space")
    if mode == "entropy" and entropy_model is None:
        raise CLIError("--model", "entropy patching needs an entropy model or BLT checkpoint directory")
    threshold = args.threshold if args.threshold is not None else settings.get("threshold")
    if mode == "entropy" and threshold is None:
        raise CLIError("--threshold", "this entropy model directory carries no threshold: give one "
                                      "(blt-ext calibrate finds the one for a target patch size)")
    return EntropyPatcher(
        entropy_model, mode=mode, threshold=threshold if threshold is not None else 0.0,
        threshold_add=settings.get("threshold_add"), monotonicity=settings.get("monotonicity", False),
        max_patch_length=args.max_patch_length or settings.get("max_patch_length"),
        patch_size=args.patch_size or settings.get("patch_size", 4), backend=args.backend)


@torch.no_grad()
def patch_bytes(patcher, data: bytes, device, chunk: int = 4096):
    """(patch lengths over the bytes of ``data``, per-byte entropies or None).

    The entropy of byte j is the entropy model's uncertainty when predicting it from the bytes
    before it; a patch starts at byte j >= 1 where it exceeds the threshold (global rule). The
    text is encoded with BOS (its own first patch, dropped from the result). In entropy mode
    the entropy model reads ``chunk`` ids at a time (its context restarts there, as the original
    does past its maximum length) and the patching rules then run over the whole sequence.
    """
    from .model import ByteTokenizer

    tokens = torch.tensor([ByteTokenizer().encode(data, add_bos=True, add_eos=False)], device=device)
    ops = patcher.ops
    entropies = None
    if patcher.mode == "entropy":
        entropies = torch.cat([patcher.entropies(tokens[:, i : i + chunk]) for i in range(0, tokens.shape[1], chunk)],
                              dim=1)
        starts = ops.entropy_patch_starts(entropies, patcher.threshold, patcher.threshold_add,
                                          patcher.monotonicity, False)
        layout = ops.patch_layout(starts, False, patcher.max_patch_length)
    else:
        layout = patcher(tokens, include_next_token=False)
    lengths = layout.patch_lengths[0, 1 : int(layout.patch_counts[0])].tolist()
    # entropies[t] is predicted at token t for token t + 1: byte j (token j + 1) gets entropies[j]
    return lengths, None if entropies is None else entropies[0, :-1].tolist()


def split_patches(data: bytes, lengths) -> list[str]:
    """The text of each patch; a UTF-8 character split by a boundary is shown in the patch that
    completes it (invalid bytes as U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    out, pos = [], 0
    for n in lengths:
        out.append(decoder.decode(data[pos : pos + n], final=pos + n == len(data)))
        pos += n
    return out


def render_patches(texts, colour: bool) -> str:
    """Patches side by side: alternating background colours, or ``|`` between them."""
    if not colour:
        return "|".join(texts)
    parts = []
    for i, text in enumerate(texts):
        on = _COLOURS[i % len(_COLOURS)]
        # a newline inside a patch: show it, and keep the colour off the line ends
        parts.append(on + text.replace("\n", "↵" + _RESET + "\n" + on) + _RESET)
    return "".join(parts)


def cmd_patch(args):
    device = _device(args.device)
    data = _read_input(args)
    if not data:
        raise CLIError("TEXT", "the input is empty")
    patcher = _patcher_for(args, device)
    lengths, entropies = patch_bytes(patcher, data, device)
    texts = split_patches(data, lengths)
    mean = len(data) / max(1, len(lengths))
    if args.json:
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        record = {"mode": patcher.mode, "threshold": patcher.threshold if patcher.mode == "entropy" else None,
                  "num_bytes": len(data), "num_patches": len(lengths), "mean_patch_size": mean,
                  "patches": [{"start": s, "length": n, "text": t} for s, n, t in zip(starts, lengths, texts)]}
        if entropies is not None:
            record["entropies"] = entropies
        print(json.dumps(record, ensure_ascii=False, indent=1))
        return 0
    colour = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    print(render_patches(texts, colour))
    rule = f"threshold {patcher.threshold:.4g}" if patcher.mode == "entropy" else f"mode {patcher.mode}"
    print(f"\n{len(data)} bytes, {len(lengths)} patches, mean patch size {mean:.2f} bytes ({rule})")
    return 0


# ---- generate -------------------------------------------------------------------------------------


def cmd_generate(args):
    from .train import load_model_dir

    if (args.prompt is None) == (args.prompt_option is None):
        raise CLIError("PROMPT", "give the prompt as an argument or with --prompt (one of them)")
    prompt = args.prompt if args.prompt is not None else args.prompt_option
    device = _device(args.device)
    try:
        model = load_model_dir(args.model, device=device, backend=args.backend)
    except (FileNotFoundError, ValueError, OSError, KeyError) as exc:
        raise CLIError("MODEL", f"not a BLT checkpoint directory: {exc}") from None
    stream = None if args.json else TextStream(prompt)
    out = model.generate([prompt], args.max_new_bytes, temperature=args.temperature, top_k=args.top_k,
                         top_p=args.top_p, stop_at_eos=not args.no_stop_at_eos, seed=args.seed,
                         use_cache=not args.no_cache, on_step=stream)
    if args.json:
        print(json.dumps({"prompt": prompt, "text": out.texts[0], "ids": out.ids[0]}, ensure_ascii=False))
    else:
        stream.close()
    return 0


class TextStream:
    """Prints the prompt, then each generated byte as it comes (UTF-8 decoded incrementally, so a
    character split over several bytes appears whole); stops printing at EOS."""

    def __init__(self, prompt: str):
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="ignore")
        self.ended = False
        print(prompt, end="", flush=True)

    def __call__(self, rows: list[int], ids: list[int]) -> None:
        (byte_id,) = ids
        if self.ended or byte_id == EOS_ID:
            self.ended = True
            return
        if byte_id >= OFFSET:
            print(self.decoder.decode(bytes([byte_id - OFFSET])), end="", flush=True)

    def close(self) -> None:
        print(self.decoder.decode(b"", final=True))


# ---- demo -----------------------------------------------------------------------------------------


def cmd_demo(args):
    from .demo import run_demo

    run_demo(out=args.out, device=args.device, quick=args.quick, progress=not args.no_progress)
    return 0


# ---- parser ---------------------------------------------------------------------------------------


def _train_parser(sub):
    from .train import DEFAULT_PRESETS, ENTROPY_SOURCES, PRECISIONS, TrainConfig

    d = TrainConfig()
    p = sub.add_parser("train", help="train an entropy model, or a BLT with a frozen entropy model",
                       description="Train the entropy model ('entropy') or a BLT patched by a frozen entropy "
                                   "model ('blt'). Unset options take the defaults shown. The run directory "
                                   "(--out) receives checkpoint.pt, log.jsonl and model/.")
    p.add_argument("task", nargs="?", choices=("entropy", "blt"))
    p.add_argument("--resume", type=existing_dir, metavar="DIR",
                   help="continue the run in DIR (only --steps, --device, --precision, --eval-every and "
                        "--checkpoint-every may change)")
    p.add_argument("--out", type=Path, help="run directory (default out/train-TASK-TIMESTAMP)")
    p.add_argument("--data", type=existing_path, nargs="+", metavar="PATH",
                   help="text files, directories, .jsonl files (default: the Python standard library's sources)")
    p.add_argument("--corpus-bytes", type=int_at_least(1), help=f"size of the default corpus ({d.corpus_bytes})")
    p.add_argument("--preset", help=f"model preset (default {DEFAULT_PRESETS['entropy']} / {DEFAULT_PRESETS['blt']})")
    p.add_argument("--steps", type=int_at_least(1), help=f"optimizer steps ({d.steps})")
    p.add_argument("--batch-size", type=int_at_least(1), help=f"rows per micro-batch ({d.batch_size})")
    p.add_argument("--seq-len", type=int_at_least(2), help=f"bytes per row ({d.seq_len})")
    p.add_argument("--grad-accum", type=int_at_least(1), help=f"micro-batches per step ({d.grad_accum})")
    p.add_argument("--lr", type=float_in(0, lo_open=True), help=f"peak learning rate ({d.lr})")
    p.add_argument("--min-lr-ratio", type=float_in(0, 1), help=f"final lr / peak lr ({d.min_lr_ratio})")
    p.add_argument("--warmup", type=int_at_least(0), help=f"warm-up steps ({d.warmup_steps})")
    p.add_argument("--weight-decay", type=float_in(0), help=f"AdamW weight decay ({d.weight_decay})")
    p.add_argument("--grad-clip", type=float_in(0), help=f"gradient norm clip, 0 = off ({d.grad_clip})")
    p.add_argument("--eval-every", type=int_at_least(0), help=f"steps between evaluations ({d.eval_every})")
    p.add_argument("--eval-batches", type=int_at_least(1), help=f"held-out batches per evaluation ({d.eval_batches})")
    p.add_argument("--checkpoint-every", type=int_at_least(0),
                   help=f"steps between checkpoints, 0 = at the end only ({d.checkpoint_every})")
    p.add_argument("--seed", type=int_at_least(0), help=f"seed of the init and the data order ({d.seed})")
    p.add_argument("--device", type=device_name, help="auto (default), cpu, cuda")
    p.add_argument("--precision", choices=PRECISIONS, help="auto (default): bf16 autocast on CUDA, fp32 on CPU")
    p.add_argument("--backend", choices=("ext", "torch"), help="BLT ops: ext kernels (default) or torch twins")
    p.add_argument("--compile", action="store_true", default=None,
                   help="the model's layers through torch.compile: fewer, fused kernels per step after a "
                        "compilation at the start (minutes for a large model)")
    p.add_argument("--entropy-model", type=existing_dir, metavar="DIR", help="blt: the frozen entropy model")
    p.add_argument("--entropies", choices=ENTROPY_SOURCES, help="blt: on-the-fly (default) or cached")
    p.add_argument("--threshold", type=float_in(), help="blt: entropy threshold in nats")
    p.add_argument("--target-patch-size", type=float_in(1),
                   help=f"blt: calibrate the threshold to this mean patch size ({d.target_patch_size})")
    p.add_argument("--max-patch-length", type=int_at_least(1), help="blt: split longer patches")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)


def build_parser() -> Parser:
    parser = Parser(prog="blt-ext", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    demo = sub.add_parser("demo", help="the main job: train tiny models, show patches, plot, generate, time")
    demo.add_argument("--out", type=Path, help="output folder (default out/demo-TIMESTAMP)")
    demo.add_argument("--device", type=device_name, default="auto")
    demo.add_argument("--quick", action="store_true", help="a few steps of everything (a smoke test)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(func=cmd_demo)

    _train_parser(sub)

    cal = sub.add_parser("calibrate", help="the threshold for a target mean patch size, with a histogram")
    cal.add_argument("model", type=existing_dir, metavar="MODEL",
                     help="entropy model directory, entropy training run, or BLT checkpoint")
    cal.add_argument("--target", type=float_in(1), required=True, help="mean patch size in bytes, e.g. 4.5")
    cal.add_argument("--data", type=existing_path, nargs="+", metavar="PATH", help="corpus (default: stdlib sources)")
    cal.add_argument("--corpus-bytes", type=int_at_least(1), default=1_000_000, help="size of the default corpus")
    cal.add_argument("--seq-len", type=int_at_least(2), default=512, help="bytes per row")
    cal.add_argument("--max-bytes", type=int_at_least(1), default=1_000_000, help="bytes of the corpus to use")
    cal.add_argument("--batch-size", type=int_at_least(1), default=16)
    cal.add_argument("--threshold-add", type=float_in(), help="relative rule: also H[p-1] - H[p-2] > this")
    cal.add_argument("--monotonicity", action="store_true", help="relative rule: H[p-1] - H[p-2] > threshold")
    cal.add_argument("--max-patch-length", type=int_at_least(1))
    cal.add_argument("--device", type=device_name, default="auto")
    cal.add_argument("--backend", choices=("ext", "torch"), default="ext")
    cal.add_argument("--json", action="store_true", help="print the result as JSON")
    cal.set_defaults(func=cmd_calibrate)

    pat = sub.add_parser("patch", help="patches of a text or file")
    pat.add_argument("text", nargs="?", metavar="TEXT")
    pat.add_argument("--file", type=lambda t: Path(t) if t == "-" else existing_path(t), metavar="PATH",
                     help="read the bytes of PATH ('-': standard input)")
    pat.add_argument("--model", type=existing_dir, metavar="DIR",
                     help="BLT checkpoint (its patcher settings) or entropy model directory (give --threshold)")
    pat.add_argument("--mode", choices=("entropy", "space", "static", "byte"),
                     help="default: the checkpoint's, else entropy with an entropy model, else space")
    pat.add_argument("--threshold", type=float_in(), help="entropy threshold in nats")
    pat.add_argument("--max-patch-length", type=int_at_least(1))
    pat.add_argument("--patch-size", type=int_at_least(1), help="static mode: bytes per patch")
    pat.add_argument("--color", choices=("auto", "always", "never"), default="auto")
    pat.add_argument("--json", action="store_true", help="patches (start, length, text) and entropies as JSON")
    pat.add_argument("--device", type=device_name, default="auto")
    pat.add_argument("--backend", choices=("ext", "torch"), default="ext")
    pat.set_defaults(func=cmd_patch)

    gen = sub.add_parser("generate", help="continue a prompt with a BLT checkpoint")
    gen.add_argument("model", type=existing_dir, metavar="MODEL",
                     help="BLT checkpoint directory (transformers or original format) or a BLT training run")
    gen.add_argument("prompt", nargs="?", metavar="PROMPT")
    gen.add_argument("--prompt", dest="prompt_option", metavar="TEXT")
    gen.add_argument("--max-new-bytes", type=int_at_least(1), default=128)
    gen.add_argument("--temperature", type=float_in(0), default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-k", type=int_at_least(1))
    gen.add_argument("--top-p", type=float_in(0, 1, lo_open=True))
    gen.add_argument("--seed", type=int_at_least(0))
    gen.add_argument("--no-stop-at-eos", action="store_true", help="keep going after an end-of-sequence byte")
    gen.add_argument("--no-cache", action="store_true",
                     help="re-run the model over the whole prefix for every byte instead of using KV caches")
    gen.add_argument("--device", type=device_name, default="auto")
    gen.add_argument("--backend", choices=("ext", "torch"), default="ext")
    gen.add_argument("--json", action="store_true")
    gen.set_defaults(func=cmd_generate)

    ops = sub.add_parser("ops", help="list the registered ops")
    ops.add_argument("--check", action="store_true", help="check and time every op against its twin")
    ops.add_argument("--device", type=device_name, default="auto")
    ops.add_argument("--reps", type=int_at_least(1), default=5)
    ops.set_defaults(func=cmd_ops)
    sub.add_parser("env", help="build and device information").set_defaults(func=cmd_env)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CLIError as exc:
        print(f"blt-ext {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"blt-ext {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
