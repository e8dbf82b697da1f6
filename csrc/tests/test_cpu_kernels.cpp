// C++ tests of the CPU kernels against hand-computed cases, run by ctest (also under valgrind when it is
// installed: the memory-safety cases below then prove that no access leaves the tensors given).
//
// Usage: test_cpu_kernels <path of the ops library>. The library is dlopen()ed, as
// torch.ops.load_library does, and every op is called through the dispatcher by its schema name, so the
// test also checks that the library registers the ops and their CPU kernels.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "check.h"

namespace {

using OptTensor = std::optional<at::Tensor>;

template <typename Signature>
c10::TypedOperatorHandle<Signature> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Signature>();
}

at::Tensor f32(std::vector<float> v) { return at::tensor(v, at::kFloat); }
at::Tensor i32(std::vector<int32_t> v) { return at::tensor(v, at::kInt); }
at::Tensor scalar_f32(float v) { return at::scalar_tensor(v, at::kFloat); }
at::Tensor scalar_i64(int64_t v) { return at::scalar_tensor(v, at::kLong); }
bool same(const at::Tensor& a, const at::Tensor& b) { return at::equal(a, b); }

const auto perturb = [] {
  return op<void(const at::Tensor&, const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&,
                 const at::Tensor&, bool)>("ssam_kernels::perturb_");
};
const auto restore = [] {
  return op<void(const at::Tensor&, const OptTensor&, const OptTensor&, const at::Tensor&)>("ssam_kernels::restore_");
};

void test_perturb_dense() {
  const at::Tensor G = f32({1.0f, -1.0f, 0.5f});
  at::Tensor W = f32({1.0f, 2.0f, 3.0f});
  at::Tensor backup = at::full({3}, NAN, at::kFloat);
  perturb().call(W, G, std::nullopt, std::nullopt, backup, scalar_f32(0.5f), false);
  EXPECT(same(W, f32({1.5f, 1.5f, 3.25f})));  // w + 0.5 g
  EXPECT(same(backup, f32({1.0f, 2.0f, 3.0f})));
  restore().call(W, std::nullopt, std::nullopt, backup);
  EXPECT(same(W, f32({1.0f, 2.0f, 3.0f})));
  perturb().call(W, G, std::nullopt, std::nullopt, backup, scalar_f32(0.5f), true);
  EXPECT(same(W, f32({1.5f, 0.0f, 5.25f})));  // w + 0.5 w² g
}

void test_perturb_masked(at::ScalarType offsets_dtype) {
  // 40 entries, bits {0, 3, 35}: words {0b1001, 1 << 3}; one chunk, offsets {0, 3}.
  const at::Tensor mask = i32({0b1001, 1 << 3});
  const at::Tensor offsets = at::tensor(std::vector<int64_t>{0, 3}, at::kLong).to(offsets_dtype);
  const at::Tensor W0 = at::arange(40, at::kFloat);
  at::Tensor W = W0.clone();
  at::Tensor backup = at::full({3}, NAN, at::kFloat);
  perturb().call(W, at::ones({40}, at::kFloat), mask, offsets, backup, scalar_f32(2.0f), false);
  at::Tensor expected = W0.clone();
  expected[0] = 2.0f;
  expected[3] = 5.0f;
  expected[35] = 37.0f;
  EXPECT(same(W, expected));
  EXPECT(same(backup, f32({0.0f, 3.0f, 35.0f})));
  restore().call(W, mask, offsets, backup);
  EXPECT(same(W, W0));
}

void test_perturb_skipped() {
  for (float s : {0.0f, std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN()}) {
    at::Tensor W = f32({1.0f, 2.0f});
    at::Tensor backup = at::full({2}, NAN, at::kFloat);
    perturb().call(W, f32({1.0f, 1.0f}), std::nullopt, std::nullopt, backup, scalar_f32(s), false);
    EXPECT(same(W, f32({1.0f, 2.0f})));
    EXPECT(same(backup, f32({1.0f, 2.0f})));  // backup is written even for a skipped step
  }
}

