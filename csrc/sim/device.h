// cuda_sim, device side: the project's CUDA device code run on a CPU, for tests.
//
// HIP-CPU (ROCm's header-only runtime; SSAM_HIP_CPU_DIR at build time) supplies the fibers, the device
// types and intrinsics (uint4, __popc, atomics) and `__shared__` (thread-local storage, shared by the
// fibers of a block, which run on one OS thread). What it gets wrong for this code, this header does:
//
// - Warps of 32 lanes whose collectives are warp-local. Every GPU thread is a fiber; a block runs its
//   fibers in turn until each waits at a collective, at __syncthreads or has exited, then a scheduler
//   completes every warp collective whose lanes have all arrived and, when every thread waits there,
//   the block barrier. Warps with different trip counts therefore stay exact (HIP-CPU's own collectives
//   are block-wide barriers).
// - A checker: it throws DeviceError, naming the kernel and the call sites, when the lanes a
//   collective's mask names do not all reach that same collective (another call site, another mask,
//   __syncthreads, or exited), when a lane reaches a collective whose mask leaves it out, when a shuffle
//   reads a lane outside the mask, and when the threads of a block reach different __syncthreads or one
//   exits while others wait at one.
// - Checked global memory: every global load and store (__ldg, __ldcg, __stwb, global_load,
//   global_store, atomics, and the reads of ssam_math.h's SSAM_READ) must lie inside one of the regions
//   registered for the launch (the op's tensors and the launcher's buffers) and be aligned to its size
//   (16 bytes for vectors); otherwise DeviceError names the kernel, the access, its call site, the
//   nearest tensor and the element index.
//
// Blocks run one after another on the calling thread, so atomics and memory ordering are trivially
// right: races, ordering and timing are out of reach, as is any `__CUDA_ARCH__` branch (the host branch
// of ssam_math.h is what runs). docs/DESIGN.md ("cuda_sim") says what it catches and what it cannot.
#pragma once

#if defined(SSAM_MATH_H)
#error "csrc/sim/device.h must come before ssam_math.h: it defines SSAM_READ"
#endif

#if !defined(SSAM_CUDA_SIM)
#define SSAM_CUDA_SIM 1  // csrc/cuda/*_platform.h: the simulator's versions
#endif

#include <hip/hip_runtime.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// HIP-CPU announces a HIP compiler, which would make later headers (c10's) reach for GPU libraries.
#undef __HIP__
#undef __HIPCC__
// HIP-CPU marks kernels and device functions for SIMD clones; the fibers make plain calls.
#undef __global__
#define __global__
#undef __device__
#define __device__

namespace ssam {
namespace sim {

using Location = std::source_location;

// A fault the simulator found in the device code or its launch. It ends the launch (the other threads
// of the block are abandoned) and reaches the op's caller as a RuntimeError.
struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// The launch shape cuda_sim reports to the launchers (host.h): the SM count, the resident blocks per SM
// of every kernel, and the largest grid of the grid-stride kernels. The defaults are an H100's (132 SMs,
// the element kernels' 6 blocks per SM, 2^16 blocks); tests make them small so that grid-stride loops,
// warps with different trip counts and multi-block reductions run at small sizes.
struct Config {
  int64_t sms = 132;
  int64_t blocks_per_sm = 6;
  int64_t max_grid_blocks = int64_t{1} << 16;
};

inline Config& config() {
  static Config value;
  return value;
}

inline std::string site(const Location& at) {
  const char* file = at.file_name();
  const char* base = std::strrchr(file, '/');
  return std::string(base != nullptr ? base + 1 : file) + ":" + std::to_string(at.line());
}

// ---------------------------------------------------------------------------------------------------
// Global memory: the regions a launch may touch
// ---------------------------------------------------------------------------------------------------

struct Region {
  const unsigned char* begin;
  size_t bytes;
  size_t element;  // bytes per element, for the index in messages
  std::string name;
};

struct Memory {
  std::vector<Region> regions;
  size_t last = 0;  // the region of the previous access: most accesses hit it again
};

inline Memory& memory() {
  thread_local Memory value;
  return value;
}

inline void add_region(const void* begin, size_t bytes, size_t element, std::string name) {
  memory().regions.push_back({static_cast<const unsigned char*>(begin), bytes, element, std::move(name)});
}

// The regions added during its lifetime are removed at its end (one op's tensors and buffers).
class RegionScope {
 public:
  RegionScope() : mark_(memory().regions.size()) {}
  ~RegionScope() {
    memory().regions.resize(mark_);
    memory().last = 0;
  }
  RegionScope(const RegionScope&) = delete;
  RegionScope& operator=(const RegionScope&) = delete;

