// Widening stored 16-bit (or wider) floats to their accumulation type in registers.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <type_traits>

namespace blt_ext::cuda {

// x[0, N) = the N elements at `packed` (4-byte aligned for bf16) as acc_t. A bf16 is the top half
// of a float, so bf16 widens on 32-bit words: the low element is the word shifted up, the high one
// the word with its low half cleared, one instruction each (converting element by element takes
// a byte permute and a shift for every element). Exact either way.
template <typename acc_t, typename T, int N>
__device__ __forceinline__ void widen(acc_t (&x)[N], const T* packed) {
  if constexpr (std::is_same_v<T, c10::BFloat16> && std::is_same_v<acc_t, float> && N % 2 == 0) {
    const auto* words = reinterpret_cast<const uint32_t*>(packed);
#pragma unroll
    for (int j = 0; j < N / 2; ++j) {
      x[2 * j] = __uint_as_float(words[j] << 16);
      x[2 * j + 1] = __uint_as_float(words[j] & 0xffff0000u);
    }
  } else {
#pragma unroll
    for (int j = 0; j < N; ++j) x[j] = static_cast<acc_t>(packed[j]);
  }
}

}  // namespace blt_ext::cuda
