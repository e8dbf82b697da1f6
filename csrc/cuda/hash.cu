// Host launcher of hash_fill_ (kernel: hash.cuh).
#include "hash.cuh"
#include "host_common.h"
#include "ops.h"

namespace ssam {
namespace cuda {

void hash_fill_(const at::Tensor& out, int64_t seed, int64_t step, int64_t base) {
  check_hash_fill_args(out, base);
  const int64_t n = out.numel();
  if (n == 0) return;
  const gpu::DeviceGuard guard(out.device());
  const uint32_t key = hash_key(static_cast<uint32_t>(seed), static_cast<uint32_t>(step));
  gpu::launch<hash_fill_kernel>(grid_for(n, kThreads), kThreads, 0, out.data_ptr<int32_t>(), n, key,
                                static_cast<uint64_t>(base));
}

}  // namespace cuda
}  // namespace ssam
