// Patch cross-attention on CUDA (BLT_SPEC.md d "Cross-attention", f "the shift").
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
// at the end (online softmax / sums); the decoder backward takes up to four sub-groups before
// heads (kDecoderBackwardSubGroups). Each kernel step handles several bytes of the range with
// all their loads issued before any use, so a warp keeps many independent loads in flight. Every
// kernel is compiled for any G and for G = kFastGroup with 16-byte loads (Dh 40-64), where the
// shuffles and lane arithmetic are unrolled: at BLT-1B shapes the kernels use 54-68% of the SM's
// compute throughput (ncu), so instructions count as well as loads in flight.
//
// Patch offsets come from at::cumsum of the lengths on the device (no host synchronisation);
// the decoder range of p ends where the next non-empty patch ends (a binary search over the
// ends, only needed after zero-length patches). Lengths are not validated on CUDA (that needs
// the data on the host): every range is clamped to [0, T], so bad lengths never make a kernel
// read or write out of bounds, but rows that no valid patch covers are then left unwritten.
//
// Up to kMaxChunk slot rows are held in registers; more slots run as several launches over
// chunks of slots that combine their results in the outputs (a log-sum-exp merge for the
// decoder forward, sums for the gradients), in a fixed order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "blt_ext.h"
#include "common/checks.h"
#include "common/patch_attention.h"

namespace blt_ext::cuda {
namespace {

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
// Sub-groups of one head the decoder backward splits a patch's bytes over, where the lanes allow
// (the other kernels fill a warp with heads first). On the H200 at BLT-1B shapes (B4 T8192 H16
// Dh64 k2 bf16, 1800 patches of 4.5 bytes a row) this took the decoder backward from 293 to 236 us,
// while the forward kernels and the encoder backward were slower with four sub-groups (94 -> 193,
// 106 -> 139 and 182 -> 260 us): their warps then spend more on per-warp set-up and merging, and
// on byte slots that short patches leave empty, than they gain in round trips.
constexpr int kDecoderBackwardSubGroups = 4;

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
  bool vec;   // 16-byte vector loads allowed (Dh % 8 == 0, 16-byte aligned bases)
};

__device__ __forceinline__ float exp2_(float x) { return exp2f(x); }
__device__ __forceinline__ double exp2_(double x) { return exp2(x); }
__device__ __forceinline__ float log2_(float x) { return log2f(x); }
__device__ __forceinline__ double log2_(double x) { return log2(x); }
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
#pragma unroll
  for (int i = 0; i < kElems; ++i) x[i] = static_cast<acc_t>(p.x[i]);
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(acc_t (&x)[kElems], const scalar_t* row, int off, int dh, bool vec) {
  Packed<scalar_t> p;
  load_packed(p, row, off, dh, vec);
  unpack(x, p);
}

// Stores factor * x (plus the row's current value when `add`) into this lane's elements.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void store_chunk(scalar_t* row, const acc_t (&x)[kElems], acc_t factor, int off, int dh,
                                            bool vec, bool add) {
  if (off >= dh) return;
  acc_t prev[kElems];
  if (add) {
    load_chunk(prev, row, off, dh, vec);
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) prev[i] = acc_t(0);
  }
  if (vec) {
    constexpr int kVecs = kElems * sizeof(scalar_t) / 16;
    alignas(16) scalar_t vals[kElems];
#pragma unroll
    for (int i = 0; i < kElems; ++i) vals[i] = static_cast<scalar_t>(prev[i] + x[i] * factor);
#pragma unroll
    for (int i = 0; i < kVecs; ++i) reinterpret_cast<uint4*>(row + off)[i] = reinterpret_cast<const uint4*>(vals)[i];
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) {
      if (off + i < dh) row[off + i] = static_cast<scalar_t>(prev[i] + x[i] * factor);
    }
  }
}

template <typename acc_t>
__device__ __forceinline__ acc_t dot(const acc_t (&a)[kElems], const acc_t (&b)[kElems]) {
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) s += a[i] * b[i];
  return s;
}

