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

Direction parse_direction(const std::string& direction, const char* op);

AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& patch_lengths, int64_t slots,
                            const std::string& direction, const char* op);

// grad_output and output [B, Sq, H, Dh] like q; lse [B, H, Sq] in lse_dtype(q).
void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& output,
                           const at::Tensor& lse, const at::Tensor& q, const AttentionShape& s,
                           const char* op);

}  // namespace blt_ext::patch_attention
