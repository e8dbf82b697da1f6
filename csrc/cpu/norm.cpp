// grad_sq_norm on CPU: a streaming loop over lanes widened to float64 (common.h: the clones).
#include "common.h"

namespace ssam {
namespace {

constexpr int64_t kNormBlock = 1 << 14;          // entries per partial sum of grad_sq_norm

// Σ g_i² (kWeighted: Σ (g_i·w_i)²) over [0, n), products and sums in float64, in kLanes interleaved
// accumulators added in lane order at the end: the result depends on the data and n only.
template <typename T, bool kWeighted>
inline double sq_sum(const T* __restrict g, const T* __restrict w, int64_t n) {
  constexpr int kLanes = 16;
  double acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    prefetch_span<kLanes * sizeof(T)>(g + i);
    if constexpr (kWeighted) prefetch_span<kLanes * sizeof(T)>(w + i);
    for (int l = 0; l < kLanes; ++l) {
      double v = widen(g[i + l]);
      if constexpr (kWeighted) v *= widen(w[i + l]);
      acc[l] += v * v;
    }
  }
  for (int l = 0; i < n; ++i, ++l) {
    double v = widen(g[i]);
    if constexpr (kWeighted) v *= widen(w[i]);
    acc[l] += v * v;
  }
  double total = 0.0;
  for (double a : acc) total += a;
  return total;
}

// The cloned entry points, one per storage type (target_clones applies to plain functions only).
SSAM_CPU_CLONES double sq_sum_block(const float* g, const float* w, int64_t n) {
  return w == nullptr ? sq_sum<float, false>(g, w, n) : sq_sum<float, true>(g, w, n);
}
SSAM_CPU_CLONES double sq_sum_block(const c10::BFloat16* g, const c10::BFloat16* w, int64_t n) {
  return w == nullptr ? sq_sum<c10::BFloat16, false>(g, w, n) : sq_sum<c10::BFloat16, true>(g, w, n);
}
SSAM_CPU_CLONES double sq_sum_block(const c10::Half* g, const c10::Half* w, int64_t n) {
  return w == nullptr ? sq_sum<c10::Half, false>(g, w, n) : sq_sum<c10::Half, true>(g, w, n);
}
SSAM_CPU_CLONES double sq_sum_block(const double* g, const double* w, int64_t n) {
  return w == nullptr ? sq_sum<double, false>(g, w, n) : sq_sum<double, true>(g, w, n);
}

}  // namespace

// Partial sums over fixed blocks of kNormBlock entries of every tensor in one parallel pass, then each
// tensor's total in block order and the tensors' totals added in list order: the result depends on the
// data only (never on the thread count), and a list's total is bit-identical to adding the single-tensor
// results (the single-tensor op is a list of one) one by one.
at::Tensor grad_sq_norm_multi_cpu(at::TensorList G, const OptionalTensors& W) {
  TORCH_CHECK_VALUE(!G.empty(), "G: expected at least one tensor");
  check_list_lengths(G.size(), {{"W", W.size()}});
  std::vector<int64_t> first_block(G.size() + 1, 0);
  for (size_t j = 0; j < G.size(); ++j) {
    const std::optional<at::Tensor> w = W.get(j);
    check_grad_sq_norm_args(G[j], w);
    check_same_kind(G[j], G[0], "G", j);
    first_block[j + 1] = first_block[j] + (G[j].numel() + kNormBlock - 1) / kNormBlock;
  }
  std::vector<double> partial(first_block.back());
  dispatch_dtype(G[0].scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, int32_t>) {
      at::parallel_for(0, static_cast<int64_t>(partial.size()), 1, [&](int64_t b0, int64_t b1) {
        // The tensor of block b0, then walk forward: blocks are numbered tensor after tensor.
        size_t j = std::upper_bound(first_block.begin(), first_block.end(), b0) - first_block.begin() - 1;
        for (int64_t b = b0; b < b1; ++b) {
          while (b >= first_block[j + 1]) ++j;
          const std::optional<at::Tensor> w = W.get(j);
          const int64_t begin = (b - first_block[j]) * kNormBlock;
          partial[b] = sq_sum_block(G[j].data_ptr<T>() + begin, w.has_value() ? w->data_ptr<T>() + begin : nullptr,
                                    std::min(kNormBlock, G[j].numel() - begin));
        }
      });
    }
  });
  double total = 0.0;
  for (size_t j = 0; j < G.size(); ++j) {
    double sum = 0.0;
    for (int64_t b = first_block[j]; b < first_block[j + 1]; ++b) sum += partial[b];
    total += sum;
  }
  return at::scalar_tensor(total, G[0].options().dtype(at::kDouble));
}

at::Tensor grad_sq_norm_cpu(const at::Tensor& G, const std::optional<at::Tensor>& W) {
  return grad_sq_norm_multi_cpu({G}, OptionalTensors({W}));
}

// The entry point of the direct eager call (registration.cpp), on lists the caller checked.
at::Tensor grad_sq_norm_checked_cpu(at::TensorList G, const OptionalTensors& W) { return grad_sq_norm_multi_cpu(G, W); }

}  // namespace ssam