template <typename acc_t, typename scalar_t>
__device__ __forceinline__ acc_t dot(const Packed<scalar_t>& a, const Packed<scalar_t>& b) {
  acc_t s = 0;
#pragma unroll
  for (int i = 0; i < kElems; ++i) s += static_cast<acc_t>(a.x[i]) * static_cast<acc_t>(b.x[i]);
  return s;
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

// Where this lane sits. A warp covers one (b, p) and a group of `heads_per_warp` heads; a head
// row takes `group` lanes, 8 elements each (16-byte loads for 16-bit types). The lanes left over
// form `subs` sub-groups per head, which split the patch's byte range and merge.
struct Lane {
  int64_t b, p, h, bp;
  int lane, sub, subs, off;
  int dh;       // Dh, or 0 for a lane whose head is past H: it loads zeros and stores nothing
  bool leader;  // first lane of an existing head row: writes the row's scalars
};

// The host checks B * P * head_groups < 2^31, so the warp coordinates use 32-bit division; the
// lane group and heads per warp are powers of two, so the lane's place takes shifts and masks.
template <typename scalar_t>
__device__ __forceinline__ bool make_lane(const Args<scalar_t>& a, Lane& l, int group) {
  const uint32_t warp = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (warp >= static_cast<uint32_t>(a.batch * a.patches * a.head_groups)) return false;
  const uint32_t groups = static_cast<uint32_t>(a.head_groups), patches = static_cast<uint32_t>(a.patches);
  const uint32_t bp = warp / groups;
  l.bp = bp;
  l.b = bp / patches;
  l.p = bp % patches;
  l.lane = threadIdx.x % kWarp;
  const int group_shift = __ffs(group) - 1, heads_shift = __ffs(a.heads_per_warp) - 1;
  const int row_group = l.lane >> group_shift;
  l.h = static_cast<int64_t>(warp % groups) * a.heads_per_warp + (row_group & (a.heads_per_warp - 1));
  l.sub = row_group >> heads_shift;
  l.subs = kWarp >> (group_shift + heads_shift);
  l.off = (l.lane & (group - 1)) * kElems;
  l.dh = l.h < a.heads ? static_cast<int>(a.head_dim) : 0;
  l.leader = l.dh > 0 && (l.lane & (group - 1)) == 0;
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

// Encoder forward: the chunk's slot queries of patch p attend the patch's bytes, U bytes a step:
// their loads are in flight together and one online-softmax rescale covers them (a typical
// 1-8 byte patch takes one or two steps).
template <typename scalar_t, int C, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(5)) encoder_forward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int U = C <= 2 ? 4 : 2;
  const int G = kGroup > 0 ? kGroup : a.group;
  const bool vec = kGroup > 0 || a.vec;
  Lane l;
  if (!make_lane(a, l, G)) return;
  const int R = l.subs, dh = l.dh;
  const int64_t row = a.heads * a.head_dim;
  const int nslot = chunk_slots<C>(a);
  const int64_t first_query = l.p * a.slots + a.chunk_begin;
  const scalar_t* q_rows = a.q + (l.b * a.queries + first_query) * row + l.h * a.head_dim;
  const scalar_t* k_rows = a.k + l.b * a.keys * row + l.h * a.head_dim;
  const scalar_t* v_rows = a.v + l.b * a.keys * row + l.h * a.head_dim;
  const acc_t qscale = a.scale * kLog2e<acc_t>;  // scores in log2 units: exp2 is one instruction

  // The slot rows' loads go out with the patch bounds' (they do not depend on them), so a warp
  // waits for two memory round trips before its first byte's score, not three.
  Packed<scalar_t> qp[C];
#pragma unroll
  for (int r = 0; r < C; ++r) load_packed(qp[r], q_rows + r * row, l.off, r < nslot ? dh : 0, vec);
  const ByteRange range = encoder_range(a, l.bp);
  acc_t acc[C][kElems], m[C], denom[C];
#pragma unroll
  for (int r = 0; r < C; ++r) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[r][e] = 0;
    m[r] = neg_inf<acc_t>();
    denom[r] = 0;
  }

  for (int64_t base = range.begin; base < range.end; base += U * R) {
#pragma unroll
    for (int r = 0; r < C; ++r) opaque(qp[r]);
    Packed<scalar_t> kp[U], vp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * R + l.sub;
      const int n = i < range.end ? dh : 0;  // past the patch: zeros, masked below
      load_packed(kp[u], k_rows + i * row, l.off, n, vec);
      load_packed(vp[u], v_rows + i * row, l.off, n, vec);
    }
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= nslot) continue;
      acc_t s[U], m_new = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u] = group_sum(dot<acc_t>(qp[r], kp[u]), G) * qscale;
        if (base + u * R + l.sub >= range.end) s[u] = neg_inf<acc_t>();
        m_new = max(m_new, s[u]);
      }
      // A sub-group may have seen no byte yet (m_new = -inf): all its weights are then 0.
      const acc_t m_use = m_new == neg_inf<acc_t>() ? acc_t(0) : m_new;
      const acc_t alpha = exp2_(m[r] - m_use);
      denom[r] *= alpha;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] *= alpha;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const acc_t weight = exp2_(s[u] - m_use);
        denom[r] += weight;
        acc_t vc[kElems];
        unpack(vc, vp[u]);
