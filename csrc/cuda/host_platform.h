// What the host launchers need from the CUDA runtime, in one place (ssam::gpu). Compiled by nvcc: c10's
// CUDA runtime. Compiled with SSAM_CUDA_SIM: cuda_sim's versions (csrc/sim/host.h), which run every
// launch on CPU fibers, register every tensor a launch may touch for the memory checks, and take the SM
// count, occupancy and grid cap from a configuration a test can make small.
#pragma once

#if defined(SSAM_CUDA_SIM)
#include "sim/host.h"
#else
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <utility>

namespace ssam {
namespace gpu {

// Makes the tensors' device current for the launcher's scope.
using DeviceGuard = c10::cuda::CUDAGuard;

// Streaming multiprocessors of the current device.
inline int64_t sm_count() {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return sms;
}

// Blocks of `Kernel` (at `threads` threads, no dynamic shared memory) resident on the whole current
// device at once: its occupancy per SM times the SM count. Cached per kernel and device, the only things
// it depends on.
template <auto Kernel>
int64_t resident_blocks(int threads) {
  constexpr int kMaxDevices = 64;
  static std::atomic<int64_t> resident[kMaxDevices];  // 0: not queried yet
  const int device = c10::cuda::current_device();
  int64_t wave = device < kMaxDevices ? resident[device].load(std::memory_order_relaxed) : 0;
  if (wave == 0) {
    int per_sm = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, Kernel, threads, 0));
    wave = std::max<int64_t>(1, sm_count() * per_sm);
    if (device < kMaxDevices) resident[device].store(wave, std::memory_order_relaxed);
  }
  return wave;
}

// The most blocks a grid-stride kernel is launched with; its loop covers the rest.
inline int64_t max_grid_blocks() { return int64_t{1} << 16; }

// A device-to-device copy on the current stream.
inline void copy_async(void* dst, const void* src, size_t bytes) {
  C10_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, c10::cuda::getCurrentCUDAStream()));
}

// The list ops copy their launch table from host memory at every call, which a CUDA graph cannot
// replay: refuse to be captured, with an error that says what to do.
inline void refuse_capture(const char* op) {
  TORCH_CHECK(c10::cuda::currentStreamCaptureStatusMayInitCtx() == c10::cuda::CaptureStatus::None,
              "ssam_kernels::", op, " cannot be captured in a CUDA graph: it copies its launch table from host "
              "memory at every call. Run the optimizer step outside the captured region (e.g. torch.compile "
              "without mode='reduce-overhead' around it).");
}

// A device buffer the launcher allocated; cuda_sim registers it for its memory checks.
inline at::Tensor scratch(at::Tensor buffer, const char* /*name*/) { return buffer; }

// Launches Kernel<<<blocks, threads, shared_bytes>>>(args...) on the current stream and checks the launch.
template <auto Kernel, typename... Args>
void launch(int64_t blocks, int threads, size_t shared_bytes, Args&&... args) {
  Kernel<<<static_cast<unsigned>(blocks), threads, shared_bytes, c10::cuda::getCurrentCUDAStream()>>>(
      std::forward<Args>(args)...);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace gpu
}  // namespace ssam
#endif
