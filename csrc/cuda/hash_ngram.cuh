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

HashConfig make_hash_config(at::IntArrayRef ngram_sizes, int64_t num_functions, int64_t vocab);

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

void check_config(const char* op, at::IntArrayRef ngram_sizes, int64_t num_functions);

void check_tokens(const char* op, const at::Tensor& tokens);

// Rows V of one table in the packed [num_tables * V, D] hash weight.
int64_t table_vocab(const char* op, const char* name, int64_t hash_rows, int64_t num_tables);

HashConfig check_ids_args(const char* op, const at::Tensor& tokens, at::IntArrayRef ngram_sizes,
                          int64_t num_functions, int64_t hash_vocab);

HashConfig check_embedding_args(const char* op, const at::Tensor& tokens,
                                const at::Tensor& byte_weight, const at::Tensor& hash_weight,
                                at::IntArrayRef ngram_sizes, int64_t num_functions);

HashConfig check_backward_args(const char* op, const at::Tensor& grad_output, const at::Tensor& tokens,
                               int64_t byte_rows, int64_t hash_rows, at::IntArrayRef ngram_sizes,
                               int64_t num_functions);

}  // namespace blt_ext::hash_ngram
