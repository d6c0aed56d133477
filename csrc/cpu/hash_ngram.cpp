// Hash n-gram ids and embedding on the CPU (BLT_SPEC.md b; DESIGN.md op 1).
//
// The embedding hashes every table's window in the kernel and sums the byte row and the hash rows
// of one position in a float (double for float64) buffer: no ids tensor and no per-table [B, T, D]
// intermediates. The backward is deterministic whatever the thread count: each output row is summed
// by one thread in position order.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <utility>
#include <vector>

#include "blt_ext.h"
#include "common/checks.h"
#include "cuda/hash_ngram.cuh"

namespace blt_ext::cpu {
namespace {

using hash_ngram::HashConfig;
using hash_ngram::kMaxNgramSize;
using hash_ngram::table_id;

constexpr int64_t kTokenVocab = 260;  // 256 bytes + 4 specials (BLT_SPEC.md a)

// back[k] = x[j - k] for the position j of row x, 0 (BOE) before the row start.
struct Window {
  int64_t back[kMaxNgramSize];
  Window(const int64_t* row, int64_t j) {
    for (int k = 0; k < kMaxNgramSize; ++k) back[k] = j - k >= 0 ? row[j - k] : 0;
  }
  int64_t operator[](int k) const { return back[k]; }
};

// Reads the data: tokens must be a contiguous CPU tensor.
void check_token_values(const at::Tensor& tokens, int64_t limit, const char* op, const char* rule) {
  const int64_t* data = tokens.data_ptr<int64_t>();
  const int64_t numel = tokens.numel();
  const int64_t* bad = std::find_if(data, data + numel, [&](int64_t v) { return v < 0 || v >= limit; });
  if (bad != data + numel) {
    const int64_t i = bad - data;
    TORCH_CHECK_VALUE(false, "blt_ext.", op, ": tokens must be in [0, ", limit, ") (", rule, "), got ", *bad,
                      " at [", i / tokens.size(1), ", ", i % tokens.size(1), "]");
  }
}

// IEEE half <-> float without branches: c10's scalar conversions (round to nearest even), rewritten
// so that the row loops below vectorize on any target; c10::Half's own only do with F16C.
inline float half_bits_to_float(uint16_t h) {
  const uint32_t w = static_cast<uint32_t>(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normal = std::bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = std::bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t exponent = two_w >> 27;
  const uint32_t is_subnormal = ((exponent | (0u - exponent)) >> 31) - 1u;  // all ones iff exponent == 0
  return std::bit_cast<float>(sign | (std::bit_cast<uint32_t>(subnormal) & is_subnormal) |
                              (std::bit_cast<uint32_t>(normal) & ~is_subnormal));
}

inline uint16_t float_to_half_bits(float f) {
  const uint32_t w = std::bit_cast<uint32_t>(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t bias = std::max(shl1_w & 0xFF000000u, 0x71000000u);
  const float scaled = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const float base = std::bit_cast<float>((bias >> 1) + 0x07800000u) + scaled;
  const uint32_t bits = std::bit_cast<uint32_t>(base);
  const uint32_t nonsign = ((bits >> 13) & 0x7C00u) + (bits & 0x0FFFu);
  const uint32_t is_nan = 0u - static_cast<uint32_t>(shl1_w > 0xFF000000u);
  return static_cast<uint16_t>((sign >> 16) | (0x7E00u & is_nan) | (nonsign & ~is_nan));
}

// The row loops are where the time goes: on x86-64 they are also compiled for AVX2 and the loader
// picks that version where the CPU has it (GCC function multiversioning).
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BLT_ROW_LOOP __attribute__((target_clones("avx2", "default")))
#else
#define BLT_ROW_LOOP
#endif

// acc[0, n) += row[0, n) in the accumulation type.
template <typename acc_t, typename scalar_t>
BLT_ROW_LOOP void add_row(acc_t* __restrict acc, const scalar_t* __restrict row, int64_t n) {
  for (int64_t d = 0; d < n; ++d) acc[d] += static_cast<acc_t>(row[d]);
}

BLT_ROW_LOOP inline void add_row(float* __restrict acc, const c10::Half* __restrict row, int64_t n) {
  const auto* bits = reinterpret_cast<const uint16_t*>(row);
  for (int64_t d = 0; d < n; ++d) acc[d] += half_bits_to_float(bits[d]);
}

// out[0, n) = acc[0, n) rounded to scalar_t.
template <typename scalar_t, typename acc_t>
BLT_ROW_LOOP void store_row(scalar_t* __restrict out, const acc_t* __restrict acc, int64_t n) {
  for (int64_t d = 0; d < n; ++d) out[d] = static_cast<scalar_t>(acc[d]);
}

BLT_ROW_LOOP inline void store_row(c10::Half* __restrict out, const float* __restrict acc, int64_t n) {
  auto* bits = reinterpret_cast<uint16_t*>(out);
  for (int64_t d = 0; d < n; ++d) bits[d] = float_to_half_bits(acc[d]);
}

// Positions per parallel chunk: about 64K elements of work each.
int64_t grain_for(int64_t work_per_position) {
  return std::max<int64_t>(1, 65536 / std::max<int64_t>(1, work_per_position));
}

// Rows are scattered over tables far larger than the caches: the rows of a few positions ahead are
// prefetched while the current one is summed, so their memory latencies overlap.
constexpr int64_t kLookahead = 4;

template <typename scalar_t>
void prefetch_row(const scalar_t* row, int64_t dim) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t offset = 0; offset < dim * static_cast<int64_t>(sizeof(scalar_t)); offset += 64) {
    __builtin_prefetch(bytes + offset);
  }
}

template <typename scalar_t>
void embedding_forward(const int64_t* tokens, const scalar_t* byte_weight, const scalar_t* hash_weight,
                       scalar_t* out, int64_t batch, int64_t seq, int64_t dim,
                       const HashConfig& config) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_tables = config.num_tables;
  const int64_t num_rows = num_tables + 1;  // the byte row, then one row per table
  at::parallel_for(0, batch * seq, grain_for(dim * num_rows), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    // rows of position pos at ring[(pos % (kLookahead + 1)) * num_rows ...]
    std::vector<const scalar_t*> ring((kLookahead + 1) * num_rows);
    auto gather_rows = [&](int64_t pos) {
      const scalar_t** rows = ring.data() + (pos % (kLookahead + 1)) * num_rows;
      const int64_t j = pos % seq;
      const Window window(tokens + (pos - j), j);
      rows[0] = byte_weight + tokens[pos] * dim;
      for (int64_t t = 0; t < num_tables; ++t) {
        rows[t + 1] = hash_weight + (t * config.vocab + table_id(config, window, t)) * dim;
      }
      for (int64_t r = 0; r < num_rows; ++r) prefetch_row(rows[r], dim);
    };
    for (int64_t pos = begin; pos < std::min(end, begin + kLookahead); ++pos) gather_rows(pos);
    for (int64_t pos = begin; pos < end; ++pos) {
      if (pos + kLookahead < end) gather_rows(pos + kLookahead);
      const scalar_t* const* rows = ring.data() + (pos % (kLookahead + 1)) * num_rows;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t r = 0; r < num_rows; ++r) add_row(acc.data(), rows[r], dim);
      store_row(out + pos * dim, acc.data(), dim);
    }
  });
}

