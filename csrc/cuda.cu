// CUDA kernels of the ssam_kernels ops. Every launch runs on the current stream of the tensors' device
// and reads the device-side scalars (scale, prefix, threshold, tie quota) from device memory, so no op
// synchronises with the host. The element-wise mathematics comes from ssam_math.h, shared with cpu.cpp.
//
// Mask layout on the GPU: one warp owns one chunk of 1024 entries (32 words); lane l holds word l, a
// warp scan of the words' popcounts plus offsets[chunk] gives each word's first rank, and the warp then
// walks the chunk word by word with lane l on bit l, so global accesses stay coalesced.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "ssam_ops.h"

namespace ssam {
namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int64_t kMaxBlocks = 1 << 16;  // grid-stride loops cover the rest
constexpr int kNormBlocks = 1024;        // partial sums of grad_sq_norm (a fixed count: deterministic)
constexpr unsigned kFullWarp = 0xFFFFFFFFu;

// V elements of T in one 16-byte-aligned access (V * sizeof(T) is 16 or 32 bytes).
template <typename T, int V>
struct alignas(16) Pack {
  T v[V];
};

template <typename T>
constexpr int kVec = 16 / sizeof(T);

int64_t grid_for(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, kMaxBlocks));
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

__device__ int64_t global_thread() { return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; }
__device__ int64_t grid_threads() { return static_cast<int64_t>(gridDim.x) * blockDim.x; }
__device__ int lane_id() { return threadIdx.x & 31; }

// ---------------------------------------------------------------------------------------------------
// grad_sq_norm: stage 1, kNormBlocks blocks each add the squares of a fixed grid-stride share of the
// entries in double and reduce them in shared memory in a fixed tree order; stage 2, one block adds the
// partials the same way. No atomics: the result is the same on every run.
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

template <typename T>
__device__ double square_term(T g, const T* w, int64_t i) {
  double v = widen(g);
  if (w != nullptr) v *= widen(w[i]);
  return v * v;
}

template <typename T>
__global__ void sq_norm_partial_kernel(const T* g, const T* w, int64_t n, int64_t nvec, double* partial) {
  __shared__ double shared[kThreads];
  constexpr int V = kVec<T>;
  double acc = 0.0;
  for (int64_t p = global_thread(); p < nvec; p += grid_threads()) {
    const Pack<T, V> gp = reinterpret_cast<const Pack<T, V>*>(g)[p];
    if (w != nullptr) {
      const Pack<T, V> wp = reinterpret_cast<const Pack<T, V>*>(w)[p];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const double v = widen(gp.v[k]) * widen(wp.v[k]);
        acc += v * v;
      }
    } else {
#pragma unroll
      for (int k = 0; k < V; ++k) {
        const double v = widen(gp.v[k]);
        acc += v * v;
      }
    }
  }
  for (int64_t i = nvec * V + global_thread(); i < n; i += grid_threads()) acc += square_term(g[i], w, i);
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

__global__ void sq_norm_final_kernel(const double* partial, int count, double* out) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int b = threadIdx.x; b < count; b += blockDim.x) acc += partial[b];
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) *out = total;
}

