#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA for sm_90, run the CUDA tests, run compute-sanitizer
# (memcheck, racecheck) over small cases of every kernel, run the GPU benchmarks, print a short
# table last; each step has a time limit so the whole run fits one 10-minute call.
# Usage: benchmarks/gpu_check.sh LOGDIR [pytest -k expression for the benchmarks]
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:?usage: benchmarks/gpu_check.sh LOGDIR}
mkdir -p "$LOG"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1
status=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $LOG/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >"$LOG/$name.log" 2>&1
  local rc=$?
  status+=("$(printf '%-12s %-4s %4ss' "$name" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - start)))")
  tail -n 3 "$LOG/$name.log"
  return $rc
}

step build 300 tools/setup_env.sh || { cat "$LOG/build.log"; exit 1; }
PY=$(tail -n 1 "$LOG/build.log")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >"$LOG/gpu.txt" 2>&1
step env 60 "$PY" -m blt_ext env
step cuda-tests 200 "$PY" -m pytest tests -m cuda -q --tb=short --maxfail=20 -rs -p no:cacheprovider
BLT_BENCH_DEVICE=cuda step bench 300 "$PY" benchmarks/run.py --record "$LOG/gpu-ops.md" ${2:+-k "$2"}
if command -v compute-sanitizer >/dev/null; then
  step memcheck 120 compute-sanitizer --tool memcheck --error-exitcode 1 "$PY" tools/sanitize_cases.py
  step racecheck 120 compute-sanitizer --tool racecheck --error-exitcode 1 "$PY" tools/sanitize_cases.py
fi

echo; echo "== $(cat "$LOG/gpu.txt")"
printf '%s\n' "${status[@]}"
echo
sed -n '/^| workload/,$p' "$LOG/gpu-ops.md" 2>/dev/null
