// Entropy patching on the CPU (BLT_SPEC.md c): entropies of the entropy model's logits, patch
// start masks (entropy and space rules) and the layout (ids, lengths, counts) of a start mask.
// Every batch row is patched on its own.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "blt_ext.h"
#include "common/entropy_patch.h"

namespace blt_ext::cpu {
namespace {

using namespace blt_ext::entropy_patch;

// Shifted logits d = z - max are clamped from below: exp there is < 1e-37 (float) or 1e-304
// (double) beside the max term's 1, and the clamp keeps e * d finite for logits at -inf.
// `d < lo ? lo : d` keeps NaN.
template <typename acc_t>
constexpr acc_t kMinShifted = std::is_same_v<acc_t, float> ? acc_t(-87) : acc_t(-700);

// The entropy of softmax(z) of one row, from d = z - max, s = sum e^d and t = sum e^d d:
// H = log s - t / s (the logsumexp minus the mean logit, both shifted by the max).
template <typename acc_t>
acc_t entropy_from_sums(acc_t s, acc_t t) {
  return std::log(s) - t / s;
}

// Scalar rows: float64, and the tails of float rows.
template <typename acc_t>
void accumulate_scalar(const acc_t* z, int64_t begin, int64_t end, acc_t m, acc_t& s, acc_t& t) {
  for (int64_t v = begin; v < end; ++v) {
    const acc_t d = z[v] - m < kMinShifted<acc_t> ? kMinShifted<acc_t> : z[v] - m;
    const acc_t e = std::exp(d);
    s += e;
    t += e * d;
  }
}

void entropy_rows_f64(const double* z, double* h, int64_t rows, int64_t V) {
  for (int64_t r = 0; r < rows; ++r, z += V) {
    double m = -std::numeric_limits<double>::infinity();
    for (int64_t v = 0; v < V; ++v) m = z[v] > m ? z[v] : m;
    double s = 0, t = 0;
    accumulate_scalar(z, 0, V, m, s, t);
    h[r] = entropy_from_sums(s, t);
  }
}

// On x86-64 Linux this loop is compiled once per ISA level and the best one for the running CPU
// is picked at load time (GNU ifunc): 16 float lanes are one AVX-512 register, two AVX2 ones or
// four SSE ones. GCC/Clang vector extensions keep it SIMD without relying on the auto-vectorizer.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__)
#define BLT_EXT_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define BLT_EXT_ISA_CLONES
#endif

BLT_EXT_ISA_CLONES void entropy_rows_f32(const float* z, float* h, int64_t rows, int64_t V) {
  typedef float pack __attribute__((vector_size(64)));
  typedef int32_t ipack __attribute__((vector_size(64)));
  constexpr int kLanes = 16;
  const int64_t body = V - V % kLanes;
  const pack lo = pack{} + kMinShifted<float>;
  const pack round = pack{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer held in the low bits
  for (int64_t r = 0; r < rows; ++r, z += V) {
    pack pack_max = pack{} - std::numeric_limits<float>::infinity();
    for (int64_t v = 0; v < body; v += kLanes) {
      pack x;
      std::memcpy(&x, z + v, sizeof(x));
      pack_max = x > pack_max ? x : pack_max;
    }
    float m = -std::numeric_limits<float>::infinity();
    for (int l = 0; l < kLanes; ++l) m = pack_max[l] > m ? pack_max[l] : m;
    for (int64_t v = body; v < V; ++v) m = z[v] > m ? z[v] : m;

    pack pack_sum{}, pack_dot{};
    for (int64_t v = 0; v < body; v += kLanes) {
      pack d;
      std::memcpy(&d, z + v, sizeof(d));
      d -= m;
      d = d < lo ? lo : d;
      // e = exp(d) for d in [-87, 0] to about 1 ulp (Cephes expf): d = n ln2 + x, a degree-6
      // polynomial in x, 2^n built in the exponent bits. NaN propagates through x.
      const pack finite = d == d ? d : pack{};  // NaN-free copy for the exponent
      const pack shifted = finite * 1.44269504088896341f + round;
      const pack n = shifted - round;
      const ipack exponent = __builtin_bit_cast(ipack, shifted) - __builtin_bit_cast(ipack, round);
      const pack x = (d - n * 0.693359375f) - n * -2.12194440e-4f;
      pack e = x * 1.9875691500e-4f + 1.3981999507e-3f;
      e = e * x + 8.3334519073e-3f;
      e = e * x + 4.1665795894e-2f;
      e = e * x + 1.6666665459e-1f;
      e = e * x + 5.0000001201e-1f;
      e = e * x * x + x + 1.0f;
      e *= __builtin_bit_cast(pack, (exponent + 127) << 23);
      pack_sum += e;
      pack_dot += e * d;
    }
    float s = 0, t = 0;
    for (int l = 0; l < kLanes; ++l) {
      s += pack_sum[l];
      t += pack_dot[l];
    }
    accumulate_scalar(z, body, V, m, s, t);
    h[r] = entropy_from_sums(s, t);
  }
}

// 16-bit rows are widened to float, ~16K logits at a time.
template <typename scalar_t>
void entropy_rows(const scalar_t* z, opmath_t<scalar_t>* h, int64_t rows, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, double>) {
    entropy_rows_f64(z, h, rows, V);
  } else if constexpr (std::is_same_v<scalar_t, float>) {
    entropy_rows_f32(z, h, rows, V);
  } else {
    const int64_t step = std::max<int64_t>(1, 16384 / V);
    std::vector<float> wide(std::min(step, rows) * V);
    for (int64_t r = 0; r < rows; r += step) {
      const int64_t n = std::min(step, rows - r);
      std::copy(z + r * V, z + (r + n) * V, wide.begin());
      entropy_rows_f32(wide.data(), h + r, n, V);
    }
  }
}

}  // namespace

at::Tensor entropy(const at::Tensor& logits) {
  check_logits(logits);
  const at::Tensor z = logits.contiguous();
  const int64_t V = z.size(-1);
  const int64_t rows = z.numel() / V;
  const auto out_dtype = z.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = at::empty(z.sizes().slice(0, z.dim() - 1), z.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "blt_ext.entropy", [&] {
    using acc_t = opmath_t<scalar_t>;
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    acc_t* hp = out.mutable_data_ptr<acc_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 16384 / V), [&](int64_t lo, int64_t hi) {
      entropy_rows(zp + lo * V, hp + lo, hi - lo, V);
    });
  });
  return out;
}

