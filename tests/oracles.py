"""Straightforward re-computations of the op contract (DESIGN.md), written independently of the code
under test: Python sorting, float64 arithmetic and exact rational arithmetic on small inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import torch

U32 = 0xFFFFFFFF


def ulp_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Number of representable values between ``a`` and ``b`` (same float dtype), element-wise."""
    int_type = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16,
                torch.bfloat16: torch.int16}[a.dtype]
    bits = torch.finfo(a.dtype).bits

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = x.contiguous().view(int_type).to(torch.int64)
        return torch.where(i < 0, -(i & ((1 << (bits - 1)) - 1)), i)

    return (ordered(a) - ordered(b)).abs()


def _descending(values: list[float], among: list[int]) -> list[int]:
    """``among`` ordered by value, largest first; NaN below every number; ties earliest first."""
    return sorted(among, key=lambda i: (math.isnan(values[i]), 0 if math.isnan(values[i]) else -values[i], i))


def _ascending(values: list[float], among: list[int]) -> list[int]:
    """``among`` ordered by value, smallest first; NaN below every number; ties earliest first."""
    nan = [math.isnan(v) for v in values]
    return sorted(among, key=lambda i: (not nan[i], 0 if nan[i] else values[i], i))


def top_k_positions(values: list[float], k: int) -> set[int]:
    """Positions of the k largest values (DESIGN.md order)."""
    return set(_descending(values, list(range(len(values))))[:k])


def mix32(x: int) -> int:
    x ^= x >> 16
    x = (x * 0x7FEB352D) & U32
    x ^= x >> 15
    x = (x * 0x846CA68B) & U32
    return x ^ (x >> 16)


def growth_hash(seed: int, step: int, j: int) -> int:
    """h(seed, step, j) as documented in ssam_kernels.ops.reference.hash_scores."""
    key = mix32(seed ^ mix32(step ^ 0x9E3779B9))
    return mix32((j & U32) ^ mix32((j >> 32) ^ key))


def dynamic_update_positions(live: set[int], drop: list[float], n_drop: int, grow: list[float] | None,
                             seed: int, step: int, base: int = 0) -> set[int]:
    """The live set after one SSAM-D update over entries 0..N-1 (grow=None means random growth)."""
    dead = [j for j in range(len(drop)) if j not in live]
    dropped = set(_ascending(drop, sorted(live))[:n_drop])
    if grow is None:
        order = sorted(dead, key=lambda j: (-growth_hash(seed, step, base + j), j))
    else:
        order = _descending(grow, dead)
    return (live - dropped) | set(order[:n_drop])


# ----------------------------------------------------------------------------------------------------
# The element-wise formulas. float64 W: Python floats are IEEE float64 and CPython rounds each operation
# once (never a fused multiply-add), which is the contract's evaluation order. fp32/bf16/fp16 W and the
# Fisher update: exact rational arithmetic (fractions.Fraction) rounded by hand, so one correctly rounded
# fused multiply-add is checked against its definition, not against another floating-point evaluation.
# ----------------------------------------------------------------------------------------------------

def perturb64(w: list[float], g: list[float], scale: float, adaptive: bool) -> list[float]:
    """``w + scale·g`` (adaptive: ``w + scale·((w·w)·g)``) in float64, each operation rounded once."""
    return [wi + scale * ((wi * wi) * gi if adaptive else gi) for wi, gi in zip(w, g, strict=True)]


def sq_norm64(g: list[float], w: list[float] | None = None) -> float:
    """``Σ (g_i·w_i)²`` (or ``Σ g_i²``): float64 products, summed exactly (``math.fsum``)."""
    terms = [gi * wi for gi, wi in zip(g, w, strict=True)] if w is not None else list(g)
    return math.fsum(t * t for t in terms)


# (significand bits, smallest normal exponent, largest exponent) of the binary formats.
_FORMATS = {torch.float32: (24, -126, 127), torch.bfloat16: (8, -126, 127), torch.float16: (11, -14, 15)}


