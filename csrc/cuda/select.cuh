// The selection primitives on the GPU (ssam_kernels/ops/select.py), over a list of segments in one launch
// per pass, on the table of the list forms (common.cuh; a segment's scores in the G column, its filter
// in the mask column, its output mask words in the backup column). One warp takes one chunk (kChunk entries),
// lane l the entries 32·k + l: loads are coalesced, and each lane issues kKeyLoads independent loads
// before it counts them. The single-segment ops are lists of one.
#pragma once

#include "common.cuh"

namespace ssam {
namespace {

constexpr int kColScores = kColG;
constexpr int kColFilter = kColMask;
constexpr int kColWords = kColBackup;
constexpr int kColCounts = kColOffsets;  // bucket_mask: the segment's int32 count per chunk
constexpr int kColStart = kColW;         // bucket_mask: the segment's first entry position
constexpr int kKeyLoads = 8;  // score loads in flight per lane

// The chunk c of the table as a selection kernel sees it.
template <typename T>
struct ScoreChunk {
  const T* x;
  const int32_t* filter;
  int32_t* words;
  int64_t n, first;  // entries of the segment; the chunk's first entry in it
  int32_t* counts;   // bucket_mask only (else null)
  int64_t start;     // bucket_mask only: the segment's first entry position
};

template <typename T>
__device__ ScoreChunk<T> score_chunk(const ListTable& t, int64_t c) {
  const Row row = row_of(t, c);
  return {column_ptr<const T>(row, kColScores), column_ptr<const int32_t>(row, kColFilter),
          column_ptr<int32_t>(row, kColWords), row.col[kColN], row.local * kChunk,
          column_ptr<int32_t>(row, kColCounts), row.col[kColStart]};
}

// Calls fn(k, key, ok) for the 32 entries i = first + 32·k + lane of the lane's chunk, the keys loaded
// kKeyLoads at a time (independent loads, then the uses); ok: i < n and the entry passes the filter.
template <typename T, typename Fn>
__device__ void for_chunk_keys(const ScoreChunk<T>& ch, bool largest, bool filter_value, Fn&& fn) {
  const int lane = lane_id();
#pragma unroll
  for (int k0 = 0; k0 < 32; k0 += kKeyLoads) {
    uint32_t key[kKeyLoads];
    bool ok[kKeyLoads];
#pragma unroll
    for (int u = 0; u < kKeyLoads; ++u) {
      const int64_t i = ch.first + (k0 + u) * 32 + lane;
      ok[u] = i < ch.n;
      key[u] = ok[u] ? score_key(global_load(ch.x + i), largest) : 0u;
    }
#pragma unroll
    for (int u = 0; u < kKeyLoads; ++u) {
      const int64_t i = ch.first + (k0 + u) * 32 + lane;
      fn(k0 + u, key[u], ok[u] && eligible(ch.filter, filter_value, i));
    }
  }
}

// Each block counts its chunks into a shared-memory histogram, then adds it to the global one with
// integer atomics (exact, so the result does not depend on the order).
template <typename T>
__global__ void radix_histogram_list_kernel(ListTable t, const int64_t* prefix, int shift, int bits, bool largest,
                                            bool filter_value, unsigned long long* out) {
  SSAM_DYNAMIC_SHARED(unsigned int, hist);
  const int bins = 1 << bits;
  const uint32_t digit_mask = static_cast<uint32_t>(bins - 1);
  for (int d = threadIdx.x; d < bins; d += blockDim.x) hist[d] = 0;
  __syncthreads();
  const uint64_t pre = static_cast<uint64_t>(global_load(prefix));
  const int high = shift + bits;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    for_chunk_keys(score_chunk<T>(t, c), largest, filter_value, [&](int, uint32_t key, bool ok) {
      if (ok && prefix_matches(key, pre, high)) atomicAdd(&hist[(key >> shift) & digit_mask], 1u);
    });
  }
  __syncthreads();
  for (int d = threadIdx.x; d < bins; d += blockDim.x) {
    if (hist[d] != 0) atomicAdd(&out[d], static_cast<unsigned long long>(hist[d]));
  }
}

// Pass 1 of threshold_mask: the number of eligible ties in each chunk of the table (one warp per chunk).
template <typename T>
__global__ void tie_count_list_kernel(ListTable t, const int64_t* threshold, const int64_t* quota, bool largest,
                                      bool filter_value, int64_t* counts) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const uint32_t th = static_cast<uint32_t>(global_load(threshold));
  const bool needed = global_load(quota) > 0;  // without a quota no tie is taken: skip reading the scores
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    int64_t count = 0;
    if (needed) {
      for_chunk_keys(score_chunk<T>(t, c), largest, filter_value, [&](int, uint32_t key, bool ok) {
        count += __popc(__ballot_sync(kFullWarp, ok && key == th));
      });
    }
    if (lane_id() == 0) global_store(counts + c, count);
  }
}