at::Tensor entropy_patch_starts(const at::Tensor& entropies, double threshold, std::optional<double> threshold_add,
                                bool monotonicity, bool include_next_token) {
  check_entropy_patch_starts_args(entropies, threshold, threshold_add);
  const at::Tensor h = entropies.contiguous();
  const int64_t B = h.size(0), T = h.size(1), L = T + include_next_token;
  const StartMode mode = start_mode(threshold_add, monotonicity);
  at::Tensor starts = at::empty({B, T + 1}, h.options().dtype(at::kBool));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "blt_ext.entropy_patch_starts", [&] {
    // Rounded to the entropies' dtype, as `entropies > threshold` rounds the Python float.
    const auto th = static_cast<scalar_t>(threshold);
    const auto th_add = static_cast<scalar_t>(threshold_add.value_or(0.0));
    const scalar_t* hp = h.const_data_ptr<scalar_t>();
    bool* sp = starts.mutable_data_ptr<bool>();
    at::parallel_for(0, B, std::max<int64_t>(1, 65536 / (T + 1)), [&](int64_t lo, int64_t hi) {
      for (int64_t b = lo; b < hi; ++b) {
        const scalar_t* row = hp + b * T;
        bool* out = sp + b * (T + 1);
        for (int64_t p = 0; p <= T; ++p) {
          out[p] = p < L && (p < 2 || entropy_starts_at(mode, p, row[p - 1], row[p - 2], th, th_add));
        }
      }
    });
  });
  return starts;
}

