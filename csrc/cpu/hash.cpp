// hash_fill_ on CPU: the random-growth hash of a range of positions.
#include "common.h"

namespace ssam {

// out[j] = h(seed, step, base + j), the random-growth hash (ssam_math.h: hash_value).
void hash_fill_cpu(const at::Tensor& out, int64_t seed, int64_t step, int64_t base) {
  check_hash_fill_args(out, base);
  const uint32_t key = hash_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(step));
  int32_t* o = out.data_ptr<int32_t>();
  at::parallel_for(0, out.numel(), kGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) o[i] = hash_value(key, static_cast<uint64_t>(base + i));
  });
}

}  // namespace ssam