#pragma unroll
        for (int e = 0; e < kElems; ++e) acc[r][e] += weight * vc[e];
      }
      m[r] = m_new;
    }
  }
  // Merge the sub-groups' partial softmax states (butterfly: every sub-group ends with the total).
  for (int o = G * a.heads_per_warp; o < kWarp; o <<= 1) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= nslot) continue;
      const acc_t m_other = __shfl_xor_sync(kFullMask, m[r], o);
      const acc_t d_other = __shfl_xor_sync(kFullMask, denom[r], o);
      acc_t acc_other[kElems];
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc_other[e] = __shfl_xor_sync(kFullMask, acc[r][e], o);
      const acc_t m_new = max(m[r], m_other);
      if (m_new == neg_inf<acc_t>()) continue;
      const acc_t a_self = exp2_(m[r] - m_new), a_other = exp2_(m_other - m_new);
      denom[r] = denom[r] * a_self + d_other * a_other;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] = acc[r][e] * a_self + acc_other[e] * a_other;
      m[r] = m_new;
    }
  }
  scalar_t* out_rows = a.out + (l.b * a.queries + first_query) * row + l.h * a.head_dim;
  acc_t* lse_rows = a.lse + (l.b * a.heads + l.h) * a.queries + first_query;
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r >= nslot || r % R != l.sub) continue;
    const bool any = denom[r] > 0;  // an empty patch: out 0, lse -inf
    store_chunk(out_rows + r * row, acc[r], any ? acc_t(1) / denom[r] : acc_t(0), l.off, dh, vec, false);
    if (l.leader) lse_rows[r] = any ? (m[r] + log2_(denom[r])) * kLn2<acc_t> : neg_inf<acc_t>();
  }
}

// Encoder backward: dq of the chunk's slot rows, dk/dv of the patch's bytes (summed over chunks),
// U bytes per sub-group a step with their loads in flight together.
template <typename scalar_t, int C, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(5)) encoder_backward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int U = C <= 2 ? 2 : 1;
  const int G = kGroup > 0 ? kGroup : a.group;
  const bool vec = kGroup > 0 || a.vec;
  Lane l;
  if (!make_lane(a, l, G)) return;
  const int R = l.subs, dh = l.dh;
  const int64_t row = a.heads * a.head_dim;
  const int nslot = chunk_slots<C>(a);
  const int64_t first_query = l.p * a.slots + a.chunk_begin;
  const int64_t q_base = (l.b * a.queries + first_query) * row + l.h * a.head_dim;
  const scalar_t* k_rows = a.k + l.b * a.keys * row + l.h * a.head_dim;
  const scalar_t* v_rows = a.v + l.b * a.keys * row + l.h * a.head_dim;
  const acc_t* lse_rows = a.lse + (l.b * a.heads + l.h) * a.queries + first_query;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool add = a.chunk_begin > 0;

  // The slot rows' loads go out with the patch bounds' (they do not depend on them).
  Packed<scalar_t> qp[C], dop[C];
  acc_t dqf[C][kElems], lse2[C], delta[C];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    const int n = r < nslot ? dh : 0;  // rows past the chunk are zeros: they add nothing
    Packed<scalar_t> op;
    load_packed(qp[r], a.q + q_base + r * row, l.off, n, vec);
    load_packed(dop[r], a.grad_output + q_base + r * row, l.off, n, vec);
    load_packed(op, a.output + q_base + r * row, l.off, n, vec);
    lse2[r] = n > 0 ? lse_rows[r] * kLog2e<acc_t> : acc_t(0);
    delta[r] = group_sum(dot<acc_t>(dop[r], op), G);
