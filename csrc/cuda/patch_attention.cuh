// Patch cross-attention on CUDA (BLT_SPEC.md d "Cross-attention", f "the shift"): what the
// forward (patch_attention_forward.cu) and backward (patch_attention_backward.cu) kernels share.
//
// As on the CPU, both directions are a block-diagonal attention: patch p pairs its `slots` rows
// with one contiguous byte range (encoder: the bytes of p, which its slot rows attend; decoder:
// the bytes t with d(t) = p, which attend its slot rows). Every kernel gives one warp to one
// (b, p) and a group of heads: the slot rows live in registers and the warp streams the byte
// range, so each output row and each gradient row is written by exactly one warp (no atomics,
// deterministic).
//
// Within a warp, a group of G lanes (G = next power of two >= Dh / 8) holds one head row, 8
// elements per lane (16-byte loads for 16-bit types), and 32 / G rows sit side by side: first
// neighbouring heads (Dh = 64: 4 heads, a 512-byte contiguous span of a byte's row), then, when
// H is too small to fill the warp, sub-groups that take different bytes of the range and merge
// at the end (online softmax / sums). Heads come first because a warp's set-up and merge cost as
// much as several bytes of work at BLT's 4.5-byte patches. Each kernel step has several bytes of
// the range in flight at once: the encoder kernels load U bytes' k/v rows into registers before
// any use; the decoder kernels, whose byte rows are the bulk of their traffic, copy up to a whole
// patch's q (and dO) rows into shared memory with cp.async first (staged_steps). Every kernel is
// compiled for any G and for G = kFastGroup with 16-byte loads (Dh 40-64), where the shuffles and
// lane arithmetic are unrolled: at BLT-1B shapes the kernels use 51-57% of the SM's issue slots
// (ncu), so instructions count as well as loads in flight.
//
// Patch offsets come from patch_ends of the lengths on the device (no host synchronisation),
// and the kernels are launched chained to it (chained_launch.cuh);
// the decoder range of p ends where the next non-empty patch ends (a binary search over the
// ends, only needed after zero-length patches). Lengths are not validated on CUDA (that needs
// the data on the host): every range is clamped to [0, T], so bad lengths never make a kernel
// read or write out of bounds, but rows that no valid patch covers are then left unwritten.
//
// Up to kMaxChunk slot rows are held in registers; more slots run as several launches over
// chunks of slots that combine their results in the outputs (a log-sum-exp merge for the
// decoder forward, sums for the gradients), in a fixed order.
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cuda/detail/IntegerDivider.cuh>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "chained_launch.cuh"
#include "common/patch_attention.h"
#include "patch_ends.cuh"
#include "widen.cuh"

