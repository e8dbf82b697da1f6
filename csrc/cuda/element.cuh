// perturb_ / restore_ on the GPU: one warp per chunk (kChunk entries), masked or dense (rank(i) = i), one
// code path for one tensor (element_kernel) and for a list of tensors (element_list_kernel). axpby_ likewise
// (axpby_kernel, axpby_list_kernel), dense.
#pragma once

#include "common.cuh"

namespace ssam {
namespace {

// The operation of an element kernel, a template parameter: each is compiled for its own case.
struct Perturb {
  static constexpr bool kRestore = false, kAdaptive = false;
};
struct PerturbAdaptive {
  static constexpr bool kRestore = false, kAdaptive = true;
};
struct Restore {
  static constexpr bool kRestore = true;  // no kAdaptive: restore_ has no perturbation
};

// One tensor of perturb_/restore_ as the kernels see it (warp-uniform). words == nullptr: dense.
template <typename T>
struct ElementArgs {
  T* w;
  const T* g;  // null for restore_
  T* backup;
  int64_t n;
  int64_t capacity;  // backup slots
  const int32_t* words;
  const void* offsets;
  bool offsets64;
  bool vec;  // w, g and backup 16-byte aligned
};

// The scale of perturb_ (restore_: none) and whether it applies.
template <typename T>
__device__ void read_scale(const ScaleView& scale, bool restore, scale_t<T>& s, bool& active) {
  s = restore ? scale_t<T>(0) : load_scale<T>(scale);
  active = !restore && scale_active(s);
}

// Lane l's word of chunk c (bits past n cleared; dense: a bit per entry below n) and the rank of its
// first set bit: base + below.
struct ChunkWord {
  uint32_t word;
  int below;     // set bits of the chunk's words before this one
  int64_t base;  // offsets[c] (dense: c * kChunk)
};

__device__ ChunkWord chunk_word(const int32_t* words, const void* offsets, bool offsets64, int64_t n, int64_t c) {
  const int lane = lane_id();
  const int64_t wi = c * kWordsPerChunk + lane;
  const int64_t valid = n - wi * 32;  // entries of word wi below n
  if (words == nullptr) {
    const int32_t every = -1;
    return {valid > 0 ? mask_word(&every, 0, valid) : 0u, lane * 32, c * kChunk};
  }
  // Both loads before any use: one round trip.
  const int32_t raw = valid > 0 ? load<Path::kReadOnly>(words + wi) : 0;
  const int64_t base = offsets64 ? load<Path::kReadOnly>(static_cast<const int64_t*>(offsets) + c)
                                 : load<Path::kReadOnly>(static_cast<const int32_t*>(offsets) + c);
  const uint32_t word = valid > 0 ? mask_word(&raw, 0, valid) : 0u;  // mask_word of the loaded word
  // Inclusive warp scan of the popcounts, less this word's own.
  int below = popcount32(word);
  for (int d = 1; d < 32; d *= 2) {
    const int up = __shfl_up_sync(kFullWarp, below, d);
    if (lane >= d) below += up;
  }
  return {word, below - popcount32(word), base};
}

// The pack of V entries from entry i, whose selected entries are `bits` (non-zero) with ranks r, r + 1,
// ... in bit order. A rank outside [0, capacity) (a short backup, offsets that do not match the mask: not
// checked on the host, that would synchronise) leaves its entry alone, so no access leaves W or the
// backup. perturb_ reads W's pack (and G's, when the scale applies) whole when it lies in the aligned
// tensor, and writes it back whole, the entries it does not perturb with the values it read.
template <typename Op, typename T>
__device__ __forceinline__ void element_pack(const ElementArgs<T>& a, int64_t i, int64_t r, uint32_t bits, scale_t<T> s,
                                             bool active) {
  constexpr int V = kVec<T>;
  uint32_t live = bits;
  if (r < 0 || r + popcount32(bits) > a.capacity) {
    live = 0;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if (((bits >> k) & 1u) && rank_in_range(r + bits_below(bits, k), a.capacity)) live |= 1u << k;
    }
    if (live == 0) return;
  }
  const bool whole = a.vec && i + V <= a.n;                               // W's (and G's) pack: one access
  const bool whole_run = a.vec && live == kAllEntries<V> && r % V == 0;   // the backup slots: one access
  if constexpr (Op::kRestore) {
    const Pack<T, V> value = load_slots<Path::kReadOnly, V>(a.backup, r, bits, live, whole_run);
    store_slots<V>(a.w, i, kAllEntries<V>, live, whole && live == kAllEntries<V>, value);
  } else {
    Pack<T, V> value = load_slots<Path::kCoherent, V>(a.w, i, kAllEntries<V>, live, whole);
    Pack<T, V> grad;
    if (active) grad = load_slots<Path::kReadOnly, V>(a.g, i, kAllEntries<V>, live, whole);
    store_slots<V>(a.backup, r, bits, live, whole_run, value);
    if (active) {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        if ((live >> k) & 1u) value.v[k] = perturbed(value.v[k], grad.v[k], s, Op::kAdaptive);
      }
      store_slots<V>(a.w, i, kAllEntries<V>, live, whole, value);
    }
  }
}