void test_perturb_half_rounds_once() {
  // 1 + 2^-11 is not an fp16 value: fp32 math gives 1.00048828125, rounded once (to even) to 1.0.
  at::Tensor W = at::ones({1}, at::kHalf);
  at::Tensor backup = at::empty({1}, at::kHalf);
  perturb().call(W, at::ones({1}, at::kHalf), std::nullopt, std::nullopt, backup, scalar_f32(1.0f / 2048), false);
  EXPECT(W.item<float>() == 1.0f);
}

void test_grad_sq_norm() {
  const auto norm = op<at::Tensor(const at::Tensor&, const OptTensor&)>("ssam_kernels::grad_sq_norm");
  const at::Tensor plain = norm.call(f32({3.0f, 4.0f}), std::nullopt);
  EXPECT(plain.scalar_type() == at::kDouble && plain.dim() == 0 && plain.item<double>() == 25.0);
  EXPECT(norm.call(f32({3.0f, 4.0f}), f32({2.0f, -0.5f})).item<double>() == 40.0);  // 6² + 2²
  EXPECT(norm.call(f32({}), std::nullopt).item<double>() == 0.0);
  for (auto dtype : {at::kHalf, at::kBFloat16}) {
    EXPECT(norm.call(f32({1.0f, 2.0f}).to(dtype), std::nullopt).item<double>() == 5.0);
  }
  // 100000 ones: exact in double, across several partial-sum blocks.
  EXPECT(norm.call(at::ones({100000}, at::kFloat), std::nullopt).item<double>() == 100000.0);
}

void test_fisher_accumulate() {
  const auto fisher = op<void(const at::Tensor&, const at::Tensor&, double)>("ssam_kernels::fisher_accumulate_");
  at::Tensor F = f32({1.0f, 1.0f});
  fisher.call(F, f32({2.0f, 3.0f}).to(at::kBFloat16), 0.5);
  EXPECT(same(F, f32({3.0f, 5.5f})));
}

void test_radix_histogram() {
  const auto hist = op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, int64_t, bool, const OptTensor&,
                                  bool)>("ssam_kernels::radix_histogram");
  // Keys: 1.0 -> 0xBF800000, -1.0 -> 0x407FFFFF, NaN -> 0, +0 and -0 -> 0x80000000.
  const at::Tensor scores = f32({1.0f, -1.0f, NAN, 0.0f, -0.0f});
  at::Tensor h = hist.call(scores, scalar_i64(0), 24, 8, true, std::nullopt, true);
  EXPECT(h.numel() == 256 && h.sum().item<int64_t>() == 5);
  EXPECT(h[0xBF].item<int64_t>() == 1 && h[0x40].item<int64_t>() == 1 && h[0x00].item<int64_t>() == 1 &&
         h[0x80].item<int64_t>() == 2);
  // largest=false complements the keys: NaN -> 0xFFFFFFFF.
  h = hist.call(scores, scalar_i64(0), 24, 8, false, std::nullopt, true);
  EXPECT(h[0xFF].item<int64_t>() == 1 && h[0x40].item<int64_t>() == 1);
  // Filter: only entries whose bit is 0 (entries 1..4 with filter 0b00001).
  h = hist.call(scores, scalar_i64(0), 24, 8, true, i32({1}), false);
  EXPECT(h[0xBF].item<int64_t>() == 0 && h.sum().item<int64_t>() == 4);
  // Second digit under prefix 0x80000000: only the two zeros, digit 0 of bits [16, 24).
  h = hist.call(scores, scalar_i64(0x80000000LL), 16, 8, true, std::nullopt, true);
  EXPECT(h.sum().item<int64_t>() == 2 && h[0].item<int64_t>() == 2);
  // int32 scores are raw unsigned keys: -1 -> 0xFFFFFFFF.
  h = hist.call(i32({-1, 1}), scalar_i64(0), 24, 8, true, std::nullopt, true);
  EXPECT(h[0xFF].item<int64_t>() == 1 && h[0].item<int64_t>() == 1);
}

