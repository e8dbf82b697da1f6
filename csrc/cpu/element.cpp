// perturb_ / restore_ on CPU, one tensor or a list: a mask word at a time, AVX-512 compress / expand
// where the CPU has it, portable loops elsewhere (common.h: the clones). axpby_, one tensor or a list: a
// streaming loop.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <type_traits>

#include "common.h"

// The AVX-512 compress / expand of the masked perturb_/restore_ (GCC on x86-64: per-function
// target pragmas and __builtin_cpu_supports); elsewhere only the portable loops are compiled.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SSAM_HAVE_AVX512 1
#include <immintrin.h>
#else
#define SSAM_HAVE_AVX512 0
#endif

namespace ssam {
namespace {

constexpr int64_t kChunkGrain = kGrain / kChunk;  // mask chunks per parallel task

// Calls fn(i, r) for every set bit i < n of the mask words [w0, w1) whose rank r lies in [0, capacity), in
// index order, r0 the rank of the first set bit. Bits past n are ignored; ranks outside the backup are
// skipped: whatever the mask and offsets hold, every slot addressed is inside the backup.
template <typename Fn>
void bounded_walk(const MaskView& mask, int64_t n, int64_t capacity, int64_t w0, int64_t w1, int64_t r0, Fn&& fn) {
  int64_t r = r0;
  for (int64_t w = w0; w < w1; ++w) {
    for (uint32_t bits = mask_word(mask.words, w, n); bits != 0; bits &= bits - 1, ++r) {
      if (rank_in_range(r, capacity)) fn(w * 32 + __builtin_ctz(bits), r);
    }
  }
}

// Set bits of a word by SWAR arithmetic: the build does not assume the popcnt instruction (no -march),
// and unlike __builtin_popcount (a libgcc call there) this loop vectorises with plain SSE2.
inline uint32_t swar_popcount(uint32_t v) {
  v = v - ((v >> 1) & 0x55555555u);
  v = (v & 0x33333333u) + ((v >> 2) & 0x33333333u);
  v = (v + (v >> 4)) & 0x0F0F0F0Fu;
  v = v + (v >> 8);
  return (v + (v >> 16)) & 0x3Fu;
}

// On CPU the offsets' contents are checked before any write: offsets[0] = 0 and offsets[c + 1] -
// offsets[c] = the set bits (below n) of chunk c, i.e. offsets = bitmask.offsets(mask, n). A popcount pass
// over the words, ~1/32 of the entries. The first chunk in [c0, c1) whose offsets are wrong, or c1.
int64_t first_wrong_chunk(const MaskView& mask, int64_t n, int64_t c0, int64_t c1) {
  const int64_t words = num_words(n);
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t w_begin = c * kWordsPerChunk;
    const int64_t w_end = std::min((c + 1) * kWordsPerChunk, words);
    uint32_t count = 0;
    for (int64_t w = w_begin; w < w_end - 1; ++w) count += swar_popcount(static_cast<uint32_t>(mask.words[w]));
    count += swar_popcount(mask_word(mask.words, w_end - 1, n));  // the only word that can reach past n
    if (load_offset(mask.offsets, mask.offsets64, c + 1) - load_offset(mask.offsets, mask.offsets64, c) !=
        static_cast<int64_t>(count)) {
      return c;
    }
  }
  return c1;
}

// ---------------------------------------------------------------------------------------------------
// perturb_ / restore_, a mask word at a time.
//
// Word k covers entries [32k, 32k + 32); its set entries own the backup slots [r, r + popcount), r the
// rank of its first entry (offsets[c] plus the popcounts of the chunk's words before it). perturb_
// compresses the set entries of W into those slots, then blends the perturbed values into W (every lane
// is computed with ssam_math.h's perturbed(), the unset lanes keep W); restore_ expands the slots back
// into the set entries. Full words are straight copies, empty words are skipped. Compress and expand
// come in two versions with the same results: AVX-512 (vpcompress / vpexpand with masked loads and
// stores, picked at run time on CPUs that have it) and a portable branch-free loop. A chunk whose ranks
// reach past the backup (offsets[c + 1] > backup.numel()) takes the per-bit walk that bounds every slot.
// ---------------------------------------------------------------------------------------------------

// A stored value's bit pattern and back: selections between values go through it, so that they are
// branch-free (an FP select whose operand the compiler may compute only on one side is turned into a
// branch, which mispredicts on every other entry of a random mask) and move every bit (NaN payloads).
template <typename T>
using Bits = std::conditional_t<sizeof(T) == 2, uint16_t, std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>>;

template <typename T>
inline Bits<T> to_bits(T v) {
  Bits<T> b;
  std::memcpy(&b, &v, sizeof b);
  return b;
}

template <typename T>
inline T from_bits(Bits<T> b) {
  T v;
  std::memcpy(&v, &b, sizeof v);
  return v;
}

// set ? a : b, as bit patterns.
template <typename T>
inline T select(bool set, T a, T b) {
  const Bits<T> m = static_cast<Bits<T>>(Bits<T>(0) - static_cast<Bits<T>>(set));
  return from_bits<T>(static_cast<Bits<T>>((to_bits(a) & m) | (to_bits(b) & static_cast<Bits<T>>(~m))));
}

// The element loops below are inlined into each ISA entry point (a target_clones clone or the AVX-512
// function), so that each compiles them for its own instruction set.
#define SSAM_INLINE inline __attribute__((always_inline))

// Portable compress / expand of one word: a walk over its set bits (one mispredicted branch per word,
// at the loop's end), measured faster than a branch-free pass over all 32 entries.
struct PortableWord {
  template <typename T>
  SSAM_INLINE static void compress(const T* __restrict x, uint32_t bits, T* __restrict b) {
    for (int r = 0; bits != 0; bits &= bits - 1, ++r) b[r] = x[__builtin_ctz(bits)];
  }
  template <typename T>
  SSAM_INLINE static void expand(T* __restrict x, uint32_t bits, const T* __restrict b) {
    for (int r = 0; bits != 0; bits &= bits - 1, ++r) x[__builtin_ctz(bits)] = b[r];
  }
};

// What one task of a perturb_/restore_ list works on: a tensor's buffers, checked.
template <typename T>
struct ElementArgs {
  T* w;
  const T* g;  // nullptr for restore_
  T* b;
  MaskView mask;
  int64_t n, capacity;  // W's entries, backup's slots
  scale_t<T> scale;  // float, or double for float64 W (ssam_math.h: load_scale)
  bool active;  // perturb_ with a finite non-zero scale
};

// x[l] = perturbed(x[l], g[l]) for the set lanes of a word, unchanged for the others, over len <= 32
// entries: every lane is computed, then selected without a branch.
template <typename T, bool kAdaptive>
SSAM_INLINE void blend_word(T* __restrict x, const T* __restrict g, uint32_t bits, int64_t len, scale_t<T> scale) {
  auto lanes = [&](auto count) {
#pragma omp simd
    for (int l = 0; l < count; ++l) {
      const T xl = x[l];
      const T p = perturbed(xl, g[l], scale, kAdaptive);
      x[l] = select((bits >> l) & 1u, p, xl);
    }
  };
  if (len == 32) {
    lanes(std::integral_constant<int, 32>{});  // a constant trip count for the full words
  } else {
    lanes(static_cast<int>(len));
  }
}

// Masked perturb_ (kRestore false) or restore_ over the mask chunks [c0, c1) of one tensor; Word: the
// compress / expand of a whole word (AVX-512 or portable). The tensor's last word, when partial, always
// takes the portable loop, which never touches an entry at or past n (mask_word clears their bits).
template <typename T, typename Word, bool kRestore, bool kAdaptive>
SSAM_INLINE void masked_run(const ElementArgs<T>& a, int64_t c0, int64_t c1) {
  const int64_t words = num_words(a.n);
  // Words [w0, w_end) one set bit at a time, every slot bounded.
  auto bounded = [&](int64_t w0, int64_t w_end, int64_t r0) {
    bounded_walk(a.mask, a.n, a.capacity, w0, w_end, r0, [&](int64_t i, int64_t rank) {
      if constexpr (kRestore) {
        a.w[i] = a.b[rank];
      } else {
        const T wi = a.w[i];
        a.b[rank] = wi;
        a.w[i] = a.active ? perturbed(wi, a.g[i], a.scale, kAdaptive) : wi;
      }
    });
  };
  for (int64_t c = c0; c < c1; ++c) {
    int64_t r = load_offset(a.mask.offsets, a.mask.offsets64, c);
    const int64_t k_end = std::min((c + 1) * kWordsPerChunk, words);
    if (r < 0 || load_offset(a.mask.offsets, a.mask.offsets64, c + 1) > a.capacity) {
      bounded(c * kWordsPerChunk, k_end, r);  // ranks reach past the backup
      continue;
    }
    for (int64_t k = c * kWordsPerChunk; k < k_end; ++k) {
      prefetch_span<sizeof(uint32_t)>(a.mask.words + k);
      const uint32_t bits = mask_word(a.mask.words, k, a.n);
      if (bits == 0) continue;
      const int64_t count = swar_popcount(bits);
      if (r + count > a.capacity) {
        // Only a mask changed since its offsets were checked (by another thread) gets here: the word's
        // slots would pass the backup's end, so the rest of the chunk is bounded bit by bit.
        bounded(k, k_end, r);
        break;
      }
      T* x = a.w + k * 32;
      prefetch_span<32 * sizeof(T)>(x);
      prefetch_span<32 * sizeof(T)>(a.b + r);
      if constexpr (!kRestore) prefetch_span<32 * sizeof(T)>(a.g + k * 32);
      const int64_t len = std::min<int64_t>(32, a.n - k * 32);
      if (bits == ~0u) {
        if constexpr (kRestore) {
          std::copy(a.b + r, a.b + r + 32, x);
        } else {
          std::copy(x, x + 32, a.b + r);
        }
      } else if (len < 32) {
        kRestore ? PortableWord::expand(x, bits, a.b + r) : PortableWord::compress(x, bits, a.b + r);
      } else {
        kRestore ? Word::expand(x, bits, a.b + r) : Word::compress(x, bits, a.b + r);
      }
      if constexpr (!kRestore) {
        if (a.active) blend_word<T, kAdaptive>(x, a.g + k * 32, bits, len, a.scale);
      }
      r += count;
    }
  }
}

// Dense perturb_ over entries [i0, i1): backup[i] = w[i], w[i] = perturbed(w[i], g[i]), one pass.
template <typename T, bool kAdaptive>
SSAM_INLINE void dense_perturb_run(const ElementArgs<T>& a, int64_t i0, int64_t i1) {
  T* __restrict w = a.w;
  const T* __restrict g = a.g;
  T* __restrict b = a.b;
  if (!a.active) {
    std::copy(w + i0, w + i1, b + i0);
    return;
  }
  for (int64_t i = i0; i < i1; ++i) {
    const T wi = w[i];
    b[i] = wi;
    w[i] = perturbed(wi, g[i], a.scale, kAdaptive);
  }
}

// One task: masked (chunks [begin, end)) or dense (entries [begin, end)), perturb_ or restore_.
template <typename T, typename Word>
SSAM_INLINE void element_task(const ElementArgs<T>& a, int64_t begin, int64_t end, bool restore, bool adaptive) {
  if (a.mask.words == nullptr) {
    if (restore) {
      std::copy(a.b + begin, a.b + end, a.w + begin);
    } else {
      adaptive ? dense_perturb_run<T, true>(a, begin, end) : dense_perturb_run<T, false>(a, begin, end);
    }
  } else if (restore) {
    masked_run<T, Word, true, false>(a, begin, end);
  } else {
    adaptive ? masked_run<T, Word, false, true>(a, begin, end) : masked_run<T, Word, false, false>(a, begin, end);
  }
}

// The portable entry points, cloned per ISA level for the blend and dense loops (target_clones applies
// to plain functions only: one per storage type).
SSAM_CPU_CLONES void element_task_portable(const ElementArgs<float>& a, int64_t b, int64_t e, bool rs, bool ad) {
  element_task<float, PortableWord>(a, b, e, rs, ad);
}
SSAM_CPU_CLONES void element_task_portable(const ElementArgs<double>& a, int64_t b, int64_t e, bool rs, bool ad) {
  element_task<double, PortableWord>(a, b, e, rs, ad);
}
SSAM_CPU_CLONES void element_task_portable(const ElementArgs<c10::BFloat16>& a, int64_t b, int64_t e, bool rs,
                                           bool ad) {
  element_task<c10::BFloat16, PortableWord>(a, b, e, rs, ad);
}
SSAM_CPU_CLONES void element_task_portable(const ElementArgs<c10::Half>& a, int64_t b, int64_t e, bool rs,
                                           bool ad) {
  element_task<c10::Half, PortableWord>(a, b, e, rs, ad);
}

#if SSAM_HAVE_AVX512
// AVX-512 compress / expand of one word of kBytes-sized entries (bits != 0, all 32 entries in W), as
// bit patterns: 16-bit entries in one 32-lane group (AVX512-VBMI2), 32-bit in two of 16, 64-bit in four
// of 8. Loads of the backup and stores to it are masked to the word's popcount(bits) slots, stores to W
// to its set lanes: nothing outside them is read or written.
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx512vbmi2,avx2,fma,f16c,bmi,bmi2,popcnt,lzcnt")
template <size_t kBytes>
struct Avx512Word {
  static constexpr int kLanes = 64 / kBytes;  // entries per 512-bit register
  static __m512i compress_group(__m512i v, uint32_t m) {
    if constexpr (kBytes == 2) return _mm512_maskz_compress_epi16(m, v);
    if constexpr (kBytes == 4) return _mm512_maskz_compress_epi32(static_cast<__mmask16>(m), v);
    if constexpr (kBytes == 8) return _mm512_maskz_compress_epi64(static_cast<__mmask8>(m), v);
  }
  static __m512i expand_group(__m512i v, uint32_t m) {
    if constexpr (kBytes == 2) return _mm512_maskz_expand_epi16(m, v);
    if constexpr (kBytes == 4) return _mm512_maskz_expand_epi32(static_cast<__mmask16>(m), v);
    if constexpr (kBytes == 8) return _mm512_maskz_expand_epi64(static_cast<__mmask8>(m), v);
  }
  static __m512i load(const void* p, uint32_t m) {
    if constexpr (kBytes == 2) return _mm512_maskz_loadu_epi16(m, p);
    if constexpr (kBytes == 4) return _mm512_maskz_loadu_epi32(static_cast<__mmask16>(m), p);
    if constexpr (kBytes == 8) return _mm512_maskz_loadu_epi64(static_cast<__mmask8>(m), p);
  }
  static void store(void* p, uint32_t m, __m512i v) {
    if constexpr (kBytes == 2) _mm512_mask_storeu_epi16(p, m, v);
    if constexpr (kBytes == 4) _mm512_mask_storeu_epi32(p, static_cast<__mmask16>(m), v);
    if constexpr (kBytes == 8) _mm512_mask_storeu_epi64(p, static_cast<__mmask8>(m), v);
  }
  static uint32_t group_bits(uint32_t bits, int group) {
    return kLanes == 32 ? bits : (bits >> (group * kLanes)) & ((1u << kLanes) - 1u);
  }
  template <typename T>
  static void compress(const T* x, uint32_t bits, T* b) {
    for (int group = 0; group < 32 / kLanes; ++group) {
      const uint32_t m = group_bits(bits, group);
      const int count = _mm_popcnt_u32(m);
      store(b, _bzhi_u32(~0u, count), compress_group(_mm512_loadu_si512(x + group * kLanes), m));
      b += count;
    }
  }
  template <typename T>
  static void expand(T* x, uint32_t bits, const T* b) {
    for (int group = 0; group < 32 / kLanes; ++group) {
      const uint32_t m = group_bits(bits, group);
      const int count = _mm_popcnt_u32(m);
      store(x + group * kLanes, m, expand_group(load(b, _bzhi_u32(~0u, count)), m));
      b += count;
    }
  }
};

template <typename T>
void element_task_avx512(const ElementArgs<T>& a, int64_t begin, int64_t end, bool restore, bool adaptive) {
  element_task<T, Avx512Word<sizeof(T)>>(a, begin, end, restore, adaptive);
}
#pragma GCC pop_options

// True where the CPU runs the AVX-512 path for kBytes-sized entries (16-bit ones also need VBMI2); the
// environment variable SSAM_KERNELS_CPU_PORTABLE=1 forces the portable path (the tests compare both).
bool use_avx512(size_t bytes) {
  static const bool portable = [] {
    const char* v = std::getenv("SSAM_KERNELS_CPU_PORTABLE");
    return v != nullptr && std::string(v) != "" && std::string(v) != "0";
  }();
  static const bool base = !portable && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
                           __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq") &&
                           __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
  static const bool vbmi2 = base && __builtin_cpu_supports("avx512vbmi2");
  return bytes == 2 ? vbmi2 : base;
}
#endif

template <typename T>
void run_element_task(const ElementArgs<T>& a, int64_t begin, int64_t end, bool restore, bool adaptive) {
#if SSAM_HAVE_AVX512
  if (use_avx512(sizeof(T))) {
    element_task_avx512(a, begin, end, restore, adaptive);
    return;
  }
#endif
  element_task_portable(a, begin, end, restore, adaptive);
}

// ---------------------------------------------------------------------------------------------------
// perturb_ / restore_ for a list of tensors (the single-tensor ops are lists of one). The work is cut
// into tasks of at most kChunkGrain mask chunks (masked entries) or kGrain entries (dense ones), a fixed
// partition, and one parallel loop runs the tasks of all tensors, so many small tensors cost one
// parallel region.
// ---------------------------------------------------------------------------------------------------

struct Task {
  size_t entry;
  int64_t begin, end;  // chunks (masked entry) or entries (dense entry)
};

std::vector<Task> make_tasks(const std::vector<ListEntry>& entries, int64_t* units) {
  std::vector<Task> tasks;
  *units = 0;
  for (size_t j = 0; j < entries.size(); ++j) {
    const int64_t n = entries[j].W->numel();
    const bool masked = entries[j].view.words != nullptr;
    const int64_t size = masked ? num_chunks(n) : n;
    const int64_t grain = masked ? kChunkGrain : kGrain;
    for (int64_t b = 0; b < size; b += grain) tasks.push_back({j, b, std::min(b + grain, size)});
    *units += masked ? n : size;
  }
  return tasks;
}

// The offsets of every masked entry checked against its mask (first_wrong_chunk) in one parallel pass over
// the masked tasks, before anything is written. The error names the first wrong entry in list order
// (`list`: "offsets[j]", else "offsets"); the name is formatted only then.
void check_offsets_match_masks(const std::vector<ListEntry>& entries, const std::vector<Task>& tasks, int64_t grain,
                               bool list) {
  auto name = [&](size_t j) { return list ? "offsets[" + std::to_string(j) + "]" : std::string("offsets"); };
  bool any_masked = false;
  for (size_t j = 0; j < entries.size(); ++j) {
    const MaskView& v = entries[j].view;
    if (v.words == nullptr) continue;
    any_masked = true;
    TORCH_CHECK_VALUE(load_offset(v.offsets, v.offsets64, 0) == 0, name(j), ": expected ", name(j), "[0] = 0, got ",
                      load_offset(v.offsets, v.offsets64, 0));
  }
  if (!any_masked) return;
  const int64_t count = static_cast<int64_t>(tasks.size());
  std::atomic<int64_t> first_bad{count};  // the first task (list order) holding a wrong chunk
  at::parallel_for(0, count, grain, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1 && t < first_bad.load(std::memory_order_relaxed); ++t) {
      const Task& task = tasks[t];
      const ListEntry& e = entries[task.entry];
      if (e.view.words == nullptr || first_wrong_chunk(e.view, e.W->numel(), task.begin, task.end) == task.end) continue;
      int64_t seen = first_bad.load();
      while (t < seen && !first_bad.compare_exchange_weak(seen, t)) {
      }
      return;
    }
  });
  if (first_bad.load() == count) return;
  const Task& bad = tasks[first_bad.load()];
  const ListEntry& e = entries[bad.entry];
  TORCH_CHECK_VALUE(false, name(bad.entry), ": do not match the mask (expected the exclusive prefix counts of its "
                    "set bits below N, bitmask.offsets(mask, N)); first wrong at chunk ",
                    first_wrong_chunk(e.view, e.W->numel(), bad.begin, bad.end));
}

