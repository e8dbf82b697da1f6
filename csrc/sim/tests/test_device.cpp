// Unit tests of the CUDA device code (csrc/cuda/*.cuh) run on cuda_sim, without torch (ctest): the list
// table's warp search, the chunk scan and the block reduction against plain C++, warps whose loops run
// different trip counts, the element kernel against a scalar reference, and the simulator's checker
// catching each kind of broken kernel. Every test runs on several grid sizes.
#include "sim/device.h"  // first: it defines ssam_math.h's SSAM_READ

#include <algorithm>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

#include "cuda/common.cuh"
#include "cuda/element.cuh"
#include "tests/check.h"

namespace {

using namespace ssam;

struct Tensor {
  const char* name;
  const void* data;
  size_t bytes, element;
};

template <typename T>
Tensor tensor(const char* name, const std::vector<T>& v) {
  return {name, v.data(), v.size() * sizeof(T), sizeof(T)};
}

// Runs `body` as a launch of `blocks` x kThreads threads with `tensors` registered as the launch's memory.
template <typename Body>
void run_kernel(int64_t blocks, const Body& body, std::initializer_list<Tensor> tensors) {
  const sim::RegionScope scope;
  for (const Tensor& t : tensors) sim::add_region(t.data, t.bytes, t.element, t.name);
  sim::run("test kernel", blocks, kThreads, 0, std::function<void()>(body));
}

// The message of the DeviceError `body` throws ("" when it throws none).
template <typename Body>
std::string error_of(const Body& body) {
  try {
    body();
  } catch (const sim::DeviceError& e) {
    return e.what();
  }
  return "";
}

bool contains(const std::string& text, const std::string& part) { return text.find(part) != std::string::npos; }

// entry_of finds every global chunk's tensor, empty tensors included, against std::upper_bound.
void test_entry_of() {
  std::mt19937 gen(1);
  for (int entries : {1, 2, 31, 33, 700}) {
    std::vector<int64_t> first(entries + 1, 0);
    for (int j = 0; j < entries; ++j) first[j + 1] = first[j] + static_cast<int64_t>(gen() % 4);  // 0: empty
    const int64_t chunks = first[entries];
    std::vector<int64_t> rows(static_cast<size_t>(entries) * kColumns, 0);
    const ListTable t{rows.data(), first.data(), entries, chunks};
    for (int64_t blocks : {1, 2, 3}) {
      std::vector<int64_t> got(std::max<int64_t>(chunks, 1), -1);
      run_kernel(blocks, [&] {
        for (int64_t c = global_warp(); c < t.chunks; c += grid_warps()) {
          const int64_t j = entry_of(t, c);
          if (lane_id() == 0) global_store(got.data() + c, j);
        }
      }, {tensor("rows", rows), tensor("first_chunk", first), tensor("out", got)});
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t want = std::upper_bound(first.begin(), first.end(), c) - first.begin() - 1;
        EXPECT(got[c] == want);
      }
    }
  }
}

// chunk_word: each lane's masked word, the set bits before it in its chunk, and the chunk's base rank.
void test_chunk_word() {
  std::mt19937 gen(2);
  for (int64_t n : {1, 31, 1024, 1025, 5000}) {
    const int64_t words = (n + 31) / 32, chunks = (n + kChunk - 1) / kChunk;
    std::vector<int32_t> mask(words);
    for (auto& w : mask) w = static_cast<int32_t>(gen());
    std::vector<int64_t> offsets(chunks + 1, 0);
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t count = 0;
      for (int64_t w = c * kWordsPerChunk; w < std::min(words, (c + 1) * kWordsPerChunk); ++w) count += popcount32(mask_word(mask.data(), w, n));
      offsets[c + 1] = offsets[c] + count;
    }
    std::vector<int64_t> below(chunks * 32, -1), base(chunks * 32, -1);
    std::vector<uint32_t> word(chunks * 32, 0);
    run_kernel(2, [&] {
      for (int64_t c = global_warp(); c < chunks; c += grid_warps()) {
        const ChunkWord cw = chunk_word(mask.data(), offsets.data(), true, n, c);
        global_store(below.data() + c * 32 + lane_id(), int64_t{cw.below});
        global_store(base.data() + c * 32 + lane_id(), cw.base);
        global_store(word.data() + c * 32 + lane_id(), cw.word);
      }
    }, {tensor("mask", mask), tensor("offsets", offsets), tensor("below", below), tensor("base", base),
        tensor("word", word)});
    for (int64_t c = 0; c < chunks; ++c) {
      int64_t before = 0;
      for (int l = 0; l < 32; ++l) {
        const int64_t w = c * kWordsPerChunk + l;
        const uint32_t expected = w < words ? mask_word(mask.data(), w, n) : 0u;
        EXPECT(word[c * 32 + l] == expected);
        EXPECT(below[c * 32 + l] == before);
        EXPECT(base[c * 32 + l] == offsets[c]);
        before += popcount32(expected);
      }
    }
  }
}

