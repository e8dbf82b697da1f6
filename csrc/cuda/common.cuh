// Device code shared by the CUDA kernel families: launch shape, lane arithmetic, global-memory access,
// the block reduction and the list table with its warp search. No ATen: compiled by nvcc into the
// extension, and by a host C++ compiler into cuda_sim and the device unit tests (csrc/sim).
//
// Every launch runs on the current stream of the tensors' device and reads the device-side scalars
// (scale, prefix, threshold, tie quota) from device memory, so no op synchronises with the host. The
// element-wise mathematics comes from ssam_math.h, shared with the CPU kernels (csrc/cpu).
//
// Mask layout on the GPU: one warp owns one chunk of kChunk entries (kWordsPerChunk = 32 words); lane l
// holds word l, a warp scan of the words' popcounts plus offsets[chunk] gives each word's first rank.
//
// The element-wise kernels (norm, perturb_/restore_, Fisher) are built to stream at the bandwidth limit
// (predicted from the static report, not measured: benchmarks/NOTES.md): every global access goes
// through load<>/store() below (a global-space instruction of a chosen cache path, whatever the
// pointer's origin); a thread moves whole 16-byte packs when its tensor is 16-byte aligned (checked per
// tensor on the host, launch.h; scalar entries otherwise and past the end); each step issues all of its
// loads before the first store or use, so several independent loads are in flight per thread; and
// __launch_bounds__ asks for 4-6 resident blocks per SM (kMinBlocksPerSM and its siblings below).
#pragma once

#include <cstdint>
#include <cstring>

#include "launch.h"
#include "ssam_math.h"
#include "device_platform.h"

