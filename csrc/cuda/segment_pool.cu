// Segment pooling of byte states into patches (BLT_SPEC.md d, patch representation init), CUDA.
//
// Patch ends come from patch_ends (the lengths' inclusive scan on the device, no host sync). One
// block covers one row's group of patches: threadIdx.y picks the patch, threadIdx.x a 16-byte chunk
// of features (8 bf16/fp16, 4 fp32, 2 fp64; one feature when D or a pointer does not allow
// vectors), and each thread loops over its patch's bytes. Length values are not checked here (that
// would need a host sync): patches are clipped to [0, T), so bad lengths never make a kernel read
// or write out of bounds; the backward zero-fills bytes after the last patch, while bytes left in a
// hole between patches by such lengths get an unspecified gradient.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "blt_ext.h"
#include "common/segment_pool.h"
#include "patch_ends.cuh"

namespace blt_ext::cuda {
namespace {

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

constexpr int kThreads = 256;

// One block per (row, group of patches): x over feature chunks (whole warps), y over patches.
struct Launch {
  dim3 grid, block;
  int64_t groups;  // blocks per row
};

Launch make_launch(int64_t B, int64_t P, int64_t chunks) {
  const int64_t bx = std::min<int64_t>(kThreads, std::max<int64_t>(32, (chunks + 31) / 32 * 32));
  const int64_t by = kThreads / bx;
  const int64_t groups = std::max<int64_t>(1, (P + by - 1) / by);
  TORCH_CHECK(B * groups <= INT32_MAX, "blt_ext.segment_pool: too many (row, patch group) blocks: ", std::to_string(B * groups));
  return {dim3(static_cast<unsigned>(B * groups)), dim3(static_cast<unsigned>(bx), static_cast<unsigned>(by)),
          groups};
}

template <typename scalar_t>
constexpr int kVec = 16 / sizeof(scalar_t);

bool aligned(const void* p, int64_t bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

// Real bytes [s, e) of patch n, clipped to [0, T) whatever the lengths hold.
__device__ __forceinline__ void patch_range(const int64_t* lengths, const int64_t* ends, int64_t n, int64_t T,
                                            int64_t& s, int64_t& e) {
  const int64_t end = ends[n];
  s = min(max(end - lengths[n], int64_t(0)), T);
  e = min(max(end, s), T);
}

template <typename scalar_t, int VEC, PoolReduce R>
__global__ void segment_pool_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ lengths,
                                    const int64_t* __restrict__ ends, scalar_t* __restrict__ out,
                                    int32_t* __restrict__ arg_index, int64_t P, int64_t T, int64_t D,
                                    int64_t groups) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  const int64_t b = blockIdx.x / groups;
  const int64_t p = (blockIdx.x % groups) * blockDim.y + threadIdx.y;
  if (p >= P) return;
  const int64_t n = b * P + p;
  int64_t s, e;
  patch_range(lengths, ends, n, T, s, e);
  const scalar_t* row = x + b * T * D;
  for (int64_t d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) {
    acc_t acc[VEC];
    int32_t idx[VEC];
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      acc[j] = acc_t(0);
      idx[j] = -1;
    }
    if constexpr (R == PoolReduce::Mean) {
#pragma unroll 4
      for (int64_t t = s; t < e; ++t) {
        const V v = *reinterpret_cast<const V*>(row + t * D + d);
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] += static_cast<acc_t>(v.v[j]);
      }
      if (e > s) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) acc[j] /= static_cast<acc_t>(e - s);
      }
    } else if (e > s) {
      const V first = *reinterpret_cast<const V*>(row + s * D + d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        acc[j] = static_cast<acc_t>(first.v[j]);
        idx[j] = static_cast<int32_t>(s);
      }
#pragma unroll 4
      for (int64_t t = s + 1; t < e; ++t) {
        const V v = *reinterpret_cast<const V*>(row + t * D + d);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          const acc_t a = static_cast<acc_t>(v.v[j]);
          // Strict comparison keeps the first occurrence on ties; the first NaN wins, as in torch.amax.
          const bool better = (R == PoolReduce::Max ? a > acc[j] : a < acc[j]) || (a != a && acc[j] == acc[j]);
          acc[j] = better ? a : acc[j];
          idx[j] = better ? static_cast<int32_t>(t) : idx[j];
        }
      }
    }
    V o;
