// Patch cross-attention on CUDA, forward: the encoder and decoder forward kernels and the op that
// launches them (the design: patch_attention.cuh).
#include <ATen/Dispatch.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "blt_ext.h"
#include "common/checks.h"
#include "patch_attention.cuh"

namespace blt_ext::cuda {

using namespace patch_attention_kernels;

namespace {

// Encoder forward: the chunk's slot queries of patch p attend the patch's bytes, U bytes a step:
// their loads are in flight together and one online-softmax rescale covers them (a typical
// 1-8 byte patch takes one or two steps).
template <typename scalar_t, int C, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(5)) encoder_forward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int U = C <= 2 ? 4 : 2;
  Lane l;
  if (!make_lane<kGroup, C>(a, l)) return;
  const int64_t first_query = l.p * a.slots + a.chunk_begin;
  const scalar_t* q_rows = a.q + (l.b * a.queries + first_query) * l.row + l.h * a.head_dim;
  const scalar_t* k_rows = a.k + l.b * a.keys * l.row + l.h * a.head_dim;
  const scalar_t* v_rows = a.v + l.b * a.keys * l.row + l.h * a.head_dim;
  const acc_t qscale = a.scale * kLog2e<acc_t>;  // scores in log2 units: exp2 is one instruction

  // The slot rows' loads go out with the patch bounds' (they do not depend on them), so a warp
  // waits for two memory round trips before its first byte's score, not three.
  Packed<scalar_t> qp[C];
#pragma unroll
  for (int r = 0; r < C; ++r) load_packed(qp[r], q_rows + r * l.row, l.off, r < l.nslot ? l.dh : 0, l.vec);
  const ByteRange range = encoder_range(a, l.bp);
  acc_t acc[C][kElems], m[C], denom[C];
#pragma unroll
  for (int r = 0; r < C; ++r) {
#pragma unroll
    for (int e = 0; e < kElems; ++e) acc[r][e] = 0;
    m[r] = neg_inf<acc_t>();
    denom[r] = 0;
  }

  for (int64_t base = range.begin; base < range.end; base += U * l.subs) {
#pragma unroll
    for (int r = 0; r < C; ++r) opaque(qp[r]);
    Packed<scalar_t> kp[U], vp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * l.subs + l.sub;
      const int n = i < range.end ? l.dh : 0;  // past the patch: zeros, masked below
      load_packed(kp[u], k_rows + i * l.row, l.off, n, l.vec);
      load_packed(vp[u], v_rows + i * l.row, l.off, n, l.vec);
    }
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= l.nslot) continue;
      acc_t s[U], m_new = m[r];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u] = group_sum(dot<acc_t>(qp[r], kp[u]), l.group) * qscale;
        if (base + u * l.subs + l.sub >= range.end) s[u] = neg_inf<acc_t>();
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
  for (int o = l.group * a.heads_per_warp; o < kWarp; o <<= 1) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
      if (r >= l.nslot) continue;
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
  scalar_t* out_rows = a.out + (l.b * a.queries + first_query) * l.row + l.h * a.head_dim;
  acc_t* lse_rows = a.lse + (l.b * a.heads + l.h) * a.queries + first_query;
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r >= l.nslot || r % l.subs != l.sub) continue;
    const bool any = denom[r] > 0;  // an empty patch: out 0, lse -inf
    store_chunk(out_rows + r * l.row, acc[r], any ? reciprocal_(denom[r]) : acc_t(0), l.off, l.dh, l.vec, false);
    if (l.leader) lse_rows[r] = any ? (m[r] + log2_(denom[r])) * kLn2<acc_t> : neg_inf<acc_t>();
  }
}

// Decoder forward: the bytes that read patch p attend the chunk's slot keys. A step stages the q
// rows of up to S bytes in shared memory (all copies in flight at once), then takes the bytes one by
// one; the slot rows stay in registers, widened once. Multi: the slots come in several chunks, and
// every chunk after the first merges into the earlier ones' output.
//
// Blocks per SM: 8 (64 registers) on the bf16 fast path, 7 on fp16's, which widens through
// conversions that take more registers (it spills at 64); 8 against 7 made the bf16 benchmark
// 67.7 against 69.2 us on the H200.
template <typename scalar_t, int kGroup>
constexpr int decoder_forward_blocks() {
  return kGroup == 0 ? 6 : (std::is_same_v<scalar_t, c10::BFloat16> ? 8 : 7);
}

