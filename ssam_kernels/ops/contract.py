"""The constants of the op contract (docs/DESIGN.md, "Mask format" and "The op contract"), defined once: the
reference, vectorized and Triton backends import them from here, and the C++ and CUDA kernels include the
header ``ssam_contract.h`` that ``cpp_header`` writes from them (setup.py, CMake and the CUDA compile checks
generate it at build time). Plain Python without torch or package imports, so that the builds can load this
file by its path before the package is importable.

``tests/oracles.py`` writes the same numbers again on purpose: the tests check the backends against the
documented contract, so a change here that every backend follows still fails them.
"""

from __future__ import annotations

import os
from typing import TypeVar

# ---------------------------------------------------------------------------------------------------
# The mask format
# ---------------------------------------------------------------------------------------------------

CHUNK = 1024
"""Entries per offsets chunk: ``offsets[c]`` counts the set bits of entries ``[0, c · CHUNK)``."""

WORD_BITS = 32
"""Entries per int32 mask word."""

WORDS_PER_CHUNK = CHUNK // WORD_BITS
"""int32 mask words per chunk (entry ``i`` is bit ``i % 32`` of word ``i // 32``); the native CUDA kernels
give each of a warp's 32 lanes one word of a chunk."""


def num_words(n: int) -> int:
    """int32 words of a mask over ``n`` entries."""
    return (n + WORD_BITS - 1) // WORD_BITS


def num_chunks(n: int) -> int:
    """``CHUNK``-sized chunks covering ``n`` entries."""
    return (n + CHUNK - 1) // CHUNK


def num_offsets(n: int) -> int:
    """Entries of the offsets of a mask over ``n`` entries: one per chunk, then the live count."""
    return num_chunks(n) + 1


# ---------------------------------------------------------------------------------------------------
# The arguments of the ops: every tensor argument is a dense, contiguous 1-D tensor (``scale`` 0-d) on
# the device of the op's first tensor; these are the dtypes each may have. ``G`` and ``backup`` have
# ``W``'s dtype and size (a masked ``backup`` at most ``W``'s size), ``mask`` ``num_words(n)`` entries and
# ``offsets`` ``num_offsets(n)``, ``n = W.numel()``. The Python checks (ops/__init__.py) and the compiled
# ones (csrc/: the dtype sets as X-macro lists and the sizes as functions of ssam_contract.h) both follow
# these.
# ---------------------------------------------------------------------------------------------------

FLOAT_DTYPES = ("float32", "float64", "bfloat16", "float16")
"""``W``, ``G``, ``backup``."""

SCORE_DTYPES = (*FLOAT_DTYPES, "int32")
"""Selection scores: floats, or the int32 bit patterns of ``hash_scores``."""

MASK_DTYPES = ("int32",)
OFFSETS_DTYPES = ("int32", "int64")
SCALE_DTYPES = ("float32", "float64")
FISHER_DTYPES = ("float32",)
"""``F``, the Fisher accumulator (any float ``G``)."""

# ---------------------------------------------------------------------------------------------------
# Score keys of the selection: the order-preserving unsigned 32-bit image of a score
# ---------------------------------------------------------------------------------------------------

KEY_BITS = 32
"""Bits of a score key."""

KEY_MASK = (1 << KEY_BITS) - 1
"""All key bits: ``largest=False`` maps a key to ``KEY_MASK - key`` (its complement)."""

KEY_SIGN_BIT = 1 << (KEY_BITS - 1)
"""A float score's fp32 bit pattern ``b``: key ``b | KEY_SIGN_BIT`` when the sign bit (this one) is clear,
``~b`` when it is set, so that unsigned key order is numeric order."""

NAN_KEY = 0
"""The key of a NaN score: below every number."""

# ---------------------------------------------------------------------------------------------------
# The random-growth hash: h(seed, step, j) = mix32(lo32(j) ^ mix32(hi32(j) ^ hash_key(seed, step)))
# ---------------------------------------------------------------------------------------------------

MIX32_SHIFTS = (16, 15, 16)
MIX32_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
"""Chris Wellons' ``lowbias32`` finaliser ``mix32``: ``x ^= x >> s0; x *= m0; x ^= x >> s1; x *= m1;
x ^= x >> s2`` on unsigned 32-bit integers (products modulo 2^32), a bijection with strong avalanche."""

HASH_STEP_SALT = 0x9E3779B9
"""The per-update key of the growth hash: ``hash_key(seed, step) = mix32(seed ^ mix32(step ^ salt))``."""

_U32 = (1 << 32) - 1
_Uint32s = TypeVar("_Uint32s")  # a Python int, or an int64 tensor of values in [0, 2^32)