// backup[rank(i)] = w[i] and, unless restore, w[i] = perturbed(w[i], g[i]) for the entries of every
// tensor (restore: w[i] = backup[rank(i)]), after the overlap rule over the whole call (`list`: the
// messages name entries) and the offsets check. scale is read once (a host scalar on CPU).
void perturb_restore_cpu(const std::vector<ListEntry>& entries, const at::Tensor* scale, bool adaptive, bool restore,
                         bool list) {
  if (entries.empty()) return;
  check_disjoint(element_spans(entries, scale, list));
  int64_t units = 0;
  const std::vector<Task> tasks = make_tasks(entries, &units);
  // Tasks per parallel piece: about kGrain entries' worth (all inline when the list is small).
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(tasks.size()) * kGrain / std::max<int64_t>(units, 1));
  check_offsets_match_masks(entries, tasks, grain, list);
  const ScaleView scale_ptr = restore ? ScaleView{} : scale_view(*scale, *entries[0].W);
  dispatch_dtype(entries[0].W->scalar_type(), "W", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, int32_t>) {  // dispatch_dtype instantiates int32, never run here
      const scale_t<T> s = restore ? scale_t<T>(0) : load_scale<T>(scale_ptr);
      const bool active = !restore && scale_active(s);
      std::vector<ElementArgs<T>> args;  // each entry's pointers, read once
      args.reserve(entries.size());
      for (const ListEntry& e : entries) {
        args.push_back({e.W->data_ptr<T>(), restore ? nullptr : e.G->data_ptr<T>(), e.backup->data_ptr<T>(), e.view,
                        e.W->numel(), e.backup->numel(), s, active});
      }
      at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          run_element_task(args[tasks[t].entry], tasks[t].begin, tasks[t].end, restore, adaptive);
        }
      });
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// axpby_: x = a·x + b·y (ssam_math.h: axpby), a streaming loop the compiler vectorises, cloned per ISA
// level (common.h); a list's entries are cut into tasks of kGrain entries, all run by one parallel loop.
// ---------------------------------------------------------------------------------------------------