#pragma unroll
    for (int j = 0; j < VEC; ++j) o.v[j] = static_cast<scalar_t>(acc[j]);
    *reinterpret_cast<V*>(out + n * D + d) = o;
    if constexpr (R != PoolReduce::Mean) {
      Vec<int32_t, VEC> a;
#pragma unroll
      for (int j = 0; j < VEC; ++j) a.v[j] = idx[j];
      *reinterpret_cast<Vec<int32_t, VEC>*>(arg_index + n * D + d) = a;
    }
  }
}

// Each thread writes its patch's grad_x rows in full (the winner's gradient or 0; mean: an equal
// share), so every byte is written once, with no atomics and no separate zero fill.
template <typename scalar_t, int VEC, bool kMean>
__global__ void segment_pool_backward_kernel(const scalar_t* __restrict__ grad_output,
                                             const int32_t* __restrict__ arg_index,
                                             const int64_t* __restrict__ lengths, const int64_t* __restrict__ ends,
                                             scalar_t* __restrict__ grad_x, int64_t P, int64_t T, int64_t D,
                                             int64_t groups) {
  using acc_t = at::opmath_type<scalar_t>;
  using V = Vec<scalar_t, VEC>;
  using IV = Vec<int32_t, VEC>;
  const int64_t b = blockIdx.x / groups;
  const int64_t group = blockIdx.x % groups;
  const int64_t p = group * blockDim.y + threadIdx.y;
  scalar_t* row = grad_x + b * T * D;
  if (p < P) {
    const int64_t n = b * P + p;
    int64_t s, e;
    patch_range(lengths, ends, n, T, s, e);
    for (int64_t d = threadIdx.x * VEC; e > s && d < D; d += blockDim.x * VEC) {
      const V g = *reinterpret_cast<const V*>(grad_output + n * D + d);
      V w;
      if constexpr (kMean) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          w.v[j] = static_cast<scalar_t>(static_cast<acc_t>(g.v[j]) / static_cast<acc_t>(e - s));
        }
#pragma unroll 4
        for (int64_t t = s; t < e; ++t) *reinterpret_cast<V*>(row + t * D + d) = w;
      } else {
        const IV a = *reinterpret_cast<const IV*>(arg_index + n * D + d);
#pragma unroll 4
        for (int64_t t = s; t < e; ++t) {
#pragma unroll
          for (int j = 0; j < VEC; ++j) w.v[j] = a.v[j] == t ? g.v[j] : scalar_t(0);
          *reinterpret_cast<V*>(row + t * D + d) = w;
        }
      }
    }
  }
  // Bytes after the row's last patch (none when the lengths sum to T or T + 1) get 0.
  if (group == groups - 1) {
    const int64_t tail = P > 0 ? min(max(ends[b * P + P - 1], int64_t(0)), T) : int64_t(0);
    V zero;
#pragma unroll
    for (int j = 0; j < VEC; ++j) zero.v[j] = scalar_t(0);
    for (int64_t t = tail + threadIdx.y; t < T; t += blockDim.y) {
      for (int64_t d = threadIdx.x * VEC; d < D; d += blockDim.x * VEC) *reinterpret_cast<V*>(row + t * D + d) = zero;
    }
  }
}

