// The element-wise mathematics of the SSAM ops, shared by the CPU (C++) and CUDA kernels.
//
// Everything that decides a bit of an output lives here, once: the perturbation formula, the
// order-preserving score -> key mapping of the radix selection, the random-growth hash, and the
// popcount/rank arithmetic of the bit-packed mask format. Both backends include this header, so they
// cannot drift apart; the Python reference (ssam_kernels/ops/reference.py) states the same meanings.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define SSAM_HD __host__ __device__ __forceinline__
#else
#define SSAM_HD inline
#endif

namespace ssam {

// Entries per offsets chunk and mask words per chunk (ssam_kernels/ops/bitmask.py).
constexpr int64_t kChunk = 1024;
constexpr int64_t kWordsPerChunk = kChunk / 32;

// float64 multiply and add, each rounded once. On the device the _rn intrinsics are never contracted
// into an FMA, so the result equals the reference's separately rounded float64 PyTorch ops bit for bit;
// the host build compiles with -ffp-contract=off for the same reason.
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

// A float64 result stored as T the way PyTorch's .to(dtype) does it: through float (a float64 -> fp32
// rounding, then fp32 -> bf16/fp16 round-to-nearest-even); a float64 T keeps it as is.
template <typename T>
SSAM_HD T store_as(double x) {
  return static_cast<T>(static_cast<float>(x));
}

template <>
SSAM_HD double store_as<double>(double x) {
  return x;
}

// A stored value as float64, exactly: fp32/bf16/fp16 through float (every one is an fp32 value), float64
// as is (never through float, which would round it).
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

// True when the perturbation applies: scale finite and non-zero (else W is left unchanged). The scale
// is a float32 or float64 value, widened exactly to double.
SSAM_HD bool scale_active(double scale) {
  return scale == scale && scale - scale == 0.0 && scale != 0.0;
}

// The scale of perturb_, read from device memory: a float32 or a float64 0-d tensor.
SSAM_HD double load_scale(const void* scale, bool scale64) {
  return scale64 ? *static_cast<const double*>(scale) : static_cast<double>(*static_cast<const float*>(scale));
}

// w + scale * g (adaptive: w + scale * ((w * w) * g)) in float64 with the reference's evaluation order,
// each operation rounded once, then stored as T. float64 holds the products of fp32 inputs (almost)
// exactly, so even when w and the step nearly cancel the result is the correctly rounded one, not fp32
// rounding noise; a float64 W gets the plain float64 evaluation (no FMA: bit-identical across backends).
template <typename T>
SSAM_HD T perturbed(T w, T g, double scale, bool adaptive) {
  const double w64 = widen(w);
  const double g64 = widen(g);
  const double step = adaptive ? mul_rn(scale, mul_rn(mul_rn(w64, w64), g64)) : mul_rn(scale, g64);
  return store_as<T>(add_rn(w64, step));
}

// F + alpha * (g * g) in float64 (g exactly as stored, float64 included), stored as fp32 (the Fisher
// accumulator).
SSAM_HD float fisher_update(float f, double g64, double alpha) {
  return static_cast<float>(add_rn(f, mul_rn(alpha, mul_rn(g64, g64))));
}

// Order-preserving unsigned image of a floating score, compared as its fp32 value (a float64 score is
// first rounded to nearest fp32, so float64 scores equal in fp32 are ties):
// -0 -> +0; NaN -> 0 (below every number); negative -> ~bits; non-negative -> bits | 2^31.
// largest=false complements the key (2^32 - 1 - key), so the largest keys are the smallest scores.
SSAM_HD uint32_t float_key(float x, bool largest) {
  uint32_t key;
  if (x != x) {
    key = 0u;
  } else {
    const uint32_t b = float_bits(x == 0.0f ? 0.0f : x);
    key = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
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
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// The per-update key of the growth hash: mix32(seed ^ mix32(step ^ 0x9E3779B9)).
SSAM_HD uint32_t hash_key(uint32_t seed, uint32_t step) {
  return mix32(seed ^ mix32(step ^ 0x9E3779B9u));
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
  return filter == nullptr || (((static_cast<uint32_t>(filter[i >> 5]) >> (i & 31)) & 1u) != 0) == filter_value;
}

}  // namespace ssam