// block_sum adds in the same tree order as this loop, bit for bit.
void test_block_sum() {
  std::mt19937_64 gen(3);
  std::uniform_real_distribution<double> value(-1e3, 1e3);
  std::vector<double> in(3 * kThreads), out(3, 0.0);
  for (double& v : in) v = value(gen);
  run_kernel(3, [&] {
    __shared__ double shared[kThreads];
    const double total = block_sum(global_load(in.data() + blockIdx.x * kThreads + threadIdx.x), shared);
    if (threadIdx.x == 0) global_store(out.data() + blockIdx.x, total);
  }, {tensor("in", in), tensor("out", out)});
  for (int b = 0; b < 3; ++b) {
    std::vector<double> tree(in.begin() + b * kThreads, in.begin() + (b + 1) * kThreads);
    for (int half = kThreads / 2; half > 0; half /= 2) {
      for (int t = 0; t < half; ++t) tree[t] += tree[t + half];
    }
    EXPECT(out[b] == tree[0]);
  }
}

// Warp w runs w + 1 rounds of shuffles, then the block meets at __syncthreads: warps stay exact though
// their trip counts differ (HIP-CPU's block-wide collectives put them out of step).
void test_warps_with_different_trip_counts() {
  std::vector<int64_t> out(2 * kThreads, 0);
  run_kernel(2, [&] {
    const int lane = lane_id(), warp = threadIdx.x / 32;
    int64_t acc = 0;
    for (int round = 0; round <= warp; ++round) {
      acc += __shfl_sync(kFullWarp, lane * 100 + round, (lane + round + 1) % 32);
      acc += __popc(__ballot_sync(kFullWarp, (lane + round) % 3 == 0));
    }
    __syncthreads();
    global_store(out.data() + blockIdx.x * kThreads + threadIdx.x, acc);
  }, {tensor("out", out)});
  for (int t = 0; t < 2 * kThreads; ++t) {
    const int lane = t % 32, warp = (t % kThreads) / 32;
    int64_t want = 0;
    for (int round = 0; round <= warp; ++round) {
      want += ((lane + round + 1) % 32) * 100 + round;
      for (int l = 0; l < 32; ++l) want += (l + round) % 3 == 0;
    }
    EXPECT(out[t] == want);
  }
}

// element_kernel (masked perturb_, then restore_) on grids of 1 to 3 blocks against a scalar loop.
void test_element_kernel() {
  std::mt19937 gen(4);
  std::normal_distribution<float> normal;
  for (int64_t n : {1, 33, 1025, 9000}) {
    for (int64_t blocks : {1, 3}) {
      std::vector<float> w(n), g(n);
      for (float& x : w) x = normal(gen);
      for (float& x : g) x = normal(gen);
      const std::vector<float> w0 = w;
      std::vector<int32_t> mask((n + 31) / 32);
      for (auto& m : mask) m = static_cast<int32_t>(gen());
      const int64_t chunks = (n + kChunk - 1) / kChunk;
      std::vector<int64_t> offsets(chunks + 1, 0);
      int64_t live = 0;
      for (int64_t i = 0; i < n; ++i) {
        if (i % kChunk == 0) offsets[i / kChunk] = live;
        live += (static_cast<uint32_t>(mask[i / 32]) >> (i % 32)) & 1u;
      }
      offsets[chunks] = live;
      std::vector<float> backup(live, -1.0f);
      const float scale = 0.375f;
      const ElementArgs<float> args{w.data(), g.data(), backup.data(), n, live, mask.data(), offsets.data(), true,
                                    launch::aligned16({w.data(), g.data(), backup.data()})};
      const auto tensors = {tensor("W", w), tensor("G", g), tensor("backup", backup), tensor("mask", mask),
                            tensor("offsets", offsets), Tensor{"scale", &scale, sizeof scale, sizeof scale}};
      run_kernel(blocks, [&] { element_kernel<float, Perturb>(args, ScaleView{&scale, false}); }, tensors);
      int64_t rank = 0;
      for (int64_t i = 0; i < n; ++i) {
        const bool set = (static_cast<uint32_t>(mask[i / 32]) >> (i % 32)) & 1u;
        EXPECT(w[i] == (set ? perturbed(w0[i], g[i], scale, false) : w0[i]));
        if (set) EXPECT(backup[rank++] == w0[i]);
      }
      run_kernel(blocks, [&] { element_kernel<float, Restore>(args, ScaleView{}); }, tensors);
      EXPECT(w == w0);
    }
  }
}