// 16-byte vectors when D and every pointer allow them (int32 arg_index: VEC * 4 bytes).
template <typename scalar_t>
bool use_vectors(int64_t D, const std::vector<const void*>& values, const void* arg_index) {
  constexpr int V = kVec<scalar_t>;
  if (D % V != 0) return false;
  for (const void* ptr : values) {
    if (!aligned(ptr, 16)) return false;
  }
  return arg_index == nullptr || aligned(arg_index, 4 * V);
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_pool(const at::Tensor& x, const at::Tensor& patch_lengths,
                                                const std::string& reduce) {
  const PoolReduce r = check_segment_pool_args(x, patch_lengths, reduce);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), P = patch_lengths.size(1);
  TORCH_CHECK_VALUE(T <= INT32_MAX, "blt_ext.segment_pool: x.size(1) (T) must fit in int32, got ", std::to_string(T));
  auto out = at::empty({B, P, D}, x.options());
  auto arg_index = at::empty(r == PoolReduce::Mean ? std::vector<int64_t>{0} : std::vector<int64_t>{B, P, D},
                             x.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, arg_index};
  const auto lengths = patch_lengths.contiguous();
  const auto ends = patch_ends(lengths);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_pool", [&] {
    int32_t* arg = r == PoolReduce::Mean ? nullptr : arg_index.mutable_data_ptr<int32_t>();
    auto run = [&](auto vec, auto reduce_tag) {
      constexpr int VEC = decltype(vec)::value;
      constexpr PoolReduce R = decltype(reduce_tag)::value;
      const Launch l = make_launch(B, P, D / VEC);
      segment_pool_kernel<scalar_t, VEC, R><<<l.grid, l.block, 0, stream>>>(
          x.const_data_ptr<scalar_t>(), lengths.const_data_ptr<int64_t>(), ends.const_data_ptr<int64_t>(),
          out.mutable_data_ptr<scalar_t>(), arg, P, T, D, l.groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto run_reduce = [&](auto vec) {
      switch (r) {
        case PoolReduce::Max: run(vec, std::integral_constant<PoolReduce, PoolReduce::Max>{}); break;
        case PoolReduce::Min: run(vec, std::integral_constant<PoolReduce, PoolReduce::Min>{}); break;
        case PoolReduce::Mean: run(vec, std::integral_constant<PoolReduce, PoolReduce::Mean>{}); break;
      }
    };
    if (use_vectors<scalar_t>(D, {x.const_data_ptr(), out.const_data_ptr()}, arg)) {
      run_reduce(std::integral_constant<int, kVec<scalar_t>>{});
    } else {
      run_reduce(std::integral_constant<int, 1>{});
    }
  });
  return {out, arg_index};
}

at::Tensor segment_pool_backward(const at::Tensor& grad_output, const at::Tensor& arg_index,
                                 const at::Tensor& patch_lengths, int64_t num_bytes, const std::string& reduce) {
  const PoolReduce r = check_segment_pool_backward_args(grad_output, arg_index, patch_lengths, num_bytes, reduce);
  const c10::cuda::CUDAGuard guard(grad_output.device());
  const int64_t B = grad_output.size(0), P = grad_output.size(1), D = grad_output.size(2);
  auto grad_x = at::empty({B, num_bytes, D}, grad_output.options());
  if (grad_x.numel() == 0) return grad_x;
  const auto lengths = patch_lengths.contiguous();
  const auto ends = patch_ends(lengths);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool mean = r == PoolReduce::Mean;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "segment_pool_backward", [&] {
    const int32_t* arg = mean ? nullptr : arg_index.const_data_ptr<int32_t>();
    auto run = [&](auto vec, auto mean_tag) {
      constexpr int VEC = decltype(vec)::value;
      const Launch l = make_launch(B, P, D / VEC);
      segment_pool_backward_kernel<scalar_t, VEC, decltype(mean_tag)::value><<<l.grid, l.block, 0, stream>>>(
          grad_output.const_data_ptr<scalar_t>(), arg, lengths.const_data_ptr<int64_t>(),
          ends.const_data_ptr<int64_t>(), grad_x.mutable_data_ptr<scalar_t>(), P, num_bytes, D, l.groups);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto run_reduce = [&](auto vec) {
      if (mean) {
        run(vec, std::true_type{});
      } else {
        run(vec, std::false_type{});
      }
    };
    if (use_vectors<scalar_t>(D, {grad_output.const_data_ptr(), grad_x.const_data_ptr()}, arg)) {
      run_reduce(std::integral_constant<int, kVec<scalar_t>>{});
    } else {
      run_reduce(std::integral_constant<int, 1>{});
    }
  });
  return grad_x;
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("segment_pool", &blt_ext::cuda::segment_pool);
  m.impl("segment_pool_backward", &blt_ext::cuda::segment_pool_backward);
}
