"""Raise one argument error per op family on each device, each in its own subprocess (eight at a
time), and report which ones raise cleanly and which ones crash the interpreter (a signal
instead of an exception).

    python tools/error_path_check.py            # cpu, and cuda where available

On a crash it prints the native backtrace when cuda-gdb is on PATH (it also debugs host code).
"""

import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import torch

CASES = {
    "entropy_patch_starts, rank error (message holds numbers)":
        "ops.entropy_patch_starts(torch.randn(2, 3, 5, device=dev))",
    "entropy_patch, rank error (message holds numbers)":
        "ops.entropy_patch(torch.randn(2, 5, device=dev))",
    "entropy, dtype error (message holds only names)":
        "ops.entropy(torch.ones(2, 5, dtype=torch.long, device=dev))",
    "segment_pool, rank error":
        "ops.segment_pool(torch.randn(4, 5, device=dev), torch.ones(4, 6, dtype=torch.long, device=dev))",
    "patch_cross_attention, bad slots":
        "ops.patch_cross_attention(*[torch.randn(1, 2, 1, 8, device=dev)] * 3, "
        "torch.tensor([[1, 1]], device=dev), 0, 'encoder')",
    "patch_ends, rank error (message holds numbers)":
        "torch.ops.blt_ext.patch_ends(torch.ones(3, dtype=torch.long, device=dev))",
    "hash_ngram_ids, bad ngram size":
        "ops.hash_ngram_ids(torch.zeros(1, 4, dtype=torch.long, device=dev), (0,), 1, 7)",
    "a plain torch error, for comparison":
        "torch.zeros(2, device=dev).view(3)",
}


def run_case(device, statement):
    code = (f"import torch\nfrom blt_ext import ops\ndev = torch.device({device!r})\n"
            f"try:\n    {statement}\nexcept Exception as exc:\n    print(type(exc).__name__)\n"
            f"else:\n    print('no error')\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True), code


def main():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = [(device, name, statement) for device in devices for name, statement in CASES.items()]
    # Each subprocess spends seconds importing torch: they run side by side, reported in order.
    with ThreadPoolExecutor(max_workers=8) as pool:
        runs = list(pool.map(lambda case: run_case(case[0], case[2]), cases))
    failed = 0
    for (device, name, _), (result, code) in zip(cases, runs):
        if result.returncode == 0:
            outcome = result.stdout.strip()
        elif result.returncode < 0:
            outcome = f"CRASH (signal {-result.returncode})"
        else:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            outcome = f"FAILED (exit {result.returncode}): {last}"
        print(f"{device:5} {name:58} {outcome}")
        if result.returncode != 0 or outcome == "no error":
            failed += 1
        if result.returncode < 0 and shutil.which("cuda-gdb"):
            bt = subprocess.run(["cuda-gdb", "-batch", "-ex", "run", "-ex", "bt 25", "--args",
                                 sys.executable, "-c", code], capture_output=True, text=True)
            print("\n".join(line for line in bt.stdout.splitlines() if line.startswith("#")))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