namespace blt_ext::cuda::patch_attention_kernels {

using patch_attention::AttentionShape;
using patch_attention::Direction;

constexpr int kWarp = 32;
constexpr int kWarpsPerBlock = 4;
constexpr int kElems = 8;     // head-dim elements per lane
constexpr int kMaxChunk = 4;  // slot rows held in registers
constexpr unsigned kFullMask = 0xffffffffu;
// The lane group every kernel is also compiled for: 8 lanes, i.e. 32 < Dh <= 64 (BLT's 64-wide
// heads), with 16-byte loads. There the row sums unroll into three shuffles, the lane's place is
// shifts, and no scalar-load path is left; other shapes take the kernels compiled for any group
// (kGroup = 0).
constexpr int kFastGroup = 8;

// Blocks of a kernel an SM must hold at once, i.e. a thread's register budget (65536 / (128 *
// blocks)): the kernels wait on memory, and more warps keep more loads in flight. Given for
// 16-bit types and up to two slot rows (BLT's k = 2), as many as fit without spills (at 96
// registers the encoder kernels spill 4-8 bytes); wider types and kMaxChunk rows keep the
// compiler's choice.
template <typename scalar_t, int C>
constexpr int min_blocks(int blocks) {
  return sizeof(scalar_t) == 2 && C <= 2 ? blocks : 1;
}

template <typename scalar_t>
struct Args {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* q;
  const scalar_t* k;
  const scalar_t* v;
  const scalar_t* output;       // backward: the forward's output O (encoder D_i = dO_i · O_i)
  const scalar_t* grad_output;  // backward: dO
  scalar_t* out;                // forward
  acc_t* lse;                   // forward: written; backward: read
  scalar_t* dq;
  scalar_t* dk;
  scalar_t* dv;
  const int64_t* lengths;  // [B, P]
  const int64_t* ends;     // [B, P] inclusive cumulative lengths
  int64_t batch, patches, heads, head_dim, queries, keys, bytes, slots;
  int64_t chunk_begin;  // first slot of this launch's chunk
  acc_t scale;
  int group;           // lanes per head row
  int heads_per_warp;  // head rows side by side in a warp
  int64_t head_groups; // warps per (b, p): ceil(H / heads_per_warp)
  uint32_t warps;      // B * P * head_groups
  at::cuda::detail::IntDivider<uint32_t> per_head_groups, per_patches;  // warp -> (b, p, head group)
  bool vec;   // 16-byte vector loads allowed (Dh % 8 == 0, 16-byte aligned bases)
};

// Softmax weights and log-sum-exps in float use the hardware's approximate exp2, log2 and
// reciprocal (about 2^-22 relative error, subnormal results flushed to 0): exp2f, log2f and an
// IEEE division cost 4, ~35 and ~8 instructions (ptxas, sm_90), paid per byte in the decoder
// forward.
__device__ __forceinline__ float exp2_(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) {
  float y;
  asm("lg2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ double log2_(double x) { return log2(x); }
__device__ __forceinline__ float reciprocal_(float x) { return __fdividef(1.0f, x); }
__device__ __forceinline__ double reciprocal_(double x) { return 1.0 / x; }
__device__ __forceinline__ float exp_(float x) { return expf(x); }
__device__ __forceinline__ double exp_(double x) { return exp(x); }
__device__ __forceinline__ float log_(float x) { return logf(x); }
__device__ __forceinline__ double log_(double x) { return log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t neg_inf() {
  return -static_cast<acc_t>(INFINITY);
}

template <typename acc_t>
constexpr acc_t kLog2e = static_cast<acc_t>(1.4426950408889634);
template <typename acc_t>
constexpr acc_t kLn2 = static_cast<acc_t>(0.6931471805599453);

// This lane's 8 elements [off, off + 8) of a head row as stored, zero past Dh. The tiles in
// flight are kept packed (half the registers of the widened form for 16-bit types) and widened
// where used, which keeps occupancy up.
template <typename scalar_t>
struct Packed {
  alignas(16) scalar_t x[kElems];
};

template <typename scalar_t>
__device__ __forceinline__ void load_packed(Packed<scalar_t>& p, const scalar_t* row, int off, int dh, bool vec) {
  if (vec) {
    constexpr int kVecs = kElems * sizeof(scalar_t) / 16;
#pragma unroll
    for (int i = 0; i < kVecs; ++i) {
      reinterpret_cast<uint4*>(p.x)[i] = off < dh ? __ldg(reinterpret_cast<const uint4*>(row + off) + i) : uint4{};
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) p.x[i] = off + i < dh ? row[off + i] : scalar_t(0);
  }
}

// Hides a packed row's value from the compiler at this point. Called at the top of a loop on rows
// that stay in registers, it keeps their widening inside the loop: hoisted, the widened copies would
// double those registers and halve the warps an SM holds.
template <typename scalar_t>
__device__ __forceinline__ void opaque(Packed<scalar_t>& p) {
  auto* words = reinterpret_cast<uint32_t*>(p.x);
#pragma unroll
  for (int i = 0; i < static_cast<int>(sizeof(p) / sizeof(uint32_t)); ++i) asm volatile("" : "+r"(words[i]));
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void unpack(acc_t (&x)[kElems], const Packed<scalar_t>& p) {
  widen(x, p.x);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(acc_t (&x)[kElems], const scalar_t* row, int off, int dh, bool vec) {
  Packed<scalar_t> p;
  load_packed(p, row, off, dh, vec);
  unpack(x, p);
}

// One 16-byte store. A plain uint4 assignment is a struct copy, which the compiler emits as four
// 4-byte stores (cuobjdump, sm_90): four times the store instructions and L1 wavefronts.
__device__ __forceinline__ void store16(uint4* address, const uint4& value) {
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};" ::"l"(address), "r"(value.x), "r"(value.y), "r"(value.z),
               "r"(value.w)
               : "memory");
}

// Stores factor * x (plus the row's current value when `add`) into this lane's elements. Without
// `add` nothing is added, so a constant factor of 1 costs no instruction.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* row, const acc_t (&x)[kElems], acc_t factor, int off, int dh,
                                            bool vec, bool add) {
  if (off >= dh) return;
  acc_t y[kElems];
  if (add) {
    load_chunk(y, row, off, dh, vec);
#pragma unroll
    for (int i = 0; i < kElems; ++i) y[i] += x[i] * factor;
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) y[i] = x[i] * factor;
  }
  if (vec) {
    constexpr int kVecs = kElems * sizeof(scalar_t) / 16;
    alignas(16) scalar_t vals[kElems];
#pragma unroll
    for (int i = 0; i < kElems; ++i) vals[i] = static_cast<scalar_t>(y[i]);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) store16(reinterpret_cast<uint4*>(row + off) + i, reinterpret_cast<const uint4*>(vals)[i]);
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      if (off + i < dh) row[off + i] = static_cast<scalar_t>(y[i]);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t (&x)[kElems], const acc_t (&y)[kElems]) {
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) s += x[i] * y[i];
  return s;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t dot(const Packed<scalar_t>& a, const Packed<scalar_t>& b) {
  acc_t x[kElems], y[kElems];
  unpack(x, a);
  unpack(y, b);
  return dot(x, y);
}

// Byte rows staged in shared memory (the decoder kernels). A warp copies the rows of up to a
// step's worth of bytes into its own slots before it uses any: the copies are cp.async (sm_80+),
// which hold no registers while in flight, so a warp keeps a whole typical patch's rows in flight
// where registers held two to four bytes. Each lane reads back only the slots it wrote itself, so
// cp.async.wait_group alone orders the copies before the reads (no warp or block barrier).
constexpr int kStagedBytesPerWarp = 4096;  // per staged tensor: a 16-bit row chunk is 512 bytes

// Bytes a step stages: one slot per lane and byte.
template <typename scalar_t>
constexpr int staged_steps() {
  return kStagedBytesPerWarp / (kWarp * static_cast<int>(sizeof(Packed<scalar_t>)));
}

// Copies one T (4, 8 or 16 bytes) from global to shared memory without a register.
template <typename T>
__device__ __forceinline__ void copy_async(void* slot, const void* source) {
  static_assert(sizeof(T) == 4 || sizeof(T) == 8 || sizeof(T) == 16);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const auto address = static_cast<unsigned>(__cvta_generic_to_shared(slot));
  if constexpr (sizeof(T) == 16) {  // .cg: bypass L1, as the rows are read once
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(address), "l"(source) : "memory");
  } else {
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2;\n" ::"r"(address), "l"(source), "n"(sizeof(T))
                 : "memory");
  }
#else
  *static_cast<T*>(slot) = *static_cast<const T*>(source);
#endif
}

