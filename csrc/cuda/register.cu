// The CUDA kernels of the ssam_kernels ops (schemas: registration.cpp).
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY_IMPL(ssam_kernels, CUDA, m) {
#define SSAM_REGISTER(op) m.impl(#op, &ssam::cuda::op);
  SSAM_CUDA_OPS(SSAM_REGISTER)
#undef SSAM_REGISTER
}
