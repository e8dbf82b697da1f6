// Host-side helpers shared by the CPU (cpu/) and CUDA (cuda/) implementations of the ops
// registered in registration.cpp: argument checks and dtype dispatch.
//
// The public functions in ssam_kernels/ops/__init__.py validate their arguments with messages that name
// them; these checks only keep a direct torch.ops.ssam_kernels.* call from reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <initializer_list>
#include <numeric>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "ssam_math.h"

namespace ssam {

template <typename T>
struct Tag {
  using type = T;
};

// Calls fn(Tag<T>{}) with T the C++ type of a storage dtype in {fp32, fp64, bf16, fp16}; int32 too when
// with_int32 (hash scores). One instantiation per dtype.
template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, const char* name, bool with_int32, Fn&& fn) {
  switch (dtype) {
    case at::kFloat:
      fn(Tag<float>{});
      return;
    case at::kDouble:
      fn(Tag<double>{});
      return;
    case at::kBFloat16:
      fn(Tag<c10::BFloat16>{});
      return;
    case at::kHalf:
      fn(Tag<c10::Half>{});
      return;
    case at::kInt:
      if (with_int32) {
        fn(Tag<int32_t>{});
        return;
      }
      break;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, name, ": unsupported dtype ", dtype);
}

inline void check_vector(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.is_contiguous(), name, ": expected a contiguous 1-D tensor");
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
}

inline void check_scalar(const at::Tensor& t, const char* name, at::ScalarType dtype, const at::Tensor& ref) {
  TORCH_CHECK(t.dim() == 0 && t.scalar_type() == dtype, name, ": expected a 0-d ", dtype, " tensor");
  TORCH_CHECK(t.device() == ref.device(), name, ": expected device ", ref.device(), ", got ", t.device());
}

// A bit-packed mask as kernels see it; words == nullptr means dense (every entry, rank(i) = i).
struct MaskView {
  const int32_t* words = nullptr;
  const void* offsets = nullptr;
  bool offsets64 = false;
};

// Whether a dtype is in one of the contract's dtype sets (ssam_contract.h, from ops/contract.py).
#define SSAM_DTYPE_IS(name) || t == at::k##name
inline bool is_float_dtype(at::ScalarType t) { return false SSAM_FLOAT_DTYPES(SSAM_DTYPE_IS); }
inline bool is_mask_dtype(at::ScalarType t) { return false SSAM_MASK_DTYPES(SSAM_DTYPE_IS); }
inline bool is_offsets_dtype(at::ScalarType t) { return false SSAM_OFFSETS_DTYPES(SSAM_DTYPE_IS); }
inline bool is_scale_dtype(at::ScalarType t) { return false SSAM_SCALE_DTYPES(SSAM_DTYPE_IS); }
#undef SSAM_DTYPE_IS

// Checks a mask (and its offsets, when present) over the entries of W.
inline MaskView mask_view(const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets,
                          const at::Tensor& W) {
  MaskView view;
  if (!mask.has_value()) return view;
  check_vector(*mask, "mask", W);
  TORCH_CHECK(is_mask_dtype(mask->scalar_type()) && mask->numel() == num_words(W.numel()),
              "mask: expected ", num_words(W.numel()), " int32 words");
  TORCH_CHECK(offsets.has_value(), "offsets: required when mask is given");
  check_vector(*offsets, "offsets", W);
  TORCH_CHECK(is_offsets_dtype(offsets->scalar_type()) && offsets->numel() == num_offsets(W.numel()),
              "offsets: expected ", num_offsets(W.numel()), " int32 or int64 entries");
  view.words = mask->data_ptr<int32_t>();
  view.offsets = offsets->data_ptr();
  view.offsets64 = offsets->scalar_type() == at::kLong;
  return view;
}