// grad_byte[r] = sum of grad rows of the positions whose token is r, in position order. Threads
// split the columns, so every column sums its rows in the same order on any thread count.
template <typename scalar_t>
void byte_backward(const scalar_t* grad, const int64_t* tokens, scalar_t* grad_byte, int64_t positions,
                   int64_t byte_rows, int64_t dim) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int64_t kColumns = 64;
  const int64_t blocks = (dim + kColumns - 1) / kColumns;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(byte_rows * kColumns);
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block * kColumns;
      const int64_t width = std::min(kColumns, dim - c0);
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t pos = 0; pos < positions; ++pos) {
        add_row(acc.data() + tokens[pos] * kColumns, grad + pos * dim + c0, width);
      }
      for (int64_t r = 0; r < byte_rows; ++r) {
        store_row(grad_byte + r * dim + c0, acc.data() + r * kColumns, width);
      }
    }
  });
}

// grad_hash[r] = sum of the grad rows of the (position, table) pairs that gather row r. A counting
// sort by row lists each row's positions in order; then each thread writes a range of rows (zeros
// for rows nobody gathered), so the dense gradient is written once, with no separate zero fill.
template <typename scalar_t>
void hash_backward(const scalar_t* grad, const int64_t* tokens, scalar_t* grad_hash, int64_t batch,
                   int64_t seq, int64_t dim, const HashConfig& config) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t num_tables = config.num_tables;
  const int64_t positions = batch * seq;
  const int64_t hash_rows = num_tables * config.vocab;
  std::vector<int64_t> rows(positions * num_tables);
  at::parallel_for(0, positions, grain_for(num_tables * kMaxNgramSize), [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t j = pos % seq;
      const Window window(tokens + (pos - j), j);
      for (int64_t t = 0; t < num_tables; ++t) {
        rows[pos * num_tables + t] = t * config.vocab + table_id(config, window, t);
      }
    }
  });
  std::vector<int64_t> start(hash_rows + 1, 0);
  for (const int64_t r : rows) ++start[r + 1];
  for (int64_t r = 0; r < hash_rows; ++r) start[r + 1] += start[r];
  std::vector<int64_t> cursor(start.begin(), start.end() - 1);
  std::vector<int64_t> sources(rows.size());
  for (int64_t e = 0; e < static_cast<int64_t>(rows.size()); ++e) sources[cursor[rows[e]]++] = e / num_tables;

  at::parallel_for(0, hash_rows, grain_for(dim), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(dim);
    for (int64_t r = begin; r < end; ++r) {
      scalar_t* out = grad_hash + r * dim;
      if (start[r] == start[r + 1]) {
        std::fill(out, out + dim, scalar_t(0));
        continue;
      }
      std::fill(acc.begin(), acc.end(), acc_t(0));
      for (int64_t k = start[r]; k < start[r + 1]; ++k) add_row(acc.data(), grad + sources[k] * dim, dim);
      store_row(out, acc.data(), dim);
    }
  });
}

}  // namespace

