// Patch cross-attention on CUDA, backward: the encoder and decoder backward kernels and the op that
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

// Encoder backward: dq of the chunk's slot rows, dk/dv of the patch's bytes (summed over chunks),
// U bytes per sub-group a step with their loads in flight together.
template <typename scalar_t, int C, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(5)) encoder_backward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int U = C <= 2 ? 2 : 1;
  Lane l;
  if (!make_lane<kGroup, C>(a, l)) return;
  const int64_t first_query = l.p * a.slots + a.chunk_begin;
  const int64_t q_base = (l.b * a.queries + first_query) * l.row + l.h * a.head_dim;
  const scalar_t* k_rows = a.k + l.b * a.keys * l.row + l.h * a.head_dim;
  const scalar_t* v_rows = a.v + l.b * a.keys * l.row + l.h * a.head_dim;
  const acc_t* lse_rows = a.lse + (l.b * a.heads + l.h) * a.queries + first_query;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool add = a.chunk_begin > 0;

  // The slot rows' loads go out with the patch bounds' (they do not depend on them).
  Packed<scalar_t> qp[C], dop[C];
  acc_t dqf[C][kElems], lse2[C], delta[C];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    const int n = r < l.nslot ? l.dh : 0;  // rows past the chunk are zeros: they add nothing
    Packed<scalar_t> op;
    load_packed(qp[r], a.q + q_base + r * l.row, l.off, n, l.vec);
    load_packed(dop[r], a.grad_output + q_base + r * l.row, l.off, n, l.vec);
    load_packed(op, a.output + q_base + r * l.row, l.off, n, l.vec);
    lse2[r] = n > 0 ? lse_rows[r] * kLog2e<acc_t> : acc_t(0);
    delta[r] = group_sum(dot<acc_t>(dop[r], op), l.group);
#pragma unroll
    for (int e = 0; e < kElems; ++e) dqf[r][e] = 0;
  }
  const ByteRange range = encoder_range(a, l.bp);

  for (int64_t base = range.begin; base < range.end; base += U * l.subs) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
      opaque(qp[r]);
      opaque(dop[r]);
    }
    Packed<scalar_t> kp[U], vp[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t i = base + u * l.subs + l.sub;
      const int n = i < range.end ? l.dh : 0;
      load_packed(kp[u], k_rows + i * l.row, l.off, n, l.vec);
      load_packed(vp[u], v_rows + i * l.row, l.off, n, l.vec);
    }
    acc_t prob[C][U], ds[C][U];
#pragma unroll
    for (int r = 0; r < C; ++r) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        prob[r][u] = ds[r][u] = 0;
        if (r >= l.nslot) continue;
        const acc_t s = group_sum(dot<acc_t>(qp[r], kp[u]), l.group);
        const acc_t dp = group_sum(dot<acc_t>(dop[r], vp[u]), l.group);
        if (base + u * l.subs + l.sub >= range.end) continue;
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
      const int64_t i = base + u * l.subs + l.sub;
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
      store_chunk(a.dk + (l.b * a.keys + i) * l.row + l.h * a.head_dim, dkf, a.scale, l.off, l.dh, l.vec, add);
      store_chunk(a.dv + (l.b * a.keys + i) * l.row + l.h * a.head_dim, dvf, acc_t(1), l.off, l.dh, l.vec, add);
    }
  }
  for (int o = l.group * a.heads_per_warp; o < kWarp; o <<= 1) {
#pragma unroll
    for (int r = 0; r < C; ++r) {
#pragma unroll
      for (int e = 0; e < kElems; ++e) dqf[r][e] += __shfl_xor_sync(kFullMask, dqf[r][e], o);
    }
  }
#pragma unroll
  for (int r = 0; r < C; ++r) {
    if (r < l.nslot && r % l.subs == l.sub) {
      store_chunk(a.dq + q_base + r * l.row, dqf[r], a.scale, l.off, l.dh, l.vec, false);
    }
  }
}

