// The element-wise mathematics of the SSAM ops, shared by the CPU (C++) and CUDA kernels.
//
// Everything that decides a bit of an output lives here, once: the perturbation, Fisher and axpby formulas, the
// order-preserving score -> key mapping of the radix selection, the random-growth hash, and the
// popcount/rank arithmetic of the bit-packed mask format. Both backends include this header, so they
// cannot drift apart; the PyTorch backends state the same meanings (ssam_kernels/ops/_arith.py for the
// arithmetic of perturb_, fisher_accumulate_ and axpby_, ssam_kernels/ops/reference.py for the rest).
#pragma once
#define SSAM_MATH_H  // csrc/sim/device.h must come first where it is used

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "ssam_contract.h"  // generated from ssam_kernels/ops/contract.py: kChunk, the key and hash constants

#if defined(__CUDACC__)
#define SSAM_HD __host__ __device__ __forceinline__
#else
#define SSAM_HD inline
#endif

// How the helpers below that take a pointer into a kernel's global memory (load_scale, eligible) read
// it: cuda_sim (csrc/sim/device.h) defines it to check the read against the tensors of the launch.
#if !defined(SSAM_READ)
#define SSAM_READ(p) (*(p))
#endif

namespace ssam {

// float64 multiply and add, each rounded once (the float64 W path of perturbed). On the device the _rn
// intrinsics are never contracted into an FMA, so the result equals the reference's separately rounded
// float64 PyTorch ops bit for bit; the host build compiles with -ffp-contract=off for the same reason.
SSAM_HD double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

SSAM_HD double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

// fp32 product, rounded once (never contracted into an FMA: __fmul_rn on the device, -ffp-contract=off
// on the host).
SSAM_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

// a·b + c in fp32 with ONE rounding (a fused multiply-add): __fmaf_rn on the device; std::fma on the
// host, one vfmadd instruction where the target has FMA (the x86-64-v3/v4 clones of SSAM_CPU_CLONES),
// glibc's correctly rounded fmaf elsewhere.
SSAM_HD float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// A stored value as float64, exactly: fp32/bf16/fp16 through float (every one is an fp32 value), float64
// as is (never through float, which would round it). grad_sq_norm accumulates these in float64.
template <typename T>
SSAM_HD double widen(T x) {
  return static_cast<double>(static_cast<float>(x));
}

template <>
SSAM_HD double widen<double>(double x) {
  return x;
}

SSAM_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t b;
  std::memcpy(&b, &x, sizeof b);
  return b;
#endif
}

SSAM_HD int popcount32(uint32_t x) {
#if defined(__CUDA_ARCH__)
  return __popc(x);
#else
  return __builtin_popcount(x);
#endif
}

// The scale perturb_ computes with for W of type T: fp32 for fp32/bf16/fp16 W (a float64 scale tensor is
// rounded to nearest fp32 once, when it is loaded), float64 for float64 W (an fp32 scale widened exactly).
template <typename T>
struct ScaleOf {
  using type = float;
};
template <>
struct ScaleOf<double> {
  using type = double;
};
template <typename T>
using scale_t = typename ScaleOf<T>::type;

// The scale of perturb_ as kernels see it: a float32 or float64 0-d tensor on W's device.
struct ScaleView {
  const void* data = nullptr;
  bool is64 = false;
};

// The scale of perturb_ for W of type T, read from device memory.
template <typename T>
SSAM_HD scale_t<T> load_scale(const ScaleView& scale) {
  return scale.is64 ? static_cast<scale_t<T>>(SSAM_READ(static_cast<const double*>(scale.data)))
                    : static_cast<scale_t<T>>(SSAM_READ(static_cast<const float*>(scale.data)));
}

// True when the perturbation applies: the scale as computed with (load_scale) is finite and non-zero;
// otherwise W is left unchanged.
template <typename S>
SSAM_HD bool scale_active(S scale) {
  return scale == scale && scale - scale == S(0) && scale != S(0);
}

