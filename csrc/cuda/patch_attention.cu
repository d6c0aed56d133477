// Patch cross-attention on CUDA (BLT_SPEC.md d "Cross-attention", f "the shift").
//
// As on the CPU, both directions are a block-diagonal attention: patch p pairs its `slots` rows
// with one contiguous byte range (encoder: the bytes of p, which its slot rows attend; decoder:
// the bytes t with d(t) = p, which attend its slot rows). Every kernel gives one warp to one
// (b, p, head): the slot rows live in registers and the warp streams the byte range, so each
// output row and each gradient row is written by exactly one warp (no atomics, deterministic).
//
// Within a warp, a group of G lanes (G = next power of two >= Dh / 8) holds one head row, 8
// elements per lane (16-byte loads for 16-bit types); the 32 / G groups of a warp take
// different bytes of the range and are merged at the end (online softmax / sums).
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

template <typename T>
struct AccType {
  using type = float;
};
template <>
struct AccType<double> {
  using type = double;
};

template <typename scalar_t>
struct Args {
  using acc_t = typename AccType<scalar_t>::type;
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
  int group;  // lanes per head row
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

// This lane's 8 elements [off, off + 8) of a head row, zero past Dh.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void load_chunk(acc_t (&x)[kElems], const scalar_t* row, int off, int dh, bool vec) {
  if (vec) {
    if (off < dh) {
      constexpr int kVecs = kElems * sizeof(scalar_t) / 16;
      alignas(16) scalar_t vals[kElems];
#pragma unroll
      for (int i = 0; i < kVecs; ++i) {
        reinterpret_cast<uint4*>(vals)[i] = __ldg(reinterpret_cast<const uint4*>(row + off) + i);
      }
#pragma unroll
      for (int i = 0; i < kElems; ++i) x[i] = static_cast<acc_t>(vals[i]);
    } else {
#pragma unroll
      for (int i = 0; i < kElems; ++i) x[i] = acc_t(0);
    }
  } else {
#pragma unroll
    for (int i = 0; i < kElems; ++i) x[i] = off + i < dh ? static_cast<acc_t>(row[off + i]) : acc_t(0);
  }
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

// Sum over the `group` lanes of a head row; every lane of the warp must call it.
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

// Where this lane sits: warp = (b, p, h), groups of `group` lanes, 8 elements per lane.
struct Lane {
  int64_t b, p, h, bp;
  int lane, sub, rows_per_warp, off;
  bool leader;  // first lane of its group: writes the group's scalars
};

// The host checks B * P * H < 2^31, so the warp coordinates use 32-bit division.
template <typename scalar_t>
__device__ __forceinline__ bool make_lane(const Args<scalar_t>& a, Lane& l) {
  const uint32_t warp = blockIdx.x * kWarpsPerBlock + threadIdx.x / kWarp;
  if (warp >= static_cast<uint32_t>(a.batch * a.patches * a.heads)) return false;
  const uint32_t heads = static_cast<uint32_t>(a.heads), patches = static_cast<uint32_t>(a.patches);
  l.h = warp % heads;
  l.bp = warp / heads;
  l.b = static_cast<uint32_t>(l.bp) / patches;
  l.p = static_cast<uint32_t>(l.bp) % patches;
  l.lane = threadIdx.x % kWarp;
  l.sub = l.lane / a.group;
  l.rows_per_warp = kWarp / a.group;
  l.off = (l.lane % a.group) * kElems;
  l.leader = l.lane % a.group == 0;
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
  const int64_t length = a.lengths[bp];
  if (length <= 0) return {0, 0, 0};
  const int64_t* ends = a.ends + (bp - p);
  const int64_t end = ends[p];
  int64_t lo = p + 1, hi = a.patches;  // first q > p with ends[q] > end (ends are non-decreasing)
  if (lo < hi && ends[lo] > end) {
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

// Encoder forward: the chunk's slot queries of patch p attend the patch's bytes.
template <typename scalar_t, int C>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) encoder_forward_kernel(const Args<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  Lane l;
  if (!make_lane(a, l)) return;
  const int G = a.group, R = l.rows_per_warp, dh = static_cast<int>(a.head_dim);
  const int64_t row = a.heads * a.head_dim;
  const ByteRange range = encoder_range(a, l.bp);
  const int nslot = chunk_slots<C>(a);
  const int64_t first_query = l.p * a.slots + a.chunk_begin;
  const scalar_t* q_rows = a.q + (l.b * a.queries + first_query) * row + l.h * a.head_dim;
  const scalar_t* k_rows = a.k + l.b * a.keys * row + l.h * a.head_dim;
  const scalar_t* v_rows = a.v + l.b * a.keys * row + l.h * a.head_dim;
  const acc_t qscale = a.scale * kLog2e<acc_t>;  // scores in log2 units: exp2 is one instruction

  acc_t qf[C][kElems], acc[C][kElems], m[C], denom[C];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r < nslot) load_chunk(qf[r], q_rows + r * row, l.off, dh, a.vec);
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      qf[r][e] = r < nslot ? qf[r][e] * qscale : acc_t(0);
      acc[r][e] = 0;
    }
    m[r] = neg_inf<acc_t>();
    denom[r] = 0;
  }

  acc_t kf[kElems], vf[kElems];
  int64_t i = range.begin + l.sub;
  if (i < range.end) {
    load_chunk(kf, k_rows + i * row, l.off, dh, a.vec);
    load_chunk(vf, v_rows + i * row, l.off, dh, a.vec);
  }
  for (int64_t base = range.begin; base < range.end; base += R, i += R) {
    const bool valid = i < range.end;
    acc_t kc[kElems], vc[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) kc[e] = kf[e], vc[e] = vf[e];
    if (i + R < range.end) {  // prefetch the next byte while this one is reduced
      load_chunk(kf, k_rows + (i + R) * row, l.off, dh, a.vec);
      load_chunk(vf, v_rows + (i + R) * row, l.off, dh, a.vec);
    }
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= nslot) continue;
      const acc_t s = group_sum(dot(qf[r], kc), G);
      if (!valid) continue;
      const acc_t m_new = max(m[r], s);
      const acc_t alpha = exp2_(m[r] - m_new), weight = exp2_(s - m_new);
      denom[r] = denom[r] * alpha + weight;
