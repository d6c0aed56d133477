// Entropy patching on CUDA (BLT_SPEC.md c), every row patched on its own, no host sync.
//
// entropy: 8 lanes (a warp for long rows) per row of V logits, read once with 16-byte loads;
// each lane keeps an online (max, sum e^d, sum e^d d) in fp32 and the lanes merge them.
// entropy_patch_starts and space_patch_starts: one thread per output position. patch_layout: one
// block per tile of a row, a max-scan for the last natural start (which also places the
// max_patch_length splits) and a sum-scan for the patch index, carried across tiles through
// per-tile summaries. entropy_patch: the entropy kernel into an fp32 (fp64) scratch, then the two
// layout launches, which decide each start from the entropies instead of reading a start mask.
//
// Value rules checked on CPU are not checked here (a host sync): on CUDA position 0 always starts
// a patch, column T is ignored without include_next_token, and tokens outside [0, 260) follow
// the space rule arithmetically; no bad value makes a kernel read or write out of bounds.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "blt_ext.h"
#include "common/entropy_patch.h"

namespace blt_ext::cuda {
namespace {

using namespace blt_ext::entropy_patch;

constexpr unsigned kFullMask = 0xffffffffu;

// ---- entropy ----

__device__ __forceinline__ float fast_exp(float x) { return __expf(x); }
__device__ __forceinline__ double fast_exp(double x) { return exp(x); }

// Softmax statistics of a set of logits: m = max, s = sum e^(z-m), t = sum e^(z-m) (z-m); the
// entropy is log s - t / s. s == 0 marks the empty set (or only -inf logits).
template <typename acc_t>
struct SoftmaxStats {
  acc_t m, s, t;
};

template <typename acc_t>
__device__ __forceinline__ SoftmaxStats<acc_t> merge(SoftmaxStats<acc_t> a, SoftmaxStats<acc_t> b) {
  if (a.m < b.m) {
    const SoftmaxStats<acc_t> c = a;
    a = b;
    b = c;
  }
  if (b.s == acc_t(0)) return a;
  // b's terms rebased on a's max: e^(z - a.m) = f e^(z - b.m), (z - a.m) = (z - b.m) + d.
  const acc_t d = b.m - a.m;
  const acc_t f = fast_exp(d);
  return {a.m, a.s + f * b.s, a.t + f * (b.t + d * b.s)};
}

// Adds n logits to a lane's statistics. Shifted logits are clamped at -87 (float) / -700
// (double): exp there is negligible beside the max term's 1, and -inf logits stay finite.
template <typename acc_t, int n>
__device__ __forceinline__ void accumulate(SoftmaxStats<acc_t>& st, bool& bad, const acc_t (&z)[n]) {
  constexpr acc_t kLo = sizeof(acc_t) == 4 ? acc_t(-87) : acc_t(-700);
  acc_t chunk_max = st.m;
#pragma unroll
  for (int i = 0; i < n; ++i) {
    chunk_max = z[i] > chunk_max ? z[i] : chunk_max;
    bad |= !(z[i] < std::numeric_limits<acc_t>::infinity());  // NaN or +inf: the entropy is NaN
  }
  if (chunk_max == -std::numeric_limits<acc_t>::infinity()) return;
  if (chunk_max > st.m && st.s > acc_t(0)) {
    const acc_t d = st.m - chunk_max;
    const acc_t f = fast_exp(d);
    st.t = f * (st.t + d * st.s);
    st.s *= f;
  }
  st.m = chunk_max;
#pragma unroll
  for (int i = 0; i < n; ++i) {
    acc_t d = z[i] - st.m;
    d = d < kLo ? kLo : d;
    const acc_t e = fast_exp(d);
    st.s += e;
    st.t += e * d;
  }
}

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

// The elements of a vector widened to acc_t. bf16 widens by placing its bits in a float's top half
// (exact), done on the packed 32-bit words: with c10's per-element conversion the bf16 kernel
// needs 64 registers, with this 48 (ptxas, sm_90).
template <typename acc_t, typename T, int N>
__device__ __forceinline__ void widen(acc_t (&x)[N], const Vec<T, N>& raw) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    const auto* words = reinterpret_cast<const uint32_t*>(raw.v);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      x[2 * j] = __uint_as_float(words[j] << 16);
      x[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = static_cast<acc_t>(raw.v[j]);
  }
}

constexpr int kEntropyThreads = 256;
constexpr int kEntropyUnroll = 4;  // 16-byte loads a lane has in flight at once

// kLanes lanes per row: 8 for short rows (V = 260 bf16 is 32.5 loads of 16 bytes, 4 per lane, all
// issued before the first is used), a warp for long ones. A row starts at any element offset, so
// its first elements up to a 16-byte boundary (head) and its last ones (tail) are read one at a
// time; their loads go out before the first vector's, so a short row costs one memory round trip.
// Groups past the last row read nothing but still take part in the shuffles.
template <typename scalar_t, int kLanes>
__global__ void __launch_bounds__(kEntropyThreads)
    entropy_kernel(const scalar_t* __restrict__ logits, opmath_t<scalar_t>* __restrict__ out, int64_t rows,
                   int64_t V) {
  using acc_t = opmath_t<scalar_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  constexpr int kRowsPerBlock = kEntropyThreads / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
  const bool valid = row < rows;
  const scalar_t* z = logits + (valid ? row : 0) * V;
  const int64_t misalignment = (reinterpret_cast<uintptr_t>(z) % 16) / sizeof(scalar_t);
  const int64_t head = valid ? std::min<int64_t>(V, misalignment == 0 ? 0 : kVec - misalignment) : 0;
  const int64_t vectors = valid ? (V - head) / kVec : 0;
  const int64_t tail = head + vectors * kVec;
  const int64_t singles = valid ? head + (V - tail) : 0;

  // head < kVec and V - tail < kVec: at most 2 * (kVec - 1) single elements.
  constexpr int kSinglesPerLane = (2 * (kVec - 1) + kLanes - 1) / kLanes;
  acc_t single[kSinglesPerLane];
#pragma unroll
  for (int j = 0; j < kSinglesPerLane; ++j) {
    const int64_t k = lane + j * kLanes;
    single[j] = k < singles ? static_cast<acc_t>(z[k < head ? k : tail + (k - head)]) : acc_t(0);
  }
  SoftmaxStats<acc_t> st{-std::numeric_limits<acc_t>::infinity(), acc_t(0), acc_t(0)};
  bool bad = false;
  const auto* body = reinterpret_cast<const Vec<scalar_t, kVec>*>(z + head);
  for (int64_t i = lane; i < vectors; i += kLanes * kEntropyUnroll) {
    Vec<scalar_t, kVec> raw[kEntropyUnroll];
#pragma unroll
    for (int u = 0; u < kEntropyUnroll; ++u) {
      if (i + u * kLanes < vectors) raw[u] = body[i + u * kLanes];
    }
#pragma unroll
    for (int u = 0; u < kEntropyUnroll; ++u) {
      if (i + u * kLanes < vectors) {
        acc_t x[kVec];
        widen(x, raw[u]);
        accumulate(st, bad, x);
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kSinglesPerLane; ++j) {
    if (lane + j * kLanes < singles) {
      const acc_t x[1] = {single[j]};
      accumulate(st, bad, x);
    }
  }
  // xor offsets below kLanes stay within the row's aligned group of lanes.
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    const SoftmaxStats<acc_t> other{__shfl_xor_sync(kFullMask, st.m, offset),
                                    __shfl_xor_sync(kFullMask, st.s, offset),
                                    __shfl_xor_sync(kFullMask, st.t, offset)};
    st = merge(st, other);
    bad |= __shfl_xor_sync(kFullMask, static_cast<int>(bad), offset) != 0;
  }
  if (valid && lane == 0) {
    out[row] = bad ? std::numeric_limits<acc_t>::quiet_NaN() : log(st.s) - st.t / st.s;
  }
}

// ---- start masks ----

constexpr int kElementwiseThreads = 256;

unsigned elementwise_blocks(int64_t n) {
  const int64_t blocks = (n + kElementwiseThreads - 1) / kElementwiseThreads;
  TORCH_CHECK(blocks <= INT32_MAX, "blt_ext: too many positions for one launch: ", std::to_string(n));
  return static_cast<unsigned>(blocks);
}

template <typename scalar_t>
__global__ void entropy_patch_starts_kernel(const scalar_t* __restrict__ entropies, bool* __restrict__ starts,
                                            int64_t B, int64_t T, int64_t L, StartMode mode, scalar_t threshold,
                                            scalar_t threshold_add) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * (T + 1)) return;
  const int64_t b = i / (T + 1), p = i % (T + 1);
  const scalar_t* h = entropies + b * T;
  starts[i] = p < L && (p < 2 || entropy_starts_at(mode, p, h[p - 1], h[p - 2], threshold, threshold_add));
}

