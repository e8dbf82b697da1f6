// Launch arithmetic of the CUDA kernels (cuda.cu): plain C++ without CUDA calls, so it is unit-tested on
// any machine (csrc/tests/test_launch.cpp, run by tests/test_launch.py and ctest).
#pragma once

#include <algorithm>
#include <cstdint>
#include <initializer_list>

#if defined(__CUDACC__)
#define SSAM_LAUNCH_HD __host__ __device__ __forceinline__
#else
#define SSAM_LAUNCH_HD inline
#endif

namespace ssam {
namespace launch {

// The list kernels' 32-way warp search (cuda.cu: entry_of) for the last j in [lo, hi] with key[j] <= c
// over a non-decreasing key, given key[lo] <= c. Each round lane l (0..31) probes search_probe(lo, hi, l);
// `taken` lanes find a probe <= hi with key <= c (a prefix of the lanes, the key being non-decreasing),
// and search_narrow keeps the span from the last of them to just before the next probe. The 32 probes
// reach hi, so a round divides the span by 32; the search ends when lo == hi.
struct Span {
  int64_t lo, hi;
};

SSAM_LAUNCH_HD int64_t search_step(int64_t lo, int64_t hi) { return (hi - lo + 31) / 32; }

SSAM_LAUNCH_HD int64_t search_probe(int64_t lo, int64_t hi, int lane) {
  return lo + (lane + 1) * search_step(lo, hi);
}

SSAM_LAUNCH_HD Span search_narrow(int64_t lo, int64_t hi, int taken) {
  const int64_t step = search_step(lo, hi);
  const int64_t last_failed = lo + (taken + 1) * step;  // past the answer, when it is <= hi
  return {lo + taken * step, last_failed - 1 < hi ? last_failed - 1 : hi};
}

// Blocks of a grid that runs in whole waves: one wave of `sms * blocks_per_sm` resident blocks (the SM
// count times the kernel's occupancy), or fewer when `units` of work at `units_per_block` per block need
// fewer; never 0. A grid of 1.29 waves would run its last 0.29 wave on a fraction of the SMs; with at
// most one wave every block starts at once and the grid-stride loop gives each the same share, to
// within one unit.
inline int64_t wave_grid(int64_t sms, int64_t blocks_per_sm, int64_t units, int64_t units_per_block) {
  const int64_t wave = std::max<int64_t>(1, sms * blocks_per_sm);
  const int64_t needed = (std::max<int64_t>(units, 1) + units_per_block - 1) / units_per_block;
  return std::min(wave, needed);
}

// Whether every non-null address is a multiple of 16 bytes: then a tensor's entries from any multiple of
// 16 / sizeof(T) on can be accessed as whole 16-byte vectors (a 1-D contiguous tensor, so the entries
// follow the address). A misaligned one (a flat segment or a view starting mid-vector) takes the
// kernels' scalar path.
inline bool aligned16(std::initializer_list<const void*> addresses) {
  return std::all_of(addresses.begin(), addresses.end(),
                     [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; });
}

}  // namespace launch
}  // namespace ssam
