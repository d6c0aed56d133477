// Patch cross-attention on the CPU (BLT_SPEC.md d "Cross-attention", f "the shift").
//
// Both directions are a block-diagonal attention: block (b, p) pairs a contiguous range of query
// rows with a contiguous range of key rows, and every query and every key row belongs to exactly
// one block. So each block is computed (forwards and backwards) by one task without atomics:
//   encoder: queries = the `slots` rows of patch p, keys = the bytes [s_p, e_p) ∩ [0, T);
//   decoder: keys = the `slots` rows of patch p, queries = the bytes t with d(t) = p, i.e.
//            [e_p - 1, e_next - 1) ∩ [0, T) for the next non-empty patch; the first non-empty
//            patch also owns the bytes before e_p - 1, which see no patch (out 0, lse -inf).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/cumsum.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "blt_ext.h"
#include "common/checks.h"
#include "common/patch_attention.h"

namespace blt_ext::cpu {
namespace {

using patch_attention::AttentionShape;
using patch_attention::Direction;

// One block of the block-diagonal attention, in rows of q (queries) and of k/v (keys).
// Query rows [q_begin, q_live) see no key (decoder bytes before the first patch ends).
struct Block {
  int64_t q_begin, q_live, q_end;
  int64_t k_begin, k_end;
};

// The blocks of every (b, p), from lengths already validated (non-negative, rows summing to T or T + 1).
std::vector<Block> make_blocks(const at::Tensor& patch_lengths, const AttentionShape& s) {
  const auto lengths = patch_lengths.accessor<int64_t, 2>();
  std::vector<Block> blocks(s.batch * s.patches);
  const int64_t T = s.bytes;
  for (int64_t b = 0; b < s.batch; ++b) {
    Block* row = blocks.data() + b * s.patches;
    int64_t end = 0;
    int64_t prev = -1;  // the previous non-empty patch (decoder)
    for (int64_t p = 0; p < s.patches; ++p) {
      const int64_t start = end;
      end += lengths[b][p];
      const int64_t slot_begin = p * s.slots;
      if (s.direction == Direction::kEncoder) {
        row[p] = {slot_begin, slot_begin, slot_begin + s.slots, std::min(start, T), std::min(end, T)};
        continue;
      }
      row[p] = {0, 0, 0, slot_begin, slot_begin + s.slots};
      if (lengths[b][p] == 0) continue;
      const int64_t first_reader = std::min(end - 1, T);
      if (prev >= 0) row[prev].q_end = first_reader;
      row[p].q_begin = prev >= 0 ? first_reader : 0;
      row[p].q_live = first_reader;
      prev = p;
    }
    if (prev >= 0) row[prev].q_end = T;
  }
  return blocks;
}

template <typename scalar_t, typename acc_t>
inline void load_row(acc_t* dst, const scalar_t* src, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<acc_t>(src[i]);
}

template <typename scalar_t, typename acc_t>
inline acc_t dot(const acc_t* a, const scalar_t* b, int64_t n) {
  // Four partial sums: lets the compiler vectorize without reassociating one chain.
  acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += a[i] * static_cast<acc_t>(b[i]);
    s1 += a[i + 1] * static_cast<acc_t>(b[i + 1]);
    s2 += a[i + 2] * static_cast<acc_t>(b[i + 2]);
    s3 += a[i + 3] * static_cast<acc_t>(b[i + 3]);
  }
  for (; i < n; ++i) s0 += a[i] * static_cast<acc_t>(b[i]);
  return (s0 + s1) + (s2 + s3);
}

template <typename scalar_t, typename acc_t>
inline void axpy(acc_t* y, acc_t alpha, const scalar_t* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * static_cast<acc_t>(x[i]);
}

template <typename scalar_t, typename acc_t>
inline void store_row(scalar_t* dst, const acc_t* src, acc_t factor, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(src[i] * factor);
}

// Blocks per parallel task: a block is small (a patch averages a few bytes).
constexpr int64_t kGrain = 16;

template <typename scalar_t>
void forward_kernel(const AttentionShape& s, const std::vector<Block>& blocks, const scalar_t* q,
                    const scalar_t* k, const scalar_t* v, scalar_t* out, at::opmath_type<scalar_t>* lse,
                    double scale_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = s.heads, Dh = s.head_dim, row = H * Dh;
  const acc_t scale = static_cast<acc_t>(scale_in);
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(Dh), acc(Dh), scores;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.patches;
      const Block& blk = blocks[item];
      const scalar_t* kb = k + b * s.keys * row;
      const scalar_t* vb = v + b * s.keys * row;
      const int64_t num_keys = blk.k_end - blk.k_begin;
      scores.resize(std::max<int64_t>(num_keys, 1));
      for (int64_t i = blk.q_begin; i < blk.q_end; ++i) {
        for (int64_t h = 0; h < H; ++h) {
          const int64_t q_off = (b * s.queries + i) * row + h * Dh;
          acc_t* lse_out = lse + (b * H + h) * s.queries + i;
          if (i < blk.q_live || num_keys == 0) {
            std::fill_n(out + q_off, Dh, scalar_t(0));
            *lse_out = -std::numeric_limits<acc_t>::infinity();
            continue;
          }
          load_row(qf.data(), q + q_off, Dh);
          acc_t max_score = -std::numeric_limits<acc_t>::infinity();
          for (int64_t j = 0; j < num_keys; ++j) {
            scores[j] = scale * dot(qf.data(), kb + (blk.k_begin + j) * row + h * Dh, Dh);
            max_score = std::max(max_score, scores[j]);
          }
          std::fill(acc.begin(), acc.end(), acc_t(0));
          acc_t denom = 0;
          for (int64_t j = 0; j < num_keys; ++j) {
            const acc_t weight = std::exp(scores[j] - max_score);
            denom += weight;
            axpy(acc.data(), weight, vb + (blk.k_begin + j) * row + h * Dh, Dh);
          }
          store_row(out + q_off, acc.data(), acc_t(1) / denom, Dh);
          *lse_out = max_score + std::log(denom);
        }
      }
    }
  });
}