template <typename scalar_t, int C, bool Multi, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(decoder_forward_blocks<scalar_t, kGroup>()))
    decoder_forward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int S = staged_steps<scalar_t>();
  __shared__ Packed<scalar_t> staged_q[kWarpsPerBlock][S][kWarp];
  Lane l;
  if (!make_lane<kGroup, C>(a, l)) return;
  // Below kMaxChunk, launch_chunks gives C slots as one chunk of exactly C, so the slot loops need
  // no bounds: 20 fewer instructions a byte here (the encoder kernels keep them: without, they spill).
  const int nslot = C < kMaxChunk ? C : l.nslot;
  const int64_t k_base = (l.b * a.keys + l.p * a.slots + a.chunk_begin) * l.row + l.h * a.head_dim;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool merge = Multi && a.chunk_begin > 0;

  // The slot rows' loads go out with the byte range's (they do not depend on it), so a warp
  // waits for two memory round trips before its first score, not three.
  acc_t kc[C][kElems], vc[C][kElems];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    const int n = r < nslot ? l.dh : 0;
    load_chunk(kc[r], a.k + k_base + r * l.row, l.off, n, l.vec);
    load_chunk(vc[r], a.v + k_base + r * l.row, l.off, n, l.vec);
  }
  const ByteRange range = decoder_range(a, l.bp, l.p);
  if (range.begin >= range.end) return;
  const LaneBytes bytes = lane_bytes(range, l);
  const int64_t stride = l.subs * l.row;  // elements from one of this lane's bytes to its next
  const int64_t first_row = (l.b * a.queries + bytes.first) * l.row + l.h * a.head_dim;
  acc_t* first_lse = a.lse + (l.b * a.heads + l.h) * a.queries + bytes.first;
  Packed<scalar_t>* const q_slots = staged_q[threadIdx.x / kWarp][0] + l.lane;  // byte j: [j * kWarp]

  for (int step = 0; step < bytes.count; step += S) {
    const int steps = min(S, bytes.count - step);
    {
      const scalar_t* q_row = a.q + first_row + step * stride;
#pragma unroll 1
      for (int j = 0; j < steps; ++j, q_row += stride) {
        stage_row(q_slots[j * kWarp], q_row, l.off, step + j < bytes.valid ? l.dh : 0, l.vec);
      }
    }
    wait_copies();
#pragma unroll 1
    for (int j = 0; j < steps; ++j) {
      const int byte = step + j;
      scalar_t* out_row = a.out + first_row + byte * stride;
      acc_t* lse = first_lse + (byte << l.subs_shift);
      const bool valid = byte < bytes.valid && l.dh > 0;
      const acc_t prev_lse = merge && valid ? *lse : acc_t(0);
      // Every lane of a row reads the earlier chunks' lse before its leader overwrites it.
      if (merge) __syncwarp();
      acc_t qc[kElems], s[C];
      unpack(qc, q_slots[j * kWarp]);
      acc_t m = neg_inf<acc_t>();
#pragma unroll
      for (int r = 0; r < C; ++r) {
        s[r] = group_sum(dot(qc, kc[r]), l.group) * qscale;
        if (r < nslot) m = max(m, s[r]);
      }
      if (byte >= bytes.valid) continue;
      const bool live = byte >= bytes.live_from;
      if (merge && !live) continue;  // the first chunk already wrote 0 and -inf
      acc_t o[kElems] = {}, denom = 0;
#pragma unroll
      for (int r = 0; r < C; ++r) {
        if (r >= nslot) continue;
        const acc_t weight = exp2_(s[r] - m);
        denom += weight;
#pragma unroll
        for (int e = 0; e < kElems; ++e) o[e] += weight * vc[r][e];
      }
      acc_t row_lse = (m + log2_(denom)) * kLn2<acc_t>;
      acc_t factor = reciprocal_(denom);
      if (!live) {
        factor = 0;
        row_lse = neg_inf<acc_t>();
      } else if (merge) {  // combine with the earlier chunks: a log-sum-exp weighted mean
        const acc_t top = max(prev_lse, row_lse);
        const acc_t total = top + log_(exp_(prev_lse - top) + exp_(row_lse - top));
        acc_t prev[kElems];
        load_chunk(prev, out_row, l.off, l.dh, l.vec);
        const acc_t w_prev = exp_(prev_lse - total), w_this = exp_(row_lse - total) / denom;
#pragma unroll
        for (int e = 0; e < kElems; ++e) o[e] = prev[e] * w_prev + o[e] * w_this;
        factor = 1;
        row_lse = total;
      }
      store_chunk(out_row, o, factor, l.off, l.dh, l.vec, false);
      if (l.leader) *lse = row_lse;
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> patch_cross_attention(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& patch_lengths, int64_t slots,
                                                         const std::string& direction, double scale,
                                                         const std::optional<at::Tensor>& given_ends) {
  const char* op = "patch_cross_attention";
  const AttentionShape s = patch_attention::check_inputs(q, k, v, patch_lengths, slots, direction, op);
  if (given_ends) check_given_patch_ends(*given_ends, patch_lengths, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lengths = patch_lengths.contiguous();
  const auto ends = given_ends ? given_ends->contiguous() : patch_ends(lengths);
  auto out = at::empty_like(q);
  auto lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(patch_attention::lse_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_cross_attention", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    auto a = make_args<scalar_t>(s, lengths, ends, scale);
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
        launch_chained(encoder_forward_kernel<scalar_t, C, G>, grid, block, stream, args);
      } else {
        launch_chained(decoder_forward_kernel<scalar_t, C, decltype(multi)::value, G>, grid, block, stream, args);
      }
    });
  });
  return {out, lse};
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("patch_cross_attention", &blt_ext::cuda::patch_cross_attention);
}