// Checks the backup of perturb_/restore_: W's dtype, N slots when dense, at most N when masked. Its
// exact length K is the mask's live count, which is not read here (on CUDA that would synchronise): the
// kernels touch only the slots 0 <= rank < backup.numel() (ssam_math.h: rank_in_range).
inline void check_backup(const at::Tensor& backup, const at::Tensor& W, const MaskView& view) {
  check_vector(backup, "backup", W);
  TORCH_CHECK_TYPE(backup.scalar_type() == W.scalar_type(), "backup: expected dtype ", W.scalar_type());
  TORCH_CHECK_VALUE(view.words != nullptr ? backup.numel() <= W.numel() : backup.numel() == W.numel(),
                    "backup: expected one slot per perturbed entry");
}

// A 0-d float32 or float64 scale tensor (perturb_'s scale, axpby_'s a and b: `name`) on W's device.
inline ScaleView scale_view(const at::Tensor& scale, const at::Tensor& W, const char* name = "scale") {
  TORCH_CHECK_TYPE(scale.dim() == 0 && is_scale_dtype(scale.scalar_type()), name,
                   ": expected a 0-d float32 or float64 tensor");
  TORCH_CHECK(scale.device() == W.device(), name, ": expected device ", W.device(), ", got ", scale.device());
  return {scale.data_ptr(), scale.scalar_type() == at::kDouble};
}

// ---------------------------------------------------------------------------------------------------
// Arguments that share memory. A tensor an op writes (perturb_'s W and backup, restore_'s W,
// fisher_accumulate_'s F, bucket_mask_multi's outputs) must share no byte with any other tensor argument
// of the call, in any entry of any list: a write into mask words, offsets or backup slots the kernel has
// yet to read moves the ranks it computes, and any overlap makes the result depend on the order of the
// writes. Tensors that are only read may overlap each other. Decided from byte ranges on the host (no
// device work). The rule, the argument order and the message are those of _check_disjoint in
// ssam_kernels/ops/__init__.py: the spans sorted by (device, first byte, argument position); the first
// span that starts inside an earlier one while either of the two is written is reported, with that earlier
// one (the earlier span reaching furthest, among the written ones if the later span is only read).
// ---------------------------------------------------------------------------------------------------

// The bytes [begin, end) of one tensor argument; `position` is its place in the argument order (lists:
// entry by entry, each entry's arguments in signature order; then the single tensors such as scale).
struct ArgSpan {
  int64_t device;
  uintptr_t begin, end;
  bool written;
  const char* name;
  int64_t index;  // its entry in its list; -1 for a tensor that is not in a list
  size_t position;
};

inline int64_t device_key(const at::Device& d) { return static_cast<int64_t>(d.type()) * 65536 + d.index(); }

// Appends t's span, from its first to its last byte, unless it holds none (empty, or no data: meta).
inline void add_span(std::vector<ArgSpan>& spans, const at::Tensor& t, const char* name, int64_t index, bool written) {
  const int64_t numel = t.numel();
  if (numel == 0) return;
  int64_t reach = numel;  // elements from the first to the last one, inclusive (strides are never negative)
  if (!t.is_contiguous()) {
    reach = 1;
    for (int64_t d = 0; d < t.dim(); ++d) reach += (t.size(d) - 1) * t.stride(d);
  }
  const uintptr_t begin = reinterpret_cast<uintptr_t>(t.const_data_ptr());
  if (begin != 0) {
    spans.push_back({device_key(t.device()), begin, begin + static_cast<uintptr_t>(reach) * t.element_size(), written,
                     name, index, spans.size()});
  }
}

inline bool span_before(const ArgSpan& a, const ArgSpan& b) {
  return a.device != b.device ? a.device < b.device
                              : a.begin != b.begin ? a.begin < b.begin : a.position < b.position;
}

inline std::string span_name(const ArgSpan& s) {
  return s.index < 0 ? std::string(s.name) : std::string(s.name) + "[" + std::to_string(s.index) + "]";
}

