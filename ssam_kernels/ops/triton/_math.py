"""The element-wise arithmetic of ``perturb_``, ``fisher_accumulate_`` and ``axpby_`` for the Triton
kernels.

The Triton statement of the op contract's arithmetic (docs/DESIGN.md, "The op contract"; the same as
``csrc/ssam_math.h`` and ``ops/_arith.py``): one correctly rounded fp32 fused multiply-add per entry,
``tl.fma`` (``fma.rn.f32`` on a GPU; the interpreter computes it with one rounding too), for every dtype
but float64 ``W``, which keeps float64 operations each rounded once. Launches pass
``enable_fp_fusion=False`` (:func:`._config.launch_options`), so no other multiply and add is fused.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._convert import round_to, to_float32

_FLT_MAX = tl.constexpr(3.4028234663852886e38)  # largest finite fp32
_DBL_MAX = tl.constexpr(1.7976931348623157e308)  # largest finite float64


@triton.jit
def load_scale(scale_ptr, dtype: tl.constexpr):
    """``(scale, active)``: the scale ``perturb_`` computes with for ``W`` of ``dtype`` (float64 for float64
    ``W``, else fp32: a float64 scale rounded to nearest once) and whether it is finite and non-zero."""
    # One return after a constexpr if/else: the compiler visits only the branch taken, but every return.
    if dtype == tl.float64:
        scale = tl.load(scale_ptr).to(tl.float64)
        largest = _DBL_MAX
    else:
        scale = tl.load(scale_ptr).to(tl.float32)
        largest = _FLT_MAX
    # NaN fails every comparison and ±inf exceeds the largest finite value.
    return scale, (tl.abs(scale) <= largest) & (scale != 0.0)


@triton.jit
def perturbed(w, g, scale, ADAPTIVE: tl.constexpr):
    """``w + scale·g`` (``ADAPTIVE``: ``w + scale·((w·w)·g)``) in ``w``'s dtype: ``fma(scale, g, w)`` in
    fp32 (``g`` replaced by ``rn(rn(w·w)·g)`` when adaptive), rounded to nearest even in ``w``'s dtype;
    float64 ``w``: float64 operations, each rounded once. ``scale`` as :func:`load_scale` gives it."""
    if w.dtype == tl.float64:
        if ADAPTIVE:
            g = w * w * g
        result = w + scale * g
    else:
        w32 = to_float32(w)
        g32 = to_float32(g)
        if ADAPTIVE:
            g32 = w32 * w32 * g32
        result = round_to(tl.fma(scale, g32, w32), w.dtype)
    return result


@triton.jit
def fisher_updated(f, g, alpha):
    """``f + alpha·g²`` of the fp32 accumulator ``f``: ``fma(g32, rn(alpha·g32), f)`` with ``g32`` the
    fp32 rounding of ``g`` (any float dtype) and ``alpha`` fp32 (csrc/ssam_math.h, ``fisher_update``)."""
    g32 = to_float32(g)
    return tl.fma(g32, alpha * g32, f)


@triton.jit
def axpby(x, y, a, b):
    """``a·x + b·y`` in ``x``'s dtype (``y`` of the same dtype; ``a``, ``b`` as :func:`load_scale` gives
    them): ``fma(b, y, rn(a·x))`` in fp32, rounded to nearest even in ``x``'s dtype; float64 ``x``:
    ``rn(rn(a·x) + rn(b·y))`` (csrc/ssam_math.h, ``axpby``)."""
    if x.dtype == tl.float64:
        result = a * x + b * y
    else:
        result = round_to(tl.fma(b, to_float32(y), a * to_float32(x)), x.dtype)
    return result
