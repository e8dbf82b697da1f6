"""Straightforward re-computations of the op contract (DESIGN.md), written independently of the code
under test: Python sorting and float64 arithmetic on small inputs."""

from __future__ import annotations

import math

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
# float64 transcriptions of the element-wise formulas: Python floats are IEEE float64 and CPython rounds
# each operation once (never a fused multiply-add), which is the contract's evaluation order.
# ----------------------------------------------------------------------------------------------------

def perturb64(w: list[float], g: list[float], scale: float, adaptive: bool) -> list[float]:
    """``w + scale·g`` (adaptive: ``w + scale·((w·w)·g)``) in float64, each operation rounded once."""
    return [wi + scale * ((wi * wi) * gi if adaptive else gi) for wi, gi in zip(w, g, strict=True)]


def sq_norm64(g: list[float], w: list[float] | None = None) -> float:
    """``Σ (g_i·w_i)²`` (or ``Σ g_i²``): float64 products, summed exactly (``math.fsum``)."""
    terms = [gi * wi for gi, wi in zip(g, w, strict=True)] if w is not None else list(g)
    return math.fsum(t * t for t in terms)


def fisher64(f: list[float], g: list[float], alpha: float) -> torch.Tensor:
    """``f + alpha·(g·g)`` in float64, each operation rounded once, then rounded to fp32."""
    exact = [fi + alpha * (gi * gi) for fi, gi in zip(f, g, strict=True)]
    return torch.tensor(exact, dtype=torch.float64).float()


def as_fp32_values(values: list[float]) -> list[float]:
    """float64 scores as the selection compares them: rounded to nearest fp32."""
    return torch.tensor(values, dtype=torch.float64).float().double().tolist()
