// The blt_ext operator library: every schema in one place, and the Python module blt_ext._C.
// Implementations register per device in csrc/cpu/*.cpp and csrc/cuda/*.cu; fakes (meta
// kernels) and autograd are registered from Python in blt_ext/ops/.
#include <torch/extension.h>
#include <torch/library.h>

#include "blt_ext.h"

TORCH_LIBRARY(blt_ext, m) {
  // tokens [B, T] int64 -> ids [B, T, num_functions * len(ngram_sizes)] int64 in [0, hash_vocab),
  // table order function-major; rolling polynomial hash of the n-byte window ending at each position.
  m.def("hash_ngram_ids(Tensor tokens, int[] ngram_sizes, int num_functions, int hash_vocab) -> Tensor");
  // byte_weight[tokens] + sum over tables i of hash_weight[i * V + ids[..., i]], V = hash_weight rows / tables.
  m.def(
      "hash_ngram_embedding(Tensor tokens, Tensor byte_weight, Tensor hash_weight, int[] ngram_sizes, "
      "int num_functions) -> Tensor");
  // Dense gradients (grad_byte_weight [byte_rows, D], grad_hash_weight [hash_rows, D]).
  m.def(
      "hash_ngram_embedding_backward(Tensor grad_output, Tensor tokens, int byte_rows, int hash_rows, "
      "int[] ngram_sizes, int num_functions, bool deterministic) -> (Tensor, Tensor)");

  // logits [..., V] -> entropy of softmax(logits) in nats, float32 [...].
  m.def("entropy(Tensor logits) -> Tensor");
  // entropies [B, T] -> patch start mask [B, T + 1] (column T: the not-yet-seen next byte).
  m.def(
      "entropy_patch_starts(Tensor entropies, float threshold, float? threshold_add, bool monotonicity, "
      "bool include_next_token) -> Tensor");
  // tokens [B, T] -> start mask [B, T + 1]: a patch starts after each run-initial space-like byte.
  m.def("space_patch_starts(Tensor tokens, bool include_next_token) -> Tensor");
  // start mask [B, T + 1] -> (patch_ids [B, T], patch_lengths [B, T + 1] zero padded, patch_counts [B]).
  m.def(
      "patch_layout(Tensor starts, bool include_next_token, int? max_patch_length) -> (Tensor, Tensor, "
      "Tensor)");
  // logits [B, T, V] -> patch_layout(entropy_patch_starts(entropy(logits), ...), ...), one op.
  m.def(
      "entropy_patch(Tensor logits, float threshold, float? threshold_add, bool monotonicity, "
      "bool include_next_token, int? max_patch_length) -> (Tensor, Tensor, Tensor)");

  // x [B, T, D] pooled per patch (max | mean | min) -> (out [B, P, D], arg_index [B, P, D] int32 or [0]).
  m.def("segment_pool(Tensor x, Tensor patch_lengths, str reduce) -> (Tensor, Tensor)");
  m.def(
      "segment_pool_backward(Tensor grad_output, Tensor arg_index, Tensor patch_lengths, int num_bytes, "
      "str reduce) -> Tensor");

  // patch_lengths [B, P] int64 -> inclusive patch ends [B, P] (torch.cumsum(patch_lengths, 1)): the
  // offsets the cross-attention kernels walk. Computed once, they serve an op and its backward
  // (patch_ends= below), which then skip computing them again.
  m.def("patch_ends(Tensor patch_lengths) -> Tensor");
  // q [B, Sq, H, Dh], k/v [B, Sk, H, Dh] -> (out [B, Sq, H, Dh], lse [B, H, Sq] float32).
  // direction "encoder": query slot j (patch j // slots) attends the bytes of its patch;
  // direction "decoder": byte t attends the slots of patch p(t + 1) - 1. Fully masked rows give 0.
  // patch_ends: patch_ends(patch_lengths) if already computed (checked against it on the CPU).
  m.def(
      "patch_cross_attention(Tensor q, Tensor k, Tensor v, Tensor patch_lengths, int slots, str direction, "
      "float scale, Tensor? patch_ends=None) -> (Tensor, Tensor)");
  m.def(
      "patch_cross_attention_backward(Tensor grad_output, Tensor q, Tensor k, Tensor v, Tensor output, "
      "Tensor lse, Tensor patch_lengths, int slots, str direction, float scale, Tensor? patch_ends=None) -> "
      "(Tensor, Tensor, Tensor)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "blt_ext compiled kernels; the ops are under torch.ops.blt_ext";
#ifdef BLT_EXT_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
  m.attr("torch_version") = TORCH_VERSION;
}
