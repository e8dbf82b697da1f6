// Host launchers of fisher_accumulate_ and its list form (kernels: fisher.cuh).
#include "fisher.cuh"
#include "host_common.h"
#include "ops.h"

namespace ssam {
namespace cuda {

void fisher_accumulate_(const at::Tensor& F, const at::Tensor& G, double alpha) {
  check_fisher_args(F, G);
  const int64_t n = F.numel();
  if (n == 0) return;
  const gpu::DeviceGuard guard(F.device());
  dispatch_dtype(G.scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    float* f = F.data_ptr<float>();
    const T* g = G.data_ptr<T>();
    gpu::launch<fisher_kernel<T>>(grid_for(num_chunks(n), kWarpsPerBlock), kThreads, 0,
                                  FisherArgs<T>{f, g, n, aligned16({f, g})}, fisher_alpha(alpha));
  });
}

void fisher_accumulate_multi_(at::TensorList F, at::TensorList G, double alpha) {
  check_list_lengths(F.size(), {{"G", G.size()}});
  if (F.empty()) return;
  std::vector<int64_t> rows(F.size() * kColumns, 0);
  for (size_t j = 0; j < F.size(); ++j) {
    check_fisher_shapes(F[j], G[j]);
    check_same_kind(G[j], G[0], "G", j);
    set_streaming_row(rows, j, address(F[j]), address(G[j]), F[j].numel());
  }
  check_disjoint(fisher_spans(F, G, true));
  const gpu::DeviceGuard guard(F[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, F[0].device(), keep, "fisher_accumulate_multi_");
  if (table.chunks == 0) return;
  dispatch_dtype(G[0].scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gpu::launch<fisher_list_kernel<T>>(grid_for(table.chunks, kWarpsPerBlock), kThreads, 0, table,
                                       fisher_alpha(alpha));
  });
}

}  // namespace cuda
}  // namespace ssam
