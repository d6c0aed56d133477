// Hash n-gram rules shared by the CPU and CUDA kernels (BLT_SPEC.md b): the primes, the tables, the
// hash of one window, the floored modulo, and the argument checks of the three ops.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common/checks.h"

#ifdef __CUDACC__
#define BLT_HASH_HD __host__ __device__ __forceinline__
#else
#define BLT_HASH_HD inline
#endif

namespace blt_ext::hash_ngram {

constexpr int kNumPrimes = 11;
constexpr int kMaxNgramSize = 16;
constexpr int kMaxNgramSizes = 16;  // entries of ngram_sizes

// Function f hashes with kPrimes[f].
constexpr uint64_t kPrimes[kNumPrimes] = {1000000007ULL, 5915587277ULL, 1500450271ULL, 3267000013ULL,
                                          5754853343ULL, 4093082899ULL, 9576890767ULL, 3628273133ULL,
                                          2860486313ULL, 5463458053ULL, 3367900313ULL};

// The tables, function-major: table t = f * num_sizes + k hashes n = sizes[k] with primes[f]. Small
// and trivially copyable: CUDA kernels take it by value.
struct HashConfig {
  int num_sizes;
  int num_tables;
  int64_t vocab;  // rows V of each table
  int sizes[kMaxNgramSizes];
  uint64_t primes[kNumPrimes];

  BLT_HASH_HD int ngram_size(int t) const { return sizes[t % num_sizes]; }
  BLT_HASH_HD uint64_t prime(int t) const { return primes[t / num_sizes]; }
};

inline HashConfig make_hash_config(at::IntArrayRef ngram_sizes, int64_t num_functions, int64_t vocab) {
  HashConfig config{};
  config.num_sizes = static_cast<int>(ngram_sizes.size());
  config.num_tables = static_cast<int>(num_functions) * config.num_sizes;
  config.vocab = vocab;
  for (int k = 0; k < config.num_sizes; ++k) config.sizes[k] = static_cast<int>(ngram_sizes[k]);
  for (int f = 0; f < kNumPrimes; ++f) config.primes[f] = kPrimes[f];
  return config;
}

// sum_{i<n} w[i] * p^i over the window w = (x[j-n+1], ..., x[j]) (oldest times p^0), by Horner from
// the newest byte. back[k] = x[j-k] (0 before the row start). Unsigned, so the products wrap modulo
// 2^64 exactly like the original's torch int64 arithmetic, without signed-overflow UB.
template <typename Back>
BLT_HASH_HD uint64_t window_hash(const Back& back, int n, uint64_t prime) {
  uint64_t h = static_cast<uint64_t>(back[0]);
  for (int k = 1; k < n; ++k) h = h * prime + static_cast<uint64_t>(back[k]);
  return h;
}

// The wrapped hash read as int64, floored modulo v (torch.remainder): always in [0, v).
BLT_HASH_HD int64_t floor_mod(uint64_t h, int64_t v) {
  const int64_t r = static_cast<int64_t>(h) % v;
  return r < 0 ? r + v : r;
}

// The row of table t (in [0, V)) gathered at the position whose window is `back`.
template <typename Back>
BLT_HASH_HD int64_t table_id(const HashConfig& config, const Back& back, int t) {
  return floor_mod(window_hash(back, config.ngram_size(t), config.prime(t)), config.vocab);
}

// ---- argument checks (host); data-dependent checks are the CPU kernels' own ----

inline void check_config(const char* op, at::IntArrayRef ngram_sizes, int64_t num_functions) {
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

inline void check_tokens(const char* op, const at::Tensor& tokens) {
  check_dim(tokens, op, "tokens", 2, "[B, T]");
  check_dtype(tokens, op, "tokens", at::kLong);
}

// Rows V of one table in the packed [num_tables * V, D] hash weight.
inline int64_t table_vocab(const char* op, const char* name, int64_t hash_rows, int64_t num_tables) {
  TORCH_CHECK_VALUE(hash_rows > 0 && hash_rows % num_tables == 0, "blt_ext.", op, ": ", name,
                    " must be a positive multiple of the number of tables ",
                    "num_functions * len(ngram_sizes) = ", num_tables, ", got ", hash_rows);
  return hash_rows / num_tables;
}

inline HashConfig check_ids_args(const char* op, const at::Tensor& tokens, at::IntArrayRef ngram_sizes,
                                 int64_t num_functions, int64_t hash_vocab) {
  check_tokens(op, tokens);
  check_config(op, ngram_sizes, num_functions);
  TORCH_CHECK_VALUE(hash_vocab >= 1, "blt_ext.", op, ": hash_vocab must be >= 1, got ", hash_vocab);
  return make_hash_config(ngram_sizes, num_functions, hash_vocab);
}

inline HashConfig check_embedding_args(const char* op, const at::Tensor& tokens,
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

inline HashConfig check_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& tokens,
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
