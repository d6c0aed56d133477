"""Share of one training step (forward + cross-entropy + backward) spent in the BLT-specific ops,
for our model with the ext ops, with the pure-PyTorch twins, and for transformers' BltForCausalLM.

    python benchmarks/profile_model.py [--out results/model-profile.md]   # or BLT_PROFILE_OUT=...

Same models, weights, inputs and patch lengths as bench_model.py (blt-1b bf16 T=8192 on CUDA,
blt-tiny fp32 T=512 on CPU; BLT_BENCH_DEVICE picks the device).

How the BLT ops are found. No model code is edited: for the duration of the profile the
functions the models look up at call time are replaced by wrappers that open a
``torch.profiler.record_function`` region named after the op's category:

- ours (either backend): the public functions of ``blt_ext.ops`` / ``blt_ext.reference`` (the
  modules read ``self.ops.<name>`` on every call): hash n-gram, pooling, cross-attention.
- transformers: ``compute_hash_embeddings`` (hash n-gram), ``BltLocalEncoder.patch_reduce``
  (pooling), ``_prepare_patch_cross_attention_mask`` plus the attention call of
  ``BltCrossAttention`` only (cross-attention: its q/k/v/o projections and norms stay outside, as
  they are outside our op), ``BltModel._patch_ids_from_lengths`` (patch ids, which our ops derive
  internally).

Forward time of an op = every event inside its region. Backward time = every event under the
autograd engine's ``evaluate_function`` nodes whose sequence number is that of a forward op
inside the region (the profiler gives a backward node its forward op's sequence number), so
the twins' many small aten backward kernels are counted as well as the ext ``*_backward`` ops.
Each event counts once, by its self time: CPU time on the CPU, kernel (device) time on CUDA.
The share's denominator is the whole step: on the CPU the wall time of the step's own region
(Python included), on CUDA the summed kernel time. "named blt_ext" is the simpler measure of the
events whose names contain "blt_ext" (the registered ext ops and their autograd nodes), for
comparison.
"""

import argparse
import contextlib
import functools
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout without installing blt_ext

from bench_model import BATCH, DTYPE_NAME, PRESET, PROVIDERS, SEQ, make_forward, prepared_models, step  # noqa: E402
from common import DEVICE, ON_CUDA  # noqa: E402

REGION = "blt_region::"
CATEGORIES = ("hash n-gram", "pooling", "cross-attention", "patch ids", "patching")
OUR_OPS = {
    "hash_ngram_ids": "hash n-gram",
    "hash_ngram_embedding": "hash n-gram",
    "segment_pool": "pooling",
    "patch_cross_attention": "cross-attention",
    "entropy": "patching",
    "entropy_patch": "patching",
    "patch_layout": "patching",
}


