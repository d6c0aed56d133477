"""What every benchmark file shares: the device, the timing, and what the runner reads back.

Each benchmark is one pytest-benchmark case whose ``group`` names the workload (op, direction,
shape) and whose ``extra_info`` carries the provider (``ext``, ``torch``, ``compile``, ``sdpa``,
``flex``...) and the bytes the workload must move at least. ``benchmarks/run.py`` turns the JSON
into the comparison table. On CUDA the time is the median of CUDA-event timings (host clocks
would add a synchronisation to every call); on CPU it is pytest-benchmark's median.

On CUDA an op's time is its GPU time: each timed call is queued behind a GPU wait, so all of its
kernels are enqueued before its start event runs and the events see neither Python's launch cost
nor an idle GPU's latency to the first kernel (tens to hundreds of microseconds per call on the
H200, different for every provider: NOTES.md, fifth GPU session). The time of a call issued
after a synchronisation, launch included, is kept as ``per_call_ms``. The whole-model benchmarks
time calls as a user's loop runs them (``gpu_time=False``): there the launches are part of the
cost.
"""

import os
import statistics

import torch

import blt_ext  # noqa: F401  (registers torch.ops.blt_ext)


def bench_device():
    """BLT_BENCH_DEVICE=cpu|cuda; by default CUDA when torch sees a GPU, else the CPU."""
    name = os.environ.get("BLT_BENCH_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"BLT_BENCH_DEVICE must be cpu or cuda, got {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("BLT_BENCH_DEVICE=cuda but torch sees no CUDA device")
    return torch.device(name)


DEVICE = bench_device()
ON_CUDA = DEVICE.type == "cuda"


# About 5 ms at the H200's 1.98 GHz: longer than any provider here takes to enqueue one call.
QUEUE_AHEAD_CYCLES = 10_000_000

# What one timing loop may take: the slow baselines (dense-mask references at 50-80 ms a call) get
# fewer repeats, down to MIN_REPEAT, which keeps a whole gpu_check.sh run within its 10 minutes.
TIMING_BUDGET_MS = 500
MIN_REPEAT = 10


def timing_repeats(call_ms, repeat, budget_ms=TIMING_BUDGET_MS):
    """Calls to time: ``repeat``, or as many as fit in ``budget_ms`` at ``call_ms`` a call, and at
    least MIN_REPEAT."""
    return max(MIN_REPEAT, min(repeat, int(budget_ms / max(call_ms, 1e-6))))


def cuda_event_median_ms(fn, warmup=5, repeat=50, queue_ahead=False):
    """Median milliseconds between CUDA events around ``fn()``; with ``queue_ahead`` each call is
    enqueued behind a GPU wait, which times the GPU's work alone (see the module docstring)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if queue_ahead:
            torch.cuda._sleep(QUEUE_AHEAD_CYCLES)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def run_benchmark(benchmark, fn, *, group, provider, bytes_moved=None, rounds=None, repeat=50, warmup=None,
                  gpu_time=True):
    """Time ``fn`` (a closure over prepared inputs) and record what the runner needs.

    ``bytes_moved`` is the fewest bytes the workload must read and write; the runner turns it
    into GB/s. ``fn`` is called once first, which also triggers torch.compile's compilation.
    On CUDA ``repeat`` calls are timed with events (fewer for slow calls: timing_repeats), after
    ``warmup`` more calls (default: min(5, repeat)); ``median_ms`` is the GPU time with
    ``gpu_time`` (then ``per_call_ms`` is recorded too), else the per-call time.
    """
    benchmark.group = group
    benchmark.extra_info.update(provider=provider, device=str(DEVICE), bytes_moved=bytes_moved)
    fn()
    if ON_CUDA:
        torch.cuda.synchronize()
        repeat = timing_repeats(cuda_event_median_ms(fn, warmup=0, repeat=1), repeat)
        warmup = min(5, repeat) if warmup is None else warmup
        per_call_ms = cuda_event_median_ms(fn, warmup=warmup, repeat=repeat)
        if gpu_time:
            benchmark.extra_info["per_call_ms"] = per_call_ms
            benchmark.extra_info["median_ms"] = cuda_event_median_ms(fn, warmup=0, repeat=repeat,
                                                                     queue_ahead=True)
        else:
            benchmark.extra_info["median_ms"] = per_call_ms

        def synced():
            fn()
            torch.cuda.synchronize()

        benchmark.pedantic(synced, rounds=rounds or 5, iterations=1)
    else:
        benchmark.pedantic(fn, rounds=rounds or 10, iterations=1, warmup_rounds=1)


def compiled(fn):
    """torch.compile of a reference twin, the way a user would apply it."""
    return torch.compile(fn, fullgraph=False, dynamic=False)
