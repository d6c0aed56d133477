#!/usr/bin/env bash
# Idempotent set-up behind `make demo` and `make test`: pick a Python where torch imports
# (creating .venv with torch==2.13.0 when none has it), install the missing test/demo
# dependencies, and build the extension in place. Prints the interpreter's path last.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[setup] $*" >&2; }

if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
  PY=.venv/bin/python
elif python3 -c "import torch" 2>/dev/null; then
  PY=$(python3 -c "import sys; print(sys.executable)")   # e.g. a GPU machine's torch+CUDA environment
else
  log "no Python with torch found: creating .venv with torch==2.13.0 (CPU)"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip >&2
  .venv/bin/python -m pip install -q torch==2.13.0 >&2
  PY=.venv/bin/python
fi
log "python: $PY (torch $("$PY" -c 'import torch; print(torch.__version__)'))"

# module name -> pip requirement; only what is missing is installed, so a machine without a
# package registry but with these packages present never needs one.
missing=()
for pair in numpy:numpy pytest:pytest pytest_benchmark:pytest-benchmark setuptools:setuptools \
            wheel:wheel transformers:transformers safetensors:safetensors matplotlib:matplotlib; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  "$PY" -m pip install -q "${missing[@]}" >&2
fi
for tool in cmake ninja; do
  command -v "$tool" >/dev/null || { log "installing $tool"; "$PY" -m pip install -q "$tool" >&2; }
done

log "building blt_ext._C (incremental)"
"$PY" setup.py -q build_ext --inplace >&2
echo "$PY"
