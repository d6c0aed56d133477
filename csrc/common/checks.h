// Argument checks shared by every op. Each message names the op, the argument and the rule,
// and shows the value that broke it, e.g.
//   blt_ext.segment_pool: x must be a 3-D tensor [B, T, D], got shape [4, 5]
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace blt_ext {

// "[2, 0, 5]". Shapes are formatted here rather than by streaming an IntArrayRef into
// TORCH_CHECK: on the H200 build (nvcc 13, torch 2.11) a .cu file whose check streamed
// logits.sizes() into its message crashed the process instead of raising.
inline std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + "]";
}

inline void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "blt_ext.", op, ": ", name, " must be a defined tensor");
}

inline void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                      const char* layout) {
  check_defined(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == dim, "blt_ext.", op, ": ", name, " must be a ", dim, "-D tensor ",
                    layout, ", got shape ", shape_str(t.sizes()));
}

inline void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "blt_ext.", op, ": ", name, " must have dtype ", dtype,
                   ", got ", t.scalar_type());
}

// Float tensors: fp32, fp16, bf16; fp64 too, for gradcheck and float64 references.
inline void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
                   "blt_ext.", op, ": ", name,
                   " must be a floating tensor (float32, float16, bfloat16 or float64), got ", s);
}

inline void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                             const char* name_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "blt_ext.", op, ": ", name_a, " and ", name_b,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

inline void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "blt_ext.", op, ": ", name,
                    " must be contiguous (call .contiguous() first), got strides ", shape_str(t.strides()),
                    " for shape ", shape_str(t.sizes()));
}

inline void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                              const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "blt_ext.", op, ": ", name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                       const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "blt_ext.", op, ": ", name, ".size(", dim, ") (", what,
                    ") must be ", expected, ", got ", t.size(dim), " (shape ", shape_str(t.sizes()), ")");
}

// Patch lengths [B, P], int64, non-negative, each row summing to T (every byte in a patch) or to
// T + 1 (the last patch also holds the not-yet-seen next byte, include_next_token). Reads the data,
// so only CPU kernels call it: a CUDA kernel would need a host synchronisation.
inline void check_patch_lengths_values(const at::Tensor& patch_lengths, int64_t num_bytes, const char* op) {
  const auto lengths = patch_lengths.accessor<int64_t, 2>();
  for (int64_t b = 0; b < lengths.size(0); ++b) {
    int64_t total = 0;
    for (int64_t p = 0; p < lengths.size(1); ++p) {
      TORCH_CHECK_VALUE(lengths[b][p] >= 0, "blt_ext.", op, ": patch_lengths must be non-negative, got ",
                        lengths[b][p], " at [", b, ", ", p, "]");
      total += lengths[b][p];
    }
    TORCH_CHECK_VALUE(total == num_bytes || total == num_bytes + 1, "blt_ext.", op,
                      ": each row of patch_lengths must sum to T = ", num_bytes, " or T + 1 = ", num_bytes + 1,
                      " (include_next_token), got ", total, " in row ", b);
  }
}

inline void check_patch_lengths(const at::Tensor& patch_lengths, int64_t batch, int64_t num_patches,
                                 int64_t num_bytes, const char* op) {
  check_dim(patch_lengths, op, "patch_lengths", 2, "[B, P]");
  check_dtype(patch_lengths, op, "patch_lengths", at::kLong);
  check_size(patch_lengths, 0, batch, op, "patch_lengths", "batch size B");
  check_size(patch_lengths, 1, num_patches, op, "patch_lengths", "number of patches P");
  if (patch_lengths.is_cpu()) check_patch_lengths_values(patch_lengths.contiguous(), num_bytes, op);
}

}  // namespace blt_ext
