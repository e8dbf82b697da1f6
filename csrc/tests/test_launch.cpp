// Tests of the host-side launch arithmetic of the CUDA kernels (csrc/launch.h): plain C++, no CUDA and
// no torch, so they run on any machine (ctest, and tests/test_launch.py through the host compiler).
#include <cstdio>

#include "../launch.h"

namespace {

int failures = 0;

#define EXPECT_EQ(a, b)                                                                      \
  do {                                                                                       \
    const long long got = (a), want = (b);                                                   \
    if (got != want) {                                                                       \
      std::fprintf(stderr, "%s:%d: FAILED %s == %s (%lld != %lld)\n", __FILE__, __LINE__, #a, #b, got, want); \
      ++failures;                                                                            \
    }                                                                                        \
  } while (0)

void test_wave_grid() {
  using ssam::launch::wave_grid;
  // An H100 (132 SMs) at 8 resident 256-thread blocks per SM: one wave is 1056 blocks, the old fixed
  // 1024-block grid at 6 blocks per SM (792 resident) was 1.29 waves.
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

}  // namespace

int main() {
  test_wave_grid();
  test_aligned16();
  if (failures == 0) std::printf("test_launch: all passed\n");
  return failures == 0 ? 0 : 1;
}