#pragma unroll
      for (int e = 0; e < kElems; ++e) acc[r][e] = acc[r][e] * alpha + weight * vc[e];
      m[r] = m_new;
    }
  }
  // Merge the groups' partial softmax states (butterfly: every group ends with the total).
  for (int o = G; o < kWarp; o <<= 1) {
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
    store_chunk(out_rows + r * row, acc[r], any ? acc_t(1) / denom[r] : acc_t(0), l.off, dh, a.vec, false);
    if (l.leader) lse_rows[r] = any ? (m[r] + log2_(denom[r])) * kLn2<acc_t> : neg_inf<acc_t>();
  }
}

// Encoder backward: dq of the chunk's slot rows, dk/dv of the patch's bytes (summed over chunks).
template <typename scalar_t, int C>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) encoder_backward_kernel(const Args<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  Lane l;
  if (!make_lane(a, l)) return;
  const int G = a.group, R = l.rows_per_warp, dh = static_cast<int>(a.head_dim);
  const int64_t row = a.heads * a.head_dim;
  const ByteRange range = encoder_range(a, l.bp);
  const int nslot = chunk_slots<C>(a);
  const int64_t first_query = l.p * a.slots + a.chunk_begin;
  const int64_t q_base = (l.b * a.queries + first_query) * row + l.h * a.head_dim;
  const scalar_t* k_rows = a.k + l.b * a.keys * row + l.h * a.head_dim;
  const scalar_t* v_rows = a.v + l.b * a.keys * row + l.h * a.head_dim;
  const acc_t* lse_rows = a.lse + (l.b * a.heads + l.h) * a.queries + first_query;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool add = a.chunk_begin > 0;

  acc_t qf[C][kElems], dof[C][kElems], dqf[C][kElems], lse2[C], delta[C];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    acc_t of[kElems];
    if (r < nslot) {
      load_chunk(qf[r], a.q + q_base + r * row, l.off, dh, a.vec);
      load_chunk(dof[r], a.grad_output + q_base + r * row, l.off, dh, a.vec);
      load_chunk(of, a.output + q_base + r * row, l.off, dh, a.vec);
      lse2[r] = lse_rows[r] * kLog2e<acc_t>;
      delta[r] = group_sum(dot(dof[r], of), G);
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) dqf[r][e] = 0;
  }

  acc_t kf[kElems], vf[kElems];
  int64_t i = range.begin + l.sub;
  if (i < range.end) {
    load_chunk(kf, k_rows + i * row, l.off, dh, a.vec);
    load_chunk(vf, v_rows + i * row, l.off, dh, a.vec);
  }
  for (int64_t base = range.begin; base < range.end; base += R, i += R) {
    const bool valid = i < range.end;
    acc_t kc[kElems], vc[kElems], dkf[kElems], dvf[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) kc[e] = kf[e], vc[e] = vf[e], dkf[e] = 0, dvf[e] = 0;
    if (i + R < range.end) {
      load_chunk(kf, k_rows + (i + R) * row, l.off, dh, a.vec);
      load_chunk(vf, v_rows + (i + R) * row, l.off, dh, a.vec);
    }
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= nslot) continue;
      const acc_t s = group_sum(dot(qf[r], kc), G);
      const acc_t dp = group_sum(dot(dof[r], vc), G);
      if (!valid) continue;
      const acc_t prob = exp2_(s * qscale - lse2[r]);
      const acc_t ds = prob * (dp - delta[r]);
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        dvf[e] += prob * dof[r][e];
        dkf[e] += ds * qf[r][e];
        dqf[r][e] += ds * kc[e];
      }
    }
    if (valid) {
      store_chunk(a.dk + (l.b * a.keys + i) * row + l.h * a.head_dim, dkf, a.scale, l.off, dh, a.vec, add);
      store_chunk(a.dv + (l.b * a.keys + i) * row + l.h * a.head_dim, dvf, acc_t(1), l.off, dh, a.vec, add);
    }
  }
  for (int o = G; o < kWarp; o <<= 1) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) dqf[r][e] += __shfl_xor_sync(kFullMask, dqf[r][e], o);
    }
  }
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r < nslot && r % R == l.sub) store_chunk(a.dq + q_base + r * row, dqf[r], a.scale, l.off, dh, a.vec, false);
  }
}

