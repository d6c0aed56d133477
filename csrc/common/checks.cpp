// The argument checks of every op, compiled once, by the host C++ compiler. The CUDA files call
// them instead of instantiating the messages themselves: on the H200 build (nvcc 13 with GCC 13,
// torch 2.11) an error raised from a .cu file with a number in its message crashed the process.
#include <ATen/ops/cumsum.h>
#include <ATen/ops/equal.h>

#include <string>

#include "common/checks.h"
#include "common/entropy_patch.h"
#include "common/patch_attention.h"
#include "common/segment_pool.h"
#include "cuda/hash_ngram.cuh"

namespace blt_ext {

std::string shape_str(at::IntArrayRef sizes) {
  std::string out = "[";
  for (size_t i = 0; i < sizes.size(); ++i) {
    out += (i ? ", " : "") + std::to_string(sizes[i]);
  }
  return out + "]";
}

void check_defined(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.defined(), "blt_ext.", op, ": ", name, " must be a defined tensor");
}

void check_dim(const at::Tensor& t, const char* op, const char* name, int64_t dim,
               const char* layout) {
  check_defined(t, op, name);
  TORCH_CHECK_VALUE(t.dim() == dim, "blt_ext.", op, ": ", name, " must be a ", dim, "-D tensor ",
                    layout, ", got shape ", shape_str(t.sizes()));
}

void check_dtype(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, "blt_ext.", op, ": ", name, " must have dtype ", dtype,
                   ", got ", t.scalar_type());
}

void check_floating(const at::Tensor& t, const char* op, const char* name) {
  const auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kHalf || s == at::kBFloat16 || s == at::kDouble,
                   "blt_ext.", op, ": ", name,
                   " must be a floating tensor (float32, float16, bfloat16 or float64), got ", s);
}

void check_same_dtype(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                      const char* name_b) {
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "blt_ext.", op, ": ", name_a, " and ", name_b,
                   " must have the same dtype, got ", a.scalar_type(), " and ", b.scalar_type());
}

void check_contiguous(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), "blt_ext.", op, ": ", name,
                    " must be contiguous (call .contiguous() first), got strides ", shape_str(t.strides()),
                    " for shape ", shape_str(t.sizes()));
}

void check_same_device(const at::Tensor& a, const at::Tensor& b, const char* op, const char* name_a,
                       const char* name_b) {
  TORCH_CHECK_VALUE(a.device() == b.device(), "blt_ext.", op, ": ", name_a, " and ", name_b,
                    " must be on the same device, got ", a.device(), " and ", b.device());
}

void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name,
                const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, "blt_ext.", op, ": ", name, ".size(", dim, ") (", what,
                    ") must be ", expected, ", got ", t.size(dim), " (shape ", shape_str(t.sizes()), ")");
}

void check_patch_lengths_values(const at::Tensor& patch_lengths, int64_t num_bytes, const char* op) {
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

void check_patch_lengths(const at::Tensor& patch_lengths, int64_t batch, int64_t num_patches,
                         int64_t num_bytes, const char* op) {
  check_dim(patch_lengths, op, "patch_lengths", 2, "[B, P]");
  check_dtype(patch_lengths, op, "patch_lengths", at::kLong);
  check_size(patch_lengths, 0, batch, op, "patch_lengths", "batch size B");
  check_size(patch_lengths, 1, num_patches, op, "patch_lengths", "number of patches P");
  if (patch_lengths.is_cpu()) check_patch_lengths_values(patch_lengths.contiguous(), num_bytes, op);
}

void check_patch_ends_lengths(const at::Tensor& patch_lengths, const char* op) {
  check_dim(patch_lengths, op, "patch_lengths", 2, "[B, P]");
  check_dtype(patch_lengths, op, "patch_lengths", at::kLong);
}

void check_given_patch_ends(const at::Tensor& patch_ends, const at::Tensor& patch_lengths, const char* op) {
  check_defined(patch_ends, op, "patch_ends");
  check_same_device(patch_lengths, patch_ends, op, "patch_lengths", "patch_ends");
  check_dtype(patch_ends, op, "patch_ends", at::kLong);
  TORCH_CHECK_VALUE(patch_ends.sizes() == patch_lengths.sizes(), "blt_ext.", op,
                    ": patch_ends must have the shape of patch_lengths ", shape_str(patch_lengths.sizes()),
                    ", got ", shape_str(patch_ends.sizes()));
  if (patch_ends.is_cpu()) {
    TORCH_CHECK_VALUE(at::equal(patch_ends, at::cumsum(patch_lengths, 1)), "blt_ext.", op,
                      ": patch_ends must be the running sum of patch_lengths along P "
                      "(blt_ext.patch_ends(patch_lengths))");
  }
}

}  // namespace blt_ext

