"""Exact float conversions on bit patterns, shared by the kernels.

Triton's interpreter converts bf16 imprecisely (bf16→fp32 mangles subnormals, fp32→bf16 truncates).
These helpers do the conversions with integer arithmetic, which means the same on a GPU (where they
equal the hardware conversions) and in the interpreter, so CPU tests check the arithmetic the GPU runs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def to_float32(x):
    """``x`` (fp32, bf16 or fp16) as fp32, exactly; fp64 rounded to nearest. bf16 is the top half of an
    fp32 pattern."""
    if x.dtype == tl.bfloat16:
        return (x.to(tl.uint16, bitcast=True).to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    return x.to(tl.float32)


@triton.jit
def to_float64(x):
    """``x`` (fp32, fp64, bf16 or fp16) as fp64, exactly (fp64 as is, never through fp32)."""
    if x.dtype == tl.float64:
        return x
    return to_float32(x).to(tl.float64)


@triton.jit
def round_to(x, dtype: tl.constexpr):
    """fp32 ``x`` rounded to nearest-even in ``dtype`` (fp32, bf16 or fp16).

    bf16: add ``0x7FFF`` plus the lowest kept bit and drop 16 bits; a carry correctly reaches the
    exponent (up to inf). NaN becomes the quiet NaN ``0x7FC0``.
    """
    if dtype == tl.bfloat16:
        b = x.to(tl.uint32, bitcast=True)
        rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).to(tl.uint16)
        rounded = tl.where(x != x, tl.full(rounded.shape, 0x7FC0, tl.uint16), rounded)
        return rounded.to(tl.bfloat16, bitcast=True)
    return x.to(dtype)
