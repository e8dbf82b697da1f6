// grad_sq_norm on the GPU: stage 1, one wave of blocks (launch.h: wave_grid, from the SM count and the
// kernel's occupancy); warp w takes the chunks (kChunk entries) w, w + warps, ...; each thread adds the squares
// of its entries in double in a fixed order, the block reduces in a fixed tree order and writes its
// partial. Stage 2, one block adds the partials the same way and writes the result. The partition
// depends only on the device: the same input gives the same result on the same device. No atomics,
// nothing to zero.
#pragma once

#include "common.cuh"

namespace ssam {
namespace {

// One tensor of grad_sq_norm: G, and W (null: no ASAM).
template <typename T>
struct NormArgs {
  const T* g;
  const T* w;
  int64_t n;
  bool vec;  // g and w 16-byte aligned
};

// 16-byte packs per lane loaded together in a norm step, for G and for W: 2 (one for 2-byte dtypes, whose
// 8 entries a pack would otherwise spill in float64).
template <typename T>
constexpr int kNormPacks = sizeof(T) >= 4 ? 2 : 1;

// acc + the squares of the lane's entries of chunk c of the tensor (g_i², or (g_i · w_i)²).
template <typename T>
__device__ double norm_chunk(const NormArgs<T>& a, int64_t c, double acc) {
  constexpr int V = kVec<T>;
  constexpr int U = kNormPacks<T>;
  for (int e = lane_id() * V; e < kChunk; e += 32 * V * U) {
    Pack<T, V> g[U], w[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {  // all loads of the step first
      const int64_t i = c * kChunk + e + u * 32 * V;
      const uint32_t live = i < a.n ? entries_below<V>(i, a.n) : 0u;
      const bool whole = a.vec && live == kAllEntries<V>;
      g[u] = load_slots<Path::kReadOnly, V>(a.g, i, kAllEntries<V>, live, whole);
      if (a.w != nullptr) w[u] = load_slots<Path::kReadOnly, V>(a.w, i, kAllEntries<V>, live, whole);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int k = 0; k < V; ++k) {  // entries past n were loaded as zeros: they add +0.0, exactly nothing
        double v = widen(g[u].v[k]);
        if (a.w != nullptr) v *= widen(w[u].v[k]);
        acc += v * v;
      }
    }
  }
  return acc;
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM)
    sq_norm_partial_kernel(NormArgs<T> a, double* partial) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  for (int64_t c = global_warp(); c < chunks; c += grid_warps()) acc = norm_chunk(a, c, acc);
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) global_store(partial + blockIdx.x, total);
}

// Stage 1 of the list norm: as sq_norm_partial_kernel, warp w taking the global chunks w, w + warps, ...
template <typename T>
__global__ void __launch_bounds__(kThreads, kListMinBlocksPerSM) sq_norm_list_kernel(ListTable t, double* partial) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int64_t c = global_warp(); c < t.chunks; c += grid_warps()) {
    const Row row = row_of(t, c);
    const NormArgs<T> a{column_ptr<const T>(row, kColG), column_ptr<const T>(row, kColW), row.col[kColN],
                        row.col[kColVec] != 0};
    acc = norm_chunk(a, row.local, acc);
  }
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) global_store(partial + blockIdx.x, total);
}

__global__ void sq_norm_final_kernel(const double* partial, int64_t count, double* out) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < count; b += blockDim.x) acc += global_load(partial + b);
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) global_store(out, total);
}

}  // namespace
}  // namespace ssam