#pragma unroll
    for (int e = 0; e < kElems; ++e) dqf[r][e] = 0;
  }
  const ByteRange range = encoder_range(a, l.bp);

  for (int64_t base = range.begin; base < range.end; base += U * R) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
      opaque(qp[r]);
      opaque(dop[r]);
    }
    Packed<scalar_t> kp[U], vp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * R + l.sub;
      const int n = i < range.end ? dh : 0;
      load_packed(kp[u], k_rows + i * row, l.off, n, vec);
      load_packed(vp[u], v_rows + i * row, l.off, n, vec);
    }
    acc_t prob[C][U], ds[C][U];
#pragma unroll
    for (int r = 0; r < C; ++r) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        prob[r][u] = ds[r][u] = 0;
        if (r >= nslot) continue;
        const acc_t s = group_sum(dot<acc_t>(qp[r], kp[u]), G);
        const acc_t dp = group_sum(dot<acc_t>(dop[r], vp[u]), G);
        if (base + u * R + l.sub >= range.end) continue;
        prob[r][u] = exp2_(s * qscale - lse2[r]);
        ds[r][u] = prob[r][u] * (dp - delta[r]);
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      acc_t kc[kElems];
      unpack(kc, kp[u]);
#pragma unroll
      for (int r = 0; r < C; ++r) {
#pragma unroll
        for (int e = 0; e < kElems; ++e) dqf[r][e] += ds[r][u] * kc[e];
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * R + l.sub;
      if (i >= range.end) continue;
      acc_t dkf[kElems] = {}, dvf[kElems] = {};
#pragma unroll
      for (int r = 0; r < C; ++r) {
        acc_t qc[kElems], doc[kElems];
        unpack(qc, qp[r]);
        unpack(doc, dop[r]);
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          dkf[e] += ds[r][u] * qc[e];
          dvf[e] += prob[r][u] * doc[e];
        }
      }
      store_chunk(a.dk + (l.b * a.keys + i) * row + l.h * a.head_dim, dkf, a.scale, l.off, dh, vec, add);
      store_chunk(a.dv + (l.b * a.keys + i) * row + l.h * a.head_dim, dvf, acc_t(1), l.off, dh, vec, add);
    }
  }
  for (int o = G * a.heads_per_warp; o < kWarp; o <<= 1) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) dqf[r][e] += __shfl_xor_sync(kFullMask, dqf[r][e], o);
    }
  }
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r < nslot && r % R == l.sub) store_chunk(a.dq + q_base + r * row, dqf[r], a.scale, l.off, dh, vec, false);
  }
}

