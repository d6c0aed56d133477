"""Run the op benchmarks and print one comparison table.

    python benchmarks/run.py                 # every benchmarks/bench_*.py on the default device
    python benchmarks/run.py -k segment_pool # pytest -k filter
    python benchmarks/run.py --record benchmarks/results/cpu-ops.md

Each row is one workload; each provider's median time is shown with the speedup of ``ext``
over it (``ext`` time / provider time < 1 means ext is faster: the column shows provider / ext).
On CUDA the op times are GPU times (benchmarks/common.py says how) and the achieved bandwidth of
``ext`` is compared with the device-to-device copy bandwidth measured in the same run; "ext per
call" is ext's time for a call issued after a synchronisation, launch latency included.
"""

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing blt_ext
PROVIDER_ORDER = ["ext", "torch", "compile", "sdpa", "flex", "flex+mask"]


def copy_bandwidth_gbs():
    import torch

    n = 1 << 30
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        dst.copy_(src)
    end.record()
    end.synchronize()
    return 2 * n * 20 / (start.elapsed_time(end) / 1e3) / 1e9


def environment():
    import torch

    import blt_ext

    # BLT_COMMIT names the commit where the checkout has no .git (a copied working tree).
    commit = os.environ.get("BLT_COMMIT") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], check=False, capture_output=True, text=True, cwd=HERE
    ).stdout.strip()
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "torch": torch.__version__,
        "blt_ext CUDA build": blt_ext.WITH_CUDA,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def load_rows(json_path):
    data = json.loads(Path(json_path).read_text())
    rows = defaultdict(dict)
    for bench in data["benchmarks"]:
        extra = bench.get("extra_info", {})
        median_ms = extra.get("median_ms")
        if median_ms is None:
            median_ms = bench["stats"]["median"] * 1e3
        rows[bench["group"]][extra["provider"]] = (median_ms, extra.get("bytes_moved"), extra)
    return rows


def fmt_ms(ms):
    return f"{ms:.3f} ms" if ms >= 0.1 else f"{ms * 1e3:.1f} us"


def table(rows, copy_gbs=None):
    providers = [p for p in PROVIDER_ORDER if any(p in r for r in rows.values())]
    providers += sorted({p for r in rows.values() for p in r} - set(providers))
    head = ["workload"] + providers + [f"{p}/ext" for p in providers if p != "ext"] + ["ext GB/s"]
    if copy_gbs:
        head.append("% of copy BW")
    # Whole-model rows carry no bytes_moved but their throughput and memory in extra_info.
    has = {key: any(key in v[2] for r in rows.values() for v in r.values())
           for key in ("bytes_per_s", "peak_mem_mb", "per_call_ms")}
    if has["per_call_ms"]:
        head.append("ext per call")
    if has["bytes_per_s"]:
        head.append("ext bytes/s")
    if has["peak_mem_mb"]:
        head.append("peak MB (" + " / ".join(providers) + ")")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for group in sorted(rows):
        r = rows[group]
        cells = [group] + [fmt_ms(r[p][0]) if p in r else "–" for p in providers]
        ext = r.get("ext")
        for p in providers:
            if p == "ext":
                continue
            cells.append(f"{r[p][0] / ext[0]:.2f}x" if ext and p in r else "–")
        gbs = ext[1] / (ext[0] / 1e3) / 1e9 if ext and ext[1] else None
        cells.append(f"{gbs:.1f}" if gbs else "–")
        if copy_gbs:
            cells.append(f"{100 * gbs / copy_gbs:.0f}%" if gbs else "–")
        if has["per_call_ms"]:
            per_call = ext[2].get("per_call_ms") if ext else None
            cells.append(fmt_ms(per_call) if per_call is not None else "–")
        if has["bytes_per_s"]:
            rate = ext[2].get("bytes_per_s") if ext else None
            cells.append(f"{rate:.3g}" if rate else "–")
        if has["peak_mem_mb"]:
            peaks = [r[p][2].get("peak_mem_mb") if p in r else None for p in providers]
            cells.append(" / ".join(f"{m:.0f}" if m is not None else "–" for m in peaks))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default=None, help="pytest -k expression selecting benchmarks")
    parser.add_argument("--record", default=None, help="also write the table (markdown) to this file")
    parser.add_argument("--json", default=None, help="keep pytest-benchmark's JSON here")
    parser.add_argument("files", nargs="*", help="benchmark files (default: benchmarks/bench_*.py)")
    args = parser.parse_args(argv)

    json_path = args.json or os.path.join(tempfile.mkdtemp(), "bench.json")
    files = args.files or sorted(str(p) for p in HERE.glob("bench_*.py"))
    # --durations: which benchmarks (compilation included) take a file's time
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files,
           f"--benchmark-json={json_path}", "--benchmark-disable-gc", "--benchmark-columns=median",
           "--durations=0", "--durations-min=5"]
    if args.k:
        cmd += ["-k", args.k]
    result = subprocess.run(cmd, check=False, cwd=HERE.parent)
    if result.returncode != 0 or not Path(json_path).exists():
        print(f"benchmark run failed (exit {result.returncode})", file=sys.stderr)
        return result.returncode or 1

    import torch

    copy_gbs = copy_bandwidth_gbs() if torch.cuda.is_available() and os.environ.get(
        "BLT_BENCH_DEVICE", "cuda") == "cuda" else None
    env = environment()
    header = "\n".join(f"- {k}: {v}" for k, v in env.items())
    if copy_gbs:
        header += f"\n- measured device-to-device copy bandwidth: {copy_gbs:.0f} GB/s"
    text = f"{header}\n\n{table(load_rows(json_path), copy_gbs)}\n"
    print("\n" + text)
    if args.record:
        Path(args.record).parent.mkdir(parents=True, exist_ok=True)
        Path(args.record).write_text(text)
        print(f"written to {args.record}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
