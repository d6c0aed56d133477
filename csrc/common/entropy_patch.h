// Entropy patching (BLT_SPEC.md c): argument checks and the per-position start rules, shared by
// the CPU and CUDA kernels so that both devices accept the same inputs and decide every start
// the same way, bit for bit.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cmath>
#include <optional>
#include <type_traits>

#include "common/checks.h"

namespace blt_ext::entropy_patch {

// Token ids are byte + kOffset; ids below kOffset are the specials (BOE, BOS, EOS, BPE).
constexpr int64_t kOffset = 4;
constexpr int64_t kVocabSize = 260;

// Which rule decides positions p >= 2. Monotonicity wins over threshold_add, as in the original.
enum class StartMode : int { Global, Monotonic, GlobalAndRelative };

inline StartMode start_mode(std::optional<double> threshold_add, bool monotonicity) {
  if (monotonicity) return StartMode::Monotonic;
  return threshold_add.has_value() ? StartMode::GlobalAndRelative : StartMode::Global;
}

// Arithmetic type of torch's elementwise ops on scalar_t: float for the 16-bit floats.
template <typename scalar_t>
using opmath_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// Whether position p >= 2 starts a patch, given cur = H[p-1] and prev = H[p-2]. Thresholds are
// already rounded to scalar_t and differences are rounded to scalar_t, as torch computes
// `entropies > threshold` and `entropies[:, 1:] - entropies[:, :-1]` in the entropies' dtype.
template <typename scalar_t>
C10_HOST_DEVICE inline bool entropy_starts_at(StartMode mode, int64_t p, scalar_t cur, scalar_t prev,
                                              scalar_t threshold, scalar_t threshold_add) {
  using op_t = opmath_t<scalar_t>;
  const op_t diff = static_cast<op_t>(static_cast<scalar_t>(static_cast<op_t>(cur) - static_cast<op_t>(prev)));
  switch (mode) {
    case StartMode::Monotonic:
      return p == 2 || diff > static_cast<op_t>(threshold);
    case StartMode::GlobalAndRelative:
      // The original forces 2 and, through its `~mask[:, :-1]` term, never starts 3.
      return p == 2 || (p > 3 && static_cast<op_t>(cur) > static_cast<op_t>(threshold) &&
                        diff > static_cast<op_t>(threshold_add));
    default:
      return static_cast<op_t>(cur) > static_cast<op_t>(threshold);
  }
}

// A byte that ends a word: not [0-9A-Za-z] and not a UTF-8 continuation byte (0x80-0xBF);
// ASCII punctuation, whitespace, controls, UTF-8 lead bytes and the specials all are.
C10_HOST_DEVICE inline bool space_like(int64_t token) {
  const int64_t byte = token - kOffset;
  const bool alnum = (byte >= '0' && byte <= '9') || (byte >= 'A' && byte <= 'Z') || (byte >= 'a' && byte <= 'z');
  const bool continuation = byte >= 0x80 && byte < 0xC0;
  return !alnum && !continuation;
}

// Whether position p >= 2 starts a patch under space patching, given token = tokens[p-1] and
// prev = tokens[p-2]: after the first space-like byte of a run, and after every special.
C10_HOST_DEVICE inline bool space_starts_at(int64_t prev, int64_t token) {
  return token < kOffset || (space_like(token) && !space_like(prev));
}

void check_logits(const at::Tensor& logits);

void check_entropy_patch_starts_args(const at::Tensor& entropies, double threshold,
                                     std::optional<double> threshold_add);

void check_space_patch_starts_args(const at::Tensor& tokens);

void check_patch_layout_args(const at::Tensor& starts, std::optional<int64_t> max_patch_length);

void check_entropy_patch_args(const at::Tensor& logits, double threshold, std::optional<double> threshold_add,
                              std::optional<int64_t> max_patch_length);

}  // namespace blt_ext::entropy_patch