// The perturbed value of w, stored as T.
// fp32/bf16/fp16 W: w and g as fp32 (exact) and one correctly rounded fp32 fused multiply-add,
//   r = fma(scale, g, w) (adaptive: r = fma(scale, rn(rn(w·w)·g), w)), then r stored as T (round to
//   nearest even, as PyTorch's .to(dtype)). The FMA rounds once, so r is the correctly rounded
//   w + scale·g even where w and the step nearly cancel; __fmaf_rn, std::fma, tl.fma and the PyTorch
//   backends' round-to-odd emulation (ssam_kernels/ops/_arith.py) all compute it, and no float64
//   arithmetic is left (consumer GPUs run it at 1/64 of the fp32 rate).
// float64 W: w + scale·g (adaptive: w + scale·((w·w)·g)) in float64, each operation rounded once (no
//   FMA: the PyTorch backends have no float64 FMA to match it).
template <typename T>
SSAM_HD T perturbed(T w, T g, scale_t<T> scale, bool adaptive) {
  if constexpr (std::is_same_v<T, double>) {
    return add_rn(w, adaptive ? mul_rn(scale, mul_rn(mul_rn(w, w), g)) : mul_rn(scale, g));
  } else {
    const float w32 = static_cast<float>(w);
    const float g32 = static_cast<float>(g);
    return static_cast<T>(fma_rn(scale, adaptive ? mul_rn(mul_rn(w32, w32), g32) : g32, w32));
  }
}

// The alpha of fisher_accumulate_ as the update computes with it: the op's float64 alpha rounded to
// nearest fp32 once, on the host.
inline float fisher_alpha(double alpha) {
  return static_cast<float>(alpha);
}

// f + alpha·g² for the fp32 Fisher accumulator f and g of any float type T: g32 = rn(g) (exact but for
// float64 G), then fma(g32, rn(alpha·g32), f): one rounded product and one fused multiply-add. The same
// work as fma(alpha, rn(g32·g32), f), but when alpha is a power of two (1 by default) alpha·g32 is exact
// and the update is the correctly rounded f + alpha·g², and for alpha < 1 no g² overflows on its way to a
// finite alpha·g².
template <typename T>
SSAM_HD float fisher_update(float f, T g, float alpha) {
  const float g32 = static_cast<float>(g);
  return fma_rn(g32, mul_rn(alpha, g32), f);
}

// a·x + b·y of axpby_, stored as T; a and b are the op's 0-d scale tensors as load_scale<T> reads them (fp32,
// each rounded to nearest once, for fp32/bf16/fp16 X; float64 for float64 X).
// fp32/bf16/fp16 X: x and y as fp32 (exact), r = fma(b, y, rn(a·x)): one rounded fp32 product and one
//   correctly rounded fused multiply-add, then r stored as T (round to nearest even). a = 1 makes it
//   fma(b, y, x), perturbed's dense plain arithmetic.
// float64 X: rn(rn(a·x) + rn(b·y)), each operation rounded once (no FMA), as the PyTorch backends compute it.
// Non-finite values propagate as IEEE arithmetic gives them (0·inf is NaN): no scale is special-cased.
template <typename T>
SSAM_HD T axpby(T x, T y, scale_t<T> a, scale_t<T> b) {
  if constexpr (std::is_same_v<T, double>) {
    return add_rn(mul_rn(a, x), mul_rn(b, y));
  } else {
    return static_cast<T>(fma_rn(b, static_cast<float>(y), mul_rn(a, static_cast<float>(x))));
  }
}

