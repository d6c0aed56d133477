"""Time patch cross-attention on CUDA (ext and flex_attention at the benchmark shapes) three
ways, to tell a kernel's cost from the cost of launching it:

- per call: CUDA events around one call issued after a synchronisation (launch latency included);
- back to back: 20 calls between two events, divided by 20 (the host may still be the limit);
- kernels: the device time of the calls' kernels, from torch.profiler.

    PYTHONPATH=. python tools/attention_timing_modes.py [providers...]   # default: ext flex
"""

import statistics
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_patch_attention as bench
from common import cuda_event_median_ms


def back_to_back_ms(fn, calls=20, repeat=15):
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def kernel_ms(fn, calls=10):
    """Device milliseconds per call, in all and for the four costliest kernels."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    per_kernel = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            per_kernel[event.name] = per_kernel.get(event.name, 0.0) + event.device_time / 1e3 / calls
    top = sorted(per_kernel.items(), key=lambda item: -item[1])[:4]
    return sum(per_kernel.values()), top


def main(providers):
    for direction in bench.DIRECTIONS:
        for provider in providers:
            for pass_ in bench.PASSES:
                run = bench.workload(provider, direction, pass_)
                run()
                per_call, queued = cuda_event_median_ms(run), back_to_back_ms(run)
                total, top = kernel_ms(run)
                kernels = "; ".join(f"{name[:48]} {ms:.4f}" for name, ms in top)
                print(f"{direction:8s} {pass_:8s} {provider:5s} per call {per_call:.4f} ms, back to back "
                      f"{queued:.4f} ms, kernels {total:.4f} ms ({kernels})", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:] or ["ext", "flex"])
