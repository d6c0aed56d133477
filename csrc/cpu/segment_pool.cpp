// Segment pooling of byte states into patches (BLT_SPEC.md d, patch representation init), CPU.
// Patch p of row b covers bytes [s_p, s_p + len_p) clipped to [0, T), s = exclusive cumsum of the
// row's lengths; a patch with no real byte pools to exactly 0 (arg_index -1).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "blt_ext.h"
#include "common/segment_pool.h"

namespace blt_ext::cpu {
namespace {

// Features are processed in chunks small enough for the running max/sum to stay in registers
// across a patch's bytes, while the inner loop over a chunk vectorizes.
constexpr int64_t kChunk = 64;

struct PatchRange {
  int64_t begin, end;  // real bytes [begin, end), begin <= end <= T
};

// The byte range of every patch, row-major [B * P].
std::vector<PatchRange> patch_ranges(const at::Tensor& patch_lengths, int64_t num_bytes) {
  const auto lengths = patch_lengths.contiguous();
  const int64_t B = lengths.size(0), P = lengths.size(1);
  const int64_t* len = lengths.const_data_ptr<int64_t>();
  std::vector<PatchRange> ranges(B * P);
  for (int64_t b = 0; b < B; ++b) {
    int64_t start = 0;
    for (int64_t p = 0; p < P; ++p) {
      const int64_t end = start + len[b * P + p];
      ranges[b * P + p] = {std::min(start, num_bytes), std::min(end, num_bytes)};
      start = end;
    }
  }
  return ranges;
}

// Work per patch is about (bytes per patch) x D; aim for tasks of ~32K elements.
int64_t patch_grain(int64_t D) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(D, 1) / 4); }

template <typename scalar_t, bool kMax>
void pool_extremum(const at::Tensor& x, const std::vector<PatchRange>& ranges, int64_t P, at::Tensor& out,
                   at::Tensor& arg_index) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(1), D = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  int32_t* ap = arg_index.mutable_data_ptr<int32_t>();
  at::parallel_for(0, static_cast<int64_t>(ranges.size()), patch_grain(D), [&](int64_t lo, int64_t hi) {
    acc_t best[kChunk];
    int32_t idx[kChunk];
    for (int64_t n = lo; n < hi; ++n) {
      const auto [s, e] = ranges[n];
      const scalar_t* row = xp + (n / P) * T * D;
      scalar_t* o = op + n * D;
      int32_t* a = ap + n * D;
      if (s == e) {
        std::fill(o, o + D, scalar_t(0));
        std::fill(a, a + D, -1);
        continue;
      }
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        const int64_t w = std::min(kChunk, D - d0);
        // Two passes that both vectorize (a fused value + index select does not): the extremum,
        // NaN-propagating as torch.amax, then its first byte. Any NaN makes best NaN, so a byte
        // matches when it equals best or is NaN.
        for (int64_t j = 0; j < w; ++j) best[j] = static_cast<acc_t>(row[s * D + d0 + j]);
        for (int64_t t = s + 1; t < e; ++t) {
          const scalar_t* xt = row + t * D + d0;
          for (int64_t j = 0; j < w; ++j) {
            const acc_t v = static_cast<acc_t>(xt[j]);
            best[j] = ((kMax ? v > best[j] : v < best[j]) || v != v) ? v : best[j];
          }
        }
        for (int64_t j = 0; j < w; ++j) idx[j] = static_cast<int32_t>(e - 1);
        for (int64_t t = e - 2; t >= s; --t) {
          const scalar_t* xt = row + t * D + d0;
          for (int64_t j = 0; j < w; ++j) {
            const acc_t v = static_cast<acc_t>(xt[j]);
            idx[j] = (v == best[j] || v != v) ? static_cast<int32_t>(t) : idx[j];
          }
        }
        for (int64_t j = 0; j < w; ++j) {
          o[d0 + j] = static_cast<scalar_t>(best[j]);
          a[d0 + j] = idx[j];
        }
      }
    }
  });
}

template <typename scalar_t>
void pool_mean(const at::Tensor& x, const std::vector<PatchRange>& ranges, int64_t P, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = x.size(1), D = x.size(2);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  scalar_t* op = out.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, static_cast<int64_t>(ranges.size()), patch_grain(D), [&](int64_t lo, int64_t hi) {
    acc_t sum[kChunk];
    for (int64_t n = lo; n < hi; ++n) {
      const auto [s, e] = ranges[n];
      const scalar_t* row = xp + (n / P) * T * D;
      scalar_t* o = op + n * D;
      if (s == e) {
        std::fill(o, o + D, scalar_t(0));
        continue;
      }
      const acc_t count = static_cast<acc_t>(e - s);
      for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
        const int64_t w = std::min(kChunk, D - d0);
        std::fill(sum, sum + w, acc_t(0));
        for (int64_t t = s; t < e; ++t) {
          const scalar_t* xt = row + t * D + d0;
          for (int64_t j = 0; j < w; ++j) sum[j] += static_cast<acc_t>(xt[j]);
        }
        for (int64_t j = 0; j < w; ++j) o[d0 + j] = static_cast<scalar_t>(sum[j] / count);
      }
    }
  });
}

