// CUDA kernels of the ssam_kernels ops. Every launch runs on the current stream of the tensors' device
// and reads the device-side scalars (scale, prefix, threshold, tie quota) from device memory, so no op
// synchronises with the host. The element-wise mathematics comes from ssam_math.h, shared with cpu.cpp.
//
// Mask layout on the GPU: one warp owns one chunk of 1024 entries (32 words); lane l holds word l, a
// warp scan of the words' popcounts plus offsets[chunk] gives each word's first rank.
//
// The element-wise kernels (norm, perturb_/restore_, Fisher) are built to stream at the bandwidth limit
// (issue 14; predicted from the static report, not measured: benchmarks/NOTES.md): every global access
// goes through load<>/store() below (a global-space instruction of a chosen cache path, whatever the
// pointer's origin); a thread moves whole 16-byte packs when its tensor is 16-byte aligned (checked per
// tensor on the host, launch.h; scalar entries otherwise and past the end); each step issues all of its
// loads before the first store or use, so several independent loads are in flight per thread; and
// __launch_bounds__ asks for 4-6 resident blocks per SM (kMinBlocksPerSM and its siblings below; no
// spills in the static report at e5f10a5, before the fp32 FMA was merged).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <tuple>
#include <vector>

#include "launch.h"
#include "ssam_ops.h"

namespace ssam {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest
constexpr unsigned kFullWarp = 0xFFFFFFFFu;
// Resident blocks per SM the element-wise kernels are compiled for (__launch_bounds__): 6 x 256 threads,
// at most 40 registers: full occupancy on sm_86/sm_89 (1536 threads per SM), 48 of 64 warps on
// sm_80/sm_90, whose 32-register full occupancy would spill (static report, before the fp32 FMA), with
// 48 KB of 16-byte loads in flight per SM, above the ~18 KB an H100 SM needs to cover its memory latency
// at full bandwidth (benchmarks/NOTES.md, finding 1).
constexpr int kMinBlocksPerSM = 6;
// perturb_ of a 2-byte dtype (8 entries a pack) spilled 16 bytes at 40 registers on sm_80 (static report
// at 3a06fe3, when each entry still went through float64; not rechecked since the fp32 FMA): 5 blocks
// (48 registers) there.
template <typename T>
constexpr int kElementMinBlocksPerSM = sizeof(T) == 2 ? 5 : kMinBlocksPerSM;
// The list kernels keep a table row's pointers and sizes in registers: 4 blocks (64 registers) there.
constexpr int kListMinBlocksPerSM = 4;

using launch::aligned16;

int64_t grid_for(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, kMaxBlocks));
}

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

// ---------------------------------------------------------------------------------------------------
// grad_sq_norm: stage 1, one wave of blocks (launch.h: wave_grid, from the SM count and the kernel's
// occupancy); warp w takes the 1024-entry chunks w, w + warps, ...; each thread adds the squares of its
// entries in double in a fixed order, the block reduces in a fixed tree order and writes its partial.
// Stage 2, one block adds the partials the same way and writes the result. The partition depends only
// on the device: the same input gives the same result on the same device. No atomics, nothing to zero.
// ---------------------------------------------------------------------------------------------------

__device__ double block_sum(double v, double* shared) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int half = blockDim.x / 2; half > 0; half /= 2) {
    if (threadIdx.x < half) shared[threadIdx.x] += shared[threadIdx.x + half];
    __syncthreads();
  }
  return shared[0];
}

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
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void sq_norm_final_kernel(const double* partial, int64_t count, double* out) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int64_t b = threadIdx.x; b < count; b += blockDim.x) acc += partial[b];
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = total;
}

