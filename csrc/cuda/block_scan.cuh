// Block-wide exclusive scans (sum, max) shared by the CUDA kernels that lay out patches.
#pragma once

namespace blt_ext::cuda {

struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};
struct Max {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};

// Exclusive scan of one value per thread over a block of kThreads threads (threads in order);
// `total` gets the scan of all of them. `shared` holds kThreads / 32 values. Every thread of the
// block must call it.
template <int kThreads, typename T, typename Op>
__device__ T block_exclusive_scan(T value, T identity, Op op, T* shared, T& total) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "a block of whole warps, at most 32 of them");
  constexpr int kWarps = kThreads / 32;
  constexpr unsigned kAllLanes = 0xffffffffu;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  T inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const T other = __shfl_up_sync(kAllLanes, inclusive, offset);
    if (lane >= offset) inclusive = op(other, inclusive);
  }
  if (lane == 31) shared[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    T w = lane < kWarps ? shared[lane] : identity;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const T other = __shfl_up_sync(kAllLanes, w, offset);
      if (lane >= offset) w = op(other, w);
    }
    if (lane < kWarps) shared[lane] = w;
  }
  __syncthreads();
  const T before_warp = warp == 0 ? identity : shared[warp - 1];
  T before_lane = __shfl_up_sync(kAllLanes, inclusive, 1);
  before_lane = lane == 0 ? identity : before_lane;
  total = shared[kWarps - 1];
  __syncthreads();  // `shared` is reused by the next scan
  return op(before_warp, before_lane);
}

}  // namespace blt_ext::cuda
