#!/usr/bin/env bash
# Compile every csrc/cuda/*.cu to an sm_90 object against the installed torch's headers, without
# a GPU and with a CPU-only torch: proves the CUDA sources still build. A CPU-only torch lacks
# the generated c10/cuda/impl/cuda_cmake_macros.h; a stand-in under build/ supplies its one macro.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$(tools/setup_env.sh)}
NVCC=${NVCC:-$(command -v nvcc || true)}
[ -n "$NVCC" ] || { echo "check_cuda_compile: nvcc not found (set NVCC or put it on PATH)" >&2; exit 1; }

TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
STUB=build/cuda-check/include
OBJ=build/cuda-check/obj
mkdir -p "$STUB/c10/cuda/impl" "$OBJ"
if [ ! -f "$("$PY" -c 'import torch,os; print(os.path.dirname(torch.__file__))')/include/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$STUB/c10/cuda/impl/cuda_cmake_macros.h"
fi

compile() {
  local src=$1 obj=$OBJ/$(basename "$1" .cu).o
  "$NVCC" -std=c++20 -gencode=arch=compute_90,code=sm_90 --expt-relaxed-constexpr -O3 -DBLT_EXT_WITH_CUDA \
    -Icsrc -I"$STUB" $TORCH_INC -c "$src" -o "$obj" && echo "  compiled $src -> $obj"
}
export -f compile; export NVCC OBJ STUB TORCH_INC
sources=(csrc/cuda/*.cu)
[ -e "${sources[0]}" ] || { echo "check_cuda_compile: no .cu files under csrc/cuda" >&2; exit 1; }
echo "check_cuda_compile: $("$NVCC" --version | tail -1), ${#sources[@]} files"
printf '%s\n' "${sources[@]}" | xargs -P "${MAX_JOBS:-2}" -I{} bash -c 'compile {}'
echo "check_cuda_compile: all ${#sources[@]} CUDA sources compile for sm_90"
