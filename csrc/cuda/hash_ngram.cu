// Hash n-gram ids and embedding on CUDA (BLT_SPEC.md b; DESIGN.md op 1; PERFORMANCE.md rows 1-2).
//
// Forward: one warp per position. Lanes hash one table each (the window read from the token row),
// the warp shares the row ids by shuffles, and every lane gathers 16-byte vectors of the byte row
// and each table's row, summing in float32 (float64 for float64) registers; one output write.
// Backward: the byte table (few rows, thousands of contributions each) is summed per block of
// positions in shared memory, one column per thread, then over the blocks in order: deterministic
// and free of atomics. The hash tables (many rows, few contributions each) take 16-byte vector
// atomics in the weight dtype by default, or, when `deterministic`, a stable sort of the gathered
// rows and one float32 segment sum per row.
//
// Token values are not checked on CUDA (that would need a host synchronisation): tokens outside
// [0, byte_rows) are hashed as they are and their byte row is left out, forward and backward.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sort.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>
#include <type_traits>

#include "blt_ext.h"
#include "cuda/hash_ngram.cuh"

namespace blt_ext::cuda {
namespace {

using hash_ngram::HashConfig;
using hash_ngram::table_id;

constexpr int kWarp = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kBlockThreads = 256;  // 8 warps
constexpr int kVecs = 4;            // 16-byte vectors per lane per pass over D
constexpr int64_t kByteChunk = 2048;  // positions per block of the byte-table gradient
constexpr int kByteUnroll = 32;       // positions loaded ahead by each thread there
constexpr int64_t kByteSharedBytes = 48 * 1024;

// kElems consecutive elements, loaded and stored as one access (16 bytes on the vector path).
template <typename scalar_t, int kElems>
struct alignas(sizeof(scalar_t) * kElems) Pack {
  scalar_t v[kElems];
};

// back[k] = x[j - k] of the token row x, 0 (BOE) before the row start.
struct TokenWindow {
  const int64_t* row;
  int64_t j;
  __device__ int64_t operator[](int k) const { return j - k >= 0 ? row[j - k] : 0; }
};

__device__ __forceinline__ TokenWindow window_at(const int64_t* tokens, int64_t pos, int64_t seq) {
  const int64_t j = pos % seq;
  return {tokens + (pos - j), j};
}

// Lane l hashes table chunk + l of this position (0 past the last table).
__device__ __forceinline__ int64_t lane_table_id(const HashConfig& config, const TokenWindow& window,
                                                 int chunk, int lane) {
  const int t = chunk + lane;
  return t < config.num_tables ? table_id(config, window, t) : 0;
}

template <typename scalar_t, int kElems>
__device__ __forceinline__ void accumulate(at::opmath_type<scalar_t> (&acc)[kElems],
                                           const scalar_t* __restrict__ src) {
  const Pack<scalar_t, kElems> p = *reinterpret_cast<const Pack<scalar_t, kElems>*>(src);
#pragma unroll
  for (int e = 0; e < kElems; ++e) acc[e] += static_cast<at::opmath_type<scalar_t>>(p.v[e]);
}

template <typename scalar_t, int kElems>
__device__ __forceinline__ void store(scalar_t* __restrict__ dst, const at::opmath_type<scalar_t> (&acc)[kElems]) {
  Pack<scalar_t, kElems> p;
#pragma unroll
  for (int e = 0; e < kElems; ++e) p.v[e] = static_cast<scalar_t>(acc[e]);
  *reinterpret_cast<Pack<scalar_t, kElems>*>(dst) = p;
}

// One warp per position: out = byte row + the row of every table, in passes of 32 * kVecs packs.
template <typename scalar_t, int kElems>
__global__ void __launch_bounds__(kBlockThreads)
    embedding_forward_kernel(const int64_t* __restrict__ tokens, const scalar_t* __restrict__ byte_weight,
                             const scalar_t* __restrict__ hash_weight, scalar_t* __restrict__ out,
                             int64_t positions, int64_t seq, int64_t dim, int64_t byte_rows,
                             HashConfig config) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pos >= positions) return;  // the whole warp
  const TokenWindow window = window_at(tokens, pos, seq);
  const int64_t token = tokens[pos];
  const bool has_byte_row = token >= 0 && token < byte_rows;
  for (int64_t d0 = 0; d0 < dim; d0 += int64_t{kWarp} * kVecs * kElems) {
    acc_t acc[kVecs][kElems] = {};
    auto gather = [&](const scalar_t* __restrict__ row) {
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        const int64_t d = d0 + (int64_t{v} * kWarp + lane) * kElems;
        if (d < dim) accumulate<scalar_t, kElems>(acc[v], row + d);
      }
    };
    if (has_byte_row) gather(byte_weight + token * dim);
    for (int chunk = 0; chunk < config.num_tables; chunk += kWarp) {
      const int64_t lane_id = lane_table_id(config, window, chunk, lane);
      const int count = min(kWarp, config.num_tables - chunk);
#pragma unroll 2
      for (int i = 0; i < count; ++i) {
        const int64_t id = __shfl_sync(kFullMask, lane_id, i);
        gather(hash_weight + ((chunk + i) * config.vocab + id) * dim);
      }
    }
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int64_t d = d0 + (int64_t{v} * kWarp + lane) * kElems;
      if (d < dim) store<scalar_t, kElems>(out + pos * dim + d, acc[v]);
    }
  }
}