// The first conflict in the documented order: (the written span of the two or the later one, the other).
inline std::optional<std::pair<ArgSpan, ArgSpan>> first_conflict(std::vector<ArgSpan> spans) {
  std::sort(spans.begin(), spans.end(), span_before);
  const ArgSpan* reach = nullptr;          // the earlier span of this device reaching furthest
  const ArgSpan* written_reach = nullptr;  // likewise among the written ones
  for (size_t k = 0; k < spans.size(); ++k) {
    const ArgSpan& s = spans[k];
    if (k > 0 && s.device != spans[k - 1].device) reach = written_reach = nullptr;
    const ArgSpan* other = written_reach != nullptr && s.begin < written_reach->end ? written_reach
                           : s.written && reach != nullptr && s.begin < reach->end  ? reach
                                                                                    : nullptr;
    if (other != nullptr) return std::make_pair(s.written ? s : *other, s.written ? *other : s);
    if (reach == nullptr || s.end > reach->end) reach = &s;
    if (s.written && (written_reach == nullptr || s.end > written_reach->end)) written_reach = &s;
  }
  return std::nullopt;
}

// check_disjoint's fast test: whether any written span meets another span. The written spans are sorted
// by first byte (the order of the last call with as many written spans is tried first: the optimizer passes
// the same weights and backups at every step, so this is usually one linear pass) and checked against each
// other; each read span is then looked up among them by binary search (the last written span starting
// before its end is the only one that can reach into it). Spans on several devices (the ops layer's lists
// may mix them) take the sorted sweep of first_conflict.
inline bool any_overlap(const std::vector<ArgSpan>& spans) {
  size_t n_written = 0;
  bool one_device = true;
  for (const ArgSpan& s : spans) {
    n_written += s.written;
    one_device = one_device && s.device == spans.front().device;
  }
  if (n_written == 0) return false;
  if (!one_device) return first_conflict(spans).has_value();
  std::vector<uint32_t> written;
  written.reserve(n_written);
  for (size_t k = 0; k < spans.size(); ++k) {
    if (spans[k].written) written.push_back(static_cast<uint32_t>(k));
  }
  thread_local std::vector<std::vector<uint32_t>> orders(4);  // recent orders (positions among `written`)
  std::vector<uint32_t>* order = nullptr;
  for (auto& o : orders) {
    if (o.size() == n_written) order = &o;
  }
  auto begin_of = [&](uint32_t w) { return spans[written[w]].begin; };
  bool sorted = order != nullptr;
  for (size_t k = 1; sorted && k < n_written; ++k) sorted = begin_of((*order)[k - 1]) < begin_of((*order)[k]);
  if (!sorted) {
    if (order == nullptr) {
      std::rotate(orders.begin(), orders.end() - 1, orders.end());
      order = &orders.front();
    }
    order->resize(n_written);
    std::iota(order->begin(), order->end(), 0u);
    std::sort(order->begin(), order->end(), [&](uint32_t a, uint32_t b) { return begin_of(a) < begin_of(b); });
  }
  std::vector<uintptr_t> begins(n_written), ends(n_written);
  for (size_t k = 0; k < n_written; ++k) {
    const ArgSpan& w = spans[written[(*order)[k]]];
    begins[k] = w.begin;
    ends[k] = w.end;
    if (k > 0 && w.begin < ends[k - 1]) return true;
  }
  size_t before = 0;  // the number of written spans starting before the read span's end
  for (const ArgSpan& s : spans) {
    if (s.written) continue;
    // The previous read span's count is tried first (the masks or offsets of a list are often views of one
    // buffer, in order), else a branch-free binary search (gradients lie anywhere: a branching search
    // would mispredict half of its steps).
    if ((before > 0 && begins[before - 1] >= s.end) || (before < n_written && begins[before] < s.end)) {
      const uintptr_t* base = begins.data();
      for (size_t size = n_written; size > 1; size -= size / 2) base = base[size / 2] < s.end ? base + size / 2 : base;
      before = static_cast<size_t>(base - begins.data()) + (*base < s.end);
    }
    if (before > 0 && ends[before - 1] > s.begin) return true;
  }
  return false;
}