// The checker: each broken kernel ends its launch with an error naming the fault, and the next launch runs.
void test_checker() {
  std::vector<float> x(100, 1.0f), y(100, 0.0f);
  const auto tensors = {tensor("x", x), tensor("y", y)};
  // A ballot inside a branch half the warp takes.
  std::string e = error_of([&] {
    run_kernel(1, [&] {
      if (lane_id() < 16) __ballot_sync(kFullWarp, 1);
    }, tensors);
  });
  EXPECT(contains(e, "diverge at a collective") && contains(e, "__ballot_sync") && contains(e, "has exited"));
  // Two halves of a warp at different collectives.
  e = error_of([&] {
    run_kernel(1, [&] {
      if (lane_id() < 16) {
        __ballot_sync(kFullWarp, 1);
      } else {
        __shfl_sync(kFullWarp, 1, 0);
      }
    }, tensors);
  });
  EXPECT(contains(e, "diverge at a collective") && contains(e, "__shfl_sync") && contains(e, "test_device.cpp:"));
  // A mask that leaves out a lane that reaches the collective.
  e = error_of([&] { run_kernel(1, [&] { __ballot_sync(0x0000FFFFu, 1); }, tensors); });
  EXPECT(contains(e, "leaves out the calling lane"));
  // A shuffle from a lane outside its mask.
  e = error_of([&] {
    run_kernel(1, [&] {
      if (lane_id() < 16) __shfl_sync(0x0000FFFFu, 1, 20);
    }, tensors);
  });
  EXPECT(contains(e, "reads lane 20"));
  // __syncthreads in a branch half the block takes.
  e = error_of([&] {
    run_kernel(1, [&] {
      if (threadIdx.x < kThreads / 2) __syncthreads();
    }, tensors);
  });
  EXPECT(contains(e, "diverge at a barrier"));
  // A wrong tail bound: the last thread reads one element past the end.
  e = error_of([&] {
    run_kernel(1, [&] {
      for (int64_t i = threadIdx.x; i <= 100; i += blockDim.x) global_store(y.data() + i, global_load(x.data() + i));
    }, tensors);
  });
  EXPECT(contains(e, "outside every tensor") && contains(e, "element 100 of x (100 elements"));
  // A 16-byte vector load from an address 4 bytes past a 16-byte boundary.
  e = error_of([&] {
    run_kernel(1, [&] {
      if (threadIdx.x == 0) __ldg(reinterpret_cast<const uint4*>(x.data() + 1));
    }, tensors);
  });
  EXPECT(contains(e, "__ldg of 16 bytes") && contains(e, "not 16-byte aligned") && contains(e, "element 1 of x"));
  // After the faults, a correct launch still runs every thread.
  run_kernel(1, [&] {
    if (threadIdx.x < 100) global_store(y.data() + threadIdx.x, 2.0f * global_load(x.data() + threadIdx.x));
  }, tensors);
  EXPECT(std::all_of(y.begin(), y.end(), [](float v) { return v == 2.0f; }));
}

}  // namespace

int main() {
  test_entry_of();
  test_chunk_word();
  test_block_sum();
  test_warps_with_different_trip_counts();
  test_element_kernel();
  test_checker();
  return ssam_test::check_status("test_device");
}