// Decoder forward: the bytes that read patch p attend the chunk's slot keys, U bytes a step with
// their q loads in flight together; the slot rows stay in registers. Multi: the slots come in
// several chunks, and every chunk after the first merges into the earlier ones' output (without
// that path a one-chunk launch needs a quarter fewer registers).
template <typename scalar_t, int C, bool Multi, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(kGroup > 0 ? 7 : 6)) decoder_forward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int U = 4;
  const int G = kGroup > 0 ? kGroup : a.group;
  const bool vec = kGroup > 0 || a.vec;
  Lane l;
  if (!make_lane(a, l, G)) return;
  const int R = l.subs, dh = l.dh;
  const int64_t row = a.heads * a.head_dim;
  const int nslot = chunk_slots<C>(a);
  const int64_t k_base = (l.b * a.keys + l.p * a.slots + a.chunk_begin) * row + l.h * a.head_dim;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool merge = Multi && a.chunk_begin > 0;

  // The slot rows' loads go out with the byte range's (they do not depend on it), so a warp
  // waits for two memory round trips before its first score, not three.
  Packed<scalar_t> kp[C], vp[C];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    const int n = r < nslot ? dh : 0;
    load_packed(kp[r], a.k + k_base + r * row, l.off, n, vec);
    load_packed(vp[r], a.v + k_base + r * row, l.off, n, vec);
  }
  const ByteRange range = decoder_range(a, l.bp, l.p);
  if (range.begin >= range.end) return;
  const scalar_t* q_rows = a.q + l.b * a.queries * row + l.h * a.head_dim;
  scalar_t* out_rows = a.out + l.b * a.queries * row + l.h * a.head_dim;
  acc_t* lse_row = a.lse + (l.b * a.heads + l.h) * a.queries;

  for (int64_t base = range.begin; base < range.end; base += U * R) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
      opaque(kp[r]);
      opaque(vp[r]);
    }
    Packed<scalar_t> qp[U];
    acc_t prev_lse[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + u * R + l.sub;
      const bool valid = t < range.end && dh > 0;
      load_packed(qp[u], q_rows + t * row, l.off, valid ? dh : 0, vec);
      prev_lse[u] = merge && valid ? lse_row[t] : acc_t(0);
    }
    // Every lane of a row reads the earlier chunks' lse before its leader overwrites it.
    if (merge) __syncwarp();
    acc_t s[U][C];
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int r = 0; r < C; ++r) s[u][r] = r < nslot ? group_sum(dot<acc_t>(qp[u], kp[r]), G) * qscale : acc_t(0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + u * R + l.sub;
      if (t >= range.end) continue;
      const bool live = t >= range.live;
      if (merge && !live) continue;  // the first chunk already wrote 0 and -inf
      acc_t m = neg_inf<acc_t>();
#pragma unroll
      for (int r = 0; r < C; ++r) {
        if (r < nslot) m = max(m, s[u][r]);
      }
      acc_t o[kElems] = {}, denom = 0;
#pragma unroll
      for (int r = 0; r < C; ++r) {
        if (r >= nslot) continue;
        const acc_t weight = exp2_(s[u][r] - m);
        denom += weight;
        acc_t vc[kElems];
        unpack(vc, vp[r]);
#pragma unroll
        for (int e = 0; e < kElems; ++e) o[e] += weight * vc[e];
      }
      acc_t lse = (m + log2_(denom)) * kLn2<acc_t>;
      acc_t factor = acc_t(1) / denom;
      scalar_t* out_row = out_rows + t * row;
      if (!live) {
        factor = 0;
        lse = neg_inf<acc_t>();
      } else if (merge) {  // combine with the earlier chunks: a log-sum-exp weighted mean
        const acc_t top = max(prev_lse[u], lse);
        const acc_t total = top + log_(exp_(prev_lse[u] - top) + exp_(lse - top));
        acc_t prev[kElems];
        load_chunk(prev, out_row, l.off, dh, vec);
        const acc_t w_prev = exp_(prev_lse[u] - total), w_this = exp_(lse - total) / denom;
#pragma unroll
        for (int e = 0; e < kElems; ++e) o[e] = prev[e] * w_prev + o[e] * w_this;
        factor = 1;
        lse = total;
      }
      store_chunk(out_row, o, factor, l.off, dh, vec, false);
      if (l.leader) lse_row[t] = lse;
    }
  }
}

// Decoder backward: dq of the bytes that read patch p (summed over chunks), dk/dv of its slots.
// D_t = dO_t · O_t is summed as sum_r P_tr (dO_t · v_r) over all slots instead of read from the
// rounded output O: a slot's dk and dv add up the bytes of a whole (possibly long) patch. Multi:
// the slots come in several chunks, and D_t also visits the slots outside this one.
template <typename scalar_t, int C, bool Multi, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(5)) decoder_backward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int U = 1;
  const int G = kGroup > 0 ? kGroup : a.group;
  const bool vec = kGroup > 0 || a.vec;
  Lane l;
  if (!make_lane(a, l, G)) return;
  const int R = l.subs, dh = l.dh;
  const int64_t row = a.heads * a.head_dim;
  const int nslot = chunk_slots<C>(a);
  const int64_t patch_base = (l.b * a.keys + l.p * a.slots) * row + l.h * a.head_dim;
  const int64_t k_base = patch_base + a.chunk_begin * row;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool add = a.chunk_begin > 0;

  Packed<scalar_t> kp[C], vp[C];
  acc_t dkf[C][kElems], dvf[C][kElems];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    const int n = r < nslot ? dh : 0;
    load_packed(kp[r], a.k + k_base + r * row, l.off, n, vec);
    load_packed(vp[r], a.v + k_base + r * row, l.off, n, vec);