// Refuses (ValueError, naming the first conflict) a call whose spans break the rule.
inline void check_disjoint(const std::vector<ArgSpan>& spans) {
  if (!any_overlap(spans)) return;
  const auto conflict = first_conflict(spans);
  TORCH_CHECK_VALUE(!conflict.has_value(), span_name(conflict->first), ": shares memory with ",
                    span_name(conflict->second), "; a tensor the op writes must not overlap any other argument");
}

// Checks the optional eligibility filter of radix_histogram / threshold_mask.
inline const int32_t* filter_view(const std::optional<at::Tensor>& filter_words, const at::Tensor& scores) {
  if (!filter_words.has_value()) return nullptr;
  check_vector(*filter_words, "filter_words", scores);
  TORCH_CHECK(filter_words->scalar_type() == at::kInt && filter_words->numel() == num_words(scores.numel()),
              "filter_words: expected ", num_words(scores.numel()), " int32 words");
  return filter_words->data_ptr<int32_t>();
}

// At most 12 bits per digit: the CUDA kernel keeps a block histogram of 2^bits counts in shared memory,
// which must fit the default 48 KiB (the selection driver uses 11).
inline void check_digit(int64_t shift, int64_t bits) {
  TORCH_CHECK(bits >= 1 && bits <= 12 && shift >= 0 && shift + bits <= 32,
              "radix_histogram: expected 1 <= bits <= 12 and shift + bits <= 32, got shift=", shift,
              ", bits=", bits);
}


// The argument checks of each op, shared by its CPU and CUDA implementations.

inline void check_grad_sq_norm_args(const at::Tensor& G, const std::optional<at::Tensor>& W) {
  check_vector(G, "G", G);
  if (W.has_value()) {
    check_vector(*W, "W", G);
    TORCH_CHECK(W->scalar_type() == G.scalar_type() && W->numel() == G.numel(), "W: expected the dtype and size of G");
  }
}

// The per-tensor checks of perturb_'s arguments (shapes, dtypes, devices). The checks of a whole call add
// the overlap rule over element_spans of its entries.
inline MaskView perturb_view(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& offsets, const at::Tensor& backup) {
  check_vector(W, "W", W);
  check_vector(G, "G", W);
  TORCH_CHECK(G.scalar_type() == W.scalar_type() && G.numel() == W.numel(), "G: expected the dtype and size of W");
  const MaskView view = mask_view(mask, offsets, W);
  check_backup(backup, W, view);
  return view;
}

inline MaskView restore_view(const at::Tensor& W, const std::optional<at::Tensor>& mask,
                             const std::optional<at::Tensor>& offsets, const at::Tensor& backup) {
  check_vector(W, "W", W);
  const MaskView view = mask_view(mask, offsets, W);
  check_backup(backup, W, view);
  return view;
}

// The list ops: entry j of every list belongs together; all entries share the first W's device and dtype.
using OptionalTensors = c10::List<std::optional<at::Tensor>>;

inline void check_list_lengths(size_t n, std::initializer_list<std::pair<const char*, size_t>> others) {
  for (const auto& [name, size] : others) {
    TORCH_CHECK_VALUE(size == n, name, ": expected ", n, " tensors (one per tensor of the first list), got ", size);
  }
}

inline void check_same_kind(const at::Tensor& t, const at::Tensor& first, const char* name, size_t j) {
  TORCH_CHECK_VALUE(t.device() == first.device(), name, "[", j, "]: expected device ", first.device(), " (that of ",
                    name, "[0]), got ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), name, "[", j, "]: expected dtype ", first.scalar_type(),
                   " (that of ", name, "[0]), got ", t.scalar_type());
}

// One entry of a perturb_/restore_ list, checked (G nullptr for restore_).
struct ListEntry {
  const at::Tensor* W;
  const at::Tensor* G;
  MaskView view;
  const at::Tensor* backup;
};

