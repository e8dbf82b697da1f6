// The selection primitives on CPU (ssam_kernels/ops/select.py): radix_histogram and threshold_mask, one
// segment or a list.
#include <type_traits>

#include "common.h"

namespace ssam {
namespace {

constexpr int64_t kTieBlock = 1 << 16;           // entries per tie-count block of threshold_mask (32 | it)

// The list forms run every segment of the list in one parallel loop over tasks of at most
// `grain` entries of one segment (32 | grain, so a task owns whole mask words); the single-segment ops are
// lists of one.
struct ScoreTask {
  size_t segment;
  int64_t begin, end;
};

std::vector<ScoreTask> score_tasks(at::TensorList scores, int64_t grain) {
  std::vector<ScoreTask> tasks;
  for (size_t j = 0; j < scores.size(); ++j) {
    const int64_t n = scores[j].numel();
    for (int64_t b = 0; b < n; b += grain) tasks.push_back({j, b, std::min(b + grain, n)});
  }
  return tasks;
}

// Tasks per parallel piece: about kGrain entries' worth (many small segments share a thread's piece).
int64_t tasks_per_piece(const std::vector<ScoreTask>& tasks, at::TensorList scores) {
  int64_t units = 0;
  for (const at::Tensor& t : scores) units += t.numel();
  return std::max<int64_t>(1, static_cast<int64_t>(tasks.size()) * kGrain / std::max<int64_t>(units, 1));
}

// Entries whose keys are computed together before they are counted: independent loads and key
// arithmetic (vectorisable), then the dependent histogram increments.
constexpr int64_t kKeyBatch = 64;

}  // namespace


// The sum over the list of the per-segment histograms: counts of the eligible entries whose key agrees
// with prefix above bit shift + bits, by digit (key >> shift) & (2^bits - 1). Each thread counts into its
// own histogram; integer sums are exact, so the result does not depend on the thread count.
at::Tensor radix_histogram_multi_cpu(at::TensorList scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                                     bool largest, const OptionalTensors& filters, bool filter_value) {
  check_digit(shift, bits);
  const std::vector<const int32_t*> filter = check_selection_list(scores, filters, {{"prefix", &prefix}});
  const int64_t bins = int64_t{1} << bits;
  at::Tensor out = at::zeros({bins}, prefix.options().dtype(at::kLong));
  if (scores.empty()) return out;
  const uint64_t pre = static_cast<uint64_t>(prefix.item<int64_t>());
  const int high = static_cast<int>(shift + bits);
  const uint32_t digit_mask = static_cast<uint32_t>(bins - 1);
  const std::vector<ScoreTask> tasks = score_tasks(scores, kGrain);
  std::vector<std::vector<int64_t>> local(at::get_num_threads());
  dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    at::parallel_for(0, static_cast<int64_t>(tasks.size()), tasks_per_piece(tasks, scores), [&](int64_t t0, int64_t t1) {
      std::vector<int64_t>& hist = local[at::get_thread_num()];
      if (hist.empty()) hist.assign(bins, 0);
      uint32_t keys[kKeyBatch];
      for (int64_t t = t0; t < t1; ++t) {
        const ScoreTask& task = tasks[t];
        const T* x = scores[task.segment].data_ptr<T>();
        const int32_t* f = filter[task.segment];
        for (int64_t i0 = task.begin; i0 < task.end; i0 += kKeyBatch) {
          const int64_t m = std::min(kKeyBatch, task.end - i0);
          for (int64_t l = 0; l < m; ++l) keys[l] = score_key(x[i0 + l], largest);
          for (int64_t l = 0; l < m; ++l) {
            if (prefix_matches(keys[l], pre, high) && eligible(f, filter_value, i0 + l)) {
              ++hist[(keys[l] >> shift) & digit_mask];
            }
          }
        }
      }
    });
  });
  int64_t* h = out.data_ptr<int64_t>();
  for (const auto& hist : local) {
    for (int64_t d = 0; d < static_cast<int64_t>(hist.size()); ++d) h[d] += hist[d];
  }
  return out;
}

