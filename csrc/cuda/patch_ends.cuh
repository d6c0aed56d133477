// Inclusive patch ends from patch lengths on the device, for the kernels that place patches
// (cross-attention, segment pooling); also the CUDA kernel of the op blt_ext::patch_ends.
#pragma once

#include <ATen/core/Tensor.h>

namespace blt_ext::cuda {

// ends[b, p] = lengths[b, 0] + ... + lengths[b, p] for int64 lengths [B, P], on the current
// stream, without a host synchronisation.
at::Tensor patch_ends(const at::Tensor& patch_lengths);

}  // namespace blt_ext::cuda