// Decoder forward: the bytes that read patch p attend the chunk's slot keys.
template <typename scalar_t, int C>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) decoder_forward_kernel(const Args<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  Lane l;
  if (!make_lane(a, l)) return;
  const ByteRange range = decoder_range(a, l.bp, l.p);
  if (range.begin >= range.end) return;
  const int G = a.group, R = l.rows_per_warp, dh = static_cast<int>(a.head_dim);
  const int64_t row = a.heads * a.head_dim;
  const int nslot = chunk_slots<C>(a);
  const int64_t k_base = (l.b * a.keys + l.p * a.slots + a.chunk_begin) * row + l.h * a.head_dim;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool merge = a.chunk_begin > 0;

  acc_t kf[C][kElems], vf[C][kElems];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r < nslot) {
      load_chunk(kf[r], a.k + k_base + r * row, l.off, dh, a.vec);
      load_chunk(vf[r], a.v + k_base + r * row, l.off, dh, a.vec);
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) kf[r][e] = r < nslot ? kf[r][e] * qscale : acc_t(0);
  }
  const scalar_t* q_rows = a.q + l.b * a.queries * row + l.h * a.head_dim;
  scalar_t* out_rows = a.out + l.b * a.queries * row + l.h * a.head_dim;
  acc_t* lse_row = a.lse + (l.b * a.heads + l.h) * a.queries;

  acc_t qn[kElems];
  int64_t t = range.begin + l.sub;
  if (t < range.end) load_chunk(qn, q_rows + t * row, l.off, dh, a.vec);
  for (int64_t base = range.begin; base < range.end; base += R, t += R) {
    acc_t qc[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) qc[e] = qn[e];
    if (t + R < range.end) load_chunk(qn, q_rows + (t + R) * row, l.off, dh, a.vec);
    // Every lane of a group reads the earlier chunks' lse before its leader overwrites it.
    const acc_t prev_lse = merge && t < range.end ? lse_row[t] : acc_t(0);
    if (merge) __syncwarp();
    acc_t s[C];
    acc_t m = neg_inf<acc_t>();
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= nslot) continue;
      s[r] = group_sum(dot(qc, kf[r]), G);
      m = max(m, s[r]);
    }
    if (t >= range.end) continue;
    const bool live = t >= range.live;
    if (merge && !live) continue;  // the first chunk already wrote 0 and -inf
    acc_t o[kElems] = {}, denom = 0;
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= nslot) continue;
      const acc_t weight = exp2_(s[r] - m);
      denom += weight;
