#!/usr/bin/env bash
# One call on a GPU machine: build with CUDA for sm_90; run the GPU tests and, beside them, raise one
# argument error per op on each device in a subprocess (tools/error_path_check.py) and run
# compute-sanitizer (memcheck, racecheck) over small cases of every kernel; then run the GPU
# benchmarks (one op family at a time, so a time limit loses at most one table) and print a short
# summary last.
# Usage: benchmarks/gpu_check.sh LOGDIR [benchmark files...]   (LOGDIR receives at most 8 files;
# default: the four op families)
# TESTS=cuda (default) runs the GPU tests (`pytest -m cuda`: every CUDA case; CI runs the CPU ones),
# TESTS=all the README's test command (CPU and CUDA), TESTS="FILES..." those files' CPU and CUDA
# cases, TESTS=0 nothing;
# SANITIZE=0 skips compute-sanitizer, SANITIZE=memcheck or racecheck runs that tool alone;
# NCU=1 adds Nsight Compute's view of the cross-attention and entropy-patching kernels
# (LOGDIR/ncu.log);
# DEMO=1 adds the demo on the GPU (into LOGDIR/demo);
# BENCH_LIMIT sets the seconds each benchmark file may take (default 300: the hash file took 146-192 s
# on the H200 before its table);
# BLT_COMMIT=HASH names the commit in the tables: pass the local one, since the copied checkout's
# git may report another.
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${1:?usage: benchmarks/gpu_check.sh LOGDIR [benchmark files...]}
shift
BENCH_FILES=("$@")
# By default the op families, the longest first (a time limit then cuts the shortest); the whole
# model (bench_model.py, bench_generate.py) takes minutes more and is named explicitly.
[ ${#BENCH_FILES[@]} -gt 0 ] || BENCH_FILES=(benchmarks/bench_{patch_attention,hash_ngram,entropy_patch,segment_pool}.py)
mkdir -p "$LOG"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
status=()
step() {  # step NAME SECONDS COMMAND...: run with a time limit, append to $LOG/NAME.log, record the outcome
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" >>"$LOG/$name.log" 2>&1
  local rc=$?
  status+=("$(printf '%-26s %-4s %4ss' "$name ${*: -1}" "$([ $rc = 0 ] && echo ok || echo FAIL)" $((SECONDS - start)))")
  return $rc
}

step build 300 tools/setup_env.sh || { tail -40 "$LOG/build.log"; exit 1; }
PY=$(tail -n 1 "$LOG/build.log")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader >>"$LOG/env.log" 2>&1
step env 60 "$PY" -m blt_ext env
# how torch and this build were compiled: a C++ ABI or compiler mismatch shows here
"$PY" -c "import torch; print('torch C++ ABI', int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__config__.show())" >>"$LOG/build.log" 2>&1
grep -h -E '^ *(FLAGS|DEFINES) =' build/cmake-*/build.ninja | sort -u >>"$LOG/build.log" 2>&1
# The correctness-only steps (argument errors, compute-sanitizer) run beside the tests, as none of
# them times anything; each leaves its summary line in LOG/NAME.status until the tests are done.
in_background() {  # in_background NAME SECONDS COMMAND...: step in a background job
  ( step "$@"; printf '%s\n' "${status[-1]}" >"$LOG/$1.status" ) &
}
in_background error-paths 120 "$PY" tools/error_path_check.py
SANITIZE=${SANITIZE:-1}
if [ "$SANITIZE" != 0 ] && command -v compute-sanitizer >/dev/null; then
  (
    for tool in memcheck racecheck; do
      [ "$SANITIZE" = 1 ] || [ "$SANITIZE" = "$tool" ] || continue
      step "$tool" 150 compute-sanitizer --tool "$tool" --error-exitcode 1 "$PY" tools/sanitize_cases.py
      printf '%s\n' "${status[-1]}" >"$LOG/$tool.status"
    done
  ) &
fi
# The tests on 8 pytest-xdist workers where available: a crashing test then takes down one worker,
# not the run.
XDIST=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadgroup")
PYTEST_ARGS="-q --tb=short --maxfail=20 -rs -p no:cacheprovider --durations=15 $XDIST"
# Two intra-op threads per worker: eight workers then share the 16 cores instead of fighting.
# Expandable segments: the workers' big tensors of many sizes leave less reserved-but-unused memory.
TEST_ALLOC=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
TESTS=${TESTS:-cuda}
TEST_CMD=()
if [ "$TESTS" = cuda ]; then
  TEST_CMD=("$PY" -m pytest tests -m cuda $PYTEST_ARGS)
elif [ "$TESTS" = all ] && command -v make >/dev/null; then
  TEST_CMD=(make test PYTEST_ARGS="$PYTEST_ARGS")
elif [ "$TESTS" = all ]; then
  echo "no make on this machine: running the test command's pytest directly" >>"$LOG/tests.log"
  TEST_CMD=("$PY" -m pytest tests $PYTEST_ARGS)
elif [ "$TESTS" != 0 ]; then
  TEST_CMD=("$PY" -m pytest $TESTS $PYTEST_ARGS)
fi
[ ${#TEST_CMD[@]} -gt 0 ] && OMP_NUM_THREADS=2 PYTORCH_CUDA_ALLOC_CONF=$TEST_ALLOC step tests 360 "${TEST_CMD[@]}"
wait
for done_step in "$LOG"/*.status; do
  [ -e "$done_step" ] && status+=("$(cat "$done_step")") && rm -f "$done_step"
done
if [ "${NCU:-0}" = 1 ] && command -v ncu >/dev/null; then
  # --clock-control none: profile at the clocks the card runs at (ncu would otherwise lock them).
  # The compute sections say which pipe and which instructions fill the issue slots.
  step ncu 120 ncu --clock-control none --section SpeedOfLight --section LaunchStats --section Occupancy --section WarpStateStats \
    --section MemoryWorkloadAnalysis --section ComputeWorkloadAnalysis --section InstructionStats --section SchedulerStats \
    -k 'regex:(encoder|decoder)_(forward|backward)|patch_layout' "$PY" tools/ncu_kernels.py
fi
for file in "${BENCH_FILES[@]}"; do
  BLT_BENCH_DEVICE=cuda step bench "${BENCH_LIMIT:-300}" "$PY" benchmarks/run.py --record "$LOG/table.tmp" "$file" &&
    cat "$LOG/table.tmp" >>"$LOG/gpu-ops.md" && echo >>"$LOG/gpu-ops.md"
done
rm -f "$LOG/table.tmp"
[ "${DEMO:-0}" = 1 ] && step demo 300 "$PY" -m blt_ext demo --device cuda --no-progress --out "$LOG/demo"

echo; cat "$LOG/env.log"
tail -n 2 "$LOG/tests.log" 2>/dev/null
printf '%s\n' "${status[@]}"
echo
grep -h '^| ' "$LOG/gpu-ops.md" 2>/dev/null | grep -v '^| workload' | grep -v '^|---' | cut -c1-220
