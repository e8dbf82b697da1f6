// Host code shared by the CUDA launchers: grid sizes, the list table and its upload.
#pragma once

#include <algorithm>
#include <cstdint>
#include <vector>

#include "launch.h"
#include "ssam_ops.h"
#include "common.cuh"
#include "host_platform.h"

namespace ssam {
namespace cuda {

using launch::aligned16;

// Blocks for `work` units at `per_block` per block, at most gpu::max_grid_blocks() (grid-stride loops
// cover the rest); never 0.
inline int64_t grid_for(int64_t work, int64_t per_block) {
  return std::max<int64_t>(1, std::min<int64_t>((work + per_block - 1) / per_block, gpu::max_grid_blocks()));
}

// One wave of `Kernel` on the current device for `chunks` chunks of work (launch.h: wave_grid).
template <auto Kernel>
int64_t wave_grid_for(int64_t chunks) {
  return launch::wave_grid(gpu::resident_blocks<Kernel>(kThreads), 1, chunks, kWarpsPerBlock);
}

inline int64_t address(const at::Tensor& t) { return static_cast<int64_t>(reinterpret_cast<uintptr_t>(t.data_ptr())); }
inline int64_t address(const std::optional<at::Tensor>& t) { return t.has_value() ? address(*t) : 0; }
inline const void* pointer(int64_t address) { return reinterpret_cast<const void*>(static_cast<uintptr_t>(address)); }

// kColVec of a row whose pointer columns are filled in: whether they are all 16-byte aligned.
inline void set_vec(int64_t* row) {
  row[kColVec] = aligned16({pointer(row[kColW]), pointer(row[kColG]), pointer(row[kColBackup])});
}

// Row j of the table of a streaming list op (norm, Fisher, axpby): the addresses of its two tensors
// (0 for a tensor the entry does not have), its entries and kColVec.
inline void set_streaming_row(std::vector<int64_t>& rows, size_t j, int64_t first, int64_t second, int64_t n) {
  int64_t* row = rows.data() + j * kColumns;
  row[kColW] = first;
  row[kColG] = second;
  row[kColN] = n;
  set_vec(row);
}

// Builds the table of `rows` (kColumns values per tensor) on the host and copies it to `device`
// asynchronously (pinned memory: the caching host allocator keeps it until the copy has run). `keep`
// holds the device copy until the op's kernels have been enqueued. `op` names the op in errors.
inline ListTable upload_table(const std::vector<int64_t>& rows, const at::Device& device, at::Tensor& keep,
                              const char* op) {
  gpu::refuse_capture(op);
  const int64_t entries = static_cast<int64_t>(rows.size()) / kColumns;
  at::Tensor host = at::empty({entries * kColumns + entries + 1},
                              at::TensorOptions().dtype(at::kLong).pinned_memory(device.is_cuda()));
  int64_t* h = host.data_ptr<int64_t>();
  std::copy(rows.begin(), rows.end(), h);
  int64_t* first = h + entries * kColumns;
  first[0] = 0;
  for (int64_t j = 0; j < entries; ++j) first[j + 1] = first[j] + num_chunks(rows[j * kColumns + kColN]);
  keep = gpu::scratch(host.to(device, /*non_blocking=*/true), "the list table");
  const int64_t* d = keep.data_ptr<int64_t>();
  return {d, d + entries * kColumns, entries, first[entries]};
}

}  // namespace cuda
}  // namespace ssam
