// Argument checks shared by every op. Each message names the op, the argument and the rule,
// and shows the value that broke it, e.g.
//   blt_ext.segment_pool: x must be a 3-D tensor [B, T, D], got shape [4, 5]
// They are defined in checks.cpp, compiled by the host compiler; a .cu file that raises an error
// itself passes numbers as std::to_string (checks.cpp says why).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <string>

namespace blt_ext {

// "[2, 0, 5]": shapes are formatted by this one function (see checks.cpp for why).
std::string shape_str(at::IntArrayRef sizes);

void check_defined(const at::Tensor& t, const char* op, const char* name);

void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim,
               const char* layout);

void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype);

// Float tensors: fp32, fp16, bf16; fp64 too, for gradcheck and float64 references.
void check_floating(const at::Tensor& t, const char* op, const char* name);

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                      const char* name_b);

void check_contiguous(const at::Tensor& t, const char* op, const char* name);

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b);

void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                const char* what);

// Patch lengths [B, P], int64, non-negative, each row summing to T (every byte in a patch) or to
// T + 1 (the last patch also holds the not-yet-seen next byte, include_next_token). Reads the data,
// so only CPU kernels call it: a CUDA kernel would need a host synchronisation.
void check_patch_lengths_values(const at::Tensor& patch_lengths, int64_t num_bytes, const char* op);

void check_patch_lengths(const at::Tensor& patch_lengths, int64_t batch, int64_t num_patches,
                         int64_t num_bytes, const char* op);

// The lengths argument of blt_ext.patch_ends: int64 [B, P].
void check_patch_ends_lengths(const at::Tensor& patch_lengths, const char* op);

// patch_ends passed beside (checked) patch_lengths: int64, the shape of patch_lengths, on its device;
// on the CPU also equal to their running sum. On CUDA the values are trusted as patch_lengths' are
// (checking them needs the data on the host): wrong ends give wrong rows, never an access out of bounds.
void check_given_patch_ends(const at::Tensor& patch_ends, const at::Tensor& patch_lengths, const char* op);

}  // namespace blt_ext
