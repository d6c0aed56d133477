// Entropy patching on CUDA (BLT_SPEC.md c), every row patched on its own, no host sync.
//
// entropy: 8 lanes (a warp for long rows) per row of V logits, read once with 16-byte loads and
// kept in registers for a max pass and a sum pass. entropy_patch_starts and space_patch_starts: one
// thread per output position. patch_layout and entropy_patch: one launch, a block per tile of a
// row; the tiles of a row chain their scans (last natural start, patch count) by decoupled
// look-back. entropy_patch computes each tile's entropies in its block and decides the starts from
// them: the logits are read once, and neither entropies nor a start mask reach memory.
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
#include "widen.cuh"

namespace blt_ext::cuda {
namespace {

using namespace blt_ext::entropy_patch;

constexpr unsigned kFullMask = 0xffffffffu;

// ---- entropy ----

// Float statistics are kept in base 2 (ex2 is the hardware exponential): with the row max m and
// d = (z - m) log2 e, s = sum 2^d, t = sum 2^d d and the entropy is ln 2 (log2 s - t / s). Every
// lane shifts by the same m, so the rounding of m log2 e cancels between log2 s and t / s.
// Arithmetic goes through the _rn intrinsics: no contraction choices, so the entropy op and the
// fused entropy_patch (which inline the same row code) agree bit for bit.
template <typename acc_t>
struct EntropyMath;

template <>
struct EntropyMath<float> {
  static constexpr float kScale = 1.4426950408889634f;  // log2 e
  // Shifted logits are clamped here: 2^-127 is subnormal and ex2.approx.ftz flushes it to 0, so
  // -inf logits (and absent elements) add exactly nothing.
  static constexpr float kLow = -127.0f;
  __device__ static float exp(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
  }
  // NaN if either is NaN: a NaN logit makes the row max, and so the entropy, NaN.
  __device__ static float max(float a, float b) {
    float y;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(y) : "f"(a), "f"(b));
    return y;
  }
  __device__ static float fma(float a, float b, float c) { return __fmaf_rn(a, b, c); }
  __device__ static float add(float a, float b) { return __fadd_rn(a, b); }
  __device__ static float mul(float a, float b) { return __fmul_rn(a, b); }
  // Approximate log2 and division (about 2^-22 relative error): with log2f and an IEEE division
  // the bf16 entropy kernel has 912 static SASS instructions, with these 776 (ptxas, sm_90).
  __device__ static float entropy(float s, float t) {
    float log2_s;
    asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(log2_s) : "f"(s));
    return 0.6931471805599453f * (log2_s - __fdividef(t, s));
  }
};

template <>
struct EntropyMath<double> {
  static constexpr double kScale = 1.0;
  static constexpr double kLow = -746.0;  // exp underflows to 0
  __device__ static double exp(double x) { return ::exp(x); }
  __device__ static double max(double a, double b) { return a != a || b != b ? a + b : (a > b ? a : b); }
  __device__ static double fma(double a, double b, double c) { return __fma_rn(a, b, c); }
  __device__ static double add(double a, double b) { return __dadd_rn(a, b); }
  __device__ static double mul(double a, double b) { return __dmul_rn(a, b); }
  __device__ static double entropy(double s, double t) { return log(s) - t / s; }
};

template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
  T v[N];
};

constexpr int kEntropyUnroll = 4;  // 16-byte loads a lane has in flight at once