__global__ void space_patch_starts_kernel(const int64_t* __restrict__ tokens, bool* __restrict__ starts, int64_t B,
                                          int64_t T, int64_t L) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= B * (T + 1)) return;
  const int64_t b = i / (T + 1), p = i % (T + 1);
  const int64_t* t = tokens + b * T;
  starts[i] = p < L && (p < 2 || space_starts_at(t[p - 2], t[p - 1]));
}

// ---- patch layout ----
//
// Two launches over tiles of kLayoutTile positions, so that a row's tiles run on many SMs: the
// first summarizes every tile (first and last natural start, starts from its first natural start
// on), the second has each tile reduce the summaries before it (a max-scan for the last natural
// start before every tile, then a sum of their start counts) and write its ids and lengths.

constexpr int kLayoutThreads = 256;
constexpr int kLayoutItems = 4;  // consecutive positions per thread
constexpr int kLayoutTile = kLayoutThreads * kLayoutItems;

// The layout kernels read a row's natural starts at positions 1 <= p < L through a source:
// a start mask, or the start rule applied to entropies (entropy_patch, no mask materialized).

// starts [B, T + 1] bool.
struct MaskStarts {
  const bool* starts;
  int T;
  __device__ __forceinline__ bool operator()(int b, int p) const {
    return starts[static_cast<int64_t>(b) * (T + 1) + p];
  }
};

