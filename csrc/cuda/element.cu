// Host launchers of perturb_ / restore_ / axpby_ and their list forms (kernels: element.cuh).
#include "element.cuh"
#include "host_common.h"
#include "ops.h"

namespace ssam {
namespace cuda {
namespace {

template <typename Fn>
void dispatch_op(bool restore, bool adaptive, Fn&& fn) {
  if (restore) {
    fn(Restore{});
  } else if (adaptive) {
    fn(PerturbAdaptive{});
  } else {
    fn(Perturb{});
  }
}

template <typename T>
void launch_element(const ElementArgs<T>& args, ScaleView scale, bool adaptive, bool restore) {
  const int64_t blocks = grid_for(num_chunks(args.n), kWarpsPerBlock);
  dispatch_op(restore, adaptive, [&](auto op) {
    gpu::launch<element_kernel<T, decltype(op)>>(blocks, kThreads, 0, args, scale);
  });
}

// The table of a perturb_ / restore_ list (G null for restore_) from its checked entries.
std::vector<int64_t> element_rows(const std::vector<ListEntry>& entries) {
  std::vector<int64_t> rows(entries.size() * kColumns, 0);
  for (size_t j = 0; j < entries.size(); ++j) {
    const ListEntry& e = entries[j];
    int64_t* row = rows.data() + j * kColumns;
    row[kColW] = address(*e.W);
    row[kColG] = e.G != nullptr ? address(*e.G) : 0;
    row[kColMask] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(e.view.words));
    row[kColOffsets] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(e.view.offsets));
    row[kColOffsets64] = e.view.offsets64;
    row[kColBackup] = address(*e.backup);
    row[kColN] = e.W->numel();
    row[kColCapacity] = e.backup->numel();
    set_vec(row);
  }
  return rows;
}

void launch_element_list(at::TensorList W, const std::vector<int64_t>& rows, ScaleView scale, bool adaptive,
                         bool restore) {
  if (W.empty()) return;
  const gpu::DeviceGuard guard(W[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, W[0].device(), keep, restore ? "restore_multi_" : "perturb_multi_");
  if (table.chunks == 0) return;
  dispatch_dtype(W[0].scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_op(restore, adaptive, [&](auto op) {
      gpu::launch<element_list_kernel<T, decltype(op)>>(grid_for(table.chunks, kWarpsPerBlock), kThreads, 0, table,
                                                        scale);
    });
  });
}

}  // namespace

void perturb_(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
              const std::optional<at::Tensor>& offsets, const at::Tensor& backup, const at::Tensor& scale,
              bool adaptive) {
  const MaskView view = perturb_view(W, G, mask, offsets, backup);
  check_disjoint(element_spans({{&W, &G, view, &backup}}, &scale, false));
  const ScaleView s = scale_view(scale, W);
  const int64_t n = W.numel();
  if (n == 0) return;
  const gpu::DeviceGuard guard(W.device());
  dispatch_dtype(W.scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* w = W.data_ptr<T>();
    const T* g = G.data_ptr<T>();
    T* b = backup.data_ptr<T>();
    launch_element(ElementArgs<T>{w, g, b, n, backup.numel(), view.words, view.offsets, view.offsets64,
                                  aligned16({w, g, b})},
                   s, adaptive, false);
  });
}

void restore_(const at::Tensor& W, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets,
              const at::Tensor& backup) {
  const MaskView view = restore_view(W, mask, offsets, backup);
  check_disjoint(element_spans({{&W, nullptr, view, &backup}}, nullptr, false));
  const int64_t n = W.numel();
  if (n == 0) return;
  const gpu::DeviceGuard guard(W.device());
  if (view.words == nullptr) {  // dense: a device-to-device copy runs at copy bandwidth by definition
    gpu::copy_async(W.data_ptr(), backup.data_ptr(), n * W.element_size());
    return;
  }
  dispatch_dtype(W.scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* w = W.data_ptr<T>();
    T* b = backup.data_ptr<T>();
    launch_element(ElementArgs<T>{w, nullptr, b, n, backup.numel(), view.words, view.offsets, view.offsets64,
                                  aligned16({w, b})},
                   ScaleView{}, false, true);
  });
}

void perturb_multi_(at::TensorList W, at::TensorList G, const OptionalTensors& mask, const OptionalTensors& offsets,
                    at::TensorList backup, const at::Tensor& scale, bool adaptive) {
  check_list_lengths(W.size(), {{"G", G.size()}, {"mask", mask.size()}, {"offsets", offsets.size()},
                                {"backup", backup.size()}});
  if (W.empty()) return;
  std::vector<const at::Tensor*> grads;
  for (const at::Tensor& g : G) grads.push_back(&g);
  const std::vector<int64_t> rows = element_rows(check_element_args(W, grads.data(), mask, offsets, backup, &scale));
  launch_element_list(W, rows, scale_view(scale, W[0]), adaptive, false);
}

void restore_multi_(at::TensorList W, const OptionalTensors& mask, const OptionalTensors& offsets,
                    at::TensorList backup) {
  check_list_lengths(W.size(), {{"mask", mask.size()}, {"offsets", offsets.size()}, {"backup", backup.size()}});
  launch_element_list(W, element_rows(check_element_args(W, nullptr, mask, offsets, backup, nullptr)), ScaleView{},
                      false, true);
}

void axpby_(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& a, const at::Tensor& b) {
  const std::pair<ScaleView, ScaleView> scales = check_axpby_args({X}, {Y}, a, b, false);
  const int64_t n = X.numel();
  if (n == 0) return;
  const gpu::DeviceGuard guard(X.device());
  dispatch_dtype(X.scalar_type(), "X", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* x = X.data_ptr<T>();
    const T* y = Y.data_ptr<T>();
    gpu::launch<axpby_kernel<T>>(grid_for(num_chunks(n), kWarpsPerBlock), kThreads, 0,
                                 AxpbyArgs<T>{x, y, n, aligned16({x, y})}, scales.first, scales.second);
  });
}

void axpby_multi_(at::TensorList X, at::TensorList Y, const at::Tensor& a, const at::Tensor& b) {
  const std::pair<ScaleView, ScaleView> scales = check_axpby_args(X, Y, a, b, true);
  if (X.empty()) return;
  std::vector<int64_t> rows(X.size() * kColumns, 0);
  for (size_t j = 0; j < X.size(); ++j) set_streaming_row(rows, j, address(X[j]), address(Y[j]), X[j].numel());
  const gpu::DeviceGuard guard(X[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, X[0].device(), keep, "axpby_multi_");
  if (table.chunks == 0) return;
  dispatch_dtype(X[0].scalar_type(), "X", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gpu::launch<axpby_list_kernel<T>>(grid_for(table.chunks, kWarpsPerBlock), kThreads, 0, table, scales.first,
                                      scales.second);
  });
}

}  // namespace cuda
}  // namespace ssam