// Decoder backward: dq of the bytes that read patch p (summed over chunks), dk/dv of its slots.
// D_t = dO_t · O_t is summed as sum_r P_tr (dO_t · v_r) over all slots instead of read from the
// rounded output O: a slot's dk and dv add up the bytes of a whole (possibly long) patch. Multi:
// the slots come in several chunks, and D_t also visits the slots outside this one. A step stages
// the q and dO rows and the lse of up to S bytes in shared memory (all copies in flight at once),
// then takes the bytes one by one: the kernel waits on those rows (ncu: half the stall cycles when
// registers held them, one byte a step).
template <typename scalar_t, int C, bool Multi, int kGroup>
__global__ void __launch_bounds__(kWarp* kWarpsPerBlock, min_blocks<scalar_t, C>(4)) decoder_backward_kernel(const Args<scalar_t> a) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int S = staged_steps<scalar_t>();
  __shared__ Packed<scalar_t> staged_q[kWarpsPerBlock][S][kWarp], staged_do[kWarpsPerBlock][S][kWarp];
  __shared__ acc_t staged_lse[kWarpsPerBlock][S][kWarp];
  Lane l;
  if (!make_lane<kGroup, C>(a, l)) return;
  const int64_t patch_base = (l.b * a.keys + l.p * a.slots) * l.row + l.h * a.head_dim;
  const int64_t k_base = patch_base + a.chunk_begin * l.row;
  const acc_t qscale = a.scale * kLog2e<acc_t>;
  const bool add = Multi && a.chunk_begin > 0;

  Packed<scalar_t> kp[C], vp[C];
  acc_t dkf[C][kElems], dvf[C][kElems];