// entropies [B, T], as entropy_patch_starts_kernel decides them: p = 1 always starts, p >= 2
// reads H[p-1] and H[p-2] (p < L <= T + 1 keeps both in the row).
template <typename scalar_t>
struct EntropyStarts {
  const scalar_t* entropies;
  int T;
  StartMode mode;
  scalar_t threshold, threshold_add;
  __device__ __forceinline__ bool operator()(int b, int p) const {
    const scalar_t* h = entropies + static_cast<int64_t>(b) * T;
    return p < 2 || entropy_starts_at(mode, p, h[p - 1], h[p - 2], threshold, threshold_add);
  }
};

struct Sum {
  __device__ int operator()(int a, int b) const { return a + b; }
};
struct Max {
  __device__ int operator()(int a, int b) const { return a > b ? a : b; }
};

// Exclusive scan of one value per thread over the block (threads in order); `total` gets the
// scan of all of them. Every thread of the block must call it.
template <typename Op>
__device__ int block_exclusive_scan(int value, int identity, Op op, int* shared, int& total) {
  constexpr int kWarps = kLayoutThreads / 32;
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  int inclusive = value;
#pragma unroll
  for (int offset = 1; offset < 32; offset *= 2) {
    const int other = __shfl_up_sync(kFullMask, inclusive, offset);
    if (lane >= offset) inclusive = op(other, inclusive);
  }
  if (lane == 31) shared[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    int w = lane < kWarps ? shared[lane] : identity;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const int other = __shfl_up_sync(kFullMask, w, offset);
      if (lane >= offset) w = op(other, w);
    }
    shared[lane] = w;
  }
  __syncthreads();
  const int before_warp = warp == 0 ? identity : shared[warp - 1];
  int before_lane = __shfl_up_sync(kFullMask, inclusive, 1);
  before_lane = lane == 0 ? identity : before_lane;
  total = shared[kWarps - 1];
  __syncthreads();  // `shared` is reused by the next scan
  return op(before_warp, before_lane);
}

