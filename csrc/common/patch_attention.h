// Argument checks and shapes of patch cross-attention, shared by the CPU and CUDA kernels.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/checks.h"

namespace blt_ext::patch_attention {

enum class Direction { kEncoder, kDecoder };

// q [B, queries, H, Dh], k/v [B, keys, H, Dh]; encoder: queries = P * slots, keys = T bytes;
// decoder: queries = T bytes, keys = P * slots.
struct AttentionShape {
  Direction direction;
  int64_t batch, queries, keys, heads, head_dim, patches, slots, bytes;
};

constexpr int64_t kMaxHeadDim = 256;

// lse is kept in the accumulation type: float32, or float64 for float64 inputs.
inline at::ScalarType lse_dtype(const at::Tensor& q) {
  return q.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

inline Direction parse_direction(const std::string& direction, const char* op) {
  TORCH_CHECK_VALUE(direction == "encoder" || direction == "decoder", "blt_ext.", op,
                    ": direction must be \"encoder\" or \"decoder\", got \"", direction, "\"");
  return direction == "encoder" ? Direction::kEncoder : Direction::kDecoder;
}

inline AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& patch_lengths, int64_t slots,
                                   const std::string& direction, const char* op) {
  AttentionShape s{};
  s.direction = parse_direction(direction, op);
  check_dim(q, op, "q", 4, "[B, Sq, H, Dh]");
  check_dim(k, op, "k", 4, "[B, Sk, H, Dh]");
  check_dim(v, op, "v", 4, "[B, Sk, H, Dh]");
  check_floating(q, op, "q");
  check_same_dtype(q, k, op, "q", "k");
  check_same_dtype(q, v, op, "q", "v");
  check_same_device(q, k, op, "q", "k");
  check_same_device(q, v, op, "q", "v");
  check_same_device(q, patch_lengths, op, "q", "patch_lengths");
  check_contiguous(q, op, "q");
  check_contiguous(k, op, "k");
  check_contiguous(v, op, "v");
  TORCH_CHECK_VALUE(slots >= 1, "blt_ext.", op, ": slots must be at least 1, got ", slots);
  s.slots = slots;
  s.batch = q.size(0);
  s.heads = q.size(2);
  s.head_dim = q.size(3);
  TORCH_CHECK_VALUE(s.head_dim >= 1 && s.head_dim <= kMaxHeadDim, "blt_ext.", op,
                    ": q.size(3) (head dim Dh) must be in [1, ", kMaxHeadDim, "], got ", s.head_dim);
  for (const auto& [t, name] : {std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    check_size(*t, 0, s.batch, op, name, "batch size B");
    check_size(*t, 2, s.heads, op, name, "number of heads H");
    check_size(*t, 3, s.head_dim, op, name, "head dim Dh");
  }
  check_dim(patch_lengths, op, "patch_lengths", 2, "[B, P]");
  s.patches = patch_lengths.size(1);
  s.queries = q.size(1);
  s.keys = k.size(1);
  if (s.direction == Direction::kEncoder) {
    s.bytes = s.keys;
    check_size(q, 1, s.patches * slots, op, "q", "P * slots patch query rows");
  } else {
    s.bytes = s.queries;
    check_size(k, 1, s.patches * slots, op, "k", "P * slots patch key rows");
  }
  check_size(v, 1, s.keys, op, "v", s.direction == Direction::kEncoder ? "number of bytes T, as k"
                                                                        : "P * slots patch key rows, as k");
  check_patch_lengths(patch_lengths, s.batch, s.patches, s.bytes, op);
  return s;
}

// grad_output and output [B, Sq, H, Dh] like q; lse [B, H, Sq] in lse_dtype(q).
inline void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& output,
                                  const at::Tensor& lse, const at::Tensor& q, const AttentionShape& s,
                                  const char* op) {
  for (const auto& [t, name] : {std::pair{&grad_output, "grad_output"}, std::pair{&output, "output"}}) {
    check_dim(*t, op, name, 4, "[B, Sq, H, Dh]");
    TORCH_CHECK_VALUE(t->sizes() == q.sizes(), "blt_ext.", op, ": ", name, " must have the shape of q ",
                      shape_str(q.sizes()), ", got ", shape_str(t->sizes()));
    check_same_dtype(q, *t, op, "q", name);
    check_same_device(q, *t, op, "q", name);
    check_contiguous(*t, op, name);
  }
  check_dim(lse, op, "lse", 3, "[B, H, Sq]");
  check_dtype(lse, op, "lse", lse_dtype(q));
  check_same_device(q, lse, op, "q", "lse");
  check_size(lse, 0, s.batch, op, "lse", "batch size B");
  check_size(lse, 1, s.heads, op, "lse", "number of heads H");
  check_size(lse, 2, s.queries, op, "lse", "number of query rows Sq");
  check_contiguous(lse, op, "lse");
}

}  // namespace blt_ext::patch_attention