at::Tensor space_patch_starts(const at::Tensor& tokens, bool include_next_token) {
  check_space_patch_starts_args(tokens);
  const at::Tensor t = tokens.contiguous();
  const int64_t B = t.size(0), T = t.size(1), L = T + include_next_token;
  const int64_t* tp = t.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < B * T; ++i) {
    TORCH_CHECK_VALUE(tp[i] >= 0 && tp[i] < kVocabSize, "blt_ext.space_patch_starts: tokens must be in [0, ",
                      kVocabSize, "), got ", tp[i], " at [", i / T, ", ", i % T, "]");
  }
  at::Tensor starts = at::empty({B, T + 1}, t.options().dtype(at::kBool));
  bool* sp = starts.mutable_data_ptr<bool>();
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / (T + 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t* row = tp + b * T;
      bool* out = sp + b * (T + 1);
      for (int64_t p = 0; p <= T; ++p) out[p] = p < L && (p < 2 || space_starts_at(row[p - 2], row[p - 1]));
    }
  });
  return starts;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> patch_layout(const at::Tensor& starts, bool include_next_token,
                                                            std::optional<int64_t> max_patch_length) {
  check_patch_layout_args(starts, max_patch_length);
  const at::Tensor s = starts.contiguous();
  const int64_t B = s.size(0), T = s.size(1) - 1, L = T + include_next_token;
  const bool* sp = s.const_data_ptr<bool>();
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK_VALUE(L == 0 || sp[b * (T + 1)], "blt_ext.patch_layout: starts[:, 0] must be True (the first ",
                      "byte starts a patch), got False in row ", b);
    TORCH_CHECK_VALUE(include_next_token || !sp[b * (T + 1) + T], "blt_ext.patch_layout: starts[:, T] (the next ",
                      "byte) must be False when include_next_token is False, got True in row ", b);
  }
  const int64_t m = max_patch_length.value_or(std::numeric_limits<int64_t>::max());
  at::Tensor patch_ids = at::empty({B, T}, s.options().dtype(at::kLong));
  at::Tensor patch_lengths = at::zeros({B, T + 1}, s.options().dtype(at::kLong));
  at::Tensor patch_counts = at::empty({B}, s.options().dtype(at::kLong));
  int64_t* ids = patch_ids.mutable_data_ptr<int64_t>();
  int64_t* lengths = patch_lengths.mutable_data_ptr<int64_t>();
  int64_t* counts = patch_counts.mutable_data_ptr<int64_t>();
  at::parallel_for(0, B, std::max<int64_t>(1, 65536 / (T + 1)), [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const bool* row = sp + b * (T + 1);
      int64_t* len = lengths + b * (T + 1);
      int64_t count = 0, begin = 0;
      int64_t run = 0;  // position within the current natural patch, modulo m
      for (int64_t p = 0; p < L; ++p) {
        if (row[p] || ++run == m) run = 0;
        if (run == 0) {
          if (count > 0) len[count - 1] = p - begin;
          begin = p;
          ++count;
        }
        if (p < T) ids[b * T + p] = count - 1;
      }
      if (count > 0) len[count - 1] = L - begin;
      counts[b] = count;
    }
  });
  return {patch_ids, patch_lengths, patch_counts};
}

// The three ops in sequence: on the CPU a call's dispatch is small beside the work, and the
// composition keeps one implementation of every rule.
std::tuple<at::Tensor, at::Tensor, at::Tensor> entropy_patch(const at::Tensor& logits, double threshold,
                                                             std::optional<double> threshold_add,
                                                             bool monotonicity, bool include_next_token,
                                                             std::optional<int64_t> max_patch_length) {
  check_entropy_patch_args(logits, threshold, threshold_add, max_patch_length);
  const at::Tensor starts =
      entropy_patch_starts(entropy(logits), threshold, threshold_add, monotonicity, include_next_token);
  return patch_layout(starts, include_next_token, max_patch_length);
}

}  // namespace blt_ext::cpu

TORCH_LIBRARY_IMPL(blt_ext, CPU, m) {
  m.impl("entropy", &blt_ext::cpu::entropy);
  m.impl("entropy_patch_starts", &blt_ext::cpu::entropy_patch_starts);
  m.impl("space_patch_starts", &blt_ext::cpu::space_patch_starts);
  m.impl("patch_layout", &blt_ext::cpu::patch_layout);
  m.impl("entropy_patch", &blt_ext::cpu::entropy_patch);
}