at::Tensor radix_histogram_cpu(const at::Tensor& scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                               bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_radix_histogram_args(scores, prefix, shift, bits);
  return radix_histogram_multi_cpu({scores}, prefix, shift, bits, largest, OptionalTensors({filter_words}),
                                   filter_value);
}

// The mask words of every segment: the eligible entries with key > threshold and the first tie_quota
// eligible entries of the list (segments in order, then index) with key == threshold; and the quota left,
// max(tie_quota - ties, 0). Two passes over tasks of kTieBlock entries: count the ties of each task, then
// (after an exclusive scan in list order) write each task's words knowing the ties before it.
std::tuple<std::vector<at::Tensor>, at::Tensor> threshold_mask_multi_cpu(at::TensorList scores,
                                                                         const at::Tensor& threshold,
                                                                         const at::Tensor& tie_quota, bool largest,
                                                                         const OptionalTensors& filters,
                                                                         bool filter_value) {
  const std::vector<const int32_t*> filter =
      check_selection_list(scores, filters, {{"threshold", &threshold}, {"tie_quota", &tie_quota}});
  std::vector<at::Tensor> out;
  for (const at::Tensor& s : scores) out.push_back(at::empty({num_words(s.numel())}, s.options().dtype(at::kInt)));
  const uint32_t t = static_cast<uint32_t>(threshold.item<int64_t>());
  const int64_t quota = tie_quota.item<int64_t>();
  const std::vector<ScoreTask> tasks = score_tasks(scores, kTieBlock);
  std::vector<int64_t> ties_before(tasks.size(), 0);
  int64_t ties = 0;
  if (!scores.empty()) {
    dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
      using T = typename decltype(tag)::type;
      const int64_t grain = std::max<int64_t>(1, tasks_per_piece(tasks, scores) * kGrain / kTieBlock);
      if (quota > 0) {  // without a quota no tie is taken and the counts are not needed
        at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t t0, int64_t t1) {
          for (int64_t k = t0; k < t1; ++k) {
            const ScoreTask& task = tasks[k];
            const T* x = scores[task.segment].data_ptr<T>();
            const int32_t* f = filter[task.segment];
            int64_t count = 0;
            for (int64_t i = task.begin; i < task.end; ++i) {
              count += score_key(x[i], largest) == t && eligible(f, filter_value, i);
            }
            ties_before[k] = count;
          }
        });
        for (int64_t& c : ties_before) {
          const int64_t count = c;
          c = ties;
          ties += count;
        }
      }
      at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t t0, int64_t t1) {
        for (int64_t k = t0; k < t1; ++k) {
          const ScoreTask& task = tasks[k];
          const T* x = scores[task.segment].data_ptr<T>();
          const int32_t* f = filter[task.segment];
          int32_t* words = out[task.segment].data_ptr<int32_t>();
          int64_t rank = ties_before[k];
          for (int64_t w = task.begin / 32, w_end = num_words(task.end); w < w_end; ++w) {
            uint32_t word = 0;
            for (int64_t bit = 0, i = w * 32; bit < 32 && i < task.end; ++bit, ++i) {
              if (!eligible(f, filter_value, i)) continue;
              const uint32_t key = score_key(x[i], largest);
              const bool take = key > t || (key == t && rank++ < quota);
              word |= static_cast<uint32_t>(take) << bit;
            }
            words[w] = static_cast<int32_t>(word);
          }
        }
      });
    });
  }
  return {out, at::scalar_tensor(std::max<int64_t>(quota - ties, 0), tie_quota.options())};
}

at::Tensor threshold_mask_cpu(const at::Tensor& scores, const at::Tensor& threshold, const at::Tensor& tie_quota,
                              bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_threshold_mask_args(scores, threshold, tie_quota);
  return std::get<0>(threshold_mask_multi_cpu({scores}, threshold, tie_quota, largest,
                                              OptionalTensors({filter_words}), filter_value))[0];
}


}  // namespace ssam
