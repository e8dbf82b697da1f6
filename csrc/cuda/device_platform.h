// What the device code needs from its platform besides CUDA's own intrinsics. Compiled by nvcc: plain
// CUDA. Compiled with SSAM_CUDA_SIM (a host C++ compiler): cuda_sim's versions (csrc/sim/device.h), which
// run the same device code on CPU fibers through HIP-CPU and check every access and collective.
//
// Device code reaches global memory only through these and the intrinsics load<>/store() use
// (common.cuh: __ldg, __ldcg, __stwb) or atomics, so cuda_sim sees every access.
#pragma once

#if defined(SSAM_CUDA_SIM)
#include "sim/device.h"
#else
#include <type_traits>

namespace ssam {

// A plain global load (ld.global), for scalars the kernels read once.
template <typename T>
__device__ __forceinline__ T global_load(const T* p) {
  return *p;
}

// A plain global store (st.global).
template <typename T>
__device__ __forceinline__ void global_store(T* p, const std::type_identity_t<T>& value) {
  *p = value;
}

}  // namespace ssam

// The block's dynamic shared memory (the launch's shared_bytes), as an array of `type`.
#define SSAM_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif
