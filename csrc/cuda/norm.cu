// Host launchers of grad_sq_norm and grad_sq_norm_multi (kernels: norm.cuh).
#include "host_common.h"
#include "norm.cuh"
#include "ops.h"

namespace ssam {
namespace cuda {
namespace {

// Both stages of a norm over `chunks` chunks in all: the partial kernel on a one-wave grid with `args`,
// then the final one into a new float64 0-d tensor.
template <auto PartialKernel, typename Args>
at::Tensor launch_norm(const Args& args, int64_t chunks, const at::TensorOptions& options) {
  at::Tensor out = gpu::scratch(at::empty({}, options.dtype(at::kDouble)), "the norm");
  const int64_t grid = wave_grid_for<PartialKernel>(chunks);
  // Every block writes its own partial: no zeroing.
  at::Tensor partial = gpu::scratch(at::empty({grid}, out.options()), "the block partials");
  gpu::launch<PartialKernel>(grid, kThreads, 0, args, partial.data_ptr<double>());
  gpu::launch<sq_norm_final_kernel>(1, kThreads, 0, partial.data_ptr<double>(), grid, out.data_ptr<double>());
  return out;
}

}  // namespace

at::Tensor grad_sq_norm(const at::Tensor& G, const std::optional<at::Tensor>& W) {
  check_grad_sq_norm_args(G, W);
  const gpu::DeviceGuard guard(G.device());
  const int64_t n = G.numel();
  if (n == 0) return at::zeros({}, G.options().dtype(at::kDouble));
  at::Tensor out;
  dispatch_dtype(G.scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = G.data_ptr<T>();
    const T* w = W.has_value() ? W->data_ptr<T>() : nullptr;
    out = launch_norm<sq_norm_partial_kernel<T>>(NormArgs<T>{g, w, n, aligned16({g, w})}, num_chunks(n),
                                                 G.options());
  });
  return out;
}

at::Tensor grad_sq_norm_multi(at::TensorList G, const OptionalTensors& W) {
  TORCH_CHECK_VALUE(!G.empty(), "G: expected at least one tensor");
  check_list_lengths(G.size(), {{"W", W.size()}});
  std::vector<int64_t> rows(G.size() * kColumns, 0);
  for (size_t j = 0; j < G.size(); ++j) {
    const std::optional<at::Tensor> w = W.get(j);
    check_grad_sq_norm_args(G[j], w);
    check_same_kind(G[j], G[0], "G", j);
    set_streaming_row(rows, j, address(w), address(G[j]), G[j].numel());
  }
  const gpu::DeviceGuard guard(G[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, G[0].device(), keep, "grad_sq_norm_multi");
  at::Tensor out;
  dispatch_dtype(G[0].scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    out = launch_norm<sq_norm_list_kernel<T>>(table, table.chunks, G[0].options());
  });
  return out;
}

}  // namespace cuda
}  // namespace ssam