namespace blt_ext::entropy_patch {

void check_logits(const at::Tensor& logits) {
  check_defined(logits, "entropy", "logits");
  TORCH_CHECK_VALUE(logits.dim() >= 1, "blt_ext.entropy: logits must be a tensor [..., V] of at least 1 dimension, ",
                    "got a 0-D tensor");
  check_floating(logits, "entropy", "logits");
  TORCH_CHECK_VALUE(logits.size(-1) >= 1, "blt_ext.entropy: logits.size(-1) (vocabulary size V) must be >= 1, ",
                    "got shape ", shape_str(logits.sizes()));
}

namespace {

void check_thresholds(const char* op, double threshold, std::optional<double> threshold_add) {
  TORCH_CHECK_VALUE(!std::isnan(threshold), "blt_ext.", op, ": threshold must not be NaN, got ", threshold);
  TORCH_CHECK_VALUE(!threshold_add.has_value() || !std::isnan(*threshold_add), "blt_ext.", op,
                    ": threshold_add must not be NaN, got ", threshold_add.value_or(0.0));
}

void check_max_patch_length(const char* op, std::optional<int64_t> max_patch_length) {
  TORCH_CHECK_VALUE(!max_patch_length.has_value() || *max_patch_length >= 1, "blt_ext.", op,
                    ": max_patch_length must be >= 1 (or None), got ", max_patch_length.value_or(0));
}

}  // namespace

void check_entropy_patch_starts_args(const at::Tensor& entropies, double threshold,
                                     std::optional<double> threshold_add) {
  constexpr const char* op = "entropy_patch_starts";
  check_dim(entropies, op, "entropies", 2, "[B, T]");
  check_floating(entropies, op, "entropies");
  check_thresholds(op, threshold, threshold_add);
}

void check_space_patch_starts_args(const at::Tensor& tokens) {
  check_dim(tokens, "space_patch_starts", "tokens", 2, "[B, T]");
  check_dtype(tokens, "space_patch_starts", "tokens", at::kLong);
}

void check_patch_layout_args(const at::Tensor& starts, std::optional<int64_t> max_patch_length) {
  constexpr const char* op = "patch_layout";
  check_dim(starts, op, "starts", 2, "[B, T + 1]");
  check_dtype(starts, op, "starts", at::kBool);
  TORCH_CHECK_VALUE(starts.size(1) >= 1, "blt_ext.", op,
                    ": starts.size(1) (T + 1, the bytes and the next byte) must be >= 1, got shape ",
                    shape_str(starts.sizes()));
  check_max_patch_length(op, max_patch_length);
}

void check_entropy_patch_args(const at::Tensor& logits, double threshold, std::optional<double> threshold_add,
                              std::optional<int64_t> max_patch_length) {
  constexpr const char* op = "entropy_patch";
  check_dim(logits, op, "logits", 3, "[B, T, V]");
  check_floating(logits, op, "logits");
  TORCH_CHECK_VALUE(logits.size(2) >= 1, "blt_ext.", op, ": logits.size(2) (vocabulary size V) must be >= 1, ",
                    "got shape ", shape_str(logits.sizes()));
  check_thresholds(op, threshold, threshold_add);
  check_max_patch_length(op, max_patch_length);
}

}  // namespace blt_ext::entropy_patch

