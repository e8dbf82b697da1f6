// Host-side helpers shared by the CPU (cpu.cpp) and CUDA (cuda.cu) implementations of the ops
// registered in registration.cpp: argument checks and dtype dispatch.
//
// The public functions in ssam_kernels/ops/__init__.py validate their arguments with messages that name
// them; these checks only keep a direct torch.ops.ssam_kernels.* call from reading out of bounds.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <initializer_list>
#include <optional>
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

inline int64_t num_words(int64_t n) { return (n + 31) / 32; }
inline int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }

// Checks a mask (and its offsets, when present) over the entries of W.
inline MaskView mask_view(const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets,
                          const at::Tensor& W) {
  MaskView view;
  if (!mask.has_value()) return view;
  check_vector(*mask, "mask", W);
  TORCH_CHECK(mask->scalar_type() == at::kInt && mask->numel() == num_words(W.numel()),
              "mask: expected ", num_words(W.numel()), " int32 words");
  TORCH_CHECK(offsets.has_value(), "offsets: required when mask is given");
  check_vector(*offsets, "offsets", W);
  TORCH_CHECK((offsets->scalar_type() == at::kInt || offsets->scalar_type() == at::kLong) &&
                  offsets->numel() == num_chunks(W.numel()) + 1,
              "offsets: expected ", num_chunks(W.numel()) + 1, " int32 or int64 entries");
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

inline ScaleView scale_view(const at::Tensor& scale, const at::Tensor& W) {
  TORCH_CHECK_TYPE(scale.dim() == 0 && (scale.scalar_type() == at::kFloat || scale.scalar_type() == at::kDouble),
                   "scale: expected a 0-d float32 or float64 tensor");
  TORCH_CHECK(scale.device() == W.device(), "scale: expected device ", W.device(), ", got ", scale.device());
  return {scale.data_ptr(), scale.scalar_type() == at::kDouble};
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

inline MaskView check_perturb_args(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& offsets, const at::Tensor& backup) {
  check_vector(W, "W", W);
  check_vector(G, "G", W);
  TORCH_CHECK(G.scalar_type() == W.scalar_type() && G.numel() == W.numel(), "G: expected the dtype and size of W");
  const MaskView view = mask_view(mask, offsets, W);
  check_backup(backup, W, view);
  return view;
}

inline MaskView check_restore_args(const at::Tensor& W, const std::optional<at::Tensor>& mask,
                                   const std::optional<at::Tensor>& offsets, const at::Tensor& backup) {
  check_vector(W, "W", W);
  const MaskView view = mask_view(mask, offsets, W);
  check_backup(backup, W, view);
  return view;
}

inline void check_fisher_args(const at::Tensor& F, const at::Tensor& G) {
  check_vector(F, "F", F);
  check_vector(G, "G", F);
  TORCH_CHECK(F.scalar_type() == at::kFloat, "F: expected float32");
  TORCH_CHECK(G.numel() == F.numel(), "G: expected ", F.numel(), " elements");
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

// perturb_ (restore: restore_) of CPU list entries whose arguments were checked (shapes, dtypes, one device;
// check_perturb_args / check_restore_args accept each): one call, the offsets still checked against the
// masks before any write (cpu.cpp). For the direct eager calls of registration.cpp.
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
// candidate buffer and an int32 one-entry cursor on the scores' device. Call after check_selection_list.
inline void check_bucket_mask_args(at::TensorList scores, int64_t shift, at::TensorList words, at::TensorList counts,
                                   at::IntArrayRef starts, const at::Tensor& candidates, const at::Tensor& cursor) {
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
}

inline void check_hash_fill_args(const at::Tensor& out, int64_t base) {
  check_vector(out, "out", out);
  TORCH_CHECK(out.scalar_type() == at::kInt, "out: expected int32");
  TORCH_CHECK(base >= 0, "base: expected a non-negative position");
}

}  // namespace ssam