namespace ssam {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
static_assert(kWordsPerChunk == 32, "the mask layout: lane l of a warp holds word l of its chunk");
// Resident blocks per SM the element-wise kernels are compiled for (__launch_bounds__): 6 x 256 threads,
// at most 40 registers: full occupancy on sm_86/sm_89 (1536 threads per SM), 48 of 64 warps on
// sm_80/sm_90, whose 32-register full occupancy would spill (static report), with 48 KB of 16-byte
// loads in flight per SM, above the ~18 KB an H100 SM needs to cover its memory latency at full
// bandwidth (benchmarks/NOTES.md, finding 1).
constexpr int kMinBlocksPerSM = 6;
// perturb_ of a 2-byte dtype (8 entries a pack) spilled 16 bytes at 40 registers on sm_80 (static
// report): 5 blocks (48 registers) there.
template <typename T>
constexpr int kElementMinBlocksPerSM = sizeof(T) == 2 ? 5 : kMinBlocksPerSM;
// The list kernels keep a table row's pointers and sizes in registers: 4 blocks (64 registers) there.
constexpr int kListMinBlocksPerSM = 4;

__device__ int64_t global_thread() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
__device__ int lane_id() { return threadIdx.x & 31; }
__device__ int64_t global_warp() { return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; }
__device__ int64_t grid_warps() { return static_cast<int64_t>(gridDim.x) * kWarpsPerBlock; }

// ---------------------------------------------------------------------------------------------------
// Global-memory access of the element-wise kernels
// ---------------------------------------------------------------------------------------------------

// V entries of T in one 16-byte-aligned pack (16 bytes; Fisher's fp32 pack of 8 entries: 32 bytes).
template <typename T, int V>
struct alignas(16) Pack {
  T v[V];
};

// Entries of T per 16-byte access.
template <typename T>
constexpr int kVec = 16 / sizeof(T);

// Bits 0 .. V - 1: every entry of a pack of V (<= 8) entries.
template <int V>
constexpr uint32_t kAllEntries = (1u << V) - 1u;

template <int Bytes>
struct Word;
template <>
struct Word<2> { using type = unsigned short; };
template <>
struct Word<4> { using type = unsigned int; };
template <>
struct Word<8> { using type = unsigned long long; };
template <>
struct Word<16> { using type = uint4; };

template <typename To, typename From>
__device__ __forceinline__ To bits_as(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bits_as: sizes differ");
  To to;
  memcpy(&to, &from, sizeof to);
  return to;
}

// The cache path of a load: kReadOnly (ld.global.nc) for data no thread of the kernel writes (G, a
// restore's backup, masks, offsets, the list table), kCoherent (ld.global.cg) for W and F, which the
// kernel also writes.
enum class Path { kReadOnly, kCoherent };

// Loads a T of 2, 4, 8 bytes or a multiple of 16 bytes (a pack). The intrinsics are volatile asm: loads
// keep their program order, so the kernels write each step's loads before its first store or use.
template <Path P, typename T>
__device__ __forceinline__ T load(const T* p) {
  if constexpr (sizeof(T) > 16) {
    static_assert(sizeof(T) % 16 == 0, "load: a pack is a multiple of 16 bytes");
    struct Parts {
      uint4 v[sizeof(T) / 16];
    } parts;
#pragma unroll
    for (int k = 0; k < static_cast<int>(sizeof(T) / 16); ++k) parts.v[k] = load<P>(reinterpret_cast<const uint4*>(p) + k);
    return bits_as<T>(parts);
  } else {
    using B = typename Word<sizeof(T)>::type;
    const B* q = reinterpret_cast<const B*>(p);
    return bits_as<T>(P == Path::kReadOnly ? __ldg(q) : __ldcg(q));
  }
}

// Stores a T of 2, 4, 8 bytes or a multiple of 16 bytes (st.global, write-back).
template <typename T>
__device__ __forceinline__ void store(T* p, const T& value) {
  if constexpr (sizeof(T) > 16) {
    struct Parts {
      uint4 v[sizeof(T) / 16];
    };
    const Parts parts = bits_as<Parts>(value);
#pragma unroll
    for (int k = 0; k < static_cast<int>(sizeof(T) / 16); ++k) __stwb(reinterpret_cast<uint4*>(p) + k, parts.v[k]);
  } else {
    using B = typename Word<sizeof(T)>::type;
    __stwb(reinterpret_cast<B*>(p), bits_as<B>(value));
  }
}

// The slots of a pack's entries: entry k (bit k of `live`) at p[first + bits_below(bits, k)]. W and G
// entries use bits = all (slot k = k), a backup run the pack's selection bits (the selected entries'
// ranks are consecutive). whole: the V slots are one aligned pack (one 16-byte access); otherwise each
// live entry is a scalar access, and the others are neither read nor written (loaded as zeros).
template <Path P, int V, typename T>
__device__ __forceinline__ Pack<T, V> load_slots(const T* p, int64_t first, uint32_t bits, uint32_t live,
                                                 bool whole) {
  if (whole) return load<P>(reinterpret_cast<const Pack<T, V>*>(p + first));
  Pack<T, V> out{};
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if ((live >> k) & 1u) out.v[k] = load<P>(p + first + bits_below(bits, k));
  }
  return out;
}

template <int V, typename T>
__device__ __forceinline__ void store_slots(T* p, int64_t first, uint32_t bits, uint32_t live, bool whole,
                                            const Pack<T, V>& value) {
  if (whole) {
    store(reinterpret_cast<Pack<T, V>*>(p + first), value);
    return;
  }
#pragma unroll
  for (int k = 0; k < V; ++k) {
    if ((live >> k) & 1u) store(p + first + bits_below(bits, k), value.v[k]);
  }
}

// Entries [i, i + V) of a tensor of n entries (i < n): the bits of those below n.
template <int V>
__device__ __forceinline__ uint32_t entries_below(int64_t i, int64_t n) {
  return n - i >= V ? kAllEntries<V> : (1u << static_cast<int>(n - i)) - 1u;
}

// One tensor of an in-place binary update x[i] = op(x[i], y[i]) (update_chunk): Fisher (x fp32, y any
// dtype) and axpby_ (both T).
template <typename X, typename Y>
struct UpdateArgs {
  X* x;        // read and written
  const Y* y;  // read only
  int64_t n;
  bool vec;  // x and y 16-byte aligned
};