void test_threshold_mask() {
  const auto thresh = op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, const OptTensor&,
                                    bool)>("ssam_kernels::threshold_mask");
  const at::Tensor scores = f32({5.0f, 3.0f, 5.0f, 5.0f, 1.0f});
  const int64_t key5 = 0x40A00000LL | 0x80000000LL;
  const int64_t key3 = 0x40400000LL | 0x80000000LL;
  EXPECT(same(thresh.call(scores, scalar_i64(key5), scalar_i64(2), true, std::nullopt, true), i32({0b00101})));
  EXPECT(same(thresh.call(scores, scalar_i64(key3), scalar_i64(0), true, std::nullopt, true), i32({0b01101})));
  // Eligible only where filter bit is 1 (entries 2, 3, 4): the first tie is entry 2.
  EXPECT(same(thresh.call(scores, scalar_i64(key5), scalar_i64(1), true, i32({0b11100}), true), i32({0b00100})));
  // 70 entries, all ties, quota 40: the first 40 entries, i.e. word 0 full, 8 bits of word 1.
  EXPECT(same(thresh.call(at::zeros({70}, at::kFloat), scalar_i64(0x80000000LL), scalar_i64(40), true, std::nullopt,
                          true),
              i32({-1, 0xFF, 0})));
}

void test_hash_fill() {
  const auto fill = op<void(const at::Tensor&, int64_t, int64_t, int64_t)>("ssam_kernels::hash_fill_");
  at::Tensor out = at::empty({4}, at::kInt);
  fill.call(out, 1, 2, 0);
  EXPECT(same(out, i32({1471415270, -1911502853, -1671701976, -890118053})));  // reference.hash_scores
  out = at::empty({2}, at::kInt);
  fill.call(out, 7, 3, (int64_t{1} << 32) - 1);  // positions crossing 2^32
  EXPECT(same(out, i32({655090511, -1162428316})));
}

using Tensors = std::vector<at::Tensor>;
using OptTensors = c10::List<std::optional<at::Tensor>>;

const auto perturb_multi = [] {
  return op<void(at::TensorList, at::TensorList, const OptTensors&, const OptTensors&, at::TensorList,
                 const at::Tensor&, bool)>("ssam_kernels::perturb_multi_");
};

// `call` raises a ValueError whose message starts with `message`, and `arena` (the memory of every tensor
// involved) is unchanged: nothing was written before the error.
template <typename Fn>
void expect_refused(Fn&& call, const std::string& message, const at::Tensor& arena) {
  const at::Tensor before = arena.clone();
  bool refused = false;
  try {
    call();
  } catch (const c10::ValueError& e) {
    refused = std::string(e.msg()).rfind(message, 0) == 0;
    if (!refused) std::fprintf(stderr, "unexpected message: %s\n", e.msg().c_str());
  } catch (const c10::Error& e) {
    std::fprintf(stderr, "unexpected error: %s\n", e.msg().c_str());
  }
  EXPECT(refused);
  EXPECT(same(arena.view(at::kInt), before.view(at::kInt)));
}