#pragma unroll
      for (int e = 0; e < kElems; ++e) o[e] += weight * vf[r][e];
    }
    acc_t lse = (m + log2_(denom)) * kLn2<acc_t>;
    acc_t factor = acc_t(1) / denom;
    scalar_t* out_row = out_rows + t * row;
    if (!live) {
      factor = 0;
      lse = neg_inf<acc_t>();
    } else if (merge) {  // combine with the earlier chunks: a log-sum-exp weighted mean
      const acc_t top = max(prev_lse, lse);
      const acc_t total = top + log_(exp_(prev_lse - top) + exp_(lse - top));
      acc_t prev[kElems];
      load_chunk(prev, out_row, l.off, dh, a.vec);
      const acc_t w_prev = exp_(prev_lse - total), w_this = exp_(lse - total) / denom;
#pragma unroll
      for (int e = 0; e < kElems; ++e) o[e] = prev[e] * w_prev + o[e] * w_this;
      factor = 1;
      lse = total;
    }
    store_chunk(out_row, o, factor, l.off, dh, a.vec, false);
    if (l.leader) lse_row[t] = lse;
  }
}

// Decoder backward: dq of the bytes that read patch p (summed over chunks), dk/dv of its slots.
// D_t = dO_t · O_t is summed as sum_r P_tr (dO_t · v_r) over all slots instead of read from the
// rounded output O: a slot's dk and dv add up the bytes of a whole (possibly long) patch.
template <typename scalar_t, int C>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock) decoder_backward_kernel(const Args<scalar_t> a) {
  using acc_t = typename AccType<scalar_t>::type;
  Lane l;
  if (!make_lane(a, l)) return;
  const ByteRange range = decoder_range(a, l.bp, l.p);
  const int G = a.group, R = l.rows_per_warp, dh = static_cast<int>(a.head_dim);
  const int64_t row = a.heads * a.head_dim;
  const int nslot = chunk_slots<C>(a);
  const int64_t patch_base = (l.b * a.keys + l.p * a.slots) * row + l.h * a.head_dim;
  const int64_t k_base = patch_base + a.chunk_begin * row;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool add = a.chunk_begin > 0;

  acc_t kf[C][kElems], vf[C][kElems], dkf[C][kElems], dvf[C][kElems];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r < nslot) {
      load_chunk(kf[r], a.k + k_base + r * row, l.off, dh, a.vec);
      load_chunk(vf[r], a.v + k_base + r * row, l.off, dh, a.vec);
    }
#pragma unroll
    for (int e = 0; e < kElems; ++e) {
      if (r >= nslot) kf[r][e] = vf[r][e] = 0;
      dkf[r][e] = dvf[r][e] = 0;
    }
  }
  const int64_t q_base = l.b * a.queries * row + l.h * a.head_dim;
  const acc_t* lse_row = a.lse + (l.b * a.heads + l.h) * a.queries;

  acc_t qn[kElems], don[kElems], lse_next = 0;
  int64_t t = range.begin + l.sub;
  if (t < range.end) {
    load_chunk(qn, a.q + q_base + t * row, l.off, dh, a.vec);
    load_chunk(don, a.grad_output + q_base + t * row, l.off, dh, a.vec);
    lse_next = lse_row[t];
  }
  for (int64_t base = range.begin; base < range.end; base += R, t += R) {
    const bool valid = t < range.end, live = valid && t >= range.live;
    acc_t qc[kElems], doc[kElems];
#pragma unroll
    for (int e = 0; e < kElems; ++e) qc[e] = qn[e], doc[e] = don[e];
    const acc_t lse2 = live ? lse_next * kLog2e<acc_t> : acc_t(0);
    if (t + R < range.end) {
      load_chunk(qn, a.q + q_base + (t + R) * row, l.off, dh, a.vec);
      load_chunk(don, a.grad_output + q_base + (t + R) * row, l.off, dh, a.vec);
      lse_next = lse_row[t + R];
    }
    acc_t prob[C], dp[C], delta = 0;
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= nslot) {
        prob[r] = dp[r] = 0;
        continue;
      }
      const acc_t s = group_sum(dot(qc, kf[r]), G);
      dp[r] = group_sum(dot(doc, vf[r]), G);
      prob[r] = live ? exp2_(s * qscale - lse2) : acc_t(0);
      delta += prob[r] * dp[r];
    }
    // Slots outside this chunk still count in D_t (only when slots > kMaxChunk).
    for (int64_t r = 0; r < a.slots; ++r) {
      if (r >= a.chunk_begin && r < a.chunk_begin + nslot) continue;
      acc_t ko[kElems], vo[kElems];
      load_chunk(ko, a.k + patch_base + r * row, l.off, dh, a.vec);
      load_chunk(vo, a.v + patch_base + r * row, l.off, dh, a.vec);
      const acc_t s = group_sum(dot(qc, ko), G);
      const acc_t dpo = group_sum(dot(doc, vo), G);
      if (live) delta += exp2_(s * qscale - lse2) * dpo;
    }
    if (!valid || (add && !live)) continue;
    acc_t dqf[kElems] = {};