#pragma unroll
    for (int e = 0; e < kElems; ++e) dkf[r][e] = dvf[r][e] = 0;
  }
  const ByteRange range = decoder_range(a, l.bp, l.p);  // after the slot loads: they overlap
  const int64_t q_base = l.b * a.queries * row + l.h * a.head_dim;
  const acc_t* lse_row = a.lse + (l.b * a.heads + l.h) * a.queries;

  for (int64_t base = range.begin; base < range.end; base += U * R) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
      opaque(kp[r]);
      opaque(vp[r]);
    }
    Packed<scalar_t> qp[U], dop[U];
    acc_t lse2[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + u * R + l.sub;
      const int n = t < range.end ? dh : 0;
      load_packed(qp[u], a.q + q_base + t * row, l.off, n, vec);
      load_packed(dop[u], a.grad_output + q_base + t * row, l.off, n, vec);
      lse2[u] = n > 0 && t >= range.live ? lse_row[t] * kLog2e<acc_t> : acc_t(0);
    }
    acc_t prob[U][C], dp[U][C], delta[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + u * R + l.sub;
      const bool live = t < range.end && t >= range.live;
      delta[u] = 0;
#pragma unroll
      for (int r = 0; r < C; ++r) {
        prob[u][r] = dp[u][r] = 0;
        if (r >= nslot) continue;
        const acc_t s = group_sum(dot<acc_t>(qp[u], kp[r]), G);
        dp[u][r] = group_sum(dot<acc_t>(dop[u], vp[r]), G);
        if (live) prob[u][r] = exp2_(s * qscale - lse2[u]);
        delta[u] += prob[u][r] * dp[u][r];
      }
      if constexpr (Multi) {
        for (int64_t r = 0; r < a.slots; ++r) {
          if (r >= a.chunk_begin && r < a.chunk_begin + nslot) continue;
          Packed<scalar_t> ko, vo;
          load_packed(ko, a.k + patch_base + r * row, l.off, dh, vec);
          load_packed(vo, a.v + patch_base + r * row, l.off, dh, vec);
          const acc_t so = group_sum(dot<acc_t>(qp[u], ko), G);
          const acc_t dpo = group_sum(dot<acc_t>(dop[u], vo), G);
          if (live) delta[u] += exp2_(so * qscale - lse2[u]) * dpo;
        }
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t t = base + u * R + l.sub;
      if (t >= range.end || (add && t < range.live)) continue;
      acc_t dqf[kElems] = {}, qc[kElems], doc[kElems];
      unpack(qc, qp[u]);
      unpack(doc, dop[u]);
#pragma unroll
      for (int r = 0; r < C; ++r) {
        const acc_t ds = prob[u][r] * (dp[u][r] - delta[u]);  // 0 for rows that see no patch
        acc_t kc[kElems];
        unpack(kc, kp[r]);
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          dqf[e] += ds * kc[e];
          dkf[r][e] += ds * qc[e];
          dvf[r][e] += prob[u][r] * doc[e];
        }
      }
      store_chunk(a.dq + q_base + t * row, dqf, a.scale, l.off, dh, vec, add);
    }
  }
  for (int o = G * a.heads_per_warp; o < kWarp; o <<= 1) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        dkf[r][e] += __shfl_xor_sync(kFullMask, dkf[r][e], o);
        dvf[r][e] += __shfl_xor_sync(kFullMask, dvf[r][e], o);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r >= nslot || r % R != l.sub) continue;
    store_chunk(a.dk + k_base + r * row, dkf[r], a.scale, l.off, dh, vec, false);
    store_chunk(a.dv + k_base + r * row, dvf[r], acc_t(1), l.off, dh, vec, false);
  }
}
bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// sub_groups: how many sub-groups per head the lanes go to before neighbouring heads.
template <typename scalar_t>
Args<scalar_t> make_args(const AttentionShape& s, const at::Tensor& lengths, const at::Tensor& ends, double scale,
                         int sub_groups) {
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
  while (a.heads_per_warp * sub_groups < kWarp / a.group && a.heads_per_warp < s.heads) a.heads_per_warp <<= 1;
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

}  // namespace