at::Tensor grad_sq_norm_cuda(const at::Tensor& G, const std::optional<at::Tensor>& W) {
  check_grad_sq_norm_args(G, W);
  const c10::cuda::CUDAGuard guard(G.device());
  at::Tensor out = at::zeros({}, G.options().dtype(at::kDouble));
  const int64_t n = G.numel();
  if (n == 0) return out;
  at::Tensor partial = at::empty({kNormBlocks}, out.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* g = G.data_ptr<T>();
    const T* w = W.has_value() ? W->data_ptr<T>() : nullptr;
    const bool vec = aligned16(g) && (w == nullptr || aligned16(w));
    const int64_t nvec = vec ? n / kVec<T> : 0;
    sq_norm_partial_kernel<T><<<kNormBlocks, kThreads, 0, stream>>>(g, w, n, nvec, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sq_norm_final_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), kNormBlocks, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

// ---------------------------------------------------------------------------------------------------
// perturb_ / restore_
// ---------------------------------------------------------------------------------------------------

// Dense perturb: backup = W; W = perturbed(W, G) when the scale is active (G is not read otherwise).
template <typename T>
__global__ void perturb_dense_kernel(T* w, const T* g, T* backup, ScaleView scale, bool adaptive, int64_t n,
                                     int64_t nvec) {
  constexpr int V = kVec<T>;
  const scale_t<T> s = load_scale<T>(scale.data, scale.is64);
  const bool active = scale_active(s);
  for (int64_t p = global_thread(); p < nvec; p += grid_threads()) {
    Pack<T, V> wp = reinterpret_cast<const Pack<T, V>*>(w)[p];
    reinterpret_cast<Pack<T, V>*>(backup)[p] = wp;
    if (active) {
      const Pack<T, V> gp = reinterpret_cast<const Pack<T, V>*>(g)[p];
#pragma unroll
      for (int k = 0; k < V; ++k) wp.v[k] = perturbed(wp.v[k], gp.v[k], s, adaptive);
      reinterpret_cast<Pack<T, V>*>(w)[p] = wp;
    }
  }
  for (int64_t i = nvec * V + global_thread(); i < n; i += grid_threads()) {
    const T wi = w[i];
    backup[i] = wi;
    if (active) w[i] = perturbed(wi, g[i], s, adaptive);
  }
}

// Masked perturb_ (restore = false) or restore_ (restore = true): one warp per 1024-entry chunk. Bits
// past n are dropped when the words are loaded; a rank outside [0, capacity) (a short backup, offsets
// that do not match the mask: not checked on the host, that would synchronise) is skipped, so no access
// leaves W or the backup.
// Chunk c of a masked perturb_ (restore = false) or restore_ (restore = true), run by one whole warp
// (warp-uniform arguments). Bits past n are dropped when the words are loaded; a rank outside
// [0, capacity) (a short backup, offsets that do not match the mask: not checked on the host, that would
// synchronise) is skipped, so no access leaves W or the backup.
template <typename T>
__device__ void masked_chunk(T* w, const T* g, T* backup, int64_t capacity, scale_t<T> s, bool active, bool adaptive,
                             bool restore, const int32_t* words, const void* offsets, bool offsets64, int64_t n,
                             int64_t c) {
  const int lane = lane_id();
  const int64_t nwords = (n + 31) / 32;
  const uint32_t lanes_below = (1u << lane) - 1u;
  const int64_t wi = c * kWordsPerChunk + lane;
  const uint32_t word = wi < nwords ? mask_word(words, wi, n) : 0u;
  // Inclusive warp scan of the popcounts: the rank of this word's first set bit within the chunk.
  int below = popcount32(word);
  for (int d = 1; d < 32; d *= 2) {
    const int up = __shfl_up_sync(kFullWarp, below, d);
    if (lane >= d) below += up;
  }
  below -= popcount32(word);
  const int64_t base = load_offset(offsets, offsets64, c);
  for (int k = 0; k < 32; ++k) {
    const uint32_t wk = __shfl_sync(kFullWarp, word, k);
    const int first = __shfl_sync(kFullWarp, below, k);
    const int64_t i = (c * kWordsPerChunk + k) * 32 + lane;
    const int64_t r = base + first + popcount32(wk & lanes_below);
    if (((wk >> lane) & 1u) == 0 || !rank_in_range(r, capacity)) continue;  // wk has no bit past n
    if (restore) {
      w[i] = backup[r];
    } else {
      const T wv = w[i];
      backup[r] = wv;
      if (active) w[i] = perturbed(wv, g[i], s, adaptive);
    }
  }
}

// The scale of perturb_ (restore_: none) and whether it applies.
template <typename T>
__device__ void read_scale(const ScaleView& scale, bool restore, scale_t<T>& s, bool& active) {
  s = restore ? scale_t<T>(0) : load_scale<T>(scale.data, scale.is64);
  active = !restore && scale_active(s);
}

// Masked perturb_ / restore_ of one tensor: one warp per 1024-entry chunk.
template <typename T>
__global__ void masked_kernel(T* w, const T* g, T* backup, int64_t capacity, ScaleView scale, bool adaptive,
                              bool restore, const int32_t* words, const void* offsets, bool offsets64, int64_t n) {
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  scale_t<T> s;
  bool active;
  read_scale<T>(scale, restore, s, active);
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < chunks; c += warps) {
    masked_chunk(w, g, backup, capacity, s, active, adaptive, restore, words, offsets, offsets64, n, c);
  }
}

template <typename T>
void launch_masked(T* w, const T* g, T* backup, int64_t capacity, ScaleView scale, bool adaptive, bool restore,
                   const MaskView& view, int64_t n, cudaStream_t stream) {
  const int64_t blocks = grid_for(num_chunks(n), kWarpsPerBlock);
  masked_kernel<T><<<blocks, kThreads, 0, stream>>>(w, g, backup, capacity, scale, adaptive, restore, view.words,
                                                    view.offsets, view.offsets64, n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void perturb_cuda(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
                  const std::optional<at::Tensor>& offsets, const at::Tensor& backup, const at::Tensor& scale,
                  bool adaptive) {
  const MaskView view = check_perturb_args(W, G, mask, offsets, backup);
  const ScaleView s = scale_view(scale, W);
  const int64_t n = W.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(W.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(W.scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    T* w = W.data_ptr<T>();
    const T* g = G.data_ptr<T>();
    T* b = backup.data_ptr<T>();
    if (view.words != nullptr) {
      launch_masked<T>(w, g, b, backup.numel(), s, adaptive, false, view, n, stream);
      return;
    }
    const int64_t nvec = aligned16(w) && aligned16(g) && aligned16(b) ? n / kVec<T> : 0;
    const int64_t blocks = grid_for(std::max(nvec, n - nvec * kVec<T>), kThreads);
    perturb_dense_kernel<T><<<blocks, kThreads, 0, stream>>>(w, g, b, s, adaptive, n, nvec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    launch_masked<T>(W.data_ptr<T>(), nullptr, backup.data_ptr<T>(), backup.numel(), ScaleView{}, false, true, view,
                     n, stream);
  });
}

// Entries per vector step of fisher_kernel: a whole 16-byte pack of G and of the fp32 F (4 for float64 G).
template <typename T>
constexpr int kFisherVec = kVec<T> > kVec<float> ? kVec<T> : kVec<float>;

// F += alpha · g² with one fp32 fused multiply-add per entry (ssam_math.h: fisher_update).
template <typename T>
__global__ void fisher_kernel(float* f, const T* g, float alpha, int64_t n, int64_t nvec) {
  constexpr int V = kFisherVec<T>;
  for (int64_t p = global_thread(); p < nvec; p += grid_threads()) {
    const Pack<T, V> gp = reinterpret_cast<const Pack<T, V>*>(g)[p];
    Pack<float, V> fp = reinterpret_cast<const Pack<float, V>*>(f)[p];
#pragma unroll
    for (int k = 0; k < V; ++k) fp.v[k] = fisher_update(fp.v[k], gp.v[k], alpha);
    reinterpret_cast<Pack<float, V>*>(f)[p] = fp;
  }
  for (int64_t i = nvec * V + global_thread(); i < n; i += grid_threads()) {
    f[i] = fisher_update(f[i], g[i], alpha);
  }
}

void fisher_accumulate_cuda(const at::Tensor& F, const at::Tensor& G, double alpha) {
  check_fisher_args(F, G);
  const int64_t n = F.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(F.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G.scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    float* f = F.data_ptr<float>();
    const T* g = G.data_ptr<T>();
    const int64_t nvec = aligned16(f) && aligned16(g) ? n / kFisherVec<T> : 0;
    const int64_t blocks = grid_for(std::max(nvec, n - nvec * kFisherVec<T>), kThreads);
    fisher_kernel<T><<<blocks, kThreads, 0, stream>>>(f, g, fisher_alpha(alpha), n, nvec);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// ---------------------------------------------------------------------------------------------------
// Selection primitives
// ---------------------------------------------------------------------------------------------------

// Each block counts into a shared-memory histogram, then adds it to the global one with integer
// atomics (exact, so the result does not depend on the order).
template <typename T>
__global__ void radix_histogram_kernel(const T* x, int64_t n, const int64_t* prefix, int shift, int bits,
                                       bool largest, const int32_t* filter, bool filter_value,
                                       unsigned long long* out) {
  extern __shared__ unsigned int hist[];
  const int bins = 1 << bits;
  const uint32_t digit_mask = static_cast<uint32_t>(bins - 1);
  for (int d = threadIdx.x; d < bins; d += blockDim.x) hist[d] = 0;
  __syncthreads();
  const uint64_t pre = static_cast<uint64_t>(*prefix);
  const int high = shift + bits;
  for (int64_t i = global_thread(); i < n; i += grid_threads()) {
    const uint32_t key = score_key(x[i], largest);
    if (prefix_matches(key, pre, high) && eligible(filter, filter_value, i)) {
      atomicAdd(&hist[(key >> shift) & digit_mask], 1u);
    }
  }
  __syncthreads();
  for (int d = threadIdx.x; d < bins; d += blockDim.x) {
    if (hist[d] != 0) atomicAdd(&out[d], static_cast<unsigned long long>(hist[d]));
  }
}

at::Tensor radix_histogram_cuda(const at::Tensor& scores, const at::Tensor& prefix, int64_t shift, int64_t bits,
                                bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_radix_histogram_args(scores, prefix, shift, bits);
  const int32_t* filter = filter_view(filter_words, scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  at::Tensor out = at::zeros({int64_t{1} << bits}, scores.options().dtype(at::kLong));
  const int64_t n = scores.numel();
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  // At least 16 entries per thread, so the per-block flush stays small next to the counting.
  const int64_t blocks = std::min<int64_t>(grid_for(n, kThreads * 16), 1024);
  const size_t shared = sizeof(unsigned int) << bits;
  dispatch_dtype(scores.scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    radix_histogram_kernel<T><<<blocks, kThreads, shared, stream>>>(
        scores.data_ptr<T>(), n, prefix.data_ptr<int64_t>(), static_cast<int>(shift), static_cast<int>(bits),
        largest, filter, filter_value, reinterpret_cast<unsigned long long*>(out.data_ptr<int64_t>()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Tie test of threshold_mask for entry i (false past the end).
template <typename T>
__device__ void classify(const T* x, int64_t i, int64_t n, uint32_t threshold, bool largest, const int32_t* filter,
                         bool filter_value, bool& greater, bool& equal) {
  greater = equal = false;
  if (i < n && eligible(filter, filter_value, i)) {
    const uint32_t key = score_key(x[i], largest);
    greater = key > threshold;
    equal = key == threshold;
  }
}

// Pass 1 of threshold_mask: the number of ties in each 1024-entry tile (one warp per tile).
template <typename T>
__global__ void tie_count_kernel(const T* x, int64_t n, const int64_t* threshold, const int64_t* quota,
                                 bool largest, const int32_t* filter, bool filter_value, int64_t* counts) {
  const int64_t tiles = (n + kChunk - 1) / kChunk;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const uint32_t t = static_cast<uint32_t>(*threshold);
  const bool needed = *quota > 0;  // without a quota no tie is taken: skip reading the scores
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; tile < tiles;
       tile += warps) {
    int64_t count = 0;
    for (int k = 0; needed && k < 32; ++k) {
      bool greater, equal;
      classify(x, tile * kChunk + k * 32 + lane_id(), n, t, largest, filter, filter_value, greater, equal);
      count += __popc(__ballot_sync(kFullWarp, equal));
    }
    if (lane_id() == 0) counts[tile] = count;
  }
}

// Pass 2 of threshold_mask: each warp writes its tile's 32 words; ties_end[tile] is the inclusive scan of
// the tie counts, so ties before the tile = ties_end[tile] - counts[tile]; within the tile a running
// count plus a ballot prefix gives each tie its rank in index order.
template <typename T>
__global__ void threshold_write_kernel(const T* x, int64_t n, const int64_t* threshold, const int64_t* quota,
                                       bool largest, const int32_t* filter, bool filter_value,
                                       const int64_t* counts, const int64_t* ties_end, int32_t* words) {
  const int lane = lane_id();
  const int64_t tiles = (n + kChunk - 1) / kChunk;
  const int64_t nwords = (n + 31) / 32;
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  const uint32_t t = static_cast<uint32_t>(*threshold);
  const int64_t q = *quota;
  const uint32_t lanes_below = (1u << lane) - 1u;
  for (int64_t tile = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; tile < tiles;
       tile += warps) {
    int64_t ties = ties_end[tile] - counts[tile];
    uint32_t mine = 0;
    for (int k = 0; k < 32; ++k) {
      bool greater, equal;
      classify(x, tile * kChunk + k * 32 + lane, n, t, largest, filter, filter_value, greater, equal);
      const uint32_t equal_lanes = __ballot_sync(kFullWarp, equal);
      const bool take = greater || (equal && ties + __popc(equal_lanes & lanes_below) < q);
      const uint32_t word = __ballot_sync(kFullWarp, take);
      ties += __popc(equal_lanes);
      if (lane == k) mine = word;
    }
    const int64_t wi = tile * kWordsPerChunk + lane;
    if (wi < nwords) words[wi] = static_cast<int32_t>(mine);
  }
}

at::Tensor threshold_mask_cuda(const at::Tensor& scores, const at::Tensor& threshold, const at::Tensor& tie_quota,
                               bool largest, const std::optional<at::Tensor>& filter_words, bool filter_value) {
  check_threshold_mask_args(scores, threshold, tie_quota);
  const int32_t* filter = filter_view(filter_words, scores);
  const c10::cuda::CUDAGuard guard(scores.device());
  const int64_t n = scores.numel();
  at::Tensor out = at::empty({num_words(n)}, scores.options().dtype(at::kInt));
  if (n == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t tiles = num_chunks(n);
  at::Tensor counts = at::empty({tiles}, scores.options().dtype(at::kLong));
  const int64_t blocks = grid_for(tiles, kWarpsPerBlock);
  dispatch_dtype(scores.scalar_type(), "scores", true, [&](auto tag) {
    using T = typename decltype(tag)::type;
    const T* x = scores.data_ptr<T>();
    const int64_t* t = threshold.data_ptr<int64_t>();
    const int64_t* q = tie_quota.data_ptr<int64_t>();
    tie_count_kernel<T><<<blocks, kThreads, 0, stream>>>(x, n, t, q, largest, filter, filter_value,
                                                         counts.data_ptr<int64_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const at::Tensor ties_end = at::cumsum(counts, 0);  // integer scan on the same stream
    threshold_write_kernel<T><<<blocks, kThreads, 0, stream>>>(x, n, t, q, largest, filter, filter_value,
                                                               counts.data_ptr<int64_t>(),
                                                               ties_end.data_ptr<int64_t>(), out.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
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
// numbers 0 .. total - 1 (1024-entry chunks, so mask offsets stay per chunk) and find each chunk's tensor
// by binary search in the table. A chunk never spans two tensors.
// ---------------------------------------------------------------------------------------------------

enum Column : int { kColW, kColG, kColMask, kColOffsets, kColBackup, kColN, kColCapacity, kColOffsets64, kColumns };

// The device copy of a list's table: rows of kColumns, then first_chunk[entries + 1].
struct ListTable {
  const int64_t* rows;
  const int64_t* first_chunk;
  int64_t entries;
  int64_t chunks;  // first_chunk[entries], known on the host
};

// The tensor of global chunk c: the last j with first_chunk[j] <= c (empty tensors own no chunk).
__device__ int64_t entry_of(const ListTable& t, int64_t c) {
  int64_t lo = 0, hi = t.entries - 1;
  while (lo < hi) {
    const int64_t mid = (lo + hi + 1) / 2;
    if (t.first_chunk[mid] <= c) lo = mid; else hi = mid - 1;
  }
  return lo;
}

template <typename P>
__device__ P* column_ptr(const int64_t* row, int col) {
  return reinterpret_cast<P*>(static_cast<uintptr_t>(row[col]));
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

// perturb_ (restore = false) / restore_ of every tensor of the table: one warp per global chunk, masked
// or dense by the tensor's row (warp-uniform).
template <typename T>
__global__ void element_list_kernel(ListTable t, ScaleView scale, bool adaptive, bool restore) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  scale_t<T> s;
  bool active;
  read_scale<T>(scale, restore, s, active);
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    const int64_t j = entry_of(t, c);
    const int64_t* row = t.rows + j * kColumns;
    const int64_t local = c - t.first_chunk[j];
    T* w = column_ptr<T>(row, kColW);
    const T* g = column_ptr<const T>(row, kColG);
    T* backup = column_ptr<T>(row, kColBackup);
    const int64_t n = row[kColN];
    const int32_t* words = column_ptr<const int32_t>(row, kColMask);
    if (words != nullptr) {
      masked_chunk(w, g, backup, row[kColCapacity], s, active, adaptive, restore, words,
                   column_ptr<const void>(row, kColOffsets), row[kColOffsets64] != 0, n, local);
      continue;
    }
    for (int64_t i = local * kChunk + lane_id(), end = std::min((local + 1) * kChunk, n); i < end; i += 32) {
      if (restore) {
        w[i] = backup[i];
      } else {
        const T wi = w[i];
        backup[i] = wi;
        if (active) w[i] = perturbed(wi, g[i], s, adaptive);
      }
    }
  }
}

// Stage 1 of the list norm: kNormBlocks blocks take the global chunks in a grid stride, each thread adds
// the squares of a fixed share, the block reduces in a fixed tree order: deterministic for the list.
template <typename T>
__global__ void sq_norm_list_kernel(ListTable t, double* partial) {
  __shared__ double shared[kThreads];
  double acc = 0.0;
  for (int64_t c = blockIdx.x; c < t.chunks; c += gridDim.x) {
    const int64_t j = entry_of(t, c);
    const int64_t* row = t.rows + j * kColumns;
    const T* g = column_ptr<const T>(row, kColG);
    const T* w = column_ptr<const T>(row, kColW);  // null: no ASAM for this tensor
    const int64_t local = c - t.first_chunk[j];
    for (int64_t i = local * kChunk + threadIdx.x, end = std::min((local + 1) * kChunk, row[kColN]); i < end;
         i += blockDim.x) {
      acc += square_term(g[i], w, i);
    }
  }
  const double total = block_sum(acc, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = total;
}

// F += alpha · g² for every (F, G) of the table (F at kColW, G at kColG): one warp per global chunk.
template <typename T>
__global__ void fisher_list_kernel(ListTable t, float alpha) {
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t c = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32; c < t.chunks; c += warps) {
    const int64_t j = entry_of(t, c);
    const int64_t* row = t.rows + j * kColumns;
    float* f = column_ptr<float>(row, kColW);
    const T* g = column_ptr<const T>(row, kColG);
    const int64_t local = c - t.first_chunk[j];
    for (int64_t i = local * kChunk + lane_id(), end = std::min((local + 1) * kChunk, row[kColN]); i < end; i += 32) {
      f[i] = fisher_update(f[i], g[i], alpha);
    }
  }
}

int64_t address(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }
int64_t address(const std::optional<at::Tensor>& t) { return t.has_value() ? address(*t) : 0; }

at::Tensor grad_sq_norm_multi_cuda(at::TensorList G, const OptionalTensors& W) {
  TORCH_CHECK_VALUE(!G.empty(), "G: expected at least one tensor");
  check_list_lengths(G.size(), {{"W", W.size()}});
  std::vector<int64_t> rows(G.size() * kColumns, 0);
  for (size_t j = 0; j < G.size(); ++j) {
    const std::optional<at::Tensor> w = W.get(j);
    check_grad_sq_norm_args(G[j], w);
    check_same_kind(G[j], G[0], "G", j);
    rows[j * kColumns + kColW] = address(w);
    rows[j * kColumns + kColG] = address(G[j]);
    rows[j * kColumns + kColN] = G[j].numel();
  }
  const c10::cuda::CUDAGuard guard(G[0].device());
  at::Tensor keep;
  const ListTable table = upload_table(rows, G[0].device(), keep);
  at::Tensor out = at::empty({}, G[0].options().dtype(at::kDouble));
  at::Tensor partial = at::empty({kNormBlocks}, out.options());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_dtype(G[0].scalar_type(), "G", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    sq_norm_list_kernel<T><<<kNormBlocks, kThreads, 0, stream>>>(table, partial.data_ptr<double>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sq_norm_final_kernel<<<1, kThreads, 0, stream>>>(partial.data_ptr<double>(), kNormBlocks, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    element_list_kernel<T><<<grid_for(table.chunks, kWarpsPerBlock), kThreads, 0, stream>>>(table, scale, adaptive,
                                                                                              restore);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
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
    rows[j * kColumns + kColW] = address(F[j]);
    rows[j * kColumns + kColG] = address(G[j]);
    rows[j * kColumns + kColN] = F[j].numel();
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
  m.impl("hash_fill_", &ssam::hash_fill_cuda);
}
