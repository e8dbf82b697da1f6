// Shared by the CPU kernels of the ssam_kernels ops (one file per op family, as csrc/cuda/): plain loops
// the compiler vectorises (and AVX-512 intrinsics for the masked perturb_/restore_ where the CPU has
// them), parallelised with at::parallel_for (OpenMP in PyTorch's CPU builds, honouring
// torch.set_num_threads). The element-wise mathematics comes from ssam_math.h, shared with the CUDA
// kernels; the ops are registered in register.cpp.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

#include "ssam_ops.h"

// The streaming loops (the norm, Fisher, the portable perturb_/restore_) are written so the compiler
// vectorises them (independent accumulator lanes, restrict pointers, no branch in the body) and are
// compiled several times by target_clones: the AVX-512 / AVX2 clone is picked at load time on CPUs that
// have it, the baseline x86-64 (SSE2) one elsewhere. Without -ffast-math and with -ffp-contract=off the
// compiler may neither reorder the sums nor fuse a multiply and an add, so every clone gives the same
// bits; the explicit std::fma of ssam_math.h is a vfmadd in the AVX2/AVX-512 clones and glibc's
// (correctly rounded) fmaf call in the baseline one.
#if defined(__x86_64__) && defined(__linux__) && defined(__GNUC__) && !defined(__clang__)  // GCC ifunc clones
#define SSAM_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SSAM_CPU_CLONES
#endif

namespace ssam {

constexpr int64_t kGrain = 1 << 15;              // entries per parallel task of the element-wise loops

// Software prefetch, kPrefetchBytes ahead of each stream, in the norm and the masked perturb_/restore_
// loops: on the VM we measure on, the hardware prefetcher alone kept too few lines in flight for one
// core (the norm ran at 0.62-0.64x the speed of torch's sum over the same buffer, 0.93x with this; the
// masked perturb_ ~7 % faster). The dense perturb_ and Fisher loops measured 2-5 % slower with it and
// go without (benchmarks/NOTES.md, "CPU paths"). A prefetch is a hint that never faults and
// whose data the program never reads, so addresses past a buffer's end are harmless (they are formed as
// integers: no pointer past the end is ever made).
constexpr uintptr_t kPrefetchBytes = 4096;
constexpr uintptr_t kLineBytes = 64;

// Prefetches the lines of [p, p + kBytes) shifted kPrefetchBytes ahead (one line when kBytes <= 64).
template <uintptr_t kBytes>
inline __attribute__((always_inline)) void prefetch_span(const void* p) {
  const uintptr_t ahead = reinterpret_cast<uintptr_t>(p) + kPrefetchBytes;
  for (uintptr_t off = 0; off < kBytes; off += kLineBytes) __builtin_prefetch(reinterpret_cast<const void*>(ahead + off));
}

// The CPU kernels of the ops (schemas.h), one family per file.
at::Tensor grad_sq_norm_cpu(const at::Tensor& G, const std::optional<at::Tensor>& W);
at::Tensor grad_sq_norm_multi_cpu(at::TensorList G, const OptionalTensors& W);
void perturb_cpu(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& offsets, const at::Tensor& backup, const at::Tensor& scale,
                 bool adaptive);
void restore_cpu(const at::Tensor& W, const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& offsets, const at::Tensor& backup);
void perturb_multi_cpu(at::TensorList W, at::TensorList G, const OptionalTensors& mask, const OptionalTensors& offsets,
                       at::TensorList backup, const at::Tensor& scale, bool adaptive);
void restore_multi_cpu(at::TensorList W, const OptionalTensors& mask, const OptionalTensors& offsets,
                       at::TensorList backup);
void fisher_accumulate_cpu(const at::Tensor& F, const at::Tensor& G, double alpha);
void fisher_accumulate_multi_cpu(at::TensorList F, at::TensorList G, double alpha);
void axpby_cpu(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& a, const at::Tensor& b);
void axpby_multi_cpu(at::TensorList X, at::TensorList Y, const at::Tensor& a, const at::Tensor& b);
at::Tensor radix_histogram_cpu(const at::Tensor& scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                               bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value);
at::Tensor radix_histogram_multi_cpu(at::TensorList scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                                     bool largest, const OptionalTensors& filters, bool filter_value);
at::Tensor threshold_mask_cpu(const at::Tensor& scores, const at::Tensor& threshold, const at::Tensor& tie_quota,
                              bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value);
std::tuple<std::vector<at::Tensor>, at::Tensor> threshold_mask_multi_cpu(at::TensorList scores,
                                                                         const at::Tensor& threshold,
                                                                         const at::Tensor& tie_quota, bool largest,
                                                                         const OptionalTensors& filters,
                                                                         bool filter_value);
void hash_fill_cpu(const at::Tensor& out, int64_t seed, int64_t step, int64_t base);

}  // namespace ssam
