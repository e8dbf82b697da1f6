// The CUDA implementations of the ssam_kernels ops (one .cu file per op family), registered for CUDA
// tensors in register.cu and, by cuda_sim, for CPU tensors (csrc/sim/cuda_sim.cpp). Signatures follow
// the schemas (csrc/schemas.h); argument checks are ssam_ops.h's, shared with the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>
#include <vector>

#include "ssam_ops.h"

namespace ssam {
namespace cuda {

// norm.cu
at::Tensor grad_sq_norm(const at::Tensor& G, const std::optional<at::Tensor>& W);
at::Tensor grad_sq_norm_multi(at::TensorList G, const OptionalTensors& W);
// element.cu
void perturb_(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
              const std::optional<at::Tensor>& offsets, const at::Tensor& backup, const at::Tensor& scale,
              bool adaptive);
void restore_(const at::Tensor& W, const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& offsets,
              const at::Tensor& backup);
void perturb_multi_(at::TensorList W, at::TensorList G, const OptionalTensors& mask, const OptionalTensors& offsets,
                    at::TensorList backup, const at::Tensor& scale, bool adaptive);
void restore_multi_(at::TensorList W, const OptionalTensors& mask, const OptionalTensors& offsets,
                    at::TensorList backup);
void axpby_(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& a, const at::Tensor& b);
void axpby_multi_(at::TensorList X, at::TensorList Y, const at::Tensor& a, const at::Tensor& b);
// fisher.cu
void fisher_accumulate_(const at::Tensor& F, const at::Tensor& G, double alpha);
void fisher_accumulate_multi_(at::TensorList F, at::TensorList G, double alpha);
// select.cu
at::Tensor radix_histogram(const at::Tensor& scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                           bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value);
at::Tensor threshold_mask(const at::Tensor& scores, const at::Tensor& threshold, const at::Tensor& tie_quota,
                          bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value);
at::Tensor radix_histogram_multi(at::TensorList scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                                 bool largest, const OptionalTensors& filters, bool filter_value);
std::tuple<std::vector<at::Tensor>, at::Tensor> threshold_mask_multi(at::TensorList scores,
                                                                     const at::Tensor& threshold,
                                                                     const at::Tensor& tie_quota, bool largest,
                                                                     const OptionalTensors& filters,
                                                                     bool filter_value);
void bucket_mask_multi(at::TensorList scores, const at::Tensor& prefix, int64_t shift, bool largest,
                       const OptionalTensors& filters, bool filter_value, at::TensorList words,
                       at::TensorList counts, at::IntArrayRef starts, const at::Tensor& candidates,
                       const at::Tensor& cursor);
// hash.cu
void hash_fill_(const at::Tensor& out, int64_t seed, int64_t step, int64_t base);

}  // namespace cuda
}  // namespace ssam

// Every op above, for the registrations: X(op name).
#define SSAM_CUDA_OPS(X)                                                                                 \
  X(grad_sq_norm) X(grad_sq_norm_multi) X(perturb_) X(restore_) X(perturb_multi_) X(restore_multi_)     \
  X(fisher_accumulate_) X(fisher_accumulate_multi_) X(radix_histogram) X(threshold_mask)                \
  X(radix_histogram_multi) X(threshold_mask_multi) X(bucket_mask_multi) X(hash_fill_) X(axpby_) X(axpby_multi_)