 private:
  size_t mark_;
};

// ---------------------------------------------------------------------------------------------------
// Threads, warps, blocks
// ---------------------------------------------------------------------------------------------------

struct Dim {
  uint32_t x, y, z;
};

enum class Status : uint8_t { kRunnable, kWarp, kBlock, kDone, kFailed };
enum class Op : uint8_t { kShfl, kShflUp, kShflDown, kShflXor, kBallot, kSyncWarp };

inline const char* op_name(Op op) {
  switch (op) {
    case Op::kShfl: return "__shfl_sync";
    case Op::kShflUp: return "__shfl_up_sync";
    case Op::kShflDown: return "__shfl_down_sync";
    case Op::kShflXor: return "__shfl_xor_sync";
    case Op::kBallot: return "__ballot_sync";
    case Op::kSyncWarp: return "__syncwarp";
  }
  return "?";
}

// One GPU thread: its fiber (a stack of its own with a guard page below it) and where it waits.
struct Thread {
  static constexpr size_t kStackBytes = size_t{128} << 10;
  hip::detail::Fiber fiber;
  void* mapping = nullptr;  // guard page + stack
  Status status = Status::kDone;
  // The collective it waits at (Status::kWarp) or the barrier (Status::kBlock: only `at`).
  Op op = Op::kSyncWarp;
  unsigned mask = 0;
  uint64_t value = 0;  // its operand, as bits
  int arg = 0;         // source lane, delta or lane mask
  int width = 32;
  Location at;
  uint64_t result = 0;
  std::string error;

  Thread() {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    mapping = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mapping == MAP_FAILED) throw std::runtime_error("cuda_sim: cannot map a fiber stack");
    mprotect(mapping, page, PROT_NONE);  // an overflow faults instead of corrupting memory
    reset();
  }
  ~Thread() { munmap(mapping, kStackBytes + static_cast<size_t>(sysconf(_SC_PAGESIZE))); }
  Thread(const Thread&) = delete;
  Thread& operator=(const Thread&) = delete;

  // A fresh fiber on this stack, at the start of fiber_main.
  void reset();
};

// The launch in progress on this OS thread.
struct Launch {
  const char* kernel = nullptr;
  const std::function<void()>* body = nullptr;
  Dim grid{1, 1, 1}, block{1, 1, 1}, block_index{0, 0, 0};
  std::vector<unsigned char> shared;  // dynamic shared memory of the block
};

struct Scheduler {
  std::vector<std::unique_ptr<Thread>> threads;
  Launch* launch = nullptr;
  int current = 0;
  const hip::detail::Fiber* home = nullptr;
};

inline Scheduler& scheduler() {
  thread_local Scheduler value;
  return value;
}

inline const char* kernel_name() {
  const Launch* launch = scheduler().launch;
  return launch != nullptr && launch->kernel != nullptr ? launch->kernel : "(host code)";
}

[[noreturn]] inline void fail(const std::string& message) {
  throw DeviceError(std::string("cuda_sim: ") + kernel_name() + ": " + message);
}

inline void fiber_main() {
  for (;;) {
    Scheduler& s = scheduler();
    Thread& me = *s.threads[s.current];
    try {
      (*s.launch->body)();
      me.status = Status::kDone;
    } catch (const std::exception& e) {
      me.status = Status::kFailed;
      me.error = e.what();
    }
    hip::detail::Fiber::yield(*s.home);
  }
}

inline void Thread::reset() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  fiber = hip::detail::Fiber::make(
      co_derive(static_cast<unsigned char*>(mapping) + page, static_cast<unsigned>(kStackBytes), &fiber_main));
  status = Status::kDone;
}

