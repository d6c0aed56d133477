// Argument checks of segment_pool / segment_pool_backward, shared by the CPU and CUDA kernels so
// that both devices accept and reject exactly the same inputs with the same messages.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

#include "common/checks.h"

namespace blt_ext {

enum class PoolReduce { Max, Mean, Min };

PoolReduce parse_pool_reduce(const std::string& reduce, const char* op);

// x [B, T, D] floating, contiguous; patch_lengths [B, P] int64 (values checked on CPU only).
PoolReduce check_segment_pool_args(const at::Tensor& x, const at::Tensor& patch_lengths,
                                   const std::string& reduce);

// grad_output [B, P, D] floating, contiguous; arg_index int32, [B, P, D] for max/min (ignored for
// mean); patch_lengths [B, P] int64 summing to num_bytes or num_bytes + 1 (values checked on CPU).
PoolReduce check_segment_pool_backward_args(const at::Tensor& grad_output, const at::Tensor& arg_index,
                                            const at::Tensor& patch_lengths, int64_t num_bytes,
                                            const std::string& reduce);

}  // namespace blt_ext