// Order-preserving unsigned image of a floating score, compared as its fp32 value (a float64 score is
// first rounded to nearest fp32, so float64 scores equal in fp32 are ties):
// -0 -> +0; NaN -> kNanKey (0: below every number); negative -> ~bits; non-negative -> bits | kKeySignBit.
// largest=false complements the key (kKeyMask - key), so the largest keys are the smallest scores.
SSAM_HD uint32_t float_key(float x, bool largest) {
  uint32_t key;
  if (x != x) {
    key = kNanKey;
  } else {
    const uint32_t b = float_bits(x == 0.0f ? 0.0f : x);
    key = (b & kKeySignBit) ? ~b : (b | kKeySignBit);
  }
  return largest ? key : ~key;
}

// int32 scores (the growth hash) are their raw unsigned value.
SSAM_HD uint32_t int_key(int32_t x, bool largest) {
  const uint32_t key = static_cast<uint32_t>(x);
  return largest ? key : ~key;
}

template <typename T>
SSAM_HD uint32_t score_key(T x, bool largest) {
  return float_key(static_cast<float>(x), largest);
}

template <>
SSAM_HD uint32_t score_key<int32_t>(int32_t x, bool largest) {
  return int_key(x, largest);
}

// True when the key's digits above bit `high` (shift + bits, at most 32) agree with the prefix's.
SSAM_HD bool prefix_matches(uint32_t key, uint64_t prefix, int high) {
  return (static_cast<uint64_t>(key) >> high) == (prefix >> high);
}

// Chris Wellons' lowbias32 finaliser: a bijection on 32-bit integers with strong avalanche.
SSAM_HD uint32_t mix32(uint32_t x) {
  x ^= x >> kMix32Shift0;
  x *= kMix32Multiplier0;
  x ^= x >> kMix32Shift1;
  x *= kMix32Multiplier1;
  x ^= x >> kMix32Shift2;
  return x;
}

// The per-update key of the growth hash: mix32(seed ^ mix32(step ^ kHashStepSalt)).
SSAM_HD uint32_t hash_key(uint32_t seed, uint32_t step) {
  return mix32(seed ^ mix32(step ^ kHashStepSalt));
}

// h(seed, step, j) = mix32(lo32(j) ^ mix32(hi32(j) ^ hash_key(seed, step))), as an int32 bit pattern.
SSAM_HD int32_t hash_value(uint32_t key, uint64_t j) {
  const uint32_t lo = static_cast<uint32_t>(j);
  const uint32_t hi = static_cast<uint32_t>(j >> 32);
  return static_cast<int32_t>(mix32(lo ^ mix32(hi ^ key)));
}

// offsets[c] of a mask, whichever of int32 / int64 the offsets tensor holds.
SSAM_HD int64_t load_offset(const void* offsets, bool offsets64, int64_t c) {
  return offsets64 ? static_cast<const int64_t*>(offsets)[c]
                   : static_cast<int64_t>(static_cast<const int32_t*>(offsets)[c]);
}

// Mask word w of a mask over n entries with the bits of entries >= n cleared: bits past N are ignored
// (never addressed, never counted in a rank).
SSAM_HD uint32_t mask_word(const int32_t* words, int64_t w, int64_t n) {
  const uint32_t word = static_cast<uint32_t>(words[w]);
  const int64_t valid = n - w * 32;
  return valid >= 32 ? word : word & ((1u << valid) - 1u);
}

// A rank from the offsets addresses the backup only when 0 <= r < capacity (the backup's length): a
// short backup or offsets that do not match the mask never read or write outside it.
SSAM_HD bool rank_in_range(int64_t r, int64_t capacity) {
  return r >= 0 && r < capacity;
}

// Number of set bits of `word` below bit `bit` (0 <= bit < 32).
SSAM_HD int bits_below(uint32_t word, int bit) {
  return popcount32(word & ((1u << bit) - 1u));
}

// Entry i is eligible for a selection: no filter, or its bit in the filter mask equals filter_value.
SSAM_HD bool eligible(const int32_t* filter, bool filter_value, int64_t i) {
  return filter == nullptr ||
         (((static_cast<uint32_t>(SSAM_READ(filter + (i >> 5))) >> (i & 31)) & 1u) != 0) == filter_value;
}

}  // namespace ssam
