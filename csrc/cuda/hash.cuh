// hash_scores on the GPU: out[i] = h(seed, step, base + i) (ssam_math.h: hash_value), a grid-stride loop.
#pragma once

#include "common.cuh"

namespace ssam {
namespace {

__global__ void hash_fill_kernel(int32_t* out, int64_t n, uint32_t key, uint64_t base) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) global_store(out + i, hash_value(key, base + i));
}

}  // namespace
}  // namespace ssam
