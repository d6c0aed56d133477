// Argument checks of segment_pool / segment_pool_backward, shared by the CPU and CUDA kernels so
// that both devices accept and reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/checks.h"

namespace blt_ext {

enum class PoolReduce { Max, Mean, Min };

inline PoolReduce parse_pool_reduce(const std::string& reduce, const char* op) {
  if (reduce == "max") return PoolReduce::Max;
  if (reduce == "mean") return PoolReduce::Mean;
  if (reduce == "min") return PoolReduce::Min;
  TORCH_CHECK_VALUE(false, "blt_ext.", op, ": reduce must be one of \"max\", \"mean\", \"min\", got \"", reduce,
                    "\"");
}

// x [B, T, D] floating, contiguous; patch_lengths [B, P] int64 (values checked on CPU only).
inline PoolReduce check_segment_pool_args(const at::Tensor& x, const at::Tensor& patch_lengths,
                                          const std::string& reduce) {
  constexpr const char* op = "segment_pool";
  const PoolReduce r = parse_pool_reduce(reduce, op);
  check_dim(x, op, "x", 3, "[B, T, D]");
  check_floating(x, op, "x");
  check_contiguous(x, op, "x");
  check_defined(patch_lengths, op, "patch_lengths");
  check_same_device(x, patch_lengths, op, "x", "patch_lengths");
  check_dim(patch_lengths, op, "patch_lengths", 2, "[B, P]");
  check_patch_lengths(patch_lengths, x.size(0), patch_lengths.size(1), x.size(1), op);
  return r;
}

// grad_output [B, P, D] floating, contiguous; arg_index int32, [B, P, D] for max/min (ignored for
// mean); patch_lengths [B, P] int64 summing to num_bytes or num_bytes + 1 (values checked on CPU).
inline PoolReduce check_segment_pool_backward_args(const at::Tensor& grad_output, const at::Tensor& arg_index,
                                                   const at::Tensor& patch_lengths, int64_t num_bytes,
                                                   const std::string& reduce) {
  constexpr const char* op = "segment_pool_backward";
  const PoolReduce r = parse_pool_reduce(reduce, op);
  check_dim(grad_output, op, "grad_output", 3, "[B, P, D]");
  check_floating(grad_output, op, "grad_output");
  check_contiguous(grad_output, op, "grad_output");
  TORCH_CHECK_VALUE(num_bytes >= 0, "blt_ext.", op, ": num_bytes must be non-negative, got ", num_bytes);
  check_defined(arg_index, op, "arg_index");
  check_dtype(arg_index, op, "arg_index", at::kInt);
  check_same_device(grad_output, arg_index, op, "grad_output", "arg_index");
  if (r != PoolReduce::Mean) {
    check_dim(arg_index, op, "arg_index", 3, "[B, P, D]");
    for (int64_t d = 0; d < 3; ++d) {
      check_size(arg_index, d, grad_output.size(d), op, "arg_index", "grad_output's size");
    }
    check_contiguous(arg_index, op, "arg_index");
  }
  check_defined(patch_lengths, op, "patch_lengths");
  check_same_device(grad_output, patch_lengths, op, "grad_output", "patch_lengths");
  check_patch_lengths(patch_lengths, grad_output.size(0), grad_output.size(1), num_bytes, op);
  return r;
}

}  // namespace blt_ext