// One warp's pass over chunk c of an update: V entries per lane, whole 16-byte packs where `p.vec`, all of
// the step's loads before its store.
template <int V, typename X, typename Y, typename Op>
__device__ __forceinline__ void update_chunk(const UpdateArgs<X, Y>& p, int64_t c, Op op) {
  for (int e = lane_id() * V; e < kChunk; e += 32 * V) {
    const int64_t i = c * kChunk + e;
    if (i >= p.n) return;
    const uint32_t live = entries_below<V>(i, p.n);
    const bool whole = p.vec && live == kAllEntries<V>;
    Pack<X, V> xs = load_slots<Path::kCoherent, V>(p.x, i, kAllEntries<V>, live, whole);
    const Pack<Y, V> ys = load_slots<Path::kReadOnly, V>(p.y, i, kAllEntries<V>, live, whole);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if ((live >> k) & 1u) xs.v[k] = op(xs.v[k], ys.v[k]);
    }
    store_slots<V>(p.x, i, kAllEntries<V>, live, whole, xs);
  }
}

// The sum of every thread's v over the block, in a fixed tree order; `shared` holds blockDim.x doubles.
__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

// ---------------------------------------------------------------------------------------------------
// The list forms: one launch per op for any number of tensors. The host writes a table of the tensors
// (addresses and sizes, kColumns int64 per tensor, then each tensor's first global chunk) and copies it
// to the device on the op's stream (host_common.h: upload_table); the kernels walk the global chunk
// numbers 0 .. total - 1 (chunks of kChunk entries, so mask offsets stay per chunk), find each chunk's tensor
// by a 32-way warp search in the table (entry_of) and run the single-tensor kernels' chunk code on it.
// A chunk never spans two tensors.
// ---------------------------------------------------------------------------------------------------

enum Column : int {
  kColW,
  kColG,
  kColMask,
  kColOffsets,
  kColBackup,
  kColN,
  kColCapacity,
  kColOffsets64,
  kColVec,  // the tensor's pointers are 16-byte aligned (launch.h: aligned16)
  kColumns
};

// The device copy of a list's table: rows of kColumns, then first_chunk[entries + 1].
struct ListTable {
  const int64_t* rows;
  const int64_t* first_chunk;
  int64_t entries;
  int64_t chunks;  // first_chunk[entries], known on the host
};

// The tensor of global chunk c: the last j with first_chunk[j] <= c (empty tensors own no chunk). A
// 32-way search by the whole warp (c is warp-uniform): each round the lanes probe 32 evenly spaced
// entries of [lo, hi] at once and a ballot keeps the span between the last probe <= c and the next, so
// 600 tensors take 2 rounds of one load each instead of 10 dependent loads of a binary search.
__device__ int64_t entry_of(const ListTable& t, int64_t c) {
  launch::Span span{0, t.entries - 1};  // first_chunk[0] = 0 <= c (launch.h: the search's invariant)
  while (span.lo < span.hi) {
    const int64_t probe = launch::search_probe(span.lo, span.hi, lane_id());
    const bool below = probe <= span.hi && load<Path::kReadOnly>(t.first_chunk + probe) <= c;
    span = launch::search_narrow(span.lo, span.hi, __popc(__ballot_sync(kFullWarp, below)));
  }
  return span.lo;
}

// Row j of the table (all its columns loaded at once) and the local number of global chunk c in it.
struct Row {
  int64_t col[kColumns];
  int64_t local;
};

__device__ Row row_of(const ListTable& t, int64_t c) {
  const int64_t j = entry_of(t, c);
  Row row;
#pragma unroll
  for (int k = 0; k < kColumns; ++k) row.col[k] = load<Path::kReadOnly>(t.rows + j * kColumns + k);
  row.local = c - load<Path::kReadOnly>(t.first_chunk + j);
  return row;
}

template <typename P>
__device__ P* column_ptr(const Row& row, int col) {
  return reinterpret_cast<P*>(static_cast<uintptr_t>(row.col[col]));
}

}  // namespace
}  // namespace ssam
