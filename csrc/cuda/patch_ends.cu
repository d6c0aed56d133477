// Inclusive patch ends: one block per row scans the row's lengths in tiles of kEndsThreads *
// kEndsItems (one tile for BLT's ~1,800 patches per 8 KB row), where at::cumsum took 4.5 us a call
// on the H200 (benchmarks/results/NOTES.md, fifth GPU session).
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

#include "chained_launch.cuh"
#include "common/checks.h"
#include "patch_ends.cuh"

namespace blt_ext::cuda {
namespace {

constexpr int kEndsThreads = 512;
constexpr int kEndsItems = 4;  // consecutive lengths per thread
constexpr int kEndsWarps = kEndsThreads / 32;
constexpr unsigned kAllLanes = 0xffffffffu;

__device__ int64_t warp_inclusive_scan(int64_t value, int lane) {
#pragma unroll
  for (int offset = 1; offset < 32; offset <<= 1) {
    const int64_t before = __shfl_up_sync(kAllLanes, value, offset);
    if (lane >= offset) value += before;
  }
  return value;
}

__global__ void __launch_bounds__(kEndsThreads)
    patch_ends_kernel(const int64_t* lengths, int64_t* ends, int64_t patches) {
  wait_for_previous_kernel();
  __shared__ int64_t warp_totals[kEndsWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t* row_lengths = lengths + blockIdx.x * patches;
  int64_t* row_ends = ends + blockIdx.x * patches;
  int64_t carry = 0;  // sum of the row's earlier tiles
  for (int64_t tile = 0; tile < patches; tile += kEndsThreads * kEndsItems) {
    const int64_t first = tile + threadIdx.x * kEndsItems;
    int64_t running[kEndsItems];
    int64_t sum = 0;
#pragma unroll
    for (int i = 0; i < kEndsItems; ++i) {
      sum += first + i < patches ? row_lengths[first + i] : 0;
      running[i] = sum;
    }
    const int64_t inclusive = warp_inclusive_scan(sum, lane);
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      const int64_t total = warp_inclusive_scan(lane < kEndsWarps ? warp_totals[lane] : 0, lane);
      if (lane < kEndsWarps) warp_totals[lane] = total;
    }
    __syncthreads();
    const int64_t before = carry + (warp > 0 ? warp_totals[warp - 1] : 0) + inclusive - sum;
#pragma unroll
    for (int i = 0; i < kEndsItems; ++i) {
      if (first + i < patches) row_ends[first + i] = before + running[i];
    }
    carry += warp_totals[kEndsWarps - 1];
    __syncthreads();  // every thread has read warp_totals before the next tile writes it
  }
}

}  // namespace

at::Tensor patch_ends(const at::Tensor& patch_lengths) {
  check_patch_ends_lengths(patch_lengths, "patch_ends");
  const c10::cuda::CUDAGuard guard(patch_lengths.device());
  const auto lengths = patch_lengths.contiguous();
  auto ends = at::empty_like(lengths);
  if (ends.numel() == 0) return ends;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  launch_chained(patch_ends_kernel, dim3(static_cast<unsigned>(lengths.size(0))), dim3(kEndsThreads), stream,
                 lengths.const_data_ptr<int64_t>(), ends.mutable_data_ptr<int64_t>(), lengths.size(1));
  return ends;
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("patch_ends", &blt_ext::cuda::patch_ends);
}