template <typename T>
SSAM_INLINE void axpby_run(T* __restrict x, const T* __restrict y, int64_t n, scale_t<T> a, scale_t<T> b) {
  for (int64_t i = 0; i < n; ++i) x[i] = axpby(x[i], y[i], a, b);
}

// The cloned entry points, one per storage type (target_clones applies to plain functions only).
SSAM_CPU_CLONES void axpby_block(float* x, const float* y, int64_t n, float a, float b) { axpby_run(x, y, n, a, b); }
SSAM_CPU_CLONES void axpby_block(double* x, const double* y, int64_t n, double a, double b) {
  axpby_run(x, y, n, a, b);
}
SSAM_CPU_CLONES void axpby_block(c10::BFloat16* x, const c10::BFloat16* y, int64_t n, float a, float b) {
  axpby_run(x, y, n, a, b);
}
SSAM_CPU_CLONES void axpby_block(c10::Half* x, const c10::Half* y, int64_t n, float a, float b) {
  axpby_run(x, y, n, a, b);
}

// axpby_ over every entry of checked lists (one dtype and device; a and b their views), one parallel loop
// over the tasks of all tensors. a and b are read once (host scalars on CPU).
void axpby_run_cpu(at::TensorList X, at::TensorList Y, const std::pair<ScaleView, ScaleView>& scales) {
  std::vector<Task> tasks;
  int64_t units = 0;
  for (size_t j = 0; j < X.size(); ++j) {
    const int64_t n = X[j].numel();
    for (int64_t b = 0; b < n; b += kGrain) tasks.push_back({j, b, std::min(b + kGrain, n)});
    units += n;
  }
  if (tasks.empty()) return;
  const int64_t grain = std::max<int64_t>(1, static_cast<int64_t>(tasks.size()) * kGrain / std::max<int64_t>(units, 1));
  dispatch_dtype(X[0].scalar_type(), "X", false, [&](auto tag) {
    using T = typename decltype(tag)::type;
    if constexpr (!std::is_same_v<T, int32_t>) {  // dispatch_dtype instantiates int32, never run here
      const scale_t<T> a = load_scale<T>(scales.first), b = load_scale<T>(scales.second);
      std::vector<std::pair<T*, const T*>> ptrs;  // each entry's pointers, read once
      ptrs.reserve(X.size());
      for (size_t j = 0; j < X.size(); ++j) ptrs.emplace_back(X[j].data_ptr<T>(), Y[j].data_ptr<T>());
      at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const Task& task = tasks[t];
          axpby_block(ptrs[task.entry].first + task.begin, ptrs[task.entry].second + task.begin,
                      task.end - task.begin, a, b);
        }
      });
    }
  });
}

}  // namespace