// Pass 2 of threshold_mask: each warp writes its chunk's 32 words. ties_end[c] is the inclusive scan of
// the tie counts in list order, so the ties before the chunk are ties_end[c] - counts[c]; within the chunk
// a running count plus a ballot prefix gives each tie its rank.
template <typename T>
__global__ void threshold_write_list_kernel(ListTable t, const int64_t* threshold, const int64_t* quota,
                                           bool largest, bool filter_value, const int64_t* counts,
                                           const int64_t* ties_end) {
  const int lane = lane_id();
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const uint32_t th = static_cast<uint32_t>(global_load(threshold));
  const int64_t q = global_load(quota);
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    const ScoreChunk<T> ch = score_chunk<T>(t, c);
    int64_t ties = global_load(ties_end + c) - global_load(counts + c);
    uint32_t mine = 0;
    for_chunk_keys(ch, largest, filter_value, [&](int k, uint32_t key, bool ok) {
      const bool equal = ok && key == th;
      const uint32_t equal_lanes = __ballot_sync(kFullWarp, equal);
      const bool take = (ok && key > th) || (equal && ties + __popc(equal_lanes & lanes_below) < q);
      const uint32_t word = __ballot_sync(kFullWarp, take);
      ties += __popc(equal_lanes);
      if (lane == k) mine = word;
    });
    const int64_t w = ch.first / 32 + lane;
    if (w < (ch.n + 31) / 32) global_store(ch.words + w, static_cast<int32_t>(mine));
  }
}

// The mask pass of the bucket path (ssam_kernels/ops/select.py): each warp writes its chunk's 32 words
// with the eligible entries whose key is above the bucket (key >> shift > prefix >> shift) and their
// count, and appends the eligible entries in the bucket to `candidates`: per 32 entries one atomicAdd on
// the cursor by the first lane, a ballot prefix for each candidate's slot. A candidate is
// (2^shift - 1 - low key bits) << 53 | position, so ascending candidates are in selection order (key
// descending, then entry order); slots at or past `capacity` are counted, not written.
template <typename T>
__global__ void bucket_mask_list_kernel(ListTable t, const int64_t* prefix, int shift, bool largest, bool filter_value,
                                        int64_t* candidates, int64_t capacity, int32_t* cursor) {
  const int lane = lane_id();
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const uint32_t bucket = static_cast<uint32_t>(global_load(prefix)) >> shift;
  const uint32_t low = (1u << shift) - 1u;
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    const ScoreChunk<T> ch = score_chunk<T>(t, c);
    uint32_t mine = 0;
    int selected = 0;
    for_chunk_keys(ch, largest, filter_value, [&](int k, uint32_t key, bool ok) {
      const uint32_t word = __ballot_sync(kFullWarp, ok && (key >> shift) > bucket);
      const bool undecided = ok && (key >> shift) == bucket;
      const uint32_t undecided_lanes = __ballot_sync(kFullWarp, undecided);
      if (undecided_lanes != 0) {  // warp-uniform
        int32_t first = 0;
        if (lane == 0) first = atomicAdd(cursor, __popc(undecided_lanes));
        first = __shfl_sync(kFullWarp, first, 0);
        const int64_t slot = static_cast<int64_t>(first) + __popc(undecided_lanes & lanes_below);
        if (undecided && slot < capacity) {
          const int64_t position = ch.start + ch.first + k * 32 + lane;
          global_store(candidates + slot, (static_cast<int64_t>(low - (key & low)) << 53) | position);
        }
      }
      selected += __popc(word);
      if (lane == k) mine = word;
    });
    const int64_t w = ch.first / 32 + lane;
    if (w < (ch.n + 31) / 32) global_store(ch.words + w, static_cast<int32_t>(mine));
    if (lane == 0) global_store(ch.counts + ch.first / kChunk, selected);
  }
}

}  // namespace
}  // namespace ssam