std::tuple<at::Tensor, at::Tensor> patch_cross_attention(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& patch_lengths, int64_t slots,
                                                         const std::string& direction, double scale) {
  const char* op = "patch_cross_attention";
  const AttentionShape s = patch_attention::check_inputs(q, k, v, patch_lengths, slots, direction, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lengths = patch_lengths.contiguous();
  const auto ends = at::cumsum(lengths, 1);
  auto out = at::empty_like(q);
  auto lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(patch_attention::lse_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_cross_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t>(s, lengths, ends, scale, 1);
    a.q = q.const_data_ptr<scalar_t>();
    a.k = k.const_data_ptr<scalar_t>();
    a.v = v.const_data_ptr<scalar_t>();
    a.out = out.mutable_data_ptr<scalar_t>();
    a.lse = lse.mutable_data_ptr<acc_t>();
    a.vec = s.head_dim % kElems == 0 && aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && aligned16(a.out);
    const bool encoder = s.direction == Direction::kEncoder;
    launch_chunks(a, [&](auto c, auto multi, auto group, dim3 grid, dim3 block, cudaStream_t stream,
                         const Args<scalar_t>& args) {
      constexpr int C = decltype(c)::value, G = decltype(group)::value;
      if (encoder) {
        encoder_forward_kernel<scalar_t, C, G><<<grid, block, 0, stream>>>(args);
      } else {
        decoder_forward_kernel<scalar_t, C, decltype(multi)::value, G><<<grid, block, 0, stream>>>(args);
      }
    });
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_cross_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& output, const at::Tensor& lse, const at::Tensor& patch_lengths, int64_t slots,
    const std::string& direction, double scale) {
  const char* op = "patch_cross_attention_backward";
  const AttentionShape s = patch_attention::check_inputs(q, k, v, patch_lengths, slots, direction, op);
  patch_attention::check_backward_inputs(grad_output, output, lse, q, s, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lengths = patch_lengths.contiguous();
  const auto ends = at::cumsum(lengths, 1);
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_cross_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool encoder = s.direction == Direction::kEncoder;
    auto a = make_args<scalar_t>(s, lengths, ends, scale, encoder ? 1 : kDecoderBackwardSubGroups);
    a.q = q.const_data_ptr<scalar_t>();
    a.k = k.const_data_ptr<scalar_t>();
    a.v = v.const_data_ptr<scalar_t>();
    a.output = output.const_data_ptr<scalar_t>();
    a.grad_output = grad_output.const_data_ptr<scalar_t>();
    a.lse = const_cast<acc_t*>(lse.const_data_ptr<acc_t>());  // read only in the backward kernels
    a.dq = dq.mutable_data_ptr<scalar_t>();
    a.dk = dk.mutable_data_ptr<scalar_t>();
    a.dv = dv.mutable_data_ptr<scalar_t>();
    a.vec = s.head_dim % kElems == 0;
    for (const void* p : {static_cast<const void*>(a.q), static_cast<const void*>(a.k), static_cast<const void*>(a.v),
                          static_cast<const void*>(a.output), static_cast<const void*>(a.grad_output),
                          static_cast<const void*>(a.dq), static_cast<const void*>(a.dk),
                          static_cast<const void*>(a.dv)}) {
      a.vec = a.vec && aligned16(p);
    }
    launch_chunks(a, [&](auto c, auto multi, auto group, dim3 grid, dim3 block, cudaStream_t stream,
                         const Args<scalar_t>& args) {
      constexpr int C = decltype(c)::value, G = decltype(group)::value;
      if (encoder) {
        encoder_backward_kernel<scalar_t, C, G><<<grid, block, 0, stream>>>(args);
      } else {
        decoder_backward_kernel<scalar_t, C, decltype(multi)::value, G><<<grid, block, 0, stream>>>(args);
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("patch_cross_attention", &blt_ext::cuda::patch_cross_attention);
  m.impl("patch_cross_attention_backward", &blt_ext::cuda::patch_cross_attention_backward);
}