void axpby_cpu(const at::Tensor& X, const at::Tensor& Y, const at::Tensor& a, const at::Tensor& b) {
  axpby_run_cpu({X}, {Y}, check_axpby_args({X}, {Y}, a, b, false));
}

void axpby_multi_cpu(at::TensorList X, at::TensorList Y, const at::Tensor& a, const at::Tensor& b) {
  axpby_run_cpu(X, Y, check_axpby_args(X, Y, a, b, true));
}

void perturb_multi_cpu(at::TensorList W, at::TensorList G, const OptionalTensors& mask, const OptionalTensors& offsets,
                       at::TensorList backup, const at::Tensor& scale, bool adaptive) {
  check_list_lengths(W.size(), {{"G", G.size()}, {"mask", mask.size()}, {"offsets", offsets.size()},
                                {"backup", backup.size()}});
  std::vector<ListEntry> entries;
  entries.reserve(W.size());
  for (size_t j = 0; j < W.size(); ++j) {
    check_same_kind(W[j], W[0], "W", j);
    entries.push_back({&W[j], &G[j], perturb_view(W[j], G[j], mask.get(j), offsets.get(j), backup[j]),
                       &backup[j]});
  }
  perturb_restore_cpu(entries, &scale, adaptive, false, true);
}

void restore_multi_cpu(at::TensorList W, const OptionalTensors& mask, const OptionalTensors& offsets,
                       at::TensorList backup) {
  check_list_lengths(W.size(), {{"mask", mask.size()}, {"offsets", offsets.size()}, {"backup", backup.size()}});
  std::vector<ListEntry> entries;
  entries.reserve(W.size());
  for (size_t j = 0; j < W.size(); ++j) {
    check_same_kind(W[j], W[0], "W", j);
    entries.push_back({&W[j], nullptr, restore_view(W[j], mask.get(j), offsets.get(j), backup[j]), &backup[j]});
  }
  perturb_restore_cpu(entries, nullptr, false, true, true);
}

void perturb_cpu(const at::Tensor& W, const at::Tensor& G, const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& offsets, const at::Tensor& backup, const at::Tensor& scale,
                 bool adaptive) {
  perturb_restore_cpu({{&W, &G, perturb_view(W, G, mask, offsets, backup), &backup}}, &scale, adaptive, false,
                      false);
}

void restore_cpu(const at::Tensor& W, const std::optional<at::Tensor>& mask,
                 const std::optional<at::Tensor>& offsets, const at::Tensor& backup) {
  perturb_restore_cpu({{&W, nullptr, restore_view(W, mask, offsets, backup), &backup}}, nullptr, false, true,
                      false);
}

// The entry point of the direct eager calls (registration.cpp), on lists the caller checked.
void perturb_restore_checked_cpu(const std::vector<ListEntry>& entries, const at::Tensor* scale, bool adaptive,
                                 bool restore) {
  perturb_restore_cpu(entries, scale, adaptive, restore, true);
}

}  // namespace ssam