// Position p starts a patch iff it is a natural start or, with splitting, lies a multiple of m
// after the last natural start s: patches split greedily into m, m, ..., remainder.
template <bool kSplit>
__device__ __forceinline__ bool on_split_grid(int offset, int m) {
  return kSplit ? offset % m == 0 : offset == 0;
}

// How many positions of [lo, hi) lie on the split grid of a natural start s < lo.
template <bool kSplit>
__device__ __forceinline__ int split_points(int s, int lo, int hi, int m) {
  return kSplit && hi > lo ? (hi - 1 - s) / m - (lo - 1 - s) / m : 0;
}

// What the second launch needs of a tile: its first natural start (the tile's end if none), its
// last (-1 if none) and how many patches start from its first natural start to its end.
struct alignas(16) TileSummary {
  int first, last, count, unused;
};

// The natural starts among a thread's positions of a tile (position 0 always is one) and the
// last natural start of the tile up to the thread's positions (-1 if none).
template <typename Source>
__device__ __forceinline__ int tile_naturals(const Source& source, int b, int tile_begin, int L,
                                             bool (&natural)[kLayoutItems], int* shared, int& tile_last) {
  const int base = tile_begin + threadIdx.x * kLayoutItems;
  int my_last = -1;
#pragma unroll
  for (int i = 0; i < kLayoutItems; ++i) {
    const int p = base + i;
    natural[i] = p < L && (p == 0 || source(b, p));
    my_last = natural[i] ? p : my_last;
  }
  return block_exclusive_scan(my_last, -1, Max{}, shared, tile_last);
}

template <bool kSplit, typename Source>
__global__ void __launch_bounds__(kLayoutThreads)
    tile_summary_kernel(Source source, TileSummary* __restrict__ summaries, int L, int m, int tiles) {
  __shared__ int shared[32];
  const int b = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const int tile_begin = tile * kLayoutTile, tile_end = min(tile_begin + kLayoutTile, L);
  bool natural[kLayoutItems];
  int tile_last;
  int s = tile_naturals(source, b, tile_begin, L, natural, shared, tile_last);
  const int base = tile_begin + threadIdx.x * kLayoutItems;
  int my_first = tile_end, my_count = 0;
#pragma unroll
  for (int i = 0; i < kLayoutItems; ++i) {
    const int p = base + i;
    my_first = natural[i] ? min(my_first, p) : my_first;
    s = natural[i] ? p : s;
    my_count += p < L && s >= 0 && on_split_grid<kSplit>(p - s, m);
  }
  int neg_first, count;
  block_exclusive_scan(-my_first, -tile_end, Max{}, shared, neg_first);
  block_exclusive_scan(my_count, 0, Sum{}, shared, count);
  if (threadIdx.x == 0) summaries[blockIdx.x] = {-neg_first, tile_last, count, 0};
}

