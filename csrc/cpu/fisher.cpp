// fisher_accumulate_ on CPU: F += alpha · g², a streaming loop in fp32 with one fused multiply-add per
// entry (common.h: the clones).
#include <type_traits>

#include "common.h"

namespace ssam {
namespace {

// f_i = f_i + alpha·g_i² with one fp32 fused multiply-add (ssam_math.h: fisher_update).
template <typename T>
inline void fisher_run(float* __restrict f, const T* __restrict g, int64_t n, float alpha) {
  for (int64_t i = 0; i < n; ++i) f[i] = fisher_update(f[i], g[i], alpha);
}

// The cloned entry points, one per storage type (target_clones applies to plain functions only).
SSAM_CPU_CLONES void fisher_block(float* f, const float* g, int64_t n, float alpha) { fisher_run(f, g, n, alpha); }
SSAM_CPU_CLONES void fisher_block(float* f, const c10::BFloat16* g, int64_t n, float alpha) {
  fisher_run(f, g, n, alpha);
}
SSAM_CPU_CLONES void fisher_block(float* f, const c10::Half* g, int64_t n, float alpha) {
  fisher_run(f, g, n, alpha);
}
SSAM_CPU_CLONES void fisher_block(float* f, const double* g, int64_t n, float alpha) { fisher_run(f, g, n, alpha); }

// F += alpha · g² with one fp32 fused multiply-add per entry (ssam_math.h: fisher_update; alpha rounded to
// fp32 once, fisher_alpha), G of any float dtype, in parallel over fixed ranges of entries. Checked already.
void fisher_run_cpu(const at::Tensor& F, const at::Tensor& G, double alpha) {
  float* f = F.data_ptr<float>();
  const float a = fisher_alpha(alpha);
  dispatch_dtype(G.scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, int32_t>) {
      const T* g = G.data_ptr<T>();
      at::parallel_for(0, F.numel(), kGrain, [&](int64_t i0, int64_t i1) { fisher_block(f + i0, g + i0, i1 - i0, a); });
    }
  });
}

}  // namespace

void fisher_accumulate_cpu(const at::Tensor& F, const at::Tensor& G, double alpha) {
  check_fisher_args(F, G);
  fisher_run_cpu(F, G, alpha);
}

// The list form: one C++ call; each tensor runs the single-tensor loop (parallel within the tensor). Not
// on the per-step path (the Fisher pass accumulates once per sample batch).
void fisher_accumulate_multi_cpu(at::TensorList F, at::TensorList G, double alpha) {
  check_list_lengths(F.size(), {{"G", G.size()}});
  for (size_t j = 0; j < F.size(); ++j) {
    check_fisher_shapes(F[j], G[j]);
    check_same_kind(G[j], G[0], "G", j);
  }
  check_disjoint(fisher_spans(F, G, true));
  for (size_t j = 0; j < F.size(); ++j) fisher_run_cpu(F[j], G[j], alpha);
}

}  // namespace ssam
