// Registers the CPU kernels of the ops (schemas.h; declared in common.h).
#include <torch/library.h>

#include "common.h"

TORCH_LIBRARY_IMPL(ssam_kernels, CPU, m) {
  m.impl("grad_sq_norm", &ssam::grad_sq_norm_cpu);
  m.impl("perturb_", &ssam::perturb_cpu);
  m.impl("restore_", &ssam::restore_cpu);
  m.impl("fisher_accumulate_", &ssam::fisher_accumulate_cpu);
  m.impl("grad_sq_norm_multi", &ssam::grad_sq_norm_multi_cpu);
  m.impl("perturb_multi_", &ssam::perturb_multi_cpu);
  m.impl("restore_multi_", &ssam::restore_multi_cpu);
  m.impl("fisher_accumulate_multi_", &ssam::fisher_accumulate_multi_cpu);
  m.impl("axpby_", &ssam::axpby_cpu);
  m.impl("axpby_multi_", &ssam::axpby_multi_cpu);
  m.impl("radix_histogram", &ssam::radix_histogram_cpu);
  m.impl("threshold_mask", &ssam::threshold_mask_cpu);
  m.impl("radix_histogram_multi", &ssam::radix_histogram_multi_cpu);
  m.impl("threshold_mask_multi", &ssam::threshold_mask_multi_cpu);
  m.impl("hash_fill_", &ssam::hash_fill_cpu);
}