namespace blt_ext::patch_attention {

Direction parse_direction(const std::string& direction, const char* op) {
  TORCH_CHECK_VALUE(direction == "encoder" || direction == "decoder", "blt_ext.", op,
                    ": direction must be \"encoder\" or \"decoder\", got \"", direction, "\"");
  return direction == "encoder" ? Direction::kEncoder : Direction::kDecoder;
}

AttentionShape check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
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

void check_backward_inputs(const at::Tensor& grad_output, const at::Tensor& output,
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

namespace blt_ext {

PoolReduce parse_pool_reduce(const std::string& reduce, const char* op) {
  if (reduce == "max") return PoolReduce::Max;
  if (reduce == "mean") return PoolReduce::Mean;
  if (reduce == "min") return PoolReduce::Min;
  TORCH_CHECK_VALUE(false, "blt_ext.", op, ": reduce must be one of \"max\", \"mean\", \"min\", got \"", reduce,
                    "\"");
}

PoolReduce check_segment_pool_args(const at::Tensor& x, const at::Tensor& patch_lengths,
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

PoolReduce check_segment_pool_backward_args(const at::Tensor& grad_output, const at::Tensor& arg_index,
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

namespace blt_ext::hash_ngram {

HashConfig make_hash_config(at::IntArrayRef ngram_sizes, int64_t num_functions, int64_t vocab) {
  HashConfig config{};
  config.num_sizes = static_cast<int>(ngram_sizes.size());
  config.num_tables = static_cast<int>(num_functions) * config.num_sizes;
  config.vocab = vocab;
  for (int k = 0; k < config.num_sizes; ++k) config.sizes[k] = static_cast<int>(ngram_sizes[k]);
  for (int f = 0; f < kNumPrimes; ++f) config.primes[f] = kPrimes[f];
  return config;
}

void check_config(const char* op, at::IntArrayRef ngram_sizes, int64_t num_functions) {
  TORCH_CHECK_VALUE(!ngram_sizes.empty() && static_cast<int64_t>(ngram_sizes.size()) <= kMaxNgramSizes,
                    "blt_ext.", op, ": ngram_sizes must have 1 to ", kMaxNgramSizes, " entries, got ",
                    ngram_sizes);
  for (const int64_t n : ngram_sizes) {
    TORCH_CHECK_VALUE(n >= 1 && n <= kMaxNgramSize, "blt_ext.", op, ": ngram_sizes must each be in [1, ",
                      kMaxNgramSize, "], got ", ngram_sizes);
  }
  TORCH_CHECK_VALUE(num_functions >= 1 && num_functions <= kNumPrimes, "blt_ext.", op,
                    ": num_functions must be in [1, ", kNumPrimes, "], got ", num_functions);
}

void check_tokens(const char* op, const at::Tensor& tokens) {
  check_dim(tokens, op, "tokens", 2, "[B, T]");
  check_dtype(tokens, op, "tokens", at::kLong);
}

int64_t table_vocab(const char* op, const char* name, int64_t hash_rows, int64_t num_tables) {
  TORCH_CHECK_VALUE(hash_rows > 0 && hash_rows % num_tables == 0, "blt_ext.", op, ": ", name,
                    " must be a positive multiple of the number of tables ",
                    "num_functions * len(ngram_sizes) = ", num_tables, ", got ", hash_rows);
  return hash_rows / num_tables;
}

HashConfig check_ids_args(const char* op, const at::Tensor& tokens, at::IntArrayRef ngram_sizes,
                          int64_t num_functions, int64_t hash_vocab) {
  check_tokens(op, tokens);
  check_config(op, ngram_sizes, num_functions);
  TORCH_CHECK_VALUE(hash_vocab >= 1, "blt_ext.", op, ": hash_vocab must be >= 1, got ", hash_vocab);
  return make_hash_config(ngram_sizes, num_functions, hash_vocab);
}

HashConfig check_embedding_args(const char* op, const at::Tensor& tokens,
                                const at::Tensor& byte_weight, const at::Tensor& hash_weight,
                                at::IntArrayRef ngram_sizes, int64_t num_functions) {
  check_tokens(op, tokens);
  check_dim(byte_weight, op, "byte_weight", 2, "[byte_rows, D]");
  check_dim(hash_weight, op, "hash_weight", 2, "[num_tables * V, D]");
  check_floating(byte_weight, op, "byte_weight");
  check_same_dtype(byte_weight, hash_weight, op, "byte_weight", "hash_weight");
  check_size(hash_weight, 1, byte_weight.size(1), op, "hash_weight", "embedding dim D of byte_weight");
  check_same_device(tokens, byte_weight, op, "tokens", "byte_weight");
  check_same_device(tokens, hash_weight, op, "tokens", "hash_weight");
  check_config(op, ngram_sizes, num_functions);
  const int64_t num_tables = num_functions * static_cast<int64_t>(ngram_sizes.size());
  const int64_t vocab = table_vocab(op, "hash_weight.size(0)", hash_weight.size(0), num_tables);
  return make_hash_config(ngram_sizes, num_functions, vocab);
}

HashConfig check_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& tokens,
                               int64_t byte_rows, int64_t hash_rows, at::IntArrayRef ngram_sizes,
                               int64_t num_functions) {
  check_tokens(op, tokens);
  check_dim(grad_output, op, "grad_output", 3, "[B, T, D]");
  check_floating(grad_output, op, "grad_output");
  check_size(grad_output, 0, tokens.size(0), op, "grad_output", "batch size B of tokens");
  check_size(grad_output, 1, tokens.size(1), op, "grad_output", "sequence length T of tokens");
  check_same_device(grad_output, tokens, op, "grad_output", "tokens");
  TORCH_CHECK_VALUE(byte_rows >= 1, "blt_ext.", op, ": byte_rows must be >= 1, got ", byte_rows);
  check_config(op, ngram_sizes, num_functions);
  const int64_t num_tables = num_functions * static_cast<int64_t>(ngram_sizes.size());
  return make_hash_config(ngram_sizes, num_functions, table_vocab(op, "hash_rows", hash_rows, num_tables));
}

}  // namespace blt_ext::hash_ngram