// Flash-attention style: P_ij = exp(S_ij - lse_i), dS_ij = P_ij (dO_i · v_j - D_i) with
// D_i = dO_i · O_i = sum_j P_ij (dO_i · v_j). The encoder reads D_i from the output O (one pass over
// a possibly long patch, as the CUDA kernel does); the decoder, whose rows see only `slots` keys,
// sums it from P: that avoids the rounding of a half-precision O, which would otherwise add up
// over the many bytes that read one patch slot in dk and dv.
template <typename scalar_t>
void backward_kernel(const AttentionShape& s, const std::vector<Block>& blocks, const scalar_t* dout,
                     const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* out,
                     const at::opmath_type<scalar_t>* lse, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                     double scale_in) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t H = s.heads, Dh = s.head_dim, row = H * Dh;
  const acc_t scale = static_cast<acc_t>(scale_in);
  const bool delta_from_output = s.direction == Direction::kEncoder;
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qf(Dh), dof(Dh), dqf(Dh), dkf, dvf, probs, dprobs;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / s.patches;
      const Block& blk = blocks[item];
      const int64_t num_keys = blk.k_end - blk.k_begin;
      const int64_t k_base = (b * s.keys + blk.k_begin) * row;
      dkf.resize(num_keys * Dh);
      dvf.resize(num_keys * Dh);
      probs.resize(num_keys);
      dprobs.resize(num_keys);
      for (int64_t h = 0; h < H; ++h) {
        std::fill(dkf.begin(), dkf.end(), acc_t(0));
        std::fill(dvf.begin(), dvf.end(), acc_t(0));
        for (int64_t i = blk.q_begin; i < blk.q_end; ++i) {
          const int64_t q_off = (b * s.queries + i) * row + h * Dh;
          if (i < blk.q_live || num_keys == 0) {
            std::fill_n(dq + q_off, Dh, scalar_t(0));
            continue;
          }
          load_row(qf.data(), q + q_off, Dh);
          load_row(dof.data(), dout + q_off, Dh);
          const acc_t row_lse = lse[(b * H + h) * s.queries + i];
          acc_t delta = 0;
          for (int64_t j = 0; j < num_keys; ++j) {
            probs[j] = std::exp(scale * dot(qf.data(), k + k_base + j * row + h * Dh, Dh) - row_lse);
            dprobs[j] = dot(dof.data(), v + k_base + j * row + h * Dh, Dh);
            delta += probs[j] * dprobs[j];
          }
          if (delta_from_output) delta = dot(dof.data(), out + q_off, Dh);
          std::fill(dqf.begin(), dqf.end(), acc_t(0));
          for (int64_t j = 0; j < num_keys; ++j) {
            const acc_t dscore = probs[j] * (dprobs[j] - delta);
            axpy(dqf.data(), dscore, k + k_base + j * row + h * Dh, Dh);
            axpy(dkf.data() + j * Dh, dscore, qf.data(), Dh);
            axpy(dvf.data() + j * Dh, probs[j], dof.data(), Dh);
          }
          store_row(dq + q_off, dqf.data(), scale, Dh);
        }
        for (int64_t j = 0; j < num_keys; ++j) {
          store_row(dk + k_base + j * row + h * Dh, dkf.data() + j * Dh, scale, Dh);
          store_row(dv + k_base + j * row + h * Dh, dvf.data() + j * Dh, acc_t(1), Dh);
        }
      }
    }
  });
}

}  // namespace

