// Hash n-gram rules shared by the CPU and CUDA kernels (BLT_SPEC.md b): the primes, the hash of one
// window, the floored modulo, and the checks of the hashing configuration.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#ifdef __CUDACC__
#define BLT_HASH_HD __host__ __device__ __forceinline__
#else
#define BLT_HASH_HD inline
#endif

namespace blt_ext::hash_ngram {

constexpr int kNumPrimes = 11;
constexpr int kMaxNgramSize = 16;
constexpr int kMaxNgramSizes = 16;  // entries of ngram_sizes
constexpr int kMaxTables = kNumPrimes * kMaxNgramSizes;

// Function f hashes with kPrimes[f].
constexpr uint64_t kPrimes[kNumPrimes] = {1000000007ULL, 5915587277ULL, 1500450271ULL, 3267000013ULL,
                                          5754853343ULL, 4093082899ULL, 9576890767ULL, 3628273133ULL,
                                          2860486313ULL, 5463458053ULL, 3367900313ULL};

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

// Rows of one table in the packed [num_tables * V, D] hash weight.
inline int64_t table_vocab(const char* op, const char* name, int64_t hash_rows, int64_t num_tables) {
  TORCH_CHECK_VALUE(hash_rows > 0 && hash_rows % num_tables == 0, "blt_ext.", op, ": ", name,
                    " must be a positive multiple of the number of tables ",
                    "num_functions * len(ngram_sizes) = ", num_tables, ", got ", hash_rows);
  return hash_rows / num_tables;
}

}  // namespace blt_ext::hash_ngram