at::Tensor hash_ngram_ids(const at::Tensor& tokens, at::IntArrayRef ngram_sizes, int64_t num_functions,
                          int64_t hash_vocab) {
  constexpr const char* op = "hash_ngram_ids";
  const HashConfig config = hash_ngram::check_ids_args(op, tokens, ngram_sizes, num_functions, hash_vocab);
  const at::Tensor tok = tokens.contiguous();
  check_token_values(tok, kTokenVocab, op, "byte + 4 or a special id");

  const int64_t num_tables = config.num_tables;
  const int64_t seq = tok.size(1);
  at::Tensor ids = at::empty({tok.size(0), seq, num_tables}, tok.options());
  const int64_t* x = tok.data_ptr<int64_t>();
  int64_t* out = ids.data_ptr<int64_t>();
  at::parallel_for(0, tok.numel(), grain_for(num_tables * kMaxNgramSize), [&](int64_t begin, int64_t end) {
    for (int64_t pos = begin; pos < end; ++pos) {
      const int64_t j = pos % seq;
      const Window window(x + (pos - j), j);
      for (int64_t t = 0; t < num_tables; ++t) out[pos * num_tables + t] = table_id(config, window, t);
    }
  });
  return ids;
}

at::Tensor hash_ngram_embedding(const at::Tensor& tokens, const at::Tensor& byte_weight,
                                const at::Tensor& hash_weight, at::IntArrayRef ngram_sizes,
                                int64_t num_functions) {
  constexpr const char* op = "hash_ngram_embedding";
  const HashConfig config =
      hash_ngram::check_embedding_args(op, tokens, byte_weight, hash_weight, ngram_sizes, num_functions);
  const at::Tensor tok = tokens.contiguous();
  check_token_values(tok, byte_weight.size(0), op, "rows of byte_weight");

  const at::Tensor bw = byte_weight.contiguous();
  const at::Tensor hw = hash_weight.contiguous();
  const int64_t dim = bw.size(1);
  at::Tensor out = at::empty({tok.size(0), tok.size(1), dim}, bw.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bw.scalar_type(), op, [&] {
    embedding_forward<scalar_t>(tok.data_ptr<int64_t>(), bw.data_ptr<scalar_t>(), hw.data_ptr<scalar_t>(),
                                out.data_ptr<scalar_t>(), tok.size(0), tok.size(1), dim, config);
  });
  return out;
}

// `deterministic` is accepted for the schema's sake: the CPU path is always deterministic.
std::tuple<at::Tensor, at::Tensor> hash_ngram_embedding_backward(
    const at::Tensor& grad_output, const at::Tensor& tokens, int64_t byte_rows, int64_t hash_rows,
    at::IntArrayRef ngram_sizes, int64_t num_functions, bool /*deterministic*/) {
  constexpr const char* op = "hash_ngram_embedding_backward";
  const HashConfig config = hash_ngram::check_backward_args(op, grad_output, tokens, byte_rows, hash_rows,
                                                            ngram_sizes, num_functions);
  const at::Tensor tok = tokens.contiguous();
  check_token_values(tok, byte_rows, op, "rows of byte_weight");

  const at::Tensor grad = grad_output.contiguous();
  const int64_t dim = grad.size(2);
  at::Tensor grad_byte = at::empty({byte_rows, dim}, grad.options());
  at::Tensor grad_hash = at::empty({hash_rows, dim}, grad.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), op, [&] {
    const scalar_t* g = grad.data_ptr<scalar_t>();
    const int64_t* x = tok.data_ptr<int64_t>();
    byte_backward<scalar_t>(g, x, grad_byte.data_ptr<scalar_t>(), tok.numel(), byte_rows, dim);
    hash_backward<scalar_t>(g, x, grad_hash.data_ptr<scalar_t>(), tok.size(0), tok.size(1), dim, config);
  });
  return {grad_byte, grad_hash};
}

}  // namespace blt_ext::cpu

TORCH_LIBRARY_IMPL(blt_ext, CPU, m) {
  m.impl("hash_ngram_ids", &blt_ext::cpu::hash_ngram_ids);
  m.impl("hash_ngram_embedding", &blt_ext::cpu::hash_ngram_embedding);
  m.impl("hash_ngram_embedding_backward", &blt_ext::cpu::hash_ngram_embedding_backward);
}