// Bytes belong to exactly one patch, so each task writes the grad_x rows of its own patches only.
template <typename scalar_t>
void pool_backward(const at::Tensor& grad_output, const at::Tensor& arg_index, PoolReduce reduce,
                   const std::vector<PatchRange>& ranges, int64_t P, at::Tensor& grad_x) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t T = grad_x.size(1), D = grad_x.size(2);
  const scalar_t* gp = grad_output.const_data_ptr<scalar_t>();
  const int32_t* ap = reduce == PoolReduce::Mean ? nullptr : arg_index.const_data_ptr<int32_t>();
  scalar_t* xp = grad_x.mutable_data_ptr<scalar_t>();
  at::parallel_for(0, static_cast<int64_t>(ranges.size()), patch_grain(D), [&](int64_t lo, int64_t hi) {
    acc_t share[kChunk];
    for (int64_t n = lo; n < hi; ++n) {
      const auto [s, e] = ranges[n];
      if (s == e) continue;
      const scalar_t* g = gp + n * D;
      scalar_t* row = xp + (n / P) * T * D;
      if (ap == nullptr) {
        const acc_t count = static_cast<acc_t>(e - s);
        for (int64_t d0 = 0; d0 < D; d0 += kChunk) {
          const int64_t w = std::min(kChunk, D - d0);
          for (int64_t j = 0; j < w; ++j) share[j] = static_cast<acc_t>(g[d0 + j]) / count;
          for (int64_t t = s; t < e; ++t) {
            scalar_t* gt = row + t * D + d0;
            for (int64_t j = 0; j < w; ++j) gt[j] = static_cast<scalar_t>(share[j]);
          }
        }
        continue;
      }
      std::memset(static_cast<void*>(row + s * D), 0, sizeof(scalar_t) * (e - s) * D);
      const int32_t* a = ap + n * D;
      for (int64_t d = 0; d < D; ++d) {
        const int64_t t = a[d];
        TORCH_CHECK_VALUE(t >= s && t < e, "blt_ext.segment_pool_backward: arg_index must hold a byte of its patch [",
                          s, ", ", e, "), got ", t, " at [", n / P, ", ", n % P, ", ", d, "]");
        row[t * D + d] = g[d];
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> segment_pool(const at::Tensor& x, const at::Tensor& patch_lengths,
                                                const std::string& reduce) {
  const PoolReduce r = check_segment_pool_args(x, patch_lengths, reduce);
  const int64_t B = x.size(0), T = x.size(1), D = x.size(2), P = patch_lengths.size(1);
  TORCH_CHECK_VALUE(T <= INT32_MAX, "blt_ext.segment_pool: x.size(1) (T) must fit in int32, got ", T);
  auto out = at::empty({B, P, D}, x.options());
  auto arg_index = at::empty(r == PoolReduce::Mean ? std::vector<int64_t>{0} : std::vector<int64_t>{B, P, D},
                             x.options().dtype(at::kInt));
  const auto ranges = patch_ranges(patch_lengths, T);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "segment_pool", [&] {
    switch (r) {
      case PoolReduce::Max: pool_extremum<scalar_t, true>(x, ranges, P, out, arg_index); break;
      case PoolReduce::Min: pool_extremum<scalar_t, false>(x, ranges, P, out, arg_index); break;
      case PoolReduce::Mean: pool_mean<scalar_t>(x, ranges, P, out); break;
    }
  });
  return {out, arg_index};
}

at::Tensor segment_pool_backward(const at::Tensor& grad_output, const at::Tensor& arg_index,
                                 const at::Tensor& patch_lengths, int64_t num_bytes, const std::string& reduce) {
  const PoolReduce r = check_segment_pool_backward_args(grad_output, arg_index, patch_lengths, num_bytes, reduce);
  const int64_t B = grad_output.size(0), P = grad_output.size(1), D = grad_output.size(2);
  // Every byte lies in exactly one patch (rows sum to T or T + 1, checked above): no zero fill needed.
  auto grad_x = at::empty({B, num_bytes, D}, grad_output.options());
  const auto ranges = patch_ranges(patch_lengths, num_bytes);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_output.scalar_type(), "segment_pool_backward",
                                  [&] { pool_backward<scalar_t>(grad_output, arg_index, r, ranges, P, grad_x); });
  return grad_x;
}

}  // namespace blt_ext::cpu

TORCH_LIBRARY_IMPL(blt_ext, CPU, m) {
  m.impl("segment_pool", &blt_ext::cpu::segment_pool);
  m.impl("segment_pool_backward", &blt_ext::cpu::segment_pool_backward);
}
