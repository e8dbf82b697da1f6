// Tests of the host-side launch arithmetic of the CUDA kernels (csrc/launch.h): plain C++, no CUDA and
// no torch, so they run on any machine (ctest, and tests/test_launch.py through the host compiler).
#include <algorithm>
#include <cstdio>
#include <random>
#include <vector>

#include "../launch.h"
#include "check.h"

namespace {

void test_wave_grid() {
  using ssam::launch::wave_grid;
  // An H100 (132 SMs) at 8 resident 256-thread blocks per SM: one wave is 1056 blocks; a fixed 1024-block
  // grid at 6 blocks per SM (792 resident) would be 1.29 waves.
  EXPECT_EQ(wave_grid(132, 8, 1 << 26, 256), 1056);
  EXPECT_EQ(wave_grid(132, 6, 1 << 26, 256), 792);
  EXPECT_EQ(wave_grid(58, 6, int64_t{1} << 33, 8), 348);  // L4: never more than one wave
  // Little work: as many blocks as it needs, never 0.
  EXPECT_EQ(wave_grid(132, 8, 1, 8), 1);
  EXPECT_EQ(wave_grid(132, 8, 0, 8), 1);
  EXPECT_EQ(wave_grid(132, 8, 8, 8), 1);
  EXPECT_EQ(wave_grid(132, 8, 9, 8), 2);
  EXPECT_EQ(wave_grid(132, 8, 1056 * 8 - 1, 8), 1056);
  // An occupancy query that reports 0 blocks (a kernel that cannot launch) still gives a grid of one.
  EXPECT_EQ(wave_grid(132, 0, 1 << 20, 8), 1);
}

void test_aligned16() {
  using ssam::launch::aligned16;
  alignas(16) static float buffer[16];
  EXPECT_EQ(aligned16({buffer}), true);
  EXPECT_EQ(aligned16({buffer, buffer + 4, buffer + 8}), true);
  EXPECT_EQ(aligned16({buffer + 1}), false);             // 4 bytes past a 16-byte boundary
  EXPECT_EQ(aligned16({buffer, buffer + 2}), false);     // one misaligned tensor: the scalar path for all
  EXPECT_EQ(aligned16({buffer, nullptr}), true);         // an absent tensor (null) does not count
  const auto* bytes = reinterpret_cast<const char*>(buffer);
  EXPECT_EQ(aligned16({bytes + 16}), true);
  EXPECT_EQ(aligned16({bytes + 8}), false);              // 8-byte aligned is not enough
}

// The warp search of the list kernels, one warp simulated: 32 probes, a ballot, search_narrow; against
// std::upper_bound on non-decreasing keys with repeats (empty tensors), for every c and many sizes.
int64_t warp_search(const std::vector<int64_t>& key, int64_t c, int& rounds) {
  ssam::launch::Span span{0, static_cast<int64_t>(key.size()) - 1};
  rounds = 0;
  while (span.lo < span.hi && rounds < 64) {  // a search that stops narrowing fails below, not hangs
    int taken = 0;
    bool prefix = true;  // the lanes that find key <= c are a prefix of the warp (what the ballot counts)
    for (int lane = 0; lane < 32; ++lane) {
      const int64_t probe = ssam::launch::search_probe(span.lo, span.hi, lane);
      if (probe <= span.hi && key[probe] <= c) {
        prefix = prefix && taken == lane;
        ++taken;
      }
    }
    EXPECT_EQ(prefix, true);
    const ssam::launch::Span next = ssam::launch::search_narrow(span.lo, span.hi, taken);
    EXPECT_EQ(next.hi - next.lo < span.hi - span.lo, true);  // progress every round
    span = next;
    ++rounds;
  }
  return span.lo;
}

void test_warp_search() {
  std::mt19937_64 rng(1234);
  for (int64_t entries : {1, 2, 3, 31, 32, 33, 600, 1023, 1024, 1025, 5000}) {
    std::vector<int64_t> key(entries);
    for (int trial = 0; trial < 3; ++trial) {
      // first_chunk of a table: key[0] = 0, non-decreasing, steps of 0 (empty tensors) to 3 chunks.
      key[0] = 0;
      for (int64_t j = 1; j < entries; ++j) key[j] = key[j - 1] + static_cast<int64_t>(rng() % 4);
      for (int64_t c = 0; c <= key.back() + 2; ++c) {
        const int64_t want = std::upper_bound(key.begin(), key.end(), c) - key.begin() - 1;
        int rounds = 0;
        EXPECT_EQ(warp_search(key, c, rounds), want);
        EXPECT_EQ(rounds <= (entries <= 32 ? 1 : entries <= 1024 ? 2 : 3), true);
      }
    }
  }
}

}  // namespace

int main() {
  test_wave_grid();
  test_aligned16();
  test_warp_search();
  return ssam_test::check_status("test_launch");
}