at::Tensor patch_ends(const at::Tensor& patch_lengths) {
  check_patch_ends_lengths(patch_lengths, "patch_ends");
  return at::cumsum(patch_lengths, 1);
}

std::tuple<at::Tensor, at::Tensor> patch_cross_attention(const at::Tensor& q, const at::Tensor& k,
                                                         const at::Tensor& v,
                                                         const at::Tensor& patch_lengths, int64_t slots,
                                                         const std::string& direction, double scale,
                                                         const std::optional<at::Tensor>& given_ends) {
  const char* op = "patch_cross_attention";
  const AttentionShape s = patch_attention::check_inputs(q, k, v, patch_lengths, slots, direction, op);
  if (given_ends) check_given_patch_ends(*given_ends, patch_lengths, op);  // the kernel walks the lengths
  const auto blocks = make_blocks(patch_lengths.contiguous(), s);
  auto out = at::empty_like(q);
  auto lse = at::empty({s.batch, s.heads, s.queries}, q.options().dtype(patch_attention::lse_dtype(q)));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_cross_attention", [&] {
    forward_kernel<scalar_t>(s, blocks, q.const_data_ptr<scalar_t>(), k.const_data_ptr<scalar_t>(),
                             v.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                             lse.mutable_data_ptr<at::opmath_type<scalar_t>>(), scale);
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_cross_attention_backward(
    const at::Tensor& grad_output, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& output, const at::Tensor& lse, const at::Tensor& patch_lengths, int64_t slots,
    const std::string& direction, double scale, const std::optional<at::Tensor>& given_ends) {
  const char* op = "patch_cross_attention_backward";
  const AttentionShape s = patch_attention::check_inputs(q, k, v, patch_lengths, slots, direction, op);
  patch_attention::check_backward_inputs(grad_output, output, lse, q, s, op);
  if (given_ends) check_given_patch_ends(*given_ends, patch_lengths, op);
  const auto blocks = make_blocks(patch_lengths.contiguous(), s);
  auto dq = at::empty_like(q);
  auto dk = at::empty_like(k);
  auto dv = at::empty_like(v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "patch_cross_attention_backward", [&] {
    backward_kernel<scalar_t>(s, blocks, grad_output.const_data_ptr<scalar_t>(), q.const_data_ptr<scalar_t>(),
                              k.const_data_ptr<scalar_t>(), v.const_data_ptr<scalar_t>(),
                              output.const_data_ptr<scalar_t>(),
                              lse.const_data_ptr<at::opmath_type<scalar_t>>(), dq.mutable_data_ptr<scalar_t>(),
                              dk.mutable_data_ptr<scalar_t>(), dv.mutable_data_ptr<scalar_t>(), scale);
  });
  return {dq, dk, dv};
}

}  // namespace blt_ext::cpu

TORCH_LIBRARY_IMPL(blt_ext, CPU, m) {
  m.impl("patch_ends", &blt_ext::cpu::patch_ends);
  m.impl("patch_cross_attention", &blt_ext::cpu::patch_cross_attention);
  m.impl("patch_cross_attention_backward", &blt_ext::cpu::patch_cross_attention_backward);
}