// ids[pos, t] (offset_tables: t * V + id, the row in the packed table), one thread per entry.
__global__ void ids_kernel(const int64_t* __restrict__ tokens, int64_t* __restrict__ ids, int64_t positions,
                           int64_t seq, HashConfig config, bool offset_tables) {
  const int64_t entry = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (entry >= positions * config.num_tables) return;
  const int64_t pos = entry / config.num_tables;
  const int t = static_cast<int>(entry % config.num_tables);
  const int64_t id = table_id(config, window_at(tokens, pos, seq), t);
  ids[entry] = offset_tables ? t * config.vocab + id : id;
}

// Byte table, step 1: block (chunk of positions, column tile) sums, per byte row, the gradient rows
// of its positions in position order: each thread owns one column of the shared-memory sums.
template <typename scalar_t>
__global__ void byte_grad_partial_kernel(const scalar_t* __restrict__ grad,
                                         const int64_t* __restrict__ tokens,
                                         at::opmath_type<scalar_t>* __restrict__ partial, int64_t positions,
                                         int64_t dim, int64_t byte_rows) {
  using acc_t = at::opmath_type<scalar_t>;
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  acc_t* sums = reinterpret_cast<acc_t*>(shared_bytes);  // [byte_rows][blockDim.x]
  const int width = blockDim.x;
  const int col_in_tile = threadIdx.x;
  const int64_t chunk = blockIdx.x;
  const int64_t col = static_cast<int64_t>(blockIdx.y) * width + col_in_tile;
  if (col >= dim) return;  // no block-wide synchronisation below: each column is one thread's
  for (int64_t r = 0; r < byte_rows; ++r) sums[r * width + col_in_tile] = acc_t(0);
  const int64_t begin = chunk * kByteChunk;
  const int64_t end = positions < begin + kByteChunk ? positions : begin + kByteChunk;
  for (int64_t pos0 = begin; pos0 < end; pos0 += kByteUnroll) {
    int64_t token[kByteUnroll];
    acc_t g[kByteUnroll];
#pragma unroll
    for (int u = 0; u < kByteUnroll; ++u) {
      const int64_t pos = pos0 + u;
      token[u] = pos < end ? tokens[pos] : -1;
      g[u] = pos < end ? static_cast<acc_t>(grad[pos * dim + col]) : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < kByteUnroll; ++u) {
      if (token[u] >= 0 && token[u] < byte_rows) sums[token[u] * width + col_in_tile] += g[u];
    }
  }
  acc_t* out = partial + chunk * byte_rows * dim + col;
  for (int64_t r = 0; r < byte_rows; ++r) out[r * dim] = sums[r * width + col_in_tile];
}

// Byte table, step 2: grad_byte = the chunks' sums, added in chunk order.
template <typename scalar_t>
__global__ void byte_grad_finish_kernel(const at::opmath_type<scalar_t>* __restrict__ partial,
                                        scalar_t* __restrict__ grad_byte, int64_t chunks, int64_t numel) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= numel) return;
  at::opmath_type<scalar_t> sum = 0;
  for (int64_t c = 0; c < chunks; ++c) sum += partial[c * numel + i];
  grad_byte[i] = static_cast<scalar_t>(sum);
}