// Chunk c of the tensor, run by one whole warp: lane l takes the packs of V entries at l * V, l * V + 32 V,
// ... of the chunk (so a warp's accesses of a step are 512 contiguous bytes of W).
template <typename Op, typename T>
__device__ void element_chunk(const ElementArgs<T>& a, scale_t<T> s, bool active, int64_t c) {
  constexpr int V = kVec<T>;
  const ChunkWord cw = chunk_word(a.words, a.offsets, a.offsets64, a.n, c);
  for (int e = lane_id() * V; e < kChunk; e += 32 * V) {  // e: the pack's first entry in the chunk
    const int source = e / 32, bit = e % 32;
    const uint32_t word = __shfl_sync(kFullWarp, cw.word, source);
    const int below = __shfl_sync(kFullWarp, cw.below, source);
    const uint32_t bits = (word >> bit) & kAllEntries<V>;
    if (bits != 0) element_pack<Op>(a, c * kChunk + e, cw.base + below + bits_below(word, bit), bits, s, active);
  }
}

// perturb_ / restore_ of one tensor, masked or dense.
template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads, kElementMinBlocksPerSM<T>) element_kernel(ElementArgs<T> a, ScaleView scale) {
  scale_t<T> s;
  bool active;
  read_scale<T>(scale, Op::kRestore, s, active);
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  for (int64_t c = global_warp(); c < chunks; c += grid_warps()) element_chunk<Op>(a, s, active, c);
}

// perturb_ / restore_ of every tensor of the table: one warp per global chunk, masked or dense by the
// tensor's row (warp-uniform).
template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads, kListMinBlocksPerSM) element_list_kernel(ListTable t, ScaleView scale) {
  scale_t<T> s;
  bool active;
  read_scale<T>(scale, Op::kRestore, s, active);
  for (int64_t c = global_warp(); c < t.chunks; c += grid_warps()) {
    const Row row = row_of(t, c);
    const ElementArgs<T> a{column_ptr<T>(row, kColW), column_ptr<const T>(row, kColG),
                           column_ptr<T>(row, kColBackup), row.col[kColN], row.col[kColCapacity],
                           column_ptr<const int32_t>(row, kColMask), column_ptr<const void>(row, kColOffsets),
                           row.col[kColOffsets64] != 0, row.col[kColVec] != 0};
    element_chunk<Op>(a, s, active, row.local);
  }
}

// ---------------------------------------------------------------------------------------------------
// axpby_: x = a·x + b·y (ssam_math.h: axpby), one warp per chunk; lane l takes the packs of V entries at
// l * V, l * V + 32 V, ... of the chunk, whole 16-byte packs of X and Y where both are aligned and the pack
// lies below n, scalar entries otherwise (the tail).
// ---------------------------------------------------------------------------------------------------

template <typename T>
using AxpbyArgs = UpdateArgs<T, T>;

template <typename T>
__device__ void axpby_chunk(const AxpbyArgs<T>& p, scale_t<T> a, scale_t<T> b, int64_t c) {
  update_chunk<kVec<T>>(p, c, [a, b](T x, T y) { return axpby(x, y, a, b); });
}

// axpby_ of one tensor; a and b are read from device memory (load_scale: fp32, rounded once, unless T is
// double).
template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) axpby_kernel(AxpbyArgs<T> p, ScaleView a, ScaleView b) {
  const scale_t<T> sa = load_scale<T>(a), sb = load_scale<T>(b);
  const int64_t chunks = (p.n + kChunk - 1) / kChunk;
  for (int64_t c = global_warp(); c < chunks; c += grid_warps()) axpby_chunk(p, sa, sb, c);
}

// axpby_ of every (X, Y) of the table (X at kColW, Y at kColG): one warp per global chunk.
template <typename T>
__global__ void __launch_bounds__(kThreads, kListMinBlocksPerSM) axpby_list_kernel(ListTable t, ScaleView a,
                                                                                   ScaleView b) {
  const scale_t<T> sa = load_scale<T>(a), sb = load_scale<T>(b);
  for (int64_t c = global_warp(); c < t.chunks; c += grid_warps()) {
    const Row row = row_of(t, c);
    const AxpbyArgs<T> p{column_ptr<T>(row, kColW), column_ptr<const T>(row, kColG), row.col[kColN],
                         row.col[kColVec] != 0};
    axpby_chunk(p, sa, sb, row.local);
  }
}

}  // namespace
}  // namespace ssam