// The spans of the arguments of perturb_ (G given) or restore_ over `entries` and perturb_'s scale (nullptr:
// none), in the argument order of check_disjoint; `list`: the names carry the entry index. The mask words and
// offsets are those of each entry's MaskView (checked: num_words(N) words, num_offsets(N) offsets).
inline std::vector<ArgSpan> element_spans(const std::vector<ListEntry>& entries, const at::Tensor* scale, bool list) {
  std::vector<ArgSpan> spans;
  spans.reserve(entries.size() * 5 + 1);
  auto raw = [&](const void* p, size_t bytes, const at::Tensor& like, const char* name, int64_t index) {
    const uintptr_t begin = bytes == 0 ? 0 : reinterpret_cast<uintptr_t>(p);
    if (begin != 0) spans.push_back({device_key(like.device()), begin, begin + bytes, false, name, index, spans.size()});
  };
  for (size_t j = 0; j < entries.size(); ++j) {
    const ListEntry& e = entries[j];
    const int64_t index = list ? static_cast<int64_t>(j) : -1;
    const int64_t n = e.W->numel();
    add_span(spans, *e.W, "W", index, true);
    if (e.G != nullptr) add_span(spans, *e.G, "G", index, false);
    if (e.view.words != nullptr) {
      raw(e.view.words, num_words(n) * sizeof(int32_t), *e.W, "mask", index);
      raw(e.view.offsets, num_offsets(n) * (e.view.offsets64 ? 8 : 4), *e.W, "offsets", index);
    }
    add_span(spans, *e.backup, "backup", index, e.G != nullptr);
  }
  if (scale != nullptr) add_span(spans, *scale, "scale", -1, false);
  return spans;
}

// The argument checks of a perturb_ (G given) / restore_ list: each entry's tensors, then the overlap rule
// over the whole call, scale included (the CUDA launchers; the CPU ones check in perturb_restore_cpu).
inline std::vector<ListEntry> check_element_args(at::TensorList W, const at::Tensor* const* G,
                                                 const OptionalTensors& mask, const OptionalTensors& offsets,
                                                 at::TensorList backup, const at::Tensor* scale) {
  std::vector<ListEntry> entries;
  entries.reserve(W.size());
  for (size_t j = 0; j < W.size(); ++j) {
    check_same_kind(W[j], W[0], "W", j);
    const MaskView view = G != nullptr ? perturb_view(W[j], *G[j], mask.get(j), offsets.get(j), backup[j])
                                       : restore_view(W[j], mask.get(j), offsets.get(j), backup[j]);
    entries.push_back({&W[j], G != nullptr ? G[j] : nullptr, view, &backup[j]});
  }
  check_disjoint(element_spans(entries, scale, true));
  return entries;
}

inline void check_fisher_shapes(const at::Tensor& F, const at::Tensor& G) {
  check_vector(F, "F", F);
  check_vector(G, "G", F);
  TORCH_CHECK(F.scalar_type() == at::kFloat, "F: expected float32");
  TORCH_CHECK(G.numel() == F.numel(), "G: expected ", F.numel(), " elements");
}

// fisher_accumulate_'s F (written) and G of every entry, in argument order (`list`: indexed names).
inline std::vector<ArgSpan> fisher_spans(at::TensorList F, at::TensorList G, bool list) {
  std::vector<ArgSpan> spans;
  spans.reserve(2 * F.size());
  for (size_t j = 0; j < F.size(); ++j) {
    const int64_t index = list ? static_cast<int64_t>(j) : -1;
    add_span(spans, F[j], "F", index, true);
    add_span(spans, G[j], "G", index, false);
  }
  return spans;
}

inline void check_fisher_args(const at::Tensor& F, const at::Tensor& G) {
  check_fisher_shapes(F, G);
  check_disjoint(fisher_spans({F}, {G}, false));
}

