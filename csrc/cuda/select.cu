// Host launchers of the selection primitives: radix_histogram(_multi), threshold_mask(_multi) and the
// bucket path's bucket_mask_multi (kernels: select.cuh).
#include "host_common.h"
#include "ops.h"
#include "select.cuh"

namespace ssam {
namespace cuda {
namespace {

// The table of a selection list: scores, filter and (threshold_mask) output words per segment.
std::vector<int64_t> score_rows(at::TensorList scores, const std::vector<const int32_t*>& filter,
                                const std::vector<at::Tensor>* words) {
  std::vector<int64_t> rows(scores.size() * kColumns, 0);
  for (size_t j = 0; j < scores.size(); ++j) {
    int64_t* row = rows.data() + j * kColumns;
    row[kColScores] = address(scores[j]);
    row[kColFilter] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(filter[j]));
    row[kColWords] = words != nullptr ? address((*words)[j]) : 0;
    row[kColN] = scores[j].numel();
  }
  return rows;
}

// Blocks of a selection launch: enough warps for the chunks, at most a few waves of resident blocks.
int64_t selection_blocks(int64_t chunks) {
  return std::min(grid_for(chunks, kWarpsPerBlock), 4 * gpu::sm_count());
}

}  // namespace

at::Tensor radix_histogram_multi(at::TensorList scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                                 bool largest, const OptionalTensors& filters, bool filter_value) {
  check_digit(shift, bits);
  const std::vector<const int32_t*> filter = check_selection_list(scores, filters, {{"prefix", &prefix}});
  const gpu::DeviceGuard guard(prefix.device());
  at::Tensor out = gpu::scratch(at::zeros({int64_t{1} << bits}, prefix.options().dtype(at::kLong)), "the histogram");
  if (scores.empty()) return out;
  at::Tensor keep;
  const ListTable table = upload_table(score_rows(scores, filter, nullptr), scores[0].device(), keep,
                                       "radix_histogram_multi");
  if (table.chunks == 0) return out;
  const size_t shared = sizeof(unsigned int) << bits;
  dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gpu::launch<radix_histogram_list_kernel<T>>(selection_blocks(table.chunks), kThreads, shared, table,
                                                prefix.data_ptr<int64_t>(), static_cast<int>(shift),
                                                static_cast<int>(bits), largest, filter_value,
                                                reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> threshold_mask_multi(at::TensorList scores,
                                                                     const at::Tensor& threshold,
                                                                     const at::Tensor& tie_quota, bool largest,
                                                                     const OptionalTensors& filters,
                                                                     bool filter_value) {
  const std::vector<const int32_t*> filter =
      check_selection_list(scores, filters, {{"threshold", &threshold}, {"tie_quota", &tie_quota}});
  const gpu::DeviceGuard guard(tie_quota.device());
  std::vector<at::Tensor> words;
  for (const at::Tensor& s : scores) {
    words.push_back(gpu::scratch(at::empty({num_words(s.numel())}, s.options().dtype(at::kInt)), "the mask words"));
  }
  if (scores.empty()) return {words, at::clamp_min(tie_quota, 0)};
  at::Tensor keep;
  const ListTable table = upload_table(score_rows(scores, filter, &words), scores[0].device(), keep,
                                       "threshold_mask_multi");
  if (table.chunks == 0) return {words, at::clamp_min(tie_quota, 0)};
  at::Tensor counts = gpu::scratch(at::empty({table.chunks}, tie_quota.options()), "the tie counts");
  const int64_t blocks = selection_blocks(table.chunks);
  at::Tensor ties_end;
  dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t* t = threshold.data_ptr<int64_t>();
    const int64_t* q = tie_quota.data_ptr<int64_t>();
    gpu::launch<tie_count_list_kernel<T>>(blocks, kThreads, 0, table, t, q, largest, filter_value,
                                          counts.data_ptr<int64_t>());
    ties_end = gpu::scratch(at::cumsum(counts, 0), "the tie scan");  // integer scan on the same stream
    gpu::launch<threshold_write_list_kernel<T>>(blocks, kThreads, 0, table, t, q, largest, filter_value,
                                                counts.data_ptr<int64_t>(), ties_end.data_ptr<int64_t>());
  });
  return {words, at::clamp_min(tie_quota - ties_end[-1], 0)};
}

void bucket_mask_multi(at::TensorList scores, const at::Tensor& prefix, int64_t shift, bool largest,
                       const OptionalTensors& filters, bool filter_value, at::TensorList words,
                       at::TensorList counts, at::IntArrayRef starts, const at::Tensor& candidates,
                       const at::Tensor& cursor) {
  const std::vector<const int32_t*> filter = check_selection_list(scores, filters, {{"prefix", &prefix}});
  check_bucket_mask_args(scores, filters, prefix, shift, words, counts, starts, candidates, cursor);
  if (scores.empty()) return;
  const gpu::DeviceGuard guard(prefix.device());
  const std::vector<at::Tensor> word_list(words.begin(), words.end());
  std::vector<int64_t> rows = score_rows(scores, filter, &word_list);
  for (size_t j = 0; j < scores.size(); ++j) {
    rows[j * kColumns + kColCounts] = address(counts[j]);
    rows[j * kColumns + kColStart] = starts[j];
  }
  at::Tensor keep;
  const ListTable table = upload_table(rows, scores[0].device(), keep, "bucket_mask_multi");
  if (table.chunks == 0) return;
  dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    gpu::launch<bucket_mask_list_kernel<T>>(selection_blocks(table.chunks), kThreads, 0, table,
                                            prefix.data_ptr<int64_t>(), static_cast<int>(shift), largest,
                                            filter_value, candidates.data_ptr<int64_t>(), candidates.numel(),
                                            cursor.data_ptr<int32_t>());
  });
}

at::Tensor radix_histogram(const at::Tensor& scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                           bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_radix_histogram_args(scores, prefix, shift, bits);
  return radix_histogram_multi({scores}, prefix, shift, bits, largest, OptionalTensors({filter_words}),
                               filter_value);
}

at::Tensor threshold_mask(const at::Tensor& scores, const at::Tensor& threshold, const at::Tensor& tie_quota,
                          bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_threshold_mask_args(scores, threshold, tie_quota);
  return std::get<0>(threshold_mask_multi({scores}, threshold, tie_quota, largest, OptionalTensors({filter_words}),
                                          filter_value))[0];
}

}  // namespace cuda
}  // namespace ssam