// dst[0, kElems) += src, atomically, in the weight dtype, one element at a time.
template <typename scalar_t, int kElems>
__device__ __forceinline__ void atomic_add_elements(scalar_t* dst, const Pack<scalar_t, kElems>& src) {
#pragma unroll
  for (int e = 0; e < kElems; ++e) {
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      atomicAdd(reinterpret_cast<__nv_bfloat16*>(dst + e), __ushort_as_bfloat16(src.v[e].x));
    } else if constexpr (std::is_same_v<scalar_t, c10::Half>) {
      atomicAdd(reinterpret_cast<__half*>(dst + e), __ushort_as_half(src.v[e].x));
    } else {
      atomicAdd(dst + e, src.v[e]);
    }
  }
}

// dst[0, kElems) += src, atomically, in the weight dtype: one 16-byte vector reduction on sm_90.
template <typename scalar_t, int kElems>
__device__ __forceinline__ void atomic_add(scalar_t* dst, const Pack<scalar_t, kElems>& src) {
  constexpr bool kHalfWord = std::is_same_v<scalar_t, c10::BFloat16> || std::is_same_v<scalar_t, c10::Half>;
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  constexpr bool kVector = sizeof(src) == 16 && (kHalfWord || std::is_same_v<scalar_t, float>);
#else
  constexpr bool kVector = false;
#endif
  if constexpr (!kVector) {
    atomic_add_elements<scalar_t, kElems>(dst, src);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    atomicAdd(reinterpret_cast<float4*>(dst), make_float4(src.v[0], src.v[1], src.v[2], src.v[3]));
  } else {
    const uint4 bits = *reinterpret_cast<const uint4*>(&src);
    if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      asm volatile("red.global.add.noftz.v4.bf16x2 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(bits.x),
                   "r"(bits.y), "r"(bits.z), "r"(bits.w)
                   : "memory");
    } else {
      asm volatile("red.global.add.noftz.v4.f16x2 [%0], {%1, %2, %3, %4};" ::"l"(dst), "r"(bits.x),
                   "r"(bits.y), "r"(bits.z), "r"(bits.w)
                   : "memory");
    }
  }
}

// Hash tables, default: one warp per position adds its gradient row to the row of every table.
template <typename scalar_t, int kElems>
__global__ void __launch_bounds__(kBlockThreads)
    hash_grad_atomic_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ tokens,
                            scalar_t* __restrict__ grad_hash, int64_t positions, int64_t seq, int64_t dim,
                            HashConfig config) {
  const int64_t pos = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (pos >= positions) return;
  const TokenWindow window = window_at(tokens, pos, seq);
  for (int64_t d0 = 0; d0 < dim; d0 += int64_t{kWarp} * kVecs * kElems) {
    Pack<scalar_t, kElems> g[kVecs];
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int64_t d = d0 + (int64_t{v} * kWarp + lane) * kElems;
      if (d < dim) g[v] = *reinterpret_cast<const Pack<scalar_t, kElems>*>(grad + pos * dim + d);
    }
    for (int chunk = 0; chunk < config.num_tables; chunk += kWarp) {
      const int64_t lane_id = lane_table_id(config, window, chunk, lane);
      const int count = min(kWarp, config.num_tables - chunk);
      for (int i = 0; i < count; ++i) {
        const int64_t id = __shfl_sync(kFullMask, lane_id, i);
        scalar_t* row = grad_hash + ((chunk + i) * config.vocab + id) * dim;
#pragma unroll
        for (int v = 0; v < kVecs; ++v) {
          const int64_t d = d0 + (int64_t{v} * kWarp + lane) * kElems;
          if (d < dim) atomic_add<scalar_t, kElems>(row + d, g[v]);
        }
      }
    }
  }
}

