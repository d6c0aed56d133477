"""The benchmark runner's comparison table (benchmarks/run.py): columns, ratios, bandwidth; and how
many calls the shared timing (benchmarks/common.py) makes."""

import importlib.util
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run():
    return load("run")


def test_slow_calls_get_fewer_timing_repeats():
    common = load("common")
    budget, floor = common.TIMING_BUDGET_MS, common.MIN_REPEAT
    assert common.timing_repeats(0.1, 50) == 50  # fast kernels keep every repeat
    assert common.timing_repeats(budget / 20, 50) == 20  # 20 calls fill the budget
    assert common.timing_repeats(budget, 50) == floor  # never fewer than the floor
    assert common.timing_repeats(0.0, 50) == 50


def cells(line):
    return [c.strip() for c in line.strip("|").split("|")]


def test_op_rows_show_speedups_bandwidth_and_the_per_call_time(run):
    rows = {
        "attention": {
            "ext": (0.1, 2e8, {"per_call_ms": 0.15}),
            "flex": (0.25, None, {"per_call_ms": 0.4}),
        },
        "pooling": {"ext": (2.0, None, {}), "torch": (5.0, None, {})},
    }
    head, rule, attention, pooling = run.table(rows, copy_gbs=4000).splitlines()
    assert cells(head) == ["workload", "ext", "torch", "flex", "torch/ext", "flex/ext", "ext GB/s",
                           "% of copy BW", "ext per call"]
    assert rule == "|" + "---|" * 9
    # 2e8 bytes in 0.1 ms = 2000 GB/s, half of the copy bandwidth; flex / ext = 0.25 / 0.1
    assert cells(attention) == ["attention", "0.100 ms", "–", "0.250 ms", "–", "2.50x", "2000.0", "50%",
                                "0.150 ms"]
    assert cells(pooling) == ["pooling", "2.000 ms", "5.000 ms", "–", "2.50x", "–", "–", "–", "–"]


def test_rows_without_per_call_times_have_no_such_column(run):
    rows = {"model": {"ext": (40.0, None, {"bytes_per_s": 2e5, "peak_mem_mb": 221.0}),
                      "transformers": (80.0, None, {"peak_mem_mb": 364.0})}}
    head, _, model = run.table(rows).splitlines()
    assert "ext per call" not in head
    assert cells(model) == ["model", "40.000 ms", "80.000 ms", "2.00x", "–", "2e+05", "221 / 364"]