#pragma unroll
  for (int r = 0; r < C; ++r) {
    const int n = r < l.nslot ? l.dh : 0;
    load_packed(kp[r], a.k + k_base + r * l.row, l.off, n, l.vec);
    load_packed(vp[r], a.v + k_base + r * l.row, l.off, n, l.vec);
#pragma unroll
    for (int e = 0; e < kElems; ++e) dkf[r][e] = dvf[r][e] = 0;
  }
  const ByteRange range = decoder_range(a, l.bp, l.p);  // after the slot loads: they overlap
  const LaneBytes bytes = lane_bytes(range, l);
  const int64_t stride = l.subs * l.row;  // elements from one of this lane's bytes to its next
  const int64_t first_row = (l.b * a.queries + bytes.first) * l.row + l.h * a.head_dim;
  const acc_t* first_lse = a.lse + (l.b * a.heads + l.h) * a.queries + bytes.first;
  // This lane's slot for the step's j-th byte: [j * kWarp].
  const int warp = threadIdx.x / kWarp;
  Packed<scalar_t>* const q_slots = staged_q[warp][0] + l.lane;
  Packed<scalar_t>* const do_slots = staged_do[warp][0] + l.lane;
  acc_t* const lse_slots = staged_lse[warp][0] + l.lane;

  for (int step = 0; step < bytes.count; step += S) {
    const int steps = min(S, bytes.count - step);
    {
      const scalar_t* q_row = a.q + first_row + step * stride;
      const scalar_t* do_row = a.grad_output + first_row + step * stride;
      const acc_t* lse = first_lse + (step << l.subs_shift);
#pragma unroll 1
      for (int j = 0; j < steps; ++j, q_row += stride, do_row += stride, lse += l.subs) {
        const int n = step + j < bytes.valid ? l.dh : 0;
        stage_row(q_slots[j * kWarp], q_row, l.off, n, l.vec);
        stage_row(do_slots[j * kWarp], do_row, l.off, n, l.vec);
        if (n > 0 && step + j >= bytes.live_from) copy_async<acc_t>(lse_slots + j * kWarp, lse);
      }
    }
    wait_copies();
#pragma unroll 1
    for (int j = 0; j < steps; ++j) {
      const int byte = step + j;
#pragma unroll
      for (int r = 0; r < C; ++r) {
        opaque(kp[r]);
        opaque(vp[r]);
      }
      const bool live = byte < bytes.valid && byte >= bytes.live_from && l.dh > 0;
      const Packed<scalar_t> qp = q_slots[j * kWarp], dop = do_slots[j * kWarp];
      const acc_t lse2 = live ? lse_slots[j * kWarp] * kLog2e<acc_t> : acc_t(0);
      // Rows past the chunk were loaded as zeros: their sums are 0.
      acc_t prob[C], dp[C], delta = 0;
      {
        acc_t qc[kElems], doc[kElems];
        unpack(qc, qp);
        unpack(doc, dop);
#pragma unroll
        for (int r = 0; r < C; ++r) {
          acc_t kc[kElems], vc[kElems];
          unpack(kc, kp[r]);
          unpack(vc, vp[r]);
          const acc_t score = group_sum(dot(qc, kc), l.group);
          dp[r] = group_sum(dot(doc, vc), l.group);
          prob[r] = live && r < l.nslot ? exp2_(score * qscale - lse2) : acc_t(0);
          delta += prob[r] * dp[r];
        }
      }
      if constexpr (Multi) {
        for (int64_t r = 0; r < a.slots; ++r) {
          if (r >= a.chunk_begin && r < a.chunk_begin + l.nslot) continue;
          Packed<scalar_t> ko, vo;
          load_packed(ko, a.k + patch_base + r * l.row, l.off, l.dh, l.vec);
          load_packed(vo, a.v + patch_base + r * l.row, l.off, l.dh, l.vec);
          const acc_t so = group_sum(dot<acc_t>(qp, ko), l.group);
          const acc_t dpo = group_sum(dot<acc_t>(dop, vo), l.group);
          if (live) delta += exp2_(so * qscale - lse2) * dpo;
        }
      }
      if (byte >= bytes.valid || (add && byte < bytes.live_from)) continue;
      acc_t dqf[kElems] = {}, qc[kElems], doc[kElems];
      unpack(qc, qp);
      unpack(doc, dop);
#pragma unroll
      for (int r = 0; r < C; ++r) {
        // Scaled here, once a byte, rather than every element of dq and dk; 0 for rows that see no patch.
        const acc_t ds = prob[r] * (dp[r] - delta) * a.scale;
        acc_t kc[kElems];
        unpack(kc, kp[r]);
#pragma unroll
        for (int e = 0; e < kElems; ++e) {
          dqf[e] += ds * kc[e];
          dkf[r][e] += ds * qc[e];
          dvf[r][e] += prob[r] * doc[e];
        }
      }
      store_chunk(a.dq + first_row + byte * stride, dqf, acc_t(1), l.off, l.dh, l.vec, add);
    }
  }
  for (int o = l.group * a.heads_per_warp; o < kWarp; o <<= 1) {
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
    if (r >= l.nslot || r % l.subs != l.sub) continue;
    store_chunk(a.dk + k_base + r * l.row, dkf[r], acc_t(1), l.off, l.dh, l.vec, false);
    store_chunk(a.dv + k_base + r * l.row, dvf[r], acc_t(1), l.off, l.dh, l.vec, false);
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_cross_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& output, const at::Tensor& lse, const at::Tensor& patch_lengths, int64_t slots,
    const std::string& direction, double scale, const std::optional<at::Tensor>& given_ends) {
  const char* op = "patch_cross_attention_backward";
  const AttentionShape s = patch_attention::check_inputs(q, k, v, patch_lengths, slots, direction, op);
  patch_attention::check_backward_inputs(grad_output, output, lse, q, s, op);
  if (given_ends) check_given_patch_ends(*given_ends, patch_lengths, op);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto lengths = patch_lengths.contiguous();
  const auto ends = given_ends ? given_ends->contiguous() : patch_ends(lengths);
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_cross_attention_backward", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const bool encoder = s.direction == Direction::kEncoder;
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
    launch_chunks(a, [&](auto c, auto multi, auto group, dim3 grid, dim3 block, cudaStream_t stream,
                         const Args<scalar_t>& args) {
      constexpr int C = decltype(c)::value, G = decltype(group)::value;
      if (encoder) {
        launch_chained(encoder_backward_kernel<scalar_t, C, G>, grid, block, stream, args);
      } else {
        launch_chained(decoder_backward_kernel<scalar_t, C, decltype(multi)::value, G>, grid, block, stream, args);
      }
    });
  });
  return {dq, dk, dv};
}

}  // namespace blt_ext::cuda

TORCH_LIBRARY_IMPL(blt_ext, CUDA, m) {
  m.impl("patch_cross_attention_backward", &blt_ext::cuda::patch_cross_attention_backward);
}