template <bool kSplit, typename Source>
__global__ void __launch_bounds__(kLayoutThreads)
    patch_layout_kernel(Source source, const TileSummary* __restrict__ summaries,
                        int64_t* __restrict__ patch_ids, int64_t* __restrict__ patch_lengths,
                        int64_t* __restrict__ patch_counts, int T, int L, int m, int tiles) {
  __shared__ int shared[32];
  __shared__ int before[2];
  const int b = blockIdx.x / tiles, tile = blockIdx.x % tiles;
  const TileSummary* row_summaries = summaries + static_cast<int64_t>(b) * tiles;

  // Scan the row's tile summaries in rounds of one per thread; this tile keeps its exclusive
  // prefix (last natural start and patches started before it), every tile the row's total.
  int last_carry = -1, count_carry = 0;
  for (int round = 0; round < tiles; round += kLayoutThreads) {
    const int j = round + threadIdx.x;
    const TileSummary t = j < tiles ? row_summaries[j] : TileSummary{0, -1, 0, 0};
    int round_last, round_count;
    const int last = max(last_carry, block_exclusive_scan(t.last, -1, Max{}, shared, round_last));
    // Tile j's patches: split points before its first natural start, then its own count.
    const int count = t.count + split_points<kSplit>(last, j * kLayoutTile, t.first, m);
    const int count_before = count_carry + block_exclusive_scan(j < tiles ? count : 0, 0, Sum{}, shared, round_count);
    if (j == tile) {
      before[0] = last;
      before[1] = count_before;
    }
    last_carry = max(last_carry, round_last);
    count_carry += round_count;
  }
  __syncthreads();
  const int natural_before = max(before[0], 0), count_before = before[1], total = count_carry;

  int64_t* ids = patch_ids + static_cast<int64_t>(b) * T;
  int64_t* lengths = patch_lengths + static_cast<int64_t>(b) * (T + 1);
  const int tile_begin = tile * kLayoutTile;
  bool natural[kLayoutItems];
  int tile_last;
  const int last_natural = max(natural_before, tile_naturals(source, b, tile_begin, L, natural, shared, tile_last));

  const int base = tile_begin + threadIdx.x * kLayoutItems;
  bool start[kLayoutItems];
  int my_count = 0;
  int s = last_natural;
#pragma unroll
  for (int i = 0; i < kLayoutItems; ++i) {
    const int p = base + i;
    s = natural[i] ? p : s;
    start[i] = p < L && on_split_grid<kSplit>(p - s, m);
    my_count += start[i];
  }
  int tile_count;
  int k = count_before + block_exclusive_scan(my_count, 0, Sum{}, shared, tile_count);

  s = last_natural;
#pragma unroll
  for (int i = 0; i < kLayoutItems; ++i) {
    const int p = base + i;
    if (p < L) {
      s = natural[i] ? p : s;
      k += start[i];
      if (p < T) ids[p] = k - 1;
      if (p + 1 == L || source(b, p + 1) || on_split_grid<kSplit>(p + 1 - s, m)) {  // p ends a patch
        const int begin = kSplit ? s + (p - s) / m * m : s;
        lengths[k - 1] = p - begin + 1;
      }
    }
  }
  // Lengths past the row's last patch are 0; each tile pads its own index range, the last tile
  // up to T.
  const int pad_end = tile + 1 == tiles ? T + 1 : tile_begin + kLayoutTile;
  for (int j = max(total, tile_begin) + threadIdx.x; j < pad_end; j += kLayoutThreads) lengths[j] = 0;
  if (tile == 0 && threadIdx.x == 0) patch_counts[b] = total;
}

// Sizes the int32 tile arithmetic of the layout kernels can address.
void check_layout_size(const char* op, const char* what, int64_t B, int64_t T) {
  TORCH_CHECK_VALUE(T < INT32_MAX - kLayoutTile, "blt_ext.", op, ": ", what, " must be < 2^31 - ",
                    std::to_string(kLayoutTile + 1), " on CUDA, got ", std::to_string(T));
  TORCH_CHECK_VALUE(B <= INT32_MAX, "blt_ext.", op, ": batch size B must be < 2^31 on CUDA, got ",
                    std::to_string(B));
}