inline Thread& this_thread() {
  Scheduler& s = scheduler();
  if (s.launch == nullptr) throw DeviceError("cuda_sim: device code called outside a kernel launch");
  return *s.threads[s.current];
}

inline Dim thread_idx() { return {static_cast<uint32_t>(scheduler().current), 0, 0}; }
inline Dim block_idx() { return scheduler().launch->block_index; }
inline Dim block_dim() { return scheduler().launch->block; }
inline Dim grid_dim() { return scheduler().launch->grid; }

inline void* dynamic_shared() { return scheduler().launch->shared.data(); }

// Suspends the calling thread at a collective until the scheduler completes it; its result.
inline uint64_t arrive(Op op, unsigned mask, uint64_t value, int arg, int width, const Location& at) {
  Thread& me = this_thread();
  me.status = Status::kWarp;
  me.op = op;
  me.mask = mask;
  me.value = value;
  me.arg = arg;
  me.width = width;
  me.at = at;
  hip::detail::Fiber::yield(*scheduler().home);
  return me.result;
}

inline void sync_block(const Location& at = Location::current()) {
  Thread& me = this_thread();
  me.status = Status::kBlock;
  me.at = at;
  hip::detail::Fiber::yield(*scheduler().home);
}

inline std::string describe(const Thread& t) {
  switch (t.status) {
    case Status::kWarp: {
      char mask[16];
      std::snprintf(mask, sizeof mask, "0x%08x", t.mask);
      return std::string(op_name(t.op)) + "(mask " + mask + ") at " + site(t.at);
    }
    case Status::kBlock: return "__syncthreads() at " + site(t.at);
    case Status::kDone: return "has exited";
    default: return "is running";
  }
}

// The lane a collective reads for `lane`, or -1 for its own value (shuffles past the segment).
inline int source_lane(const Thread& t, int lane) {
  const int width = t.width, base = lane & ~(width - 1), within = lane & (width - 1);
  switch (t.op) {
    case Op::kShfl: return base + (t.arg & (width - 1));
    case Op::kShflUp: return within >= t.arg ? lane - t.arg : -1;
    case Op::kShflDown: return within + t.arg < width ? lane + t.arg : -1;
    case Op::kShflXor: return (within ^ t.arg) < width ? base + (within ^ t.arg) : -1;
    default: return -1;
  }
}

