// The check macros of the C++ tests (csrc/tests, csrc/sim/tests): a failed check prints its file, line and
// expression and is counted; main returns check_status(name), non-zero when any check failed.
#pragma once

#include <cstdio>

namespace ssam_test {

inline int failures = 0;

// 0 (printing "<name>: all passed") when no check failed, else 1 (printing the count).
inline int check_status(const char* name) {
  if (failures != 0) {
    std::fprintf(stderr, "%s: %d check(s) failed\n", name, failures);
    return 1;
  }
  std::printf("%s: all passed\n", name);
  return 0;
}

}  // namespace ssam_test

#define EXPECT(cond)                                                        \
  do {                                                                      \
    if (!(cond)) {                                                          \
      std::fprintf(stderr, "%s:%d: FAILED %s\n", __FILE__, __LINE__, #cond); \
      ++ssam_test::failures;                                                \
    }                                                                       \
  } while (0)

// Integers compared with both values printed.
#define EXPECT_EQ(a, b)                                                                                       \
  do {                                                                                                        \
    const long long got_ = (a), want_ = (b);                                                                  \
    if (got_ != want_) {                                                                                      \
      std::fprintf(stderr, "%s:%d: FAILED %s == %s (%lld != %lld)\n", __FILE__, __LINE__, #a, #b, got_, want_); \
      ++ssam_test::failures;                                                                                  \
    }                                                                                                         \
  } while (0)