// The entropy of the row of V logits at z, by kLanes lanes (an aligned group of a warp; every lane
// of the warp must call, `valid` false for groups without a row); every lane of the group gets it.
// 8 lanes take a short row (V = 260 bf16 is 32.5 loads of 16 bytes: 4 per lane), a warp a long one.
// A row starts at any element offset, so its first elements up to a 16-byte boundary (head) and
// its last ones (tail) are read one at a time. A lane's first kEntropyUnroll vectors and its single
// elements are loaded at once and kept in registers for both passes (max, then sums), so a short
// row costs one memory round trip; the vectors past them are read once per pass.
template <typename scalar_t, int kLanes>
__device__ __forceinline__ opmath_t<scalar_t> row_entropy(const scalar_t* z, int64_t V, int lane, bool valid) {
  using acc_t = opmath_t<scalar_t>;
  using Math = EntropyMath<acc_t>;
  constexpr int kVec = 16 / sizeof(scalar_t);
  // head < kVec and V - tail < kVec: at most 2 * (kVec - 1) single elements.
  constexpr int kSinglesPerLane = (2 * (kVec - 1) + kLanes - 1) / kLanes;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  const int64_t misalignment = (reinterpret_cast<uintptr_t>(z) % 16) / sizeof(scalar_t);
  const int64_t head = valid ? std::min<int64_t>(V, misalignment == 0 ? 0 : kVec - misalignment) : 0;
  const int64_t vectors = valid ? (V - head) / kVec : 0;
  const int64_t tail = head + vectors * kVec;
  const int64_t singles = valid ? head + (V - tail) : 0;
  const auto* body = reinterpret_cast<const Vec<scalar_t, kVec>*>(z + head);

  // Absent single elements are -inf: they shift to kLow and add nothing.
  acc_t single[kSinglesPerLane];
#pragma unroll
  for (int j = 0; j < kSinglesPerLane; ++j) {
    const int64_t k = lane + j * kLanes;
    single[j] = k < singles ? static_cast<acc_t>(z[k < head ? k : tail + (k - head)]) : kNegInf;
  }
  // Held packed (fewer registers) and widened in each pass.
  Vec<scalar_t, kVec> held[kEntropyUnroll];
#pragma unroll
  for (int u = 0; u < kEntropyUnroll; ++u) {
    if (lane + u * kLanes < vectors) held[u] = body[lane + u * kLanes];
  }
  // f on every element of the row this lane reads: held ones, then the vectors past them.
  const auto for_each_element = [&](auto&& f) {
#pragma unroll
    for (int j = 0; j < kSinglesPerLane; ++j) f(single[j]);
#pragma unroll
    for (int u = 0; u < kEntropyUnroll; ++u) {
      if (lane + u * kLanes < vectors) {
        acc_t x[kVec];
        widen(x, held[u].v);
#pragma unroll
        for (int j = 0; j < kVec; ++j) f(x[j]);
      }
    }
    for (int64_t i = lane + static_cast<int64_t>(kLanes) * kEntropyUnroll; i < vectors; i += kLanes) {
      acc_t x[kVec];
      const Vec<scalar_t, kVec> raw = body[i];
      widen(x, raw.v);
#pragma unroll
      for (int j = 0; j < kVec; ++j) f(x[j]);
    }
  };

  acc_t m = kNegInf;
  for_each_element([&](acc_t x) { m = Math::max(m, x); });
  // xor offsets below kLanes stay within the row's aligned group of lanes.
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) m = Math::max(m, __shfl_xor_sync(kFullMask, m, offset));

  // A +inf max makes the +inf logit's term NaN, an all -inf row every term: both entropies NaN.
  const acc_t shift = -Math::mul(m, Math::kScale);
  acc_t s = 0, t = 0;
  const auto add_term = [&](acc_t x) {
    const acc_t d = Math::max(Math::fma(x, Math::kScale, shift), Math::kLow);
    const acc_t e = Math::exp(d);
    s = Math::add(s, e);
    t = Math::fma(e, d, t);
  };
  for_each_element(add_term);
#pragma unroll
  for (int offset = kLanes / 2; offset > 0; offset /= 2) {
    s = Math::add(s, __shfl_xor_sync(kFullMask, s, offset));
    t = Math::add(t, __shfl_xor_sync(kFullMask, t, offset));
  }
  return Math::entropy(s, t);
}