// One wave of `kernel` on the current device: its resident blocks per SM (cudaOccupancy..., cached per
// device: it depends only on the kernel and the device) times the SM count, capped by the work.
template <typename Kernel>
int64_t wave_grid_for(Kernel kernel, int64_t chunks) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> resident[kMaxDevices];  // sms * blocks per SM; 0: not queried yet
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  int64_t wave = device < kMaxDevices ? resident[device].load(std::memory_order_relaxed) : 0;
  if (wave == 0) {
    int sms = 0, per_sm = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kThreads, 0));
    wave = std::max<int64_t>(1, int64_t{sms} * per_sm);
    if (device < kMaxDevices) resident[device].store(wave, std::memory_order_relaxed);
  }
  return launch::wave_grid(wave, 1, chunks, kWarpsPerBlock);
}

// Launches both stages of a norm over `chunks` chunks in all: the partial kernel (`launch_partial(grid,
// partial)`) on a one-wave grid and the final one into a new float64 0-d tensor.
template <typename Kernel, typename LaunchPartial>
at::Tensor launch_norm(Kernel partial_kernel, int64_t chunks, const at::TensorOptions& options,
                       LaunchPartial&& launch_partial) {
  at::Tensor out = at::empty({}, options.dtype(at::kDouble));
  const int64_t grid = wave_grid_for(partial_kernel, chunks);
  at::Tensor partial = at::empty({grid}, out.options());  // every block writes its own: no zeroing
  launch_partial(grid, partial.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  sq_norm_final_kernel<<<1, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(partial.data_ptr<double>(), grid,
                                                                             out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor grad_sq_norm_cuda(const at::Tensor& G, const std::optional<at::Tensor>& W) {
  check_grad_sq_norm_args(G, W);
  const c10::cuda::CUDAGuard guard(G.device());
  const int64_t n = G.numel();
  if (n == 0) return at::zeros({}, G.options().dtype(at::kDouble));
  at::Tensor out;
  dispatch_dtype(G.scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = G.data_ptr<T>();
    const T* w = W.has_value() ? W->data_ptr<T>() : nullptr;
    const NormArgs<T> args{g, w, n, aligned16({g, w})};
    out = launch_norm(sq_norm_partial_kernel<T>, num_chunks(n), G.options(), [&](int64_t grid, double* partial) {
      sq_norm_partial_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args, partial);
    });
  });
  return out;
}

// ---------------------------------------------------------------------------------------------------
// perturb_ / restore_: one warp per 1024-entry chunk, masked or dense (rank(i) = i), one code path.
// ---------------------------------------------------------------------------------------------------

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

template <typename Fn>
void dispatch_op(bool restore, bool adaptive, Fn&& fn) {
  if (restore) {
    fn(Restore{});
  } else if (adaptive) {
    fn(PerturbAdaptive{});
  } else {
    fn(Perturb{});
  }
}

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
  s = restore ? scale_t<T>(0) : load_scale<T>(scale.data, scale.is64);
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

template <typename T>
void launch_element(const ElementArgs<T>& args, ScaleView scale, bool adaptive, bool restore) {
  const int64_t blocks = grid_for(num_chunks(args.n), kWarpsPerBlock);
  dispatch_op(restore, adaptive, [&](auto op) {
    element_kernel<T, decltype(op)><<<blocks, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(args, scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void perturb_cuda(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& offsets, const at::Tensor& backup, const at::Tensor& scale,
                  bool adaptive) {
  const MaskView view = check_perturb_args(W, G, mask, offsets, backup);
  const ScaleView s = scale_view(scale, W);
  const int64_t n = W.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(W.device());
  dispatch_dtype(W.scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* w = W.data_ptr<T>();
    const T* g = G.data_ptr<T>();
    T* b = backup.data_ptr<T>();
    launch_element(ElementArgs<T>{w, g, b, n, backup.numel(), view.words, view.offsets, view.offsets64,
                                  aligned16({w, g, b})},
                   s, adaptive, false);
  });
}

void restore_cuda(const at::Tensor& W, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& offsets, const at::Tensor& backup) {
  const MaskView view = check_restore_args(W, mask, offsets, backup);
  const int64_t n = W.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (view.words == nullptr) {  // dense: a device-to-device copy runs at copy bandwidth by definition
    C10_CUDA_CHECK(cudaMemcpyAsync(W.data_ptr(), backup.data_ptr(), n * W.element_size(), cudaMemcpyDeviceToDevice,
                                   stream));
    return;
  }
  dispatch_dtype(W.scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* w = W.data_ptr<T>();
    T* b = backup.data_ptr<T>();
    launch_element(ElementArgs<T>{w, nullptr, b, n, backup.numel(), view.words, view.offsets, view.offsets64,
                                  aligned16({w, b})},
                   ScaleView{}, false, true);
  });
}

// ---------------------------------------------------------------------------------------------------
// fisher_accumulate_: F += alpha · g², one correctly rounded fp32 FMA (ssam_math.h: fisher_update),
// one warp per 1024-entry chunk.
// ---------------------------------------------------------------------------------------------------

// Entries per Fisher pack: a whole 16-byte pack of G and of the fp32 F (4 for float64 G; bf16 / fp16 G:
// 8, with a 32-byte F pack).
template <typename T>
constexpr int kFisherVec = kVec<T> > kVec<float> ? kVec<T> : kVec<float>;

template <typename T>
struct FisherArgs {
  float* f;
  const T* g;
  int64_t n;
  bool vec;  // f and g 16-byte aligned
};

template <typename T>
__device__ void fisher_chunk(const FisherArgs<T>& a, float alpha, int64_t c) {
  constexpr int V = kFisherVec<T>;
  for (int e = lane_id() * V; e < kChunk; e += 32 * V) {
    const int64_t i = c * kChunk + e;
    if (i >= a.n) return;
    const uint32_t live = entries_below<V>(i, a.n);
    const bool whole = a.vec && live == kAllEntries<V>;
    Pack<float, V> f = load_slots<Path::kCoherent, V>(a.f, i, kAllEntries<V>, live, whole);
    const Pack<T, V> g = load_slots<Path::kReadOnly, V>(a.g, i, kAllEntries<V>, live, whole);
#pragma unroll
    for (int k = 0; k < V; ++k) {
      if ((live >> k) & 1u) f.v[k] = fisher_update(f.v[k], g.v[k], alpha);
    }
    store_slots<V>(a.f, i, kAllEntries<V>, live, whole, f);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kMinBlocksPerSM) fisher_kernel(FisherArgs<T> a, float alpha) {
  const int64_t chunks = (a.n + kChunk - 1) / kChunk;
  for (int64_t c = global_warp(); c < chunks; c += grid_warps()) fisher_chunk(a, alpha, c);
}

void fisher_accumulate_cuda(const at::Tensor& F, const at::Tensor& G, double alpha) {
  check_fisher_args(F, G);
  const int64_t n = F.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(F.device());
  dispatch_dtype(G.scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    float* f = F.data_ptr<float>();
    const T* g = G.data_ptr<T>();
    fisher_kernel<T><<<grid_for(num_chunks(n), kWarpsPerBlock), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        FisherArgs<T>{f, g, n, aligned16({f, g})}, fisher_alpha(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

__global__ void hash_fill_kernel(int32_t* out, int64_t n, uint32_t key, uint64_t base) {
  for (int64_t i = global_thread(); i < n; i += grid_threads()) out[i] = hash_value(key, base + i);
}

void hash_fill_cuda(const at::Tensor& out, int64_t seed, int64_t step, int64_t base) {
  check_hash_fill_args(out, base);
  const int64_t n = out.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(out.device());
  const uint32_t key = hash_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(step));
  hash_fill_kernel<<<grid_for(n, kThreads), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
      out.data_ptr<int32_t>(), n, key, static_cast<uint64_t>(base));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------
// The list forms: one launch per op for any number of tensors (issue 15). The host writes a table of the
// tensors (addresses and sizes, kColumns int64 per tensor, then each tensor's first global chunk) into
// pinned memory and copies it to the device on the op's stream; the kernels walk the global chunk
// numbers 0 .. total - 1 (1024-entry chunks, so mask offsets stay per chunk), find each chunk's tensor
// by a 32-way warp search in the table (entry_of) and run the single-tensor kernels' chunk code on it. A chunk never spans
// two tensors.
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

// Builds the table of `rows` (kColumns values per tensor) on the host and copies it to `device`
// asynchronously (pinned memory: the caching host allocator keeps it until the copy has run).
ListTable upload_table(const std::vector<int64_t>& rows, const at::Device& device, at::Tensor& keep) {
  const int64_t entries = static_cast<int64_t>(rows.size()) / kColumns;
  at::Tensor host = at::empty({entries * kColumns + entries + 1}, at::TensorOptions().dtype(at::kLong).pinned_memory(true));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(rows.begin(), rows.end(), h);
  int64_t* first = h + entries * kColumns;
  first[0] = 0;
  for (int64_t j = 0; j < entries; ++j) first[j + 1] = first[j] + num_chunks(rows[j * kColumns + kColN]);
  keep = host.to(device, /*non_blocking=*/true);
  const int64_t* d = keep.data_ptr<int64_t>();
  return {d, d + entries * kColumns, entries, first[entries]};
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
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
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

int64_t address(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }
int64_t address(const std::optional<at::Tensor>& t) { return t.has_value() ? address(*t) : 0; }
const void* pointer(int64_t address) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(address)); }

// kColVec of a row whose pointer columns are filled in: whether they are all 16-byte aligned.
void set_vec(int64_t* row) {
  row[kColVec] = aligned16({pointer(row[kColW]), pointer(row[kColG]), pointer(row[kColBackup])});
}

at::Tensor grad_sq_norm_multi_cuda(at::TensorList G, const OptionalTensors& W) {
  TORCH_CHECK_VALUE(!G.empty(), "G: expected at least one tensor");
  check_list_lengths(G.size(), {{"W", W.size()}});
  std::vector<int64_t> rows(G.size() * kColumns, 0);
  for (size_t j = 0; j < G.size(); ++j) {
    const std::optional<at::Tensor> w = W.get(j);
    check_grad_sq_norm_args(G[j], w);
    check_same_kind(G[j], G[0], "G", j);
    int64_t* row = rows.data() + j * kColumns;
    row[kColW] = address(w);
    row[kColG] = address(G[j]);
    row[kColN] = G[j].numel();
    set_vec(row);
  }
  const c10::cuda::CUDAGuard guard(G[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, G[0].device(), keep);
  at::Tensor out;
  dispatch_dtype(G[0].scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    out = launch_norm(sq_norm_list_kernel<T>, table.chunks, G[0].options(), [&](int64_t grid, double* partial) {
      sq_norm_list_kernel<T><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(table, partial);
    });
  });
  return out;
}

// The table of a perturb_ / restore_ list (G null for restore_), after the per-tensor checks.
std::vector<int64_t> element_rows(at::TensorList W, const at::Tensor* const* G, const OptionalTensors& mask,
                                  const OptionalTensors& offsets, at::TensorList backup) {
  std::vector<int64_t> rows(W.size() * kColumns, 0);
  for (size_t j = 0; j < W.size(); ++j) {
    check_same_kind(W[j], W[0], "W", j);
    const MaskView view = G != nullptr ? check_perturb_args(W[j], *G[j], mask.get(j), offsets.get(j), backup[j])
                                       : check_restore_args(W[j], mask.get(j), offsets.get(j), backup[j]);
    int64_t* row = rows.data() + j * kColumns;
    row[kColW] = address(W[j]);
    row[kColG] = G != nullptr ? address(*G[j]) : 0;
    row[kColMask] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(view.words));
    row[kColOffsets] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(view.offsets));
    row[kColOffsets64] = view.offsets64;
    row[kColBackup] = address(backup[j]);
    row[kColN] = W[j].numel();
    row[kColCapacity] = backup[j].numel();
    set_vec(row);
  }
  return rows;
}

void launch_element_list(at::TensorList W, const std::vector<int64_t>& rows, ScaleView scale, bool adaptive,
                         bool restore) {
  if (W.empty()) return;
  const c10::cuda::CUDAGuard guard(W[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, W[0].device(), keep);
  if (table.chunks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(W[0].scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    dispatch_op(restore, adaptive, [&](auto op) {
      element_list_kernel<T, decltype(op)><<<grid_for(table.chunks, kWarpsPerBlock), kThreads, 0, stream>>>(table,
                                                                                                          scale);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
}

void perturb_multi_cuda(at::TensorList W, at::TensorList G, const OptionalTensors& mask,
                        const OptionalTensors& offsets, at::TensorList backup, const at::Tensor& scale,
                        bool adaptive) {
  check_list_lengths(W.size(), {{"G", G.size()}, {"mask", mask.size()}, {"offsets", offsets.size()},
                                {"backup", backup.size()}});
  if (W.empty()) return;
  std::vector<const at::Tensor*> grads;
  for (const at::Tensor& g : G) grads.push_back(&g);
  const std::vector<int64_t> rows = element_rows(W, grads.data(), mask, offsets, backup);
  launch_element_list(W, rows, scale_view(scale, W[0]), adaptive, false);
}

void restore_multi_cuda(at::TensorList W, const OptionalTensors& mask, const OptionalTensors& offsets,
                        at::TensorList backup) {
  check_list_lengths(W.size(), {{"mask", mask.size()}, {"offsets", offsets.size()}, {"backup", backup.size()}});
  launch_element_list(W, element_rows(W, nullptr, mask, offsets, backup), ScaleView{}, false, true);
}

void fisher_accumulate_multi_cuda(at::TensorList F, at::TensorList G, double alpha) {
  check_list_lengths(F.size(), {{"G", G.size()}});
  if (F.empty()) return;
  std::vector<int64_t> rows(F.size() * kColumns, 0);
  for (size_t j = 0; j < F.size(); ++j) {
    check_fisher_args(F[j], G[j]);
    check_same_kind(G[j], G[0], "G", j);
    int64_t* row = rows.data() + j * kColumns;
    row[kColW] = address(F[j]);
    row[kColG] = address(G[j]);
    row[kColN] = F[j].numel();
    set_vec(row);
  }
  const c10::cuda::CUDAGuard guard(F[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, F[0].device(), keep);
  if (table.chunks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G[0].scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    fisher_list_kernel<T><<<grid_for(table.chunks, kWarpsPerBlock), kThreads, 0, stream>>>(table, fisher_alpha(alpha));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------
// Selection primitives, over a list of segments (issue 15) in one launch per pass, on the table of the
// list forms above (a segment's scores in the G column, its filter in the mask column, its output mask
// words in the backup column). One warp takes one 1024-entry chunk, lane l the entries 32·k + l: loads
// are coalesced, and each lane issues kKeyLoads independent loads before it counts them. The
// single-segment ops are lists of one.
// ---------------------------------------------------------------------------------------------------

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

// Calls fn(k, i, key, ok) for the 32 entries i = first + 32·k + lane of the lane's chunk, the keys loaded
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
      key[u] = ok[u] ? score_key(ch.x[i], largest) : 0u;
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
  extern __shared__ unsigned int hist[];
  const int bins = 1 << bits;
  const uint32_t digit_mask = static_cast<uint32_t>(bins - 1);
  for (int d = threadIdx.x; d < bins; d += blockDim.x) hist[d] = 0;
  __syncthreads();
  const uint64_t pre = static_cast<uint64_t>(*prefix);
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
  const uint32_t th = static_cast<uint32_t>(*threshold);
  const bool needed = *quota > 0;  // without a quota no tie is taken: skip reading the scores
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    int64_t count = 0;
    if (needed) {
      for_chunk_keys(score_chunk<T>(t, c), largest, filter_value, [&](int, uint32_t key, bool ok) {
        count += __popc(__ballot_sync(kFullWarp, ok && key == th));
      });
    }
    if (lane_id() == 0) counts[c] = count;
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
  const uint32_t th = static_cast<uint32_t>(*threshold);
  const int64_t q = *quota;
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    const ScoreChunk<T> ch = score_chunk<T>(t, c);
    int64_t ties = ties_end[c] - counts[c];
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
    if (w < (ch.n + 31) / 32) ch.words[w] = static_cast<int32_t>(mine);
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
  const uint32_t bucket = static_cast<uint32_t>(*prefix) >> shift;
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
          candidates[slot] = (static_cast<int64_t>(low - (key & low)) << 53) | position;
        }
      }
      selected += __popc(word);
      if (lane == k) mine = word;
    });
    const int64_t w = ch.first / 32 + lane;
    if (w < (ch.n + 31) / 32) ch.words[w] = static_cast<int32_t>(mine);
    if (lane == 0) ch.counts[ch.first / kChunk] = selected;
  }
}

// The table of a selection list: scores, filter and (threshold_mask) output words per segment.
std::vector<int64_t> score_rows(at::TensorList scores, const std::vector<const int32_t*>& filter,
                                const std::vector<at::Tensor>* words) {
  std::vector<int64_t> rows(scores.size() * kColumns, 0);
  for (size_t j = 0; j < scores.size(); ++j) {
    int64_t* row = rows.data() + j * kColumns;
    row[kColScores] = address(scores[j]);
    row[kColFilter] = static_cast<int64_t>(reinterpret_cast<uintptr_t>(filter[j]));
    row[kColWords] = words != nullptr ? address((*words)[j]) : 0;
    row[kColN] = scores[j].numel();
  }
  return rows;
}

// Blocks of a selection launch: enough warps for the chunks, at most a few waves of resident blocks.
int64_t selection_blocks(int64_t chunks) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  const int64_t resident = 4 * static_cast<int64_t>(sms);
  return std::min(grid_for(chunks, kWarpsPerBlock), resident);
}

at::Tensor radix_histogram_multi_cuda(at::TensorList scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                                      bool largest, const OptionalTensors& filters, bool filter_value) {
  check_digit(shift, bits);
  const std::vector<const int32_t*> filter = check_selection_list(scores, filters, {{"prefix", &prefix}});
  const c10::cuda::CUDAGuard guard(prefix.device());
  at::Tensor out = at::zeros({int64_t{1} << bits}, prefix.options().dtype(at::kLong));
  if (scores.empty()) return out;
  at::Tensor keep;
  const ListTable table = upload_table(score_rows(scores, filter, nullptr), scores[0].device(), keep);
  if (table.chunks == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const size_t shared = sizeof(unsigned int) << bits;
  dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    radix_histogram_list_kernel<T><<<selection_blocks(table.chunks), kThreads, shared, stream>>>(
        table, prefix.data_ptr<int64_t>(), static_cast<int>(shift), static_cast<int>(bits), largest, filter_value,
        reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<std::vector<at::Tensor>, at::Tensor> threshold_mask_multi_cuda(at::TensorList scores,
                                                                          const at::Tensor& threshold,
                                                                          const at::Tensor& tie_quota, bool largest,
                                                                          const OptionalTensors& filters,
                                                                          bool filter_value) {
  const std::vector<const int32_t*> filter =
      check_selection_list(scores, filters, {{"threshold", &threshold}, {"tie_quota", &tie_quota}});
  const c10::cuda::CUDAGuard guard(tie_quota.device());
  std::vector<at::Tensor> words;
  for (const at::Tensor& s : scores) words.push_back(at::empty({num_words(s.numel())}, s.options().dtype(at::kInt)));
  if (scores.empty()) return {words, at::clamp_min(tie_quota, 0)};
  at::Tensor keep;
  const ListTable table = upload_table(score_rows(scores, filter, &words), scores[0].device(), keep);
  if (table.chunks == 0) return {words, at::clamp_min(tie_quota, 0)};
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  at::Tensor counts = at::empty({table.chunks}, tie_quota.options());
  const int64_t blocks = selection_blocks(table.chunks);
  at::Tensor ties_end;
  dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const int64_t* t = threshold.data_ptr<int64_t>();
    const int64_t* q = tie_quota.data_ptr<int64_t>();
    tie_count_list_kernel<T><<<blocks, kThreads, 0, stream>>>(table, t, q, largest, filter_value,
                                                              counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    ties_end = at::cumsum(counts, 0);  // integer scan on the same stream
    threshold_write_list_kernel<T><<<blocks, kThreads, 0, stream>>>(table, t, q, largest, filter_value,
                                                                    counts.data_ptr<int64_t>(),
                                                                    ties_end.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {words, at::clamp_min(tie_quota - ties_end[-1], 0)};
}

void bucket_mask_multi_cuda(at::TensorList scores, const at::Tensor& prefix, int64_t shift, bool largest,
                            const OptionalTensors& filters, bool filter_value, at::TensorList words,
                            at::TensorList counts, at::IntArrayRef starts, const at::Tensor& candidates,
                            const at::Tensor& cursor) {
  const std::vector<const int32_t*> filter = check_selection_list(scores, filters, {{"prefix", &prefix}});
  check_bucket_mask_args(scores, shift, words, counts, starts, candidates, cursor);
  if (scores.empty()) return;
  const c10::cuda::CUDAGuard guard(prefix.device());
  const std::vector<at::Tensor> word_list(words.begin(), words.end());
  std::vector<int64_t> rows = score_rows(scores, filter, &word_list);
  for (size_t j = 0; j < scores.size(); ++j) {
    rows[j * kColumns + kColCounts] = address(counts[j]);
    rows[j * kColumns + kColStart] = starts[j];
  }
  at::Tensor keep;
  const ListTable table = upload_table(rows, scores[0].device(), keep);
  if (table.chunks == 0) return;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(scores[0].scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    bucket_mask_list_kernel<T><<<selection_blocks(table.chunks), kThreads, 0, stream>>>(
        table, prefix.data_ptr<int64_t>(), static_cast<int>(shift), largest, filter_value,
        candidates.data_ptr<int64_t>(), candidates.numel(), cursor.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor radix_histogram_cuda(const at::Tensor& scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                                bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_radix_histogram_args(scores, prefix, shift, bits);
  return radix_histogram_multi_cuda({scores}, prefix, shift, bits, largest, OptionalTensors({filter_words}),
                                    filter_value);
}

at::Tensor threshold_mask_cuda(const at::Tensor& scores, const at::Tensor& threshold, const at::Tensor& tie_quota,
                               bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_threshold_mask_args(scores, threshold, tie_quota);
  return std::get<0>(threshold_mask_multi_cuda({scores}, threshold, tie_quota, largest,
                                               OptionalTensors({filter_words}), filter_value))[0];
}

}  // namespace
}  // namespace ssam

TORCH_LIBRARY_IMPL(ssam_kernels, CUDA, m) {
  m.impl("grad_sq_norm", &ssam::grad_sq_norm_cuda);
  m.impl("perturb_", &ssam::perturb_cuda);
  m.impl("restore_", &ssam::restore_cuda);
  m.impl("fisher_accumulate_", &ssam::fisher_accumulate_cuda);
  m.impl("grad_sq_norm_multi", &ssam::grad_sq_norm_multi_cuda);
  m.impl("perturb_multi_", &ssam::perturb_multi_cuda);
  m.impl("restore_multi_", &ssam::restore_multi_cuda);
  m.impl("fisher_accumulate_multi_", &ssam::fisher_accumulate_multi_cuda);
  m.impl("radix_histogram", &ssam::radix_histogram_cuda);
  m.impl("threshold_mask", &ssam::threshold_mask_cuda);
  m.impl("radix_histogram_multi", &ssam::radix_histogram_multi_cuda);
  m.impl("threshold_mask_multi", &ssam::threshold_mask_multi_cuda);
  m.impl("bucket_mask_multi", &ssam::bucket_mask_multi_cuda);
  m.impl("hash_fill_", &ssam::hash_fill_cuda);
}