// axpby_'s X (written) and Y of every entry, then a and b, in argument order (`list`: indexed names).
inline std::vector<ArgSpan> axpby_spans(at::TensorList X, at::TensorList Y, const at::Tensor& a, const at::Tensor& b,
                                        bool list) {
  std::vector<ArgSpan> spans;
  spans.reserve(2 * X.size() + 2);
  for (size_t j = 0; j < X.size(); ++j) {
    const int64_t index = list ? static_cast<int64_t>(j) : -1;
    add_span(spans, X[j], "X", index, true);
    add_span(spans, Y[j], "Y", index, false);
  }
  add_span(spans, a, "a", -1, false);
  add_span(spans, b, "b", -1, false);
  return spans;
}

// The checks of axpby_ (`list` false: a list of one) / axpby_multi_: each X a float vector of X[0]'s device and
// dtype, its Y of X's dtype and size on that device, a and b 0-d float32/float64 tensors there, and the overlap
// rule over the whole call. Returns a's and b's views (none for an empty list, which does nothing).
inline std::pair<ScaleView, ScaleView> check_axpby_args(at::TensorList X, at::TensorList Y, const at::Tensor& a,
                                                        const at::Tensor& b, bool list) {
  check_list_lengths(X.size(), {{"Y", Y.size()}});
  for (size_t j = 0; j < X.size(); ++j) {
    check_vector(X[j], "X", X[0]);
    TORCH_CHECK_TYPE(is_float_dtype(X[j].scalar_type()), "X: expected a float dtype, got ", X[j].scalar_type());
    if (list) check_same_kind(X[j], X[0], "X", j);
    check_vector(Y[j], "Y", X[j]);
    TORCH_CHECK_TYPE(Y[j].scalar_type() == X[j].scalar_type(), "Y: expected dtype ", X[j].scalar_type());
    TORCH_CHECK_VALUE(Y[j].numel() == X[j].numel(), "Y: expected ", X[j].numel(), " elements");
  }
  if (X.empty()) return {};
  const std::pair<ScaleView, ScaleView> views{scale_view(a, X[0], "a"), scale_view(b, X[0], "b")};
  check_disjoint(axpby_spans(X, Y, a, b, list));
  return views;
}

// perturb_ (restore: restore_) of CPU list entries whose arguments were checked (shapes, dtypes, one device;
// perturb_view / restore_view accept each): one call, the overlap rule and the offsets checked against the
// masks before any write (cpu/element.cpp). For the direct eager calls of registration.cpp.
void perturb_restore_checked_cpu(const std::vector<ListEntry>& entries, const at::Tensor* scale, bool adaptive,
                                 bool restore);

// grad_sq_norm_multi on CPU lists (the direct eager call of registration.cpp; the checks still run).
at::Tensor grad_sq_norm_checked_cpu(at::TensorList G, const OptionalTensors& W);

inline void check_radix_histogram_args(const at::Tensor& scores, const at::Tensor& prefix, int64_t shift,
                                       int64_t bits) {
  check_vector(scores, "scores", scores);
  check_scalar(prefix, "prefix", at::kLong, scores);
  check_digit(shift, bits);
}

inline void check_threshold_mask_args(const at::Tensor& scores, const at::Tensor& threshold,
                                      const at::Tensor& tie_quota) {
  check_vector(scores, "scores", scores);
  check_scalar(threshold, "threshold", at::kLong, scores);
  check_scalar(tie_quota, "tie_quota", at::kLong, scores);
}