// Rows of up to 64 16-byte vectors (V = 512 bf16) take 8 lanes, longer ones a warp.
bool short_rows(int64_t V, int64_t element_size) { return V * element_size <= 1024; }

constexpr int kEntropyThreads = 256;

// Blocks of 256 threads per SM the register budget of the kernels that compute entropies is set
// for: 4 (64 registers; ptxas, sm_90: no spills, except 4 bytes in the fp32 entropy kernel);
// fp64's exp needs more.
template <typename scalar_t>
constexpr int entropy_min_blocks() {
  return sizeof(scalar_t) == 8 ? 2 : 4;
}

// Groups past the last row read nothing but still take part in the shuffles.
template <typename scalar_t, int kLanes>
__global__ void __launch_bounds__(kEntropyThreads, entropy_min_blocks<scalar_t>())
    entropy_kernel(const scalar_t* __restrict__ logits, opmath_t<scalar_t>* __restrict__ out, int64_t rows,
                   int64_t V) {
  constexpr int kRowsPerBlock = kEntropyThreads / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kLanes;
  const bool valid = row < rows;
  const auto h = row_entropy<scalar_t, kLanes>(logits + (valid ? row : 0) * V, V, lane, valid);
  if (valid && lane == 0) out[row] = h;
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
// One launch. Each block takes the next tile of kLayoutTile positions of a row (an atomic ticket,
// so every earlier tile of the row has started and none waits on a later one), finds the tile's
// natural starts, publishes the tile's summary and combines the summaries of the tiles before it
// (decoupled look-back: one warp reads 96 tiles' records at a time and stops at the nearest tile
// that has published its inclusive prefix), then writes the tile's patch ids and lengths.

constexpr int kLayoutThreads = 256;
// Position p's start rule reads H[p-1] and H[p-2]; a tile's end test reads position tile_end too.
constexpr int kHalo = 2;
// Entropy rows a block computes: its tile and the halo before it.
constexpr int kTileRows = 128;
constexpr int kLayoutTile = kTileRows - kHalo;  // positions per tile, one per thread
// Every group of lanes runs the same number of rows (whole warps meet in the shuffles).
static_assert(kLayoutTile <= kLayoutThreads && kTileRows % (kLayoutThreads / 8) == 0);

// The layout kernel reads a row's natural starts at positions 1 <= p < L through a source: a start
// mask, or the start rule applied to entropies that the block computes from the logits
// (entropy_patch: neither the entropies nor a start mask reach memory). `load` prepares a tile;
// `source(storage, tile_begin, b, p)` says whether p starts a patch.

// starts [B, T + 1] bool.
struct MaskStarts {
  static constexpr int kMinBlocks = 4;
  struct Storage {};
  const bool* starts;
  int T;
  __device__ void load(Storage&, int, int) {}
  __device__ bool operator()(const Storage&, int, int b, int p) const {
    return starts[static_cast<int64_t>(b) * (T + 1) + p];
  }
};

// logits [B, T, V]; positions decided as entropy_patch_starts_kernel decides them from the
// entropies: p = 1 always starts, p >= 2 reads H[p-1] and H[p-2].
template <typename scalar_t, int kLanes>
struct LogitsStarts {
  using acc_t = opmath_t<scalar_t>;
  static constexpr int kMinBlocks = entropy_min_blocks<scalar_t>();
  struct Storage {
    acc_t entropies[kTileRows];  // H[tile_begin - kHalo + i]
  };
  const scalar_t* logits;
  int64_t V;
  int T;
  StartMode mode;
  acc_t threshold, threshold_add;

  // Rows outside [0, T) are not read: no position asks for them.
  __device__ void load(Storage& storage, int b, int tile_begin) {
    constexpr int kGroups = kLayoutThreads / kLanes;
    const int lane = threadIdx.x % kLanes;
    for (int r = threadIdx.x / kLanes; r < kTileRows; r += kGroups) {
      const int q = tile_begin - kHalo + r;
      const bool valid = q >= 0 && q < T;
      const int64_t row = static_cast<int64_t>(b) * T + (valid ? q : 0);
      const acc_t h = row_entropy<scalar_t, kLanes>(logits + row * V, V, lane, valid);
      if (lane == 0) storage.entropies[r] = h;
    }
    __syncthreads();
  }
  __device__ bool operator()(const Storage& storage, int tile_begin, int, int p) const {
    const acc_t* h = storage.entropies + (p - tile_begin + kHalo);
    return p < 2 || entropy_starts_at(mode, p, h[-1], h[-2], threshold, threshold_add);
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

// A range of positions [begin, end) as the scan sees it: its first natural start (end if none),
// its last (-1 if none) and how many patches start in it from its first natural start on.
struct Summary {
  int begin, first, last, count;
};

// The summary of a range followed by the adjacent range b: b's positions before its first natural
// start continue a's last patch (and its splits).
template <bool kSplit>
__device__ __forceinline__ Summary combine(const Summary& a, const Summary& b, int m) {
  const bool a_has = a.last >= 0;
  return {a.begin, a_has ? a.first : b.first, b.last >= 0 ? b.last : a.last,
          a.count + (a_has ? split_points<kSplit>(a.last, b.begin, b.first, m) : 0) + b.count};
}

// A tile's record: one 64-bit word, stored and loaded whole, so a reader sees the old or the new
// word and no fence orders it against anything. Its top two bits say what it holds: nothing yet,
// the tile's own summary (kAggregate: first natural start, last natural start + 1 (0: none) and
// start count, 20 bits each, relative to the tile), or the summary of the row up to the tile's end
// (kInclusive: last natural start + 1 and count, 31 bits each; begin and first are 0).
using Record = unsigned long long;
constexpr Record kAggregate = Record{1} << 62, kInclusive = Record{2} << 62, kKindMask = Record{3} << 62;
constexpr Record kField20 = (Record{1} << 20) - 1, kField31 = (Record{1} << 31) - 1;
static_assert(kLayoutTile < (1 << 20));

__device__ __forceinline__ Record aggregate_record(const Summary& tile) {
  const int last = tile.last >= 0 ? tile.last - tile.begin + 1 : 0;
  return kAggregate | static_cast<Record>(tile.first - tile.begin) << 40 | static_cast<Record>(last) << 20 |
         static_cast<Record>(tile.count);
}

// check_layout_size keeps every position and count of a row below 2^31 - 1.
__device__ __forceinline__ Record inclusive_record(const Summary& prefix) {
  return kInclusive | static_cast<Record>(prefix.last + 1) << 31 | static_cast<Record>(prefix.count);
}

__device__ __forceinline__ Summary read_record(Record record, int tile_begin) {
  if ((record & kKindMask) == kInclusive) {
    return {0, 0, static_cast<int>((record >> 31) & kField31) - 1, static_cast<int>(record & kField31)};
  }
  const int last = static_cast<int>((record >> 20) & kField20);
  return {tile_begin, tile_begin + static_cast<int>((record >> 40) & kField20), last > 0 ? tile_begin + last - 1 : -1,
          static_cast<int>(record & kField20)};
}

__device__ __forceinline__ void publish(Record* record, Record value) {
  *reinterpret_cast<volatile Record*>(record) = value;
}

// Records one lane of the look-back reads per round: a warp covers 96 tiles (12,096 positions) at
// once, so for rows up to that long one round trip to L2 finds tile 0's inclusive summary.
constexpr int kRecordsPerLane = 3;
constexpr int kLookBackWindow = 32 * kRecordsPerLane;

// Warp 0 of the tile's block: the summary of positions [0, tile_begin) from the records of the
// row's earlier tiles (tile 0 publishes its inclusive summary without looking back). Each round
// waits until every record of its window holds something, combines them from the nearest
// inclusive one on, and stops there, or goes one window further back.
template <bool kSplit>
__device__ Summary look_back(const Record* row_records, int tile, int m) {
  const int lane = threadIdx.x % 32;
  Summary suffix{0, 0, -1, 0};
  bool have_suffix = false;
  for (int window_end = tile;; window_end -= kLookBackWindow) {
    const int lane_first = window_end - kLookBackWindow + lane * kRecordsPerLane;  // lane 31 ends at tile - 1
    // Tiles before tile 0 read as inclusive: tile 0 always is, so they are never combined.
    Record records[kRecordsPerLane];
    bool ready;
    do {
      ready = true;
#pragma unroll
      for (int j = 0; j < kRecordsPerLane; ++j) {
        const int i = lane_first + j;
        records[j] = i >= 0 ? *reinterpret_cast<const volatile Record*>(row_records + i) : kInclusive;
        ready = ready && records[j] != 0;
      }
    } while (!__all_sync(kFullMask, ready));
    // This lane's tiles from its nearest inclusive record on.
    Summary mine{0, 0, -1, 0};
    bool lane_inclusive = false;
#pragma unroll
    for (int j = 0; j < kRecordsPerLane; ++j) {
      const Summary record = read_record(records[j], (lane_first + j) * kLayoutTile);
      const bool inclusive = (records[j] & kKindMask) == kInclusive;
      mine = inclusive || j == 0 ? record : combine<kSplit>(mine, record, m);
      lane_inclusive = lane_inclusive || inclusive;
    }
    const unsigned inclusive = __ballot_sync(kFullMask, lane_inclusive);
    const int lowest = inclusive ? 31 - __clz(inclusive) : 0;
    // Suffix scan in tile order: lane l ends with the summary of lanes l..31.
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const Summary later{__shfl_down_sync(kFullMask, mine.begin, offset), __shfl_down_sync(kFullMask, mine.first, offset),
                          __shfl_down_sync(kFullMask, mine.last, offset), __shfl_down_sync(kFullMask, mine.count, offset)};
      if (lane + offset < 32) mine = combine<kSplit>(mine, later, m);
    }
    const Summary window{__shfl_sync(kFullMask, mine.begin, lowest), __shfl_sync(kFullMask, mine.first, lowest),
                         __shfl_sync(kFullMask, mine.last, lowest), __shfl_sync(kFullMask, mine.count, lowest)};
    suffix = have_suffix ? combine<kSplit>(window, suffix, m) : window;
    have_suffix = true;
    if (inclusive) return suffix;
  }
}

// workspace: a ticket counter, then one record per tile, zeroed before the launch; patch_lengths
// arrive zeroed too (the padding past a row's last patch).
template <bool kSplit, typename Source>
__global__ void __launch_bounds__(kLayoutThreads, Source::kMinBlocks)
    patch_layout_kernel(Source source, Record* __restrict__ workspace, int64_t* __restrict__ patch_ids,
                        int64_t* __restrict__ patch_lengths, int64_t* __restrict__ patch_counts, int T, int L, int m,
                        int tiles) {
  __shared__ typename Source::Storage storage;
  __shared__ int shared[32];
  __shared__ int ticket;
  __shared__ Summary prefix;
  if (threadIdx.x == 0) ticket = static_cast<int>(atomicAdd(workspace, Record{1}));
  __syncthreads();
  const int b = ticket / tiles, tile = ticket % tiles;
  const int tile_begin = tile * kLayoutTile, tile_end = min(tile_begin + kLayoutTile, L);
  source.load(storage, b, tile_begin);

  // This thread's position: whether it is a natural start, the tile's last natural start up to
  // it, and whether it starts a patch counted from the tile's first natural start on.
  const int p = tile_begin + threadIdx.x;
  const bool inside = p < tile_end;
  const bool natural = inside && (p == 0 || source(storage, tile_begin, b, p));
  int tile_last;
  const int last_before = block_exclusive_scan(natural ? p : -1, -1, Max{}, shared, tile_last);
  const int tile_natural = natural ? p : last_before;
  int neg_first;
  block_exclusive_scan(natural ? -p : -tile_end, -tile_end, Max{}, shared, neg_first);
  const int first = -neg_first;
  const bool counted = inside && tile_natural >= 0 && on_split_grid<kSplit>(p - tile_natural, m);
  int tile_count;
  const int counted_before = block_exclusive_scan(counted, 0, Sum{}, shared, tile_count);

  Record* row_records = workspace + 1 + static_cast<int64_t>(b) * tiles;
  const Summary aggregate{tile_begin, first, tile_last, tile_count};
  if (threadIdx.x < 32) {
    Summary before{0, 0, -1, 0};
    if (tile > 0) {
      if (threadIdx.x == 0) publish(row_records + tile, aggregate_record(aggregate));
      before = look_back<kSplit>(row_records, tile, m);
    }
    if (threadIdx.x == 0) {
      const Summary through = combine<kSplit>(before, aggregate, m);
      publish(row_records + tile, inclusive_record(through));
      if (tile + 1 == tiles) patch_counts[b] = through.count;
      prefix = before;
    }
  }
  __syncthreads();
  if (!inside) return;

  // k: the patches started at or before p (so p lies in patch k - 1).
  const int s = max(prefix.last, tile_natural);  // the last natural start at or before p
  const int k = prefix.count + split_points<kSplit>(prefix.last, tile_begin, min(p + 1, first), m) +
                (p >= first ? counted_before + counted : 0);
  if (p < T) patch_ids[static_cast<int64_t>(b) * T + p] = k - 1;
  if (p + 1 == L || source(storage, tile_begin, b, p + 1) || on_split_grid<kSplit>(p + 1 - s, m)) {  // p ends a patch
    const int begin = kSplit ? s + (p - s) / m * m : s;
    patch_lengths[static_cast<int64_t>(b) * (T + 1) + k - 1] = p - begin + 1;
  }
}

// Sizes the int32 tile arithmetic of the layout kernel can address.
void check_layout_size(const char* op, const char* what, int64_t B, int64_t T) {
  TORCH_CHECK_VALUE(T < INT32_MAX - kLayoutTile, "blt_ext.", op, ": ", what, " must be < 2^31 - ",
                    std::to_string(kLayoutTile + 1), " on CUDA, got ", std::to_string(T));
  TORCH_CHECK_VALUE(B <= INT32_MAX, "blt_ext.", op, ": batch size B must be < 2^31 on CUDA, got ",
                    std::to_string(B));
}

// The layout of B rows of T bytes and its launch. patch_lengths shares one zeroed allocation with
// the kernel's workspace (one memset for both); it is a view of the allocation's first B (T + 1)
// elements.
struct Layout {
  int64_t B, T, L, tiles;
  at::Tensor patch_ids, patch_lengths, patch_counts;
  Record* workspace = nullptr;

  Layout(int64_t B, int64_t T, bool include_next_token, const at::TensorOptions& options)
      : B(B), T(T), L(T + include_next_token),
        // An empty sequence still gets one tile: it writes the counts.
        tiles(std::max<int64_t>(1, (L + kLayoutTile - 1) / kLayoutTile)),
        patch_ids(at::empty({B, T}, options.dtype(at::kLong))),
        patch_counts(at::empty({B}, options.dtype(at::kLong))) {
    TORCH_CHECK(B * tiles <= INT32_MAX, "blt_ext: too many positions for one launch: ", std::to_string(B * (T + 1)));
    const int64_t lengths = B * (T + 1);
    at::Tensor buffer = at::empty({lengths + 1 + B * tiles}, options.dtype(at::kLong));
    patch_lengths = buffer.narrow(0, 0, lengths).view({B, T + 1});
    if (B == 0) return;
    C10_CUDA_CHECK(cudaMemsetAsync(buffer.mutable_data_ptr<int64_t>(), 0, buffer.nbytes(),
                                   c10::cuda::getCurrentCUDAStream()));
    workspace = reinterpret_cast<Record*>(buffer.mutable_data_ptr<int64_t>() + lengths);
  }

  std::tuple<at::Tensor, at::Tensor, at::Tensor> tuple() const { return {patch_ids, patch_lengths, patch_counts}; }

  // Natural starts read from `source` (B >= 1).
  template <typename Source>
  void launch(const Source& source, std::optional<int64_t> max_patch_length) {
    // A patch is at most L long, so any m >= L splits nothing.
    const bool split = max_patch_length.has_value() && *max_patch_length < L;
    const int m = split ? static_cast<int>(*max_patch_length) : 1;
    const auto kernel = split ? patch_layout_kernel<true, Source> : patch_layout_kernel<false, Source>;
    kernel<<<static_cast<unsigned>(B * tiles), kLayoutThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        source, workspace, patch_ids.mutable_data_ptr<int64_t>(), patch_lengths.mutable_data_ptr<int64_t>(),
        patch_counts.mutable_data_ptr<int64_t>(), static_cast<int>(T), static_cast<int>(L), m,
        static_cast<int>(tiles));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

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
  const bool short_row = short_rows(V, z.element_size());
  const int64_t rows_per_block = kEntropyThreads / (short_row ? 8 : 32);
  const int64_t blocks = (rows + rows_per_block - 1) / rows_per_block;
  TORCH_CHECK(blocks <= INT32_MAX, "blt_ext.entropy: too many rows for one launch: ", std::to_string(rows));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "blt_ext.entropy", [&] {
    const auto kernel = short_row ? entropy_kernel<scalar_t, 8> : entropy_kernel<scalar_t, 32>;
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
  Layout layout(B, T, include_next_token, s.options());
  if (B > 0) layout.launch(MaskStarts{s.const_data_ptr<bool>(), static_cast<int>(T)}, max_patch_length);
  return layout.tuple();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_patch(const at::Tensor& logits, double threshold,
                                                             std::optional<double> threshold_add,
                                                             bool monotonicity, bool include_next_token,
                                                             std::optional<int64_t> max_patch_length) {
  check_entropy_patch_args(logits, threshold, threshold_add, max_patch_length);
  const c10::cuda::CUDAGuard guard(logits.device());
  const at::Tensor z = logits.contiguous();
  const int64_t B = z.size(0), T = z.size(1), V = z.size(2);
  check_layout_size("entropy_patch", "logits.size(1) (sequence length T)", B, T);
  Layout layout(B, T, include_next_token, z.options());
  if (B == 0) return layout.tuple();
  const StartMode mode = start_mode(threshold_add, monotonicity);
  const bool short_row = short_rows(V, z.element_size());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "blt_ext.entropy_patch", [&] {
    using acc_t = opmath_t<scalar_t>;
    // Thresholds rounded to the entropies' dtype, as entropy_patch_starts rounds them.
    const auto launch = [&](auto lanes) {
      const LogitsStarts<scalar_t, decltype(lanes)::value> source{
          z.const_data_ptr<scalar_t>(), V, static_cast<int>(T), mode, static_cast<acc_t>(threshold),
          static_cast<acc_t>(threshold_add.value_or(0.0))};
      layout.launch(source, max_patch_length);
    };
    if (short_row) {
      launch(std::integral_constant<int, 8>{});
    } else {
      launch(std::integral_constant<int, 32>{});
    }
  });
  return layout.tuple();
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("entropy", &blt_ext::cuda::entropy);
  m.impl("entropy_patch_starts", &blt_ext::cuda::entropy_patch_starts);
  m.impl("space_patch_starts", &blt_ext::cuda::space_patch_starts);
  m.impl("patch_layout", &blt_ext::cuda::patch_layout);
  m.impl("entropy_patch", &blt_ext::cuda::entropy_patch);
}
