// fisher_accumulate_ on the GPU: F += alpha · g², one correctly rounded fp32 FMA (ssam_math.h:
// fisher_update), one warp per chunk (kChunk entries), for one tensor or a list.
#pragma once

#include "common.cuh"

namespace ssam {
namespace {

// Entries per Fisher pack: a whole 16-byte pack of G and of the fp32 F (4 for float64 G; bf16 / fp16 G:
// 8, with a 32-byte F pack).
template <typename T>
constexpr int kFisherVec = kVec<T> > kVec<float> ? kVec<T> : kVec<float>;

template <typename T>
using FisherArgs = UpdateArgs<float, T>;  // x: F, y: G

template <typename T>
__device__ void fisher_chunk(const FisherArgs<T>& a, float alpha, int64_t c) {
  update_chunk<kFisherVec<T>>(a, c, [alpha](float f, T g) { return fisher_update(f, g, alpha); });
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) fisher_kernel(FisherArgs<T> a, float alpha) {
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  for (int64_t c = global_warp(); c < chunks; c += grid_warps()) fisher_chunk(a, alpha, c);
}

// F += alpha · g² for every (F, G) of the table (F at kColW, G at kColG): one warp per global chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads, kListMinBlocksPerSM) fisher_list_kernel(ListTable t, float alpha) {
  for (int64_t c = global_warp(); c < t.chunks; c += grid_warps()) {
    const Row row = row_of(t, c);
    const FisherArgs<T> a{column_ptr<float>(row, kColW), column_ptr<const T>(row, kColG), row.col[kColN],
                          row.col[kColVec] != 0};
    fisher_chunk(a, alpha, row.local);
  }
}

}  // namespace
}  // namespace ssam