// Hash tables, deterministic: rows sorted stably (so each row's entries are in position order); the
// warp of a row's first entry sums the row's gradient rows in float32 and writes the row once.
template <typename scalar_t, int kElems>
__global__ void __launch_bounds__(kBlockThreads)
    hash_grad_segment_kernel(const scalar_t* __restrict__ grad, const int64_t* __restrict__ sorted_rows,
                             const int64_t* __restrict__ entries, scalar_t* __restrict__ grad_hash,
                             int64_t num_entries, int num_tables, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (first >= num_entries) return;
  const int64_t row = sorted_rows[first];
  if (first > 0 && sorted_rows[first - 1] == row) return;  // not the row's first entry
  for (int64_t d0 = 0; d0 < dim; d0 += int64_t{kWarp} * kVecs * kElems) {
    acc_t acc[kVecs][kElems] = {};
    for (int64_t e = first; e < num_entries && sorted_rows[e] == row; ++e) {
      const scalar_t* g = grad + (entries[e] / num_tables) * dim;
#pragma unroll
      for (int v = 0; v < kVecs; ++v) {
        const int64_t d = d0 + (int64_t{v} * kWarp + lane) * kElems;
        if (d < dim) accumulate<scalar_t, kElems>(acc[v], g + d);
      }
    }
#pragma unroll
    for (int v = 0; v < kVecs; ++v) {
      const int64_t d = d0 + (int64_t{v} * kWarp + lane) * kElems;
      if (d < dim) store<scalar_t, kElems>(grad_hash + row * dim + d, acc[v]);
    }
  }
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Blocks for one warp per item.
int64_t warp_blocks(int64_t items) { return ceil_div(items, kBlockThreads / kWarp); }

// The 16-byte path needs whole 16-byte vectors per row and 16-byte aligned rows.
template <typename scalar_t>
bool vectorizable(int64_t dim, std::initializer_list<const void*> pointers) {
  bool ok = (dim * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0;
  for (const void* p : pointers) ok = ok && reinterpret_cast<uintptr_t>(p) % 16 == 0;
  return ok;
}

// Runs launch.template operator()<kElems>() with 16-byte packs where possible, else one element.
template <typename scalar_t, typename Launch>
void with_pack_width(bool vector, const Launch& launch) {
  if (vector) {
    launch.template operator()<16 / static_cast<int>(sizeof(scalar_t))>();
  } else {
    launch.template operator()<1>();
  }
}

void launch_ids(const at::Tensor& tokens, at::Tensor& ids, const HashConfig& config, bool offset_tables) {
  const int64_t entries = ids.numel();
  if (entries == 0) return;
  ids_kernel<<<ceil_div(entries, kBlockThreads), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      tokens.data_ptr<int64_t>(), ids.data_ptr<int64_t>(), tokens.numel(), tokens.size(1), config,
      offset_tables);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void byte_backward(const at::Tensor& grad, const at::Tensor& tokens, at::Tensor& grad_byte, const char* op) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t positions = tokens.numel();
  const int64_t byte_rows = grad_byte.size(0);
  const int64_t dim = grad_byte.size(1);
  if (dim == 0) return;
  // Columns per block: the sums of every byte row for those columns must fit in shared memory.
  const int64_t column_bytes = byte_rows * static_cast<int64_t>(sizeof(acc_t));
  const int64_t max_rows = kByteSharedBytes / static_cast<int64_t>(sizeof(acc_t));
  TORCH_CHECK_VALUE(byte_rows <= max_rows, "blt_ext.", op, ": byte_rows must be at most ", std::to_string(max_rows),
                    " on CUDA for ", grad.scalar_type(), " (its gradient sums live in shared memory), got ",
                    std::to_string(byte_rows));
  int width = kWarp;
  while (width > 1 && column_bytes * width > kByteSharedBytes) width /= 2;
  const int64_t chunks = std::max<int64_t>(1, ceil_div(positions, kByteChunk));
  const auto acc_dtype = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
  at::Tensor partial = at::empty({chunks, byte_rows, dim}, grad.options().dtype(acc_dtype));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned>(chunks), static_cast<unsigned>(ceil_div(dim, width)));
  byte_grad_partial_kernel<scalar_t><<<grid, width, column_bytes * width, stream>>>(
      grad.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), partial.data_ptr<acc_t>(), positions, dim,
      byte_rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t numel = grad_byte.numel();
  byte_grad_finish_kernel<scalar_t><<<ceil_div(numel, kBlockThreads), kBlockThreads, 0, stream>>>(
      partial.data_ptr<acc_t>(), grad_byte.data_ptr<scalar_t>(), chunks, numel);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t>
void hash_backward(const at::Tensor& grad, const at::Tensor& tokens, at::Tensor& grad_hash,
                   const HashConfig& config, bool deterministic) {
  const int64_t positions = tokens.numel();
  const int64_t dim = grad.size(2);
  if (positions == 0 || dim == 0) return;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const bool vector = vectorizable<scalar_t>(dim, {grad.data_ptr(), grad_hash.data_ptr()});
  if (!deterministic) {
    with_pack_width<scalar_t>(vector, [&]<int kElems>() {
      hash_grad_atomic_kernel<scalar_t, kElems><<<warp_blocks(positions), kBlockThreads, 0, stream>>>(
          grad.data_ptr<scalar_t>(), tokens.data_ptr<int64_t>(), grad_hash.data_ptr<scalar_t>(), positions,
          tokens.size(1), dim, config);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
    return;
  }
  at::Tensor rows = at::empty({positions * config.num_tables}, tokens.options());
  launch_ids(tokens, rows, config, /*offset_tables=*/true);
  // Spelled as optional<bool>: a plain `true` would pick the sort(self, dim, descending) overload.
  const auto sorted = at::sort(rows, std::optional<bool>(true), /*dim=*/0, /*descending=*/false);
  const at::Tensor& sorted_rows = std::get<0>(sorted);
  const at::Tensor& entries = std::get<1>(sorted);
  with_pack_width<scalar_t>(vector, [&]<int kElems>() {
    hash_grad_segment_kernel<scalar_t, kElems><<<warp_blocks(rows.numel()), kBlockThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), sorted_rows.data_ptr<int64_t>(), entries.data_ptr<int64_t>(),
        grad_hash.data_ptr<scalar_t>(), rows.numel(), config.num_tables, dim);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace

at::Tensor hash_ngram_ids(const at::Tensor& tokens, at::IntArrayRef ngram_sizes, int64_t num_functions,
                          int64_t hash_vocab) {
  const HashConfig config =
      hash_ngram::check_ids_args("hash_ngram_ids", tokens, ngram_sizes, num_functions, hash_vocab);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor tok = tokens.contiguous();
  at::Tensor ids = at::empty({tok.size(0), tok.size(1), config.num_tables}, tok.options());
  launch_ids(tok, ids, config, /*offset_tables=*/false);
  return ids;
}

at::Tensor hash_ngram_embedding(const at::Tensor& tokens, const at::Tensor& byte_weight,
                                const at::Tensor& hash_weight, at::IntArrayRef ngram_sizes,
                                int64_t num_functions) {
  constexpr const char* op = "hash_ngram_embedding";
  const HashConfig config =
      hash_ngram::check_embedding_args(op, tokens, byte_weight, hash_weight, ngram_sizes, num_functions);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor tok = tokens.contiguous();
  const at::Tensor bw = byte_weight.contiguous();
  const at::Tensor hw = hash_weight.contiguous();
  const int64_t dim = bw.size(1);
  at::Tensor out = at::empty({tok.size(0), tok.size(1), dim}, bw.options());
  const int64_t positions = tok.numel();
  if (positions == 0 || dim == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.scalar_type(), op, [&] {
    const bool vector = vectorizable<scalar_t>(dim, {bw.data_ptr(), hw.data_ptr(), out.data_ptr()});
    with_pack_width<scalar_t>(vector, [&]<int kElems>() {
      embedding_forward_kernel<scalar_t, kElems>
          <<<warp_blocks(positions), kBlockThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
              tok.data_ptr<int64_t>(), bw.data_ptr<scalar_t>(), hw.data_ptr<scalar_t>(),
              out.data_ptr<scalar_t>(), positions, tok.size(1), dim, bw.size(0), config);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> hash_ngram_embedding_backward(
    const at::Tensor& grad_output, const at::Tensor& tokens, int64_t byte_rows, int64_t hash_rows,
    at::IntArrayRef ngram_sizes, int64_t num_functions, bool deterministic) {
  constexpr const char* op = "hash_ngram_embedding_backward";
  const HashConfig config = hash_ngram::check_backward_args(op, grad_output, tokens, byte_rows, hash_rows,
                                                            ngram_sizes, num_functions);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor tok = tokens.contiguous();
  const at::Tensor grad = grad_output.contiguous();
  const int64_t dim = grad.size(2);
  at::Tensor grad_byte = at::empty({byte_rows, dim}, grad.options());
  at::Tensor grad_hash = at::zeros({hash_rows, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
    byte_backward<scalar_t>(grad, tok, grad_byte, op);
    hash_backward<scalar_t>(grad, tok, grad_hash, config, deterministic);
  });
  return {grad_byte, grad_hash};
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("hash_ngram_ids", &blt_ext::cuda::hash_ngram_ids);
  m.impl("hash_ngram_embedding", &blt_ext::cuda::hash_ngram_embedding);
  m.impl("hash_ngram_embedding_backward", &blt_ext::cuda::hash_ngram_embedding_backward);
}