// Arguments that share memory with a tensor the op writes are refused before any write. The mask of the
// first case is a view of the backup's memory: a kernel that ran would overwrite mask words it has yet to
// read, count more live entries than the offsets say and write past the backup's end.
void test_overlapping_arguments() {
  constexpr int64_t n = 3000;  // every third entry live: 1000 of them, 342 / 341 / 317 per 1024-entry chunk
  std::vector<int32_t> bits((n + 31) / 32, 0);
  for (int64_t i = 0; i < n; i += 3) bits[i / 32] |= static_cast<int32_t>(1u << (i % 32));
  const at::Tensor words = i32(bits);
  const int64_t k = 1000;
  const at::Tensor offsets = at::tensor(std::vector<int64_t>{0, 342, 683, k}, at::kLong);
  const at::Tensor arena = at::randn({n + k});  // W, then the backup, ending where the allocation ends
  at::Tensor W = arena.narrow(0, 0, n), backup = arena.narrow(0, n, k), G = at::randn({n});
  at::Tensor mask_in_backup = backup.view(at::kInt).narrow(0, 8, words.numel());
  mask_in_backup.copy_(words);
  expect_refused([&] { perturb().call(W, G, mask_in_backup, offsets, backup, scalar_f32(0.5f), false); },
                 "backup: shares memory with mask", arena);
  at::Tensor mask_in_w = W.view(at::kInt).narrow(0, 8, words.numel());
  mask_in_w.copy_(words);
  expect_refused([&] { restore().call(W, mask_in_w, offsets, backup); }, "W: shares memory with mask", arena);
  expect_refused([&] { perturb().call(W, W, words, offsets, backup, scalar_f32(0.5f), false); },
                 "W: shares memory with G", arena);
  expect_refused([&] { perturb().call(W, G, words, offsets, backup, W.narrow(0, 7, 1).squeeze(0), false); },
                 "W: shares memory with scale", arena);
  // Across the entries of a list: entry 1's backup is entry 0's weights.
  const at::Tensor W0 = arena.narrow(0, 0, 100), W1 = arena.narrow(0, 200, 100);
  expect_refused(
      [&] {
        perturb_multi().call(Tensors{W0, W1}, Tensors{at::randn({100}), at::randn({100})}, OptTensors({{}, {}}),
                             OptTensors({{}, {}}), Tensors{at::empty({100}), W0}, scalar_f32(0.5f), false);
      },
      "backup[1]: shares memory with W[0]", arena);
  const auto fisher = op<void(const at::Tensor&, const at::Tensor&, double)>("ssam_kernels::fisher_accumulate_");
  expect_refused([&] { fisher.call(W0, W0, 1.0); }, "F: shares memory with G", arena);
}

// Masks, offsets and backups that disagree stay inside the tensors given (valgrind watches every access):
// a short backup, mask bits past N, and offsets that do not match the mask (refused on CPU).
void test_bounded_arguments() {
  const at::Tensor words = i32({-1, -1, -1, -1});  // 128 bits over 100 entries: 28 bits past N
  const at::Tensor offsets = at::tensor(std::vector<int64_t>{0, 100}, at::kLong);
  at::Tensor W = at::arange(100, at::kFloat);
  at::Tensor short_backup = at::full({40}, NAN, at::kFloat);
  perturb().call(W, at::ones({100}, at::kFloat), words, offsets, short_backup, scalar_f32(1.0f), false);
  EXPECT(same(short_backup, at::arange(40, at::kFloat)));
  EXPECT(same(W.narrow(0, 0, 40), at::arange(1, 41, at::kFloat)) && same(W.narrow(0, 40, 60), at::arange(40, 100, at::kFloat)));
  restore().call(W, words, offsets, short_backup);
  EXPECT(same(W, at::arange(100, at::kFloat)));
  const at::Tensor wrong = at::tensor(std::vector<int64_t>{0, 7}, at::kLong);
  expect_refused([&] { perturb().call(W, at::ones({100}, at::kFloat), words, wrong, short_backup, scalar_f32(1.0f), false); },
                 "offsets: do not match the mask", W);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s <ops library>\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  test_perturb_dense();
  test_perturb_masked(at::kLong);
  test_perturb_masked(at::kInt);
  test_perturb_skipped();
  test_perturb_half_rounds_once();
  test_grad_sq_norm();
  test_fisher_accumulate();
  test_radix_histogram();
  test_threshold_mask();
  test_hash_fill();
  test_overlapping_arguments();
  test_bounded_arguments();
  return ssam_test::check_status("test_cpu_kernels");
}