def round_exact(x: float | Fraction, dtype: torch.dtype = torch.float32) -> float:
    """``x`` (a float or an exact rational) rounded to nearest, ties to even, in ``dtype`` (fp32, bf16 or
    fp16), as a Python float: subnormals by the format's fixed quantum, ``±inf`` from ``2^(emax+1)`` on
    (a tie with the largest finite value rounds to even, which is the overflow), zeros keep their sign,
    NaN and ``±inf`` pass through."""
    if isinstance(x, float) and (not math.isfinite(x) or x == 0.0):
        return x
    precision, emin, emax = _FORMATS[dtype]
    q = Fraction(x)
    sign, m = (-1.0 if q < 0 else 1.0), abs(q)
    e = m.numerator.bit_length() - m.denominator.bit_length()  # 2^(e-1) < m < 2^(e+1)
    if Fraction(2) ** e > m:
        e -= 1  # now 2^e <= m < 2^(e+1)
    quantum = Fraction(2) ** (max(e, emin) - precision + 1)
    value = round(m / quantum) * quantum  # Fraction.__round__: ties to even
    if value >= Fraction(2) ** (emax + 1):
        return sign * math.inf
    return sign * float(value)  # exact: at most 24 significant bits, exponent within float64's range


def mul_exact(a: float, b: float) -> float:
    """``a·b`` of fp32 values rounded once to fp32."""
    p = a * b  # float64: exact for fp32 inputs, so its specials and the sign of a zero are IEEE's
    return p if not math.isfinite(p) or p == 0.0 else round_exact(Fraction(a) * Fraction(b))


def fma_exact(a: float, b: float, c: float) -> float:
    """``a·b + c`` of fp32 values rounded ONCE to fp32 (IEEE 754 fusedMultiplyAdd, round to nearest)."""
    if not (math.isfinite(a) and math.isfinite(b) and math.isfinite(c)):
        return a * b + c  # NaN / inf rules; a finite a·b cannot overflow float64
    exact = Fraction(a) * Fraction(b) + Fraction(c)
    if exact == 0:
        return a * b + c  # float64 a·b is exact: the sign of the zero sum follows IEEE's rule
    return round_exact(exact)


def perturb_exact(w: list[float], g: list[float], scale: float, adaptive: bool,
                  dtype: torch.dtype) -> list[float]:
    """The contract for fp32/bf16/fp16 ``W`` (values given as Python floats): ``s`` = ``scale`` rounded to
    fp32, ``u = g`` (adaptive: ``rn(rn(w·w)·g)``), ``r = fma(s, u, w)`` rounded once to fp32, then ``r``
    rounded to ``dtype``."""
    s = round_exact(scale)
    out = []
    for wi, gi in zip(w, g, strict=True):
        u = mul_exact(mul_exact(wi, wi), gi) if adaptive else gi
        out.append(round_exact(fma_exact(s, u, wi), dtype))
    return out


def fisher_exact(f: list[float], g: list[float], alpha: float) -> list[float]:
    """The contract's Fisher update of fp32 ``f``: ``fma(g32, rn(alpha32·g32), f)`` with ``g32`` and
    ``alpha32`` the fp32 roundings of ``g`` (any float dtype) and ``alpha``."""
    a = round_exact(alpha)
    out = []
    for fi, gi in zip(f, g, strict=True):
        g32 = round_exact(gi)
        out.append(fma_exact(g32, mul_exact(a, g32), fi))
    return out


def axpby_exact(x: list[float], y: list[float], a: float, b: float, dtype: torch.dtype) -> list[float]:
    """The contract of ``axpby_`` (values given as Python floats). fp32/bf16/fp16 ``X``: ``a``, ``b``
    rounded to fp32, ``r = fma(b, y, rn(a·x))`` rounded once to fp32, then ``r`` rounded to ``dtype``.
    float64 ``X``: ``a·x + b·y`` with Python floats, each operation rounded once (no FMA)."""
    if dtype == torch.float64:
        return [a * xi + b * yi for xi, yi in zip(x, y, strict=True)]
    a32, b32 = round_exact(a), round_exact(b)
    return [round_exact(fma_exact(b32, yi, mul_exact(a32, xi)), dtype) for xi, yi in zip(x, y, strict=True)]


def as_fp32_values(values: list[float]) -> list[float]:
    """float64 scores as the selection compares them: rounded to nearest fp32."""
    return torch.tensor(values, dtype=torch.float64).float().double().tolist()