#pragma unroll
    for (int r = 0; r < C; ++r) {
      const acc_t ds = prob[r] * (dp[r] - delta);  // 0 for rows that see no patch
#pragma unroll
      for (int e = 0; e < kElems; ++e) {
        dqf[e] += ds * kf[r][e];
        dkf[r][e] += ds * qc[e];
        dvf[r][e] += prob[r] * doc[e];
      }
    }
    store_chunk(a.dq + q_base + t * row, dqf, a.scale, l.off, dh, a.vec, add);
  }
  for (int o = G; o < kWarp; o <<= 1) {
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
    store_chunk(a.dk + k_base + r * row, dkf[r], a.scale, l.off, dh, a.vec, false);
    store_chunk(a.dv + k_base + r * row, dvf[r], acc_t(1), l.off, dh, a.vec, false);
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

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
  return a;
}

// Runs kernel<C> over every (b, p, h) warp, once per chunk of at most kMaxChunk slots.
template <typename scalar_t, typename Launch>
void launch_chunks(Args<scalar_t> a, Launch launch) {
  const int64_t warps = a.batch * a.patches * a.heads;
  if (warps == 0) return;
  TORCH_CHECK(warps < (int64_t{1} << 31), "blt_ext.patch_cross_attention: B * P * H must be below 2^31, got ",
              warps);
  const dim3 grid(static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock));
  const dim3 block(kWarp * kWarpsPerBlock);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t chunk = a.slots <= 1 ? 1 : (a.slots <= 2 ? 2 : kMaxChunk);
  for (a.chunk_begin = 0; a.chunk_begin < a.slots; a.chunk_begin += chunk) {
    if (chunk == 1) {
      launch(std::integral_constant<int, 1>{}, grid, block, stream, a);
    } else if (chunk == 2) {
      launch(std::integral_constant<int, 2>{}, grid, block, stream, a);
    } else {
      launch(std::integral_constant<int, kMaxChunk>{}, grid, block, stream, a);
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
    using acc_t = typename AccType<scalar_t>::type;
    auto a = make_args<scalar_t>(s, lengths, ends, scale);
    a.q = q.const_data_ptr<scalar_t>();
    a.k = k.const_data_ptr<scalar_t>();
    a.v = v.const_data_ptr<scalar_t>();
    a.out = out.mutable_data_ptr<scalar_t>();
    a.lse = lse.mutable_data_ptr<acc_t>();
    a.vec = s.head_dim % kElems == 0 && aligned16(a.q) && aligned16(a.k) && aligned16(a.v) && aligned16(a.out);
    const bool encoder = s.direction == Direction::kEncoder;
    launch_chunks(a, [&](auto c, dim3 grid, dim3 block, cudaStream_t stream, const Args<scalar_t>& args) {
      constexpr int C = decltype(c)::value;
      if (encoder) {
        encoder_forward_kernel<scalar_t, C><<<grid, block, 0, stream>>>(args);
      } else {
        decoder_forward_kernel<scalar_t, C><<<grid, block, 0, stream>>>(args);
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
    using acc_t = typename AccType<scalar_t>::type;
    auto a = make_args<scalar_t>(s, lengths, ends, scale);
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
    const bool encoder = s.direction == Direction::kEncoder;
    launch_chunks(a, [&](auto c, dim3 grid, dim3 block, cudaStream_t stream, const Args<scalar_t>& args) {
      constexpr int C = decltype(c)::value;
      if (encoder) {
        encoder_backward_kernel<scalar_t, C><<<grid, block, 0, stream>>>(args);
      } else {
        decoder_backward_kernel<scalar_t, C><<<grid, block, 0, stream>>>(args);
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