// Waits for this thread's cp.async copies.
__device__ __forceinline__ void wait_copies() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\ncp.async.wait_group 0;\n" ::: "memory");
#endif
}

// Copies this lane's elements of a row into its slot: cp.async on the vector path, else through
// registers (zeros past Dh, as load_packed).
template <typename scalar_t>
__device__ __forceinline__ void stage_row(Packed<scalar_t>& slot, const scalar_t* row, int off, int dh, bool vec) {
  if (vec && off < dh) {
#pragma unroll
    for (int i = 0; i < static_cast<int>(sizeof(slot) / 16); ++i) {
      copy_async<uint4>(reinterpret_cast<uint4*>(slot.x) + i, reinterpret_cast<const uint4*>(row + off) + i);
    }
  } else {
    Packed<scalar_t> p;
    load_packed(p, row, off, dh, vec);
    slot = p;
  }
}

// Sum over the `group` lanes of a head row; every lane of the warp must call it. With a
// compile-time group (kFastGroup) the loop unrolls into its shuffles.
template <typename acc_t>
__device__ __forceinline__ acc_t group_sum(acc_t x, int group) {
  for (int o = group >> 1; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) { return x < lo ? lo : (x > hi ? hi : x); }

// Slot rows of this launch's chunk: at most C.
template <int C, typename scalar_t>
__device__ __forceinline__ int chunk_slots(const Args<scalar_t>& a) {
  const int64_t left = a.slots - a.chunk_begin;
  return left < C ? static_cast<int>(left) : C;
}

// Where this lane sits, and what every kernel derives from it. A warp covers one (b, p) and a
// group of `heads_per_warp` heads; a head row takes `group` lanes, 8 elements each (16-byte loads
// for 16-bit types). The lanes left over form `subs` sub-groups per head, which split the patch's
// byte range and merge.
struct Lane {
  int64_t b, p, h, bp;
  int64_t row;  // elements per byte or slot row: H * Dh
  int lane, sub, subs, off;
  int subs_shift;  // log2(subs)
  int group;    // lanes per head row: kGroup where the kernel is compiled for it (a constant)
  int nslot;    // slot rows of this launch's chunk
  int dh;       // Dh, or 0 for a lane whose head is past H: it loads zeros and stores nothing
  bool vec;     // 16-byte loads and stores (always with kGroup)
  bool leader;  // first lane of an existing head row: writes the row's scalars
};

// The host checks B * P * head_groups < 2^31, so the warp coordinates are 32-bit and divide by
// multiplying with the host's magic numbers; the lane group and heads per warp are powers of two,
// so the lane's place takes shifts and masks.
template <int kGroup, int C, typename scalar_t>
__device__ __forceinline__ bool make_lane(const Args<scalar_t>& a, Lane& l) {
  wait_for_previous_kernel();  // every kernel starts here: launched chained (launch_chunks)
  const int group = kGroup > 0 ? kGroup : a.group;
  l.group = group;
  l.vec = kGroup > 0 || a.vec;
  const uint32_t warp = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (warp >= a.warps) return false;
  const auto bp_group = a.per_head_groups.divmod(warp);
  const auto b_p = a.per_patches.divmod(bp_group.div);
  l.bp = bp_group.div;
  l.b = b_p.div;
  l.p = b_p.mod;
  l.lane = threadIdx.x % kWarp;
  const int group_shift = __ffs(group) - 1, heads_shift = __ffs(a.heads_per_warp) - 1;
  const int row_group = l.lane >> group_shift;
  l.h = static_cast<int64_t>(bp_group.mod) * a.heads_per_warp + (row_group & (a.heads_per_warp - 1));
  l.sub = row_group >> heads_shift;
  l.subs_shift = __ffs(kWarp) - 1 - group_shift - heads_shift;
  l.subs = 1 << l.subs_shift;
  l.off = (l.lane & (group - 1)) * kElems;
  l.dh = l.h < a.heads ? static_cast<int>(a.head_dim) : 0;
  l.leader = l.dh > 0 && (l.lane & (group - 1)) == 0;
  l.row = a.heads * a.head_dim;
  l.nslot = chunk_slots<C>(a);
  return true;
}

// Query rows (decoder bytes) [begin, end) read patch p's slots; [begin, live) see no patch.
struct ByteRange {
  int64_t begin, live, end;
};

// Encoder: the bytes of patch p, [s_p, e_p) ∩ [0, T).
template <typename scalar_t>
__device__ __forceinline__ ByteRange encoder_range(const Args<scalar_t>& a, int64_t bp) {
  const int64_t end = a.ends[bp];
  const int64_t begin = clamp64(end - a.lengths[bp], 0, a.bytes);
  return {begin, begin, clamp64(end, begin, a.bytes)};
}

// Decoder: the bytes t with d(t) = p, [e_p - 1, e_next - 1) ∩ [0, T) where e_next is the end of
// the next non-empty patch (T if none); the first non-empty patch (s_p = 0) also owns the bytes
// before e_p - 1, which see no patch. Empty patches own no byte.
template <typename scalar_t>
__device__ __forceinline__ ByteRange decoder_range(const Args<scalar_t>& a, int64_t bp, int64_t p) {
  // The three index loads are issued together: one memory round trip in the common case.
  const int64_t* ends = a.ends + (bp - p);
  const int64_t length = a.lengths[bp], end = ends[p];
  const int64_t next_end = p + 1 < a.patches ? ends[p + 1] : end;
  if (length <= 0) return {0, 0, 0};
  int64_t lo = p + 1, hi = a.patches;  // first q > p with ends[q] > end (ends are non-decreasing)
  if (lo < hi && next_end > end) {
    hi = lo;
  } else {
    while (lo < hi) {
      const int64_t mid = (lo + hi) / 2;
      if (ends[mid] > end) hi = mid; else lo = mid + 1;
    }
  }
  const int64_t stop = lo < a.patches ? ends[lo] - 1 : a.bytes;
  const int64_t live = clamp64(end - 1, 0, a.bytes);
  const int64_t begin = end - length <= 0 ? 0 : live;
  return {begin, live, clamp64(stop, live, a.bytes)};
}

// A lane's bytes of a decoder range, counted from its first: its j-th byte is first + j * subs. The
// warp takes j < count (whole steps past the range are not staged), the lane's byte is inside the
// range for j < valid and sees a patch for j >= live_from. Worked out once, so the per-byte loops
// compare 32-bit counters instead of 64-bit byte positions.
struct LaneBytes {
  int64_t first;
  int count, valid, live_from;
};

__device__ __forceinline__ LaneBytes lane_bytes(const ByteRange& range, const Lane& l) {
  const auto bytes_before = [&](int64_t stop, int64_t from) {  // j's with from + j * subs < stop
    return static_cast<int>(max(stop - from + l.subs - 1, int64_t{0}) >> l.subs_shift);
  };
  LaneBytes bytes;
  bytes.first = range.begin + l.sub;
  bytes.count = bytes_before(range.end, range.begin);
  bytes.valid = bytes_before(range.end, bytes.first);
  bytes.live_from = bytes_before(range.live, bytes.first);
  return bytes;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

template <typename scalar_t>
Args<scalar_t> make_args(const AttentionShape& s, const at::Tensor& lengths, const at::Tensor& ends, double scale) {
  Args<scalar_t> a{};
  a.lengths = lengths.const_data_ptr<int64_t>();
  a.ends = ends.const_data_ptr<int64_t>();
  a.batch = s.batch;
  a.patches = s.patches;
  a.heads = s.heads;
  a.head_dim = s.head_dim;
  a.queries = s.queries;
  a.keys = s.keys;
  a.bytes = s.bytes;
  a.slots = s.slots;
  a.scale = static_cast<typename Args<scalar_t>::acc_t>(scale);
  const int lanes = static_cast<int>((s.head_dim + kElems - 1) / kElems);
  a.group = 1;
  while (a.group < lanes) a.group <<= 1;
  a.heads_per_warp = 1;
  while (a.heads_per_warp < kWarp / a.group && a.heads_per_warp < s.heads) a.heads_per_warp <<= 1;
  a.head_groups = (s.heads + a.heads_per_warp - 1) / a.heads_per_warp;
  return a;
}

// Warps of a launch: one per (b, p, head group).
template <typename scalar_t>
int64_t warp_count(const Args<scalar_t>& a) {
  return a.batch * a.patches * a.head_groups;
}

// Runs kernel<C, Multi, kGroup> over every (b, p, head group) warp, once per chunk of at most
// kMaxChunk slots; Multi: there is more than one chunk; kGroup: kFastGroup where it applies, else 0.
template <typename scalar_t, typename Launch>
void launch_chunks(Args<scalar_t> a, Launch launch) {
  const int64_t warps = warp_count(a);
  if (warps == 0) return;
  TORCH_CHECK(warps < (int64_t{1} << 31),
              "blt_ext.patch_cross_attention: B * P * ceil(H / heads per warp) must be below 2^31, got ", std::to_string(warps));
  a.warps = static_cast<uint32_t>(warps);
  a.per_head_groups = at::cuda::detail::IntDivider<uint32_t>(static_cast<uint32_t>(a.head_groups));
  a.per_patches = at::cuda::detail::IntDivider<uint32_t>(static_cast<uint32_t>(a.patches));
  const dim3 grid(static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarp * kWarpsPerBlock);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunk = a.slots <= 1 ? 1 : (a.slots <= 2 ? 2 : kMaxChunk);
  const bool fast = a.vec && a.group == kFastGroup;
  const auto run = [&](auto c, auto multi) {
    if (fast) {
      launch(c, multi, std::integral_constant<int, kFastGroup>{}, grid, block, stream, a);
    } else {
      launch(c, multi, std::integral_constant<int, 0>{}, grid, block, stream, a);
    }
  };
  for (a.chunk_begin = 0; a.chunk_begin < a.slots; a.chunk_begin += chunk) {
    if (chunk == 1) {
      run(std::integral_constant<int, 1>{}, std::false_type{});
    } else if (chunk == 2) {
      run(std::integral_constant<int, 2>{}, std::false_type{});
    } else if (a.slots <= kMaxChunk) {
      run(std::integral_constant<int, kMaxChunk>{}, std::false_type{});
    } else {
      run(std::integral_constant<int, kMaxChunk>{}, std::true_type{});
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace blt_ext::cuda::patch_attention_kernels