// Completes every warp collective of the block whose lanes have all arrived; a collective that cannot
// complete because a lane it names is elsewhere is an error. Returns whether any thread was released.
inline bool complete_warps(int threads) {
  Scheduler& s = scheduler();
  bool released = false;
  for (int first = 0; first < threads; first += 32) {
    const int lanes = std::min(32, threads - first);
    const unsigned present = lanes == 32 ? 0xFFFFFFFFu : (1u << lanes) - 1u;
    const int warp = first / 32;
    for (int lane = 0; lane < lanes; ++lane) {
      Thread& a = *s.threads[first + lane];
      if (a.status != Status::kWarp) continue;
      const std::string who = "warp " + std::to_string(warp) + ", lane " + std::to_string(lane) + ": " + describe(a);
      if (((a.mask >> lane) & 1u) == 0) fail(who + ": the mask leaves out the calling lane");
      if ((a.mask & ~present) != 0) fail(who + ": the mask names lanes the block does not have");
      if (a.width < 1 || a.width > 32 || (a.width & (a.width - 1)) != 0) fail(who + ": width must be a power of 2 <= 32");
      for (int l = 0; l < lanes; ++l) {
        const Thread& b = *s.threads[first + l];
        const bool named = (a.mask >> l) & 1u;
        const bool same = b.status == Status::kWarp && b.op == a.op && b.mask == a.mask &&
                          b.at.line() == a.at.line() && std::strcmp(b.at.file_name(), a.at.file_name()) == 0;
        if (named && !same) {
          fail("the lanes of warp " + std::to_string(warp) + " diverge at a collective: lane " + std::to_string(lane) +
               " waits at " + describe(a) + ", lane " + std::to_string(l) + " " + describe(b));
        }
      }
      uint64_t ballot = 0;
      for (int l = 0; l < lanes; ++l) {
        const Thread& b = *s.threads[first + l];
        if (((a.mask >> l) & 1u) && b.value != 0) ballot |= uint64_t{1} << l;
      }
      for (int l = 0; l < lanes; ++l) {
        if (((a.mask >> l) & 1u) == 0) continue;
        Thread& b = *s.threads[first + l];
        if (a.op == Op::kBallot) {
          b.result = ballot;
        } else if (a.op != Op::kSyncWarp) {
          const int from = source_lane(b, l);
          if (from >= 0 && ((a.mask >> from) & 1u) == 0) {
            fail("warp " + std::to_string(warp) + ", lane " + std::to_string(l) + ": " + describe(b) +
                 " reads lane " + std::to_string(from) + ", which the mask leaves out");
          }
          b.result = from >= 0 ? s.threads[first + from]->value : b.value;
        }
      }
      for (int l = 0; l < lanes; ++l) {
        if ((a.mask >> l) & 1u) s.threads[first + l]->status = Status::kRunnable;
      }
      released = true;
    }
  }
  return released;
}

// Releases the block barrier when every thread waits at the same __syncthreads; otherwise an error.
inline void complete_block(int threads) {
  Scheduler& s = scheduler();
  const Thread& first = *s.threads[0];
  for (int t = 0; t < threads; ++t) {
    const Thread& b = *s.threads[t];
    const bool same = b.status == Status::kBlock && b.at.line() == first.at.line() &&
                      std::strcmp(b.at.file_name(), first.at.file_name()) == 0;
    if (!same) {
      fail("the threads of block " + std::to_string(s.launch->block_index.x) + " diverge at a barrier: thread 0 " +
           describe(first) + ", thread " + std::to_string(t) + " " + describe(b));
    }
  }
  for (int t = 0; t < threads; ++t) s.threads[t]->status = Status::kRunnable;
}

// Runs one block of the launch to completion.
inline void run_block(int threads) {
  Scheduler& s = scheduler();
  for (int t = 0; t < threads; ++t) s.threads[t]->status = Status::kRunnable;
  for (;;) {
    bool waiting = false;
    for (int t = 0; t < threads; ++t) {
      Thread& th = *s.threads[t];
      if (th.status == Status::kRunnable) {
        s.current = t;
        hip::detail::Fiber::yield(th.fiber);
      }
      if (th.status == Status::kFailed) {
        throw DeviceError(th.error + " (block " + std::to_string(s.launch->block_index.x) + ", thread " +
                          std::to_string(t) + ")");
      }
      waiting = waiting || th.status != Status::kDone;
    }
    if (!waiting) return;
    if (!complete_warps(threads)) complete_block(threads);
  }
}

constexpr int kMaxBlockThreads = 1024;  // CUDA's limit on the threads of a block