def mix32(x: _Uint32s) -> _Uint32s:
    """``lowbias32`` of ``x`` in ``[0, 2^32)``: a Python int, or element-wise an int64 tensor."""
    s0, s1, s2 = MIX32_SHIFTS
    m0, m1 = MIX32_MULTIPLIERS
    x = x ^ (x >> s0)
    x = (x * m0) & _U32
    x = x ^ (x >> s1)
    x = (x * m1) & _U32
    return x ^ (x >> s2)


def hash_key(seed: int, step: int) -> int:
    """The per-update key of the growth hash: ``mix32(seed ^ mix32(step ^ HASH_STEP_SALT))`` of the low 32
    bits of ``seed`` and ``step``."""
    return mix32((seed & _U32) ^ mix32((step & _U32) ^ HASH_STEP_SALT))


# ---------------------------------------------------------------------------------------------------
# The C++ header
# ---------------------------------------------------------------------------------------------------

CPP_HEADER = "ssam_contract.h"
"""The name of the generated header; csrc/ssam_math.h includes it."""

_CPP_CONSTANTS = (  # (C++ name, C++ type, value, what it is)
    ("kChunk", "int64_t", CHUNK, "entries per offsets chunk"),
    ("kWordBits", "int64_t", WORD_BITS, "entries per int32 mask word"),
    ("kWordsPerChunk", "int64_t", WORDS_PER_CHUNK, "int32 mask words per chunk"),
    ("kKeyBits", "int", KEY_BITS, "bits of a score key"),
    ("kKeyMask", "uint32_t", KEY_MASK, "all key bits"),
    ("kKeySignBit", "uint32_t", KEY_SIGN_BIT, "the fp32 sign bit, set in the key of a non-negative score"),
    ("kNanKey", "uint32_t", NAN_KEY, "the key of a NaN score"),
    *((f"kMix32Shift{i}", "int", s, "shift of mix32") for i, s in enumerate(MIX32_SHIFTS)),
    *((f"kMix32Multiplier{i}", "uint32_t", m, "multiplier of mix32")
      for i, m in enumerate(MIX32_MULTIPLIERS)),
    ("kHashStepSalt", "uint32_t", HASH_STEP_SALT, "hash_key(seed, step) = mix32(seed ^ mix32(step ^ salt))"),
)


_CPP_SIZES = (  # num_words, num_chunks and num_offsets above, in C++
    "constexpr int64_t num_words(int64_t n) { return (n + kWordBits - 1) / kWordBits; }",
    "constexpr int64_t num_chunks(int64_t n) { return (n + kChunk - 1) / kChunk; }",
    "constexpr int64_t num_offsets(int64_t n) { return num_chunks(n) + 1; }",
)

_CPP_SCALAR_TYPES = {"float32": "Float", "float64": "Double", "bfloat16": "BFloat16", "float16": "Half",
                     "int32": "Int", "int64": "Long"}
_CPP_DTYPE_SETS = (("FLOAT_DTYPES", FLOAT_DTYPES), ("SCORE_DTYPES", SCORE_DTYPES),
                   ("MASK_DTYPES", MASK_DTYPES), ("OFFSETS_DTYPES", OFFSETS_DTYPES),
                   ("SCALE_DTYPES", SCALE_DTYPES), ("FISHER_DTYPES", FISHER_DTYPES))


def cpp_header() -> str:
    """The text of ``ssam_contract.h``: this module's constants as ``constexpr`` in namespace ``ssam``."""
    lines = ["// Generated from ssam_kernels/ops/contract.py (cpp_header) at build time; do not edit: change",
             "// contract.py, whose constants the Python backends use too.",
             "#pragma once",
             "",
             "#include <cstdint>",
             "",
             "namespace ssam {",
             ""]
    for name, ctype, value, what in _CPP_CONSTANTS:
        literal = f"0x{value:08X}u" if ctype == "uint32_t" else str(value)
        lines.append(f"constexpr {ctype} {name} = {literal};  // {what}")
    lines += ["", *_CPP_SIZES, "", "}  // namespace ssam", "",
              "// The dtypes of each argument: at::ScalarType names for X-macros (X(Float) X(Double) ...).",
              *(f"#define SSAM_{name}(X) {' '.join(f'X({_CPP_SCALAR_TYPES[d]})' for d in dtypes)}"
                for name, dtypes in _CPP_DTYPE_SETS), ""]
    return "\n".join(lines)


def write_cpp_header(directory: str) -> str:
    """Writes ``ssam_contract.h`` into ``directory`` (created if missing) unless it already holds the same
    text (an unchanged header keeps its time stamp, so nothing recompiles); returns its path."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CPP_HEADER)
    text = cpp_header()
    try:
        with open(path) as f:
            if f.read() == text:
                return path
    except FileNotFoundError:
        pass
    with open(path, "w") as f:
        f.write(text)
    return path