struct LayoutOutputs {
  at::Tensor patch_ids, patch_lengths, patch_counts;
  LayoutOutputs(int64_t B, int64_t T, const at::TensorOptions& options)
      : patch_ids(at::empty({B, T}, options.dtype(at::kLong))),
        patch_lengths(at::empty({B, T + 1}, options.dtype(at::kLong))),
        patch_counts(at::empty({B}, options.dtype(at::kLong))) {}
  std::tuple<at::Tensor, at::Tensor, at::Tensor> tuple() const { return {patch_ids, patch_lengths, patch_counts}; }
};

// The two layout launches over B rows of T bytes (B >= 1), natural starts read from `source`.
template <typename Source>
void launch_layout(const Source& source, LayoutOutputs& out, int64_t B, int64_t T, bool include_next_token,
                   std::optional<int64_t> max_patch_length) {
  const int64_t L = T + include_next_token;
  // A patch is at most L long, so any m >= L splits nothing.
  const bool split = max_patch_length.has_value() && *max_patch_length < L;
  const int m = split ? static_cast<int>(*max_patch_length) : 1;
  // An empty sequence still gets one tile: it writes the counts and pads the lengths.
  const int64_t tiles = std::max<int64_t>(1, (L + kLayoutTile - 1) / kLayoutTile);
  TORCH_CHECK(B * tiles <= INT32_MAX, "blt_ext: too many positions for one launch: ", std::to_string(B * (T + 1)));
  at::Tensor summaries = at::empty({B, tiles, static_cast<int64_t>(sizeof(TileSummary) / sizeof(int))},
                                   out.patch_counts.options().dtype(at::kInt));
  const auto blocks = static_cast<unsigned>(B * tiles);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  auto* tile_summaries = reinterpret_cast<TileSummary*>(summaries.mutable_data_ptr<int>());
  const auto summarize = split ? tile_summary_kernel<true, Source> : tile_summary_kernel<false, Source>;
  summarize<<<blocks, kLayoutThreads, 0, stream>>>(source, tile_summaries, static_cast<int>(L), m,
                                                   static_cast<int>(tiles));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto layout = split ? patch_layout_kernel<true, Source> : patch_layout_kernel<false, Source>;
  layout<<<blocks, kLayoutThreads, 0, stream>>>(
      source, tile_summaries, out.patch_ids.mutable_data_ptr<int64_t>(), out.patch_lengths.mutable_data_ptr<int64_t>(),
      out.patch_counts.mutable_data_ptr<int64_t>(), static_cast<int>(T), static_cast<int>(L), m,
      static_cast<int>(tiles));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor entropy(const at::Tensor& logits) {
  check_logits(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const int64_t V = z.size(-1);
  const int64_t rows = z.numel() / V;
  const auto out_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(out_dtype));
  if (rows == 0) return out;
  // Rows of up to 64 16-byte vectors (V = 512 bf16) take 8 lanes, longer ones a warp.
  const bool short_rows = V * static_cast<int64_t>(z.element_size()) <= 1024;
  const int64_t rows_per_block = kEntropyThreads / (short_rows ? 8 : 32);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "blt_ext.entropy: too many rows for one launch: ", std::to_string(rows));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "blt_ext.entropy", [&] {
    const auto kernel = short_rows ? entropy_kernel<scalar_t, 8> : entropy_kernel<scalar_t, 32>;
    kernel<<<static_cast<unsigned>(blocks), kEntropyThreads, 0, stream>>>(
        z.const_data_ptr<scalar_t>(), out.mutable_data_ptr<opmath_t<scalar_t>>(), rows, V);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

at::Tensor entropy_patch_starts(const at::Tensor& entropies, double threshold, std::optional<double> threshold_add,
                                bool monotonicity, bool include_next_token) {
  check_entropy_patch_starts_args(entropies, threshold, threshold_add);
  const c10::cuda::CUDAGuard guard(entropies.device());
  const at::Tensor h = entropies.contiguous();
  const int64_t B = h.size(0), T = h.size(1);
  at::Tensor starts = at::empty({B, T + 1}, h.options().dtype(at::kBool));
  if (B == 0) return starts;
  const StartMode mode = start_mode(threshold_add, monotonicity);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "blt_ext.entropy_patch_starts", [&] {
    // Rounded to the entropies' dtype on the host, as `entropies > threshold` rounds the Python float.
    entropy_patch_starts_kernel<scalar_t><<<elementwise_blocks(B * (T + 1)), kElementwiseThreads, 0, stream>>>(
        h.const_data_ptr<scalar_t>(), starts.mutable_data_ptr<bool>(), B, T, T + include_next_token, mode,
        static_cast<scalar_t>(threshold), static_cast<scalar_t>(threshold_add.value_or(0.0)));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return starts;
}

at::Tensor space_patch_starts(const at::Tensor& tokens, bool include_next_token) {
  check_space_patch_starts_args(tokens);
  const c10::cuda::CUDAGuard guard(tokens.device());
  const at::Tensor t = tokens.contiguous();
  const int64_t B = t.size(0), T = t.size(1);
  at::Tensor starts = at::empty({B, T + 1}, t.options().dtype(at::kBool));
  if (B == 0) return starts;
  space_patch_starts_kernel<<<elementwise_blocks(B * (T + 1)), kElementwiseThreads, 0,
                              c10::cuda::getCurrentCUDAStream()>>>(t.const_data_ptr<int64_t>(),
                                                                   starts.mutable_data_ptr<bool>(), B, T,
                                                                   T + include_next_token);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return starts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_layout(const at::Tensor& starts, bool include_next_token,
                                                            std::optional<int64_t> max_patch_length) {
  check_patch_layout_args(starts, max_patch_length);
  const c10::cuda::CUDAGuard guard(starts.device());
  const at::Tensor s = starts.contiguous();
  const int64_t B = s.size(0), T = s.size(1) - 1;
  check_layout_size("patch_layout", "starts.size(1) - 1 (sequence length T)", B, T);
  LayoutOutputs out(B, T, s.options());
  if (B == 0) return out.tuple();
  launch_layout(MaskStarts{s.const_data_ptr<bool>(), static_cast<int>(T)}, out, B, T, include_next_token,
                max_patch_length);
  return out.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_patch(const at::Tensor& logits, double threshold,
                                                             std::optional<double> threshold_add,
                                                             bool monotonicity, bool include_next_token,
                                                             std::optional<int64_t> max_patch_length) {
  check_entropy_patch_args(logits, threshold, threshold_add, max_patch_length);
  const c10::cuda::CUDAGuard guard(logits.device());
  const int64_t B = logits.size(0), T = logits.size(1);
  check_layout_size("entropy_patch", "logits.size(1) (sequence length T)", B, T);
  LayoutOutputs out(B, T, logits.options());
  if (B == 0) return out.tuple();
  // The entropies stay in the op: the layout launches apply the start rule to them directly.
  const at::Tensor entropies = entropy(logits);
  const StartMode mode = start_mode(threshold_add, monotonicity);
  AT_DISPATCH_FLOATING_TYPES(entropies.scalar_type(), "blt_ext.entropy_patch", [&] {
    // Rounded to the entropies' dtype, as entropy_patch_starts rounds them.
    const EntropyStarts<scalar_t> source{entropies.const_data_ptr<scalar_t>(), static_cast<int>(T), mode,
                                         static_cast<scalar_t>(threshold),
                                         static_cast<scalar_t>(threshold_add.value_or(0.0))};
    launch_layout(source, out, B, T, include_next_token, max_patch_length);
  });
  return out.tuple();
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("entropy", &blt_ext::cuda::entropy);
  m.impl("entropy_patch_starts", &blt_ext::cuda::entropy_patch_starts);
  m.impl("space_patch_starts", &blt_ext::cuda::space_patch_starts);
  m.impl("patch_layout", &blt_ext::cuda::patch_layout);
  m.impl("entropy_patch", &blt_ext::cuda::entropy_patch);
}
