// The op signatures of blt_ext, declared for each device implementation.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>

namespace blt_ext::cpu {
#include "op_signatures.inc"
}  // namespace blt_ext::cpu

#ifdef BLT_EXT_WITH_CUDA
namespace blt_ext::cuda {
#include "op_signatures.inc"
}  // namespace blt_ext::cuda
#endif