def labelled(fn, category):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with record_function(REGION + category):
            return fn(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def patched(targets):
    """Replace ``getattr(owner, name)`` by ``make(original)`` for each (owner, name, make); restore after."""
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    try:
        for owner, name, make in targets:
            setattr(owner, name, make(getattr(owner, name)))
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


class _CrossAttentionOnly:
    """Stand-in for transformers' ALL_ATTENTION_FUNCTIONS that labels the cross-attention calls."""

    def __init__(self, registry, cross_cls):
        self._registry, self._cross_cls = registry, cross_cls

    def get_interface(self, name, default):
        fn = self._registry.get_interface(name, default)

        def attention(module, *args, **kwargs):
            if not isinstance(module, self._cross_cls):
                return fn(module, *args, **kwargs)
            with record_function(REGION + "cross-attention"):
                return fn(module, *args, **kwargs)

        return attention

    def __getattr__(self, name):
        return getattr(self._registry, name)


def regions(provider):
    """The (owner, attribute, wrapper factory) list that labels ``provider``'s BLT ops."""
    if provider != "transformers":
        import blt_ext.ops
        import blt_ext.reference

        namespace = blt_ext.ops if provider.startswith("ext") else blt_ext.reference
        return [(namespace, name, functools.partial(labelled, category=cat)) for name, cat in OUR_OPS.items()]
    from transformers.models.blt import modeling_blt as m

    return [
        (m, "compute_hash_embeddings", functools.partial(labelled, category="hash n-gram")),
        (m.BltLocalEncoder, "patch_reduce", functools.partial(labelled, category="pooling")),
        (m, "_prepare_patch_cross_attention_mask", functools.partial(labelled, category="cross-attention")),
        (m, "ALL_ATTENTION_FUNCTIONS", lambda reg: _CrossAttentionOnly(reg, m.BltCrossAttention)),
        (m.BltModel, "_patch_ids_from_lengths", functools.partial(labelled, category="patch ids")),
    ]


def subtree(event):
    yield event
    for child in event.cpu_children:
        yield from subtree(child)


def attribute(events):
    """(self time per BLT category, total self time, self time of events named "blt_ext"), in us."""
    self_key = "self_device_time_total" if ON_CUDA else "self_cpu_time_total"
    owner, seq_category = {}, {}
    # Events come in start order, so an outer region claims its events before a nested one
    # (a twin calling another labelled twin) could.
    for event in events:
        if event.name.startswith(REGION):
            category = event.name[len(REGION):]
            for e in subtree(event):
                owner.setdefault(id(e), category)
                if e.sequence_nr >= 0:
                    seq_category.setdefault(e.sequence_nr, category)
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function") and event.sequence_nr in seq_category:
            for e in subtree(event):
                owner.setdefault(id(e), seq_category[event.sequence_nr])
    per_category = defaultdict(float)
    total = named = 0.0
    for event in events:
        if event.device_type != DeviceType.CPU:
            continue  # a kernel's own event: its time is already its launching op's device time
        t = getattr(event, self_key)
        total += t
        if "blt_ext" in event.name:
            named += t
        if id(event) in owner:
            per_category[owner[id(event)]] += t
    return per_category, total, named


def wall_ms(fn, repeat):
    """Median wall time of ``fn`` (device-synchronised), without the profiler."""
    times = []
    for _ in range(repeat):
        if ON_CUDA:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if ON_CUDA:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def profile_provider(provider, ours, hf, inputs, repeat, top=0):
    x, targets, pl, hf_pl = inputs
    forward = make_forward(provider, ours, hf)
    model = hf if provider == "transformers" else ours

    def run_step():
        step(forward, (model,), x, targets, pl, hf_pl)

    run_step()  # warm-up (allocator, lazy init)
    step_ms = wall_ms(run_step, repeat)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ON_CUDA else [])
    with patched(regions(provider)), profile(activities=activities) as prof:
        with record_function("step"):
            run_step()
        if ON_CUDA:
            torch.cuda.synchronize()
    events = prof.events()
    per_category, kernel_total, named = attribute(events)
    if not ON_CUDA:  # CPU: the step's wall time (Python included) is the denominator
        kernel_total = sum(e.cpu_time_total for e in events if e.name == "step")
    model.zero_grad(set_to_none=True)
    sort_key = "self_device_time_total" if ON_CUDA else "self_cpu_time_total"
    return {"step_ms": step_ms, "total_ms": kernel_total / 1e3, "named_ms": named / 1e3,
            "per_category": {k: v / 1e3 for k, v in per_category.items()},
            "top": prof.key_averages().table(sort_by=sort_key, row_limit=top) if top else ""}


def table(results):
    unit = "kernel ms" if ON_CUDA else "CPU ms"
    cats = [c for c in CATEGORIES if any(c in r["per_category"] for r in results.values())]
    head = ["provider", "step ms (no profiler)", f"profiled step ({unit})", f"BLT ops ({unit})", "BLT share"]
    head += cats + ["named blt_ext share"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for provider, r in results.items():
        blt = sum(r["per_category"].values())
        total = r["total_ms"]
        cells = [provider, f"{r['step_ms']:.2f}", f"{total:.2f}", f"{blt:.2f}", f"{100 * blt / total:.1f}%"]
        cells += [f"{r['per_category'][c]:.2f} ({100 * r['per_category'][c] / total:.1f}%)"
                  if c in r["per_category"] else "–" for c in cats]
        cells.append(f"{100 * r['named_ms'] / total:.1f}%")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=os.environ.get("BLT_PROFILE_OUT"),
                        help="also write the table (markdown) here (default: $BLT_PROFILE_OUT)")
    parser.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    parser.add_argument("--repeat", type=int, default=5, help="unprofiled steps timed for the step column")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also list each provider's N ops with the most self time (kernel time on CUDA)")
    args = parser.parse_args(argv)

    ours, hf, inputs, _ = prepared_models()
    results = {p: profile_provider(p, ours, hf, inputs, args.repeat, args.top) for p in args.providers}
    make_forward("ext", ours, hf)  # the model as it was: ext ops, eager
    title = (f"One training step (forward + cross-entropy + backward), {PRESET} B{BATCH} T{SEQ} {DTYPE_NAME} on "
             f"{torch.cuda.get_device_name() if ON_CUDA else 'CPU'}, {int((inputs[2] > 0).sum())} patches")
    text = f"{title}\n\n{table(results)}\n"
    text += "".join(f"\n{p}: the {args.top} ops with the most self time\n```\n{r['top']}\n```\n"
                    for p, r in results.items() if r["top"])
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
