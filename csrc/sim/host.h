// cuda_sim, host side: the ssam::gpu interface of host_platform.h over the simulator of device.h. The
// "device" is the CPU: device tensors are CPU tensors, a launch runs to completion before it returns,
// and every tensor a launch may touch is registered for the memory checks (the op's arguments by the op
// wrapper in cuda_sim.cpp, the launcher's own buffers by scratch()).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <string_view>
#include <utility>

#include "sim/device.h"

namespace ssam {
namespace sim {

// Registers the memory of `t` (its elements, not its whole storage) as `name`.
inline void add_tensor(const at::Tensor& t, std::string name) {
  TORCH_CHECK(t.device().is_cpu(), "cuda_sim: ", name, ": expected a CPU tensor, got ", t.device());
  add_region(t.data_ptr(), static_cast<size_t>(t.numel()) * t.element_size(), t.element_size(), std::move(name));
}

// "element_kernel<float, Perturb>" for gpu::launch<element_kernel<float, Perturb>>: the template argument
// as the compiler spells it, without the ssam:: namespaces.
template <auto Kernel>
const char* kernel_name() {
  static const std::string name = [pretty = std::string(__PRETTY_FUNCTION__)] {
    std::string s = pretty;
    const size_t start = s.find("Kernel = ");
    s = start == std::string::npos ? s : s.substr(start + 9, s.rfind(']') - start - 9);
    for (const std::string_view prefix : {"ssam::{anonymous}::", "ssam::"}) {
      for (size_t at = s.find(prefix); at != std::string::npos; at = s.find(prefix)) s.erase(at, prefix.size());
    }
    return s;
  }();
  return name.c_str();
}

}  // namespace sim

namespace gpu {

struct DeviceGuard {
  explicit DeviceGuard(const c10::Device& /*device*/) {}
};

inline int64_t sm_count() { return sim::config().sms; }

template <auto Kernel>
int64_t resident_blocks(int /*threads*/) {
  return std::max<int64_t>(1, sim::config().sms * sim::config().blocks_per_sm);
}

inline int64_t max_grid_blocks() { return sim::config().max_grid_blocks; }

inline void copy_async(void* dst, const void* src, size_t bytes) {
  const sim::Location at = sim::Location::current();
  sim::check_access(src, bytes, 1, "the source of a copy", at);
  sim::check_access(dst, bytes, 1, "the destination of a copy", at);
  std::memcpy(dst, src, bytes);
}

inline void refuse_capture(const char* /*op*/) {}  // no CUDA graphs here

inline at::Tensor scratch(at::Tensor buffer, const char* name) {
  sim::add_tensor(buffer, name);
  return buffer;
}

template <auto Kernel, typename... Args>
void launch(int64_t blocks, int threads, size_t shared_bytes, Args&&... args) {
  sim::run(sim::kernel_name<Kernel>(), blocks, threads, shared_bytes, [&] { Kernel(args...); });
}

}  // namespace gpu
}  // namespace ssam