// The list forms of the selection primitives: filters[j] (or None) belongs to scores[j], every scores[j]
// has scores[0]'s device and dtype, and the device scalars live there too. Returns the filter pointers
// (nullptr: no filter).
inline std::vector<const int32_t*> check_selection_list(at::TensorList scores, const OptionalTensors& filters,
                                                        std::initializer_list<std::pair<const char*, const at::Tensor*>> scalars) {
  check_list_lengths(scores.size(), {{"filters", filters.size()}});
  std::vector<const int32_t*> filter_ptrs(scores.size(), nullptr);
  for (size_t j = 0; j < scores.size(); ++j) {
    check_vector(scores[j], "scores", scores[j]);
    check_same_kind(scores[j], scores[0], "scores", j);
    filter_ptrs[j] = filter_view(filters.get(j), scores[j]);
  }
  if (!scores.empty()) {
    for (const auto& [name, t] : scalars) check_scalar(*t, name, at::kLong, scores[0]);
  }
  return filter_ptrs;
}

// bucket_mask_multi (CUDA only; the selection driver's bucket path): words[j] / counts[j] the int32 mask
// words / per-chunk counts of scores[j], starts[j] its first entry position (positions stay below 2^53,
// the candidates' position field), shift <= 10 (the low key bits above the position field), an int64
// candidate buffer and an int32 one-entry cursor on the scores' device, none of the outputs (words, counts,
// candidates, cursor) sharing memory with another argument (scores, filters and prefix included). Call after
// check_selection_list.
inline void check_bucket_mask_args(at::TensorList scores, const OptionalTensors& filters, const at::Tensor& prefix,
                                   int64_t shift, at::TensorList words, at::TensorList counts, at::IntArrayRef starts,
                                   const at::Tensor& candidates, const at::Tensor& cursor) {
  check_list_lengths(scores.size(), {{"words", words.size()}, {"counts", counts.size()}, {"starts", starts.size()}});
  TORCH_CHECK_VALUE(shift >= 0 && shift <= 10, "shift: expected 0 <= shift <= 10, got ", shift);
  for (size_t j = 0; j < scores.size(); ++j) {
    const int64_t n = scores[j].numel();
    check_vector(words[j], "words", scores[j]);
    TORCH_CHECK_VALUE(words[j].scalar_type() == at::kInt && words[j].numel() == num_words(n), "words[", j,
                      "]: expected ", num_words(n), " int32 words");
    check_vector(counts[j], "counts", scores[j]);
    TORCH_CHECK_VALUE(counts[j].scalar_type() == at::kInt && counts[j].numel() == num_chunks(n), "counts[", j,
                      "]: expected ", num_chunks(n), " int32 counts");
    TORCH_CHECK_VALUE(starts[j] >= 0 && starts[j] <= (int64_t{1} << 53) - n, "starts[", j,
                      "]: expected a position in [0, 2^53 - N]");
  }
  if (scores.empty()) return;
  check_vector(candidates, "candidates", scores[0]);
  TORCH_CHECK_VALUE(candidates.scalar_type() == at::kLong, "candidates: expected int64");
  check_vector(cursor, "cursor", scores[0]);
  TORCH_CHECK_VALUE(cursor.scalar_type() == at::kInt && cursor.numel() == 1, "cursor: expected one int32");
  std::vector<ArgSpan> spans;
  for (size_t j = 0; j < scores.size(); ++j) {
    add_span(spans, scores[j], "scores", static_cast<int64_t>(j), false);
    const std::optional<at::Tensor> filter = filters.get(j);
    if (filter.has_value()) add_span(spans, *filter, "filters", static_cast<int64_t>(j), false);
    add_span(spans, words[j], "words", static_cast<int64_t>(j), true);
    add_span(spans, counts[j], "counts", static_cast<int64_t>(j), true);
  }
  add_span(spans, prefix, "prefix", -1, false);
  add_span(spans, candidates, "candidates", -1, true);
  add_span(spans, cursor, "cursor", -1, true);
  check_disjoint(spans);
}

inline void check_hash_fill_args(const at::Tensor& out, int64_t base) {
  check_vector(out, "out", out);
  TORCH_CHECK(out.scalar_type() == at::kInt, "out: expected int32");
  TORCH_CHECK(base >= 0, "base: expected a non-negative position");
}

}  // namespace ssam