// Runs `body` (one call of the kernel) as a grid of `blocks` x `threads` GPU threads, block by block.
inline void run(const char* kernel, int64_t blocks, int threads, size_t shared_bytes,
                const std::function<void()>& body) {
  Scheduler& s = scheduler();
  if (s.launch != nullptr) throw DeviceError(std::string("cuda_sim: ") + kernel + ": launched from device code");
  Launch launch;
  launch.kernel = kernel;
  s.launch = &launch;
  try {
    if (blocks < 1 || blocks > 0x7FFFFFFF) fail("invalid grid of " + std::to_string(blocks) + " blocks");
    if (threads < 1 || threads > kMaxBlockThreads) fail("invalid block of " + std::to_string(threads) + " threads");
    launch.body = &body;
    launch.grid = {static_cast<uint32_t>(blocks), 1, 1};
    launch.block = {static_cast<uint32_t>(threads), 1, 1};
    launch.shared.resize(shared_bytes);
    while (static_cast<int>(s.threads.size()) < threads) s.threads.push_back(std::make_unique<Thread>());
    s.home = &hip::detail::Fiber::this_fiber();
    for (int64_t b = 0; b < blocks; ++b) {
      launch.block_index = {static_cast<uint32_t>(b), 0, 0};
      std::fill(launch.shared.begin(), launch.shared.end(), static_cast<unsigned char>(0xA5));  // never zeroed
      run_block(threads);
    }
  } catch (...) {
    for (auto& t : s.threads) t->reset();  // abandoned fibers start over at the next launch
    s.launch = nullptr;
    throw;
  }
  s.launch = nullptr;
}

// ---------------------------------------------------------------------------------------------------
// Checked global memory
// ---------------------------------------------------------------------------------------------------

inline std::string where_is(const unsigned char* p, size_t bytes) {
  const Memory& m = memory();
  if (m.regions.empty()) return "no tensor is registered for this launch";
  const Region* nearest = nullptr;
  uint64_t distance = UINT64_MAX;
  for (const Region& r : m.regions) {
    const unsigned char* end = r.begin + r.bytes;
    const uint64_t d = p + bytes <= r.begin ? static_cast<uint64_t>(r.begin - p) : p >= end ? static_cast<uint64_t>(p - end) : 0;
    if (d < distance) distance = d, nearest = &r;
  }
  const int64_t offset = p - nearest->begin;
  const int64_t index = offset >= 0 ? offset / static_cast<int64_t>(nearest->element)
                                    : -((-offset + static_cast<int64_t>(nearest->element) - 1) / static_cast<int64_t>(nearest->element));
  return "element " + std::to_string(index) + " of " + nearest->name + " (" +
         std::to_string(nearest->bytes / nearest->element) + " elements of " + std::to_string(nearest->element) +
         " bytes)";
}

// Throws unless [p, p + bytes) lies inside one registered region and p is a multiple of `align`.
inline void check_access(const void* address, size_t bytes, size_t align, const char* what, const Location& at) {
  Memory& m = memory();
  const auto* p = static_cast<const unsigned char*>(address);
  const auto inside = [&](const Region& r) { return p >= r.begin && p + bytes <= r.begin + r.bytes; };
  if (!(m.last < m.regions.size() && inside(m.regions[m.last]))) {
    size_t found = m.regions.size();
    for (size_t k = 0; k < m.regions.size() && found == m.regions.size(); ++k) {
      if (inside(m.regions[k])) found = k;
    }
    if (found == m.regions.size()) {
      fail(std::string(what) + " of " + std::to_string(bytes) + " bytes at " + site(at) +
           " outside every tensor of the launch: " + where_is(p, bytes));
    }
    m.last = found;
  }
  if (reinterpret_cast<uintptr_t>(p) % align != 0) {
    fail(std::string(what) + " of " + std::to_string(bytes) + " bytes at " + site(at) + " is not " +
         std::to_string(align) + "-byte aligned: " + where_is(p, bytes));
  }
}

// Accesses are aligned to their size, up to 16 bytes (a vector).
template <typename T>
constexpr size_t kAlign = sizeof(T) >= 16 ? 16 : sizeof(T);

template <typename T>
T load(const T* p, const char* what, const Location& at) {
  check_access(p, sizeof(T), kAlign<T>, what, at);
  T value;
  std::memcpy(static_cast<void*>(&value), p, sizeof value);
  return value;
}

template <typename T>
void store(T* p, const T& value, const char* what, const Location& at) {
  check_access(p, sizeof(T), kAlign<T>, what, at);
  std::memcpy(static_cast<void*>(p), &value, sizeof value);
}

// atomicAdd on shared memory (the block's dynamic buffer, or any static __shared__ array: unchecked) or
// on global memory (checked).
template <typename T, typename U>
T atomic_add(T* p, U value, const Location& at) {
  const Launch* launch = scheduler().launch;
  const auto* a = reinterpret_cast<const unsigned char*>(p);
  const bool in_shared = launch != nullptr && !launch->shared.empty() && a >= launch->shared.data() &&
                         a + sizeof(T) <= launch->shared.data() + launch->shared.size();
  if (!in_shared) check_access(p, sizeof(T), sizeof(T), "atomicAdd", at);
  const T old = *p;
  *p = static_cast<T>(old + static_cast<T>(value));
  return old;
}

template <typename T>
uint64_t bits_of(const T& value) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>, "collective operand too large");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof value);
  return bits;
}

template <typename T>
T from_bits(uint64_t bits) {
  T value;
  std::memcpy(static_cast<void*>(&value), &bits, sizeof value);
  return value;
}

}  // namespace sim

// global_load / global_store of device_platform.h, checked.
template <typename T>
T global_load(const T* p, const sim::Location& at = sim::Location::current()) {
  return sim::load(p, "a load", at);
}

template <typename T>
void global_store(T* p, const std::type_identity_t<T>& value, const sim::Location& at = sim::Location::current()) {
  sim::store(p, value, "a store", at);
}

}  // namespace ssam

// ---------------------------------------------------------------------------------------------------
// The CUDA names the device code uses
// ---------------------------------------------------------------------------------------------------

#define threadIdx (::ssam::sim::thread_idx())
#define blockIdx (::ssam::sim::block_idx())
#define blockDim (::ssam::sim::block_dim())
#define gridDim (::ssam::sim::grid_dim())
#define __syncthreads() ::ssam::sim::sync_block()
#define SSAM_DYNAMIC_SHARED(type, name) type* name = static_cast<type*>(::ssam::sim::dynamic_shared())
#define SSAM_READ(p) (::ssam::sim::load((p), "a load", ::ssam::sim::Location::current()))
#define __ldg(p) (::ssam::sim::load((p), "__ldg", ::ssam::sim::Location::current()))
#define atomicAdd(p, v) (::ssam::sim::atomic_add((p), (v), ::ssam::sim::Location::current()))

template <typename T>
T __ldcg(const T* p, const ssam::sim::Location& at = ssam::sim::Location::current()) {
  return ssam::sim::load(p, "__ldcg", at);
}

template <typename T>
void __stwb(T* p, const T& value, const ssam::sim::Location& at = ssam::sim::Location::current()) {
  ssam::sim::store(p, value, "__stwb", at);
}

template <typename T>
T __shfl_sync(unsigned mask, T var, int src_lane, int width = 32,
              const ssam::sim::Location& at = ssam::sim::Location::current()) {
  using namespace ssam::sim;
  return from_bits<T>(arrive(Op::kShfl, mask, bits_of(var), src_lane, width, at));
}

template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 const ssam::sim::Location& at = ssam::sim::Location::current()) {
  using namespace ssam::sim;
  return from_bits<T>(arrive(Op::kShflUp, mask, bits_of(var), static_cast<int>(delta), width, at));
}

template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   const ssam::sim::Location& at = ssam::sim::Location::current()) {
  using namespace ssam::sim;
  return from_bits<T>(arrive(Op::kShflDown, mask, bits_of(var), static_cast<int>(delta), width, at));
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const ssam::sim::Location& at = ssam::sim::Location::current()) {
  using namespace ssam::sim;
  return from_bits<T>(arrive(Op::kShflXor, mask, bits_of(var), lane_mask, width, at));
}

inline unsigned __ballot_sync(unsigned mask, int predicate,
                              const ssam::sim::Location& at = ssam::sim::Location::current()) {
  using namespace ssam::sim;
  return static_cast<unsigned>(arrive(Op::kBallot, mask, predicate != 0, 0, 32, at));
}

inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, const ssam::sim::Location& at = ssam::sim::Location::current()) {
  using namespace ssam::sim;
  arrive(Op::kSyncWarp, mask, 0, 0, 32, at);
}
