"""The element-wise arithmetic of ``perturb_``, ``fisher_accumulate_`` and ``axpby_``, and the summation
order of ``grad_sq_norm``, in device-agnostic PyTorch.

The one PyTorch statement of that part of the op contract (docs/DESIGN.md, "The op contract"), shared by
the ``reference`` and ``vectorized`` backends; the C++/CUDA kernels state it in ``csrc/ssam_math.h``
(``perturbed``, ``fisher_update``, ``axpby``) and ``csrc/cpu/norm.cpp`` (``sq_sum``, the norm's order),
the Triton kernels in ``ops/triton/_math.py``.

- ``perturb_``, ``W`` float32/bfloat16/float16: ``w``, ``g`` as fp32 (exact) and the scale as fp32 (a
  float64 scale rounded to nearest once); ``r = fma(s, g, w)`` (adaptive: ``fma(s, rn(rn(w·w)·g), w)``),
  one correctly rounded fp32 fused multiply-add; ``r`` stored as ``W``'s dtype (round to nearest even).
- ``perturb_``, ``W`` float64: ``w + s·g`` (adaptive: ``w + s·((w·w)·g)``) in float64, each operation
  rounded once, no FMA.
- ``fisher_accumulate_``: ``F = fma(g32, rn(alpha32·g32), F)`` with ``g32 = rn(g)`` and ``alpha32`` the
  fp32 rounding of ``alpha``.
- ``axpby_``, ``X`` float32/bfloat16/float16: ``x``, ``y`` as fp32 (exact), ``a``, ``b`` rounded to nearest
  fp32 once; ``r = fma(b, y, rn(a·x))``, one fp32 product and one fused multiply-add, stored as ``X``'s
  dtype (round to nearest even). ``X`` float64: ``rn(rn(a·x) + rn(b·y))`` in float64, no FMA.

PyTorch has no fused multiply-add, so :func:`fma32` emulates one in float64: the product of two fp32 values
is exact in float64, but rounding the float64 sum to nearest and then to fp32 rounds twice, which is wrong
when the first rounding lands on an fp32 tie. Rounding the float64 sum *to odd* instead (keep it if exact,
else take the neighbour with an odd last bit) carries 29 spare bits into the second rounding, and a round
to odd with at least two extra bits followed by a round to nearest equals one round to nearest (Boldo and
Melquiond, "Emulation of FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE
Trans. Computers 57(4), 2008).

:func:`fma32_fast` gives the same bits cheaper. Where :func:`hardware_fma` finds that PyTorch's own
``addcmul`` rounds once (its AVX2/AVX-512 CPU kernels use the FMA instruction), it is that one op. Else,
where the host reads tensors for free (CPU), the plain double rounding is already correct unless the
float64 sum lands on an fp32 rounding boundary, which it tests for per block with two reductions and
repairs, on the few entries concerned, by :func:`fma32`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from .tuning import DEFAULT, Tuning

HOST_READ_DEVICES = ("cpu",)
"""Device types whose tensors the host reads without synchronising: :func:`fma32_fast` branches on a
reduction there, and runs :func:`fma32` elsewhere."""

_INT64_MIN = -(1 << 63)
_FLT_MIN_BITS = 0x00800000  # fp32 bits of 2^-126


def fma32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``a·b + c`` rounded once to fp32 (what ``std::fma``, ``__fmaf_rn`` and ``tl.fma`` compute): fp32
    ``b`` and ``c`` of one shape, fp32 ``a`` of that shape or 0-d; a new fp32 tensor (inputs unchanged).

    IEEE semantics throughout: subnormal inputs and results, overflow to ``±inf``, NaN for ``0·inf`` or
    ``inf - inf``, and the sign of an exact zero sum as a fused multiply-add gives it.
    """
    c64 = c.double()
    p = a.double() * b.double()  # exact: 48 significant bits, exponents within [-298, 256]
    s = p + c64
    # TwoSum (Knuth), in place: e = (p - t) + (c - (s - t)) with t = s - c, so s + e == p + c exactly,
    # whatever the magnitudes (no overflow below 2^257).
    t = s - c64
    e = p.sub_(t).add_(c64.sub_(t.neg_().add_(s)))
    # Round to odd: truncate (one step toward zero when s went past p + c, i.e. e and s differ in sign),
    # then set the last bit when inexact. s == 0 only if p + c == 0 (both are multiples of 2^-298); e is
    # NaN only when s is not finite, and then ``e.abs() > 0`` is false: nothing moves.
    bits = s.view(torch.int64)
    inexact = e.abs() > 0
    past = ((e.view(torch.int64) ^ bits) < 0) & inexact
    bits.sub_(past.long()).bitwise_or_(inexact.long())
    return s.float()


_HARDWARE_FMA: dict[torch.device, bool] = {}


def hardware_fma(device: torch.device) -> bool:
    """Whether ``torch.addcmul(c, a, b)`` on fp32 tensors of ``device`` gives :func:`fma32`'s bits (NaN
    as NaN), ``a`` 0-d or of ``b``'s shape: probed once per device on the inputs where a multiply then an
    add differ from a fused multiply-add.

    PyTorch does not promise it: its CPU kernels compute ``c + a·b`` with the FMA instruction where the
    build's kernels for the running CPU have one (AVX2, AVX-512; not its ``DEFAULT`` kernels), CUDA's
    compiler contracts it; other devices are unknown. The probe covers every length up to 70 (vector
    remainders), a length past PyTorch's parallel grain (thread splits), subnormal results, overflow,
    signed zeros, infinities and NaN, and random values of which about one in five differs without
    fusion.
    """
    device = torch.device(device)
    found = _HARDWARE_FMA.get(device)
    if found is None:
        found = _HARDWARE_FMA[device] = _probe_addcmul(device)
    return found


def fused_addcmul(device: torch.device, tuning: Tuning) -> bool:
    """Whether the fp32 FMA is one ``torch.addcmul`` on ``device``: :func:`hardware_fma`, unless
    ``tuning.fused_fma`` is off."""
    return tuning.fused_fma and hardware_fma(device)


def reads_host(device: torch.device, tuning: Tuning) -> bool:
    """Whether ops on ``device`` tensors branch on values read on the host (``HOST_READ_DEVICES``),
    unless ``tuning.host_reads`` is off."""
    return tuning.host_reads and device.type in HOST_READ_DEVICES


def _probe_addcmul(device: torch.device) -> bool:
    gen = torch.Generator().manual_seed(0x5EED)
    special = torch.tensor([0.0, -0.0, 2.0**-149, -(2.0**-149), 2.0**-126, 1.0 + 2.0**-12, -(1.0 + 2.0**-12),
                            2.0**-80, 3.0e38, -3.0e38, math.inf, -math.inf, math.nan], dtype=torch.float32)
    combos = torch.cartesian_prod(special, special, special)  # every (a, b, c) of specials
    cases = [tuple(combos.unbind(1))]
    for n in [*range(1, 71), 4099, 3 * 32768 + 37]:
        cases.append(torch.randn(3, n, generator=gen).unbind(0))
    cases.append((torch.randn(3, 4099, generator=gen) * 2.0**-60).unbind(0))  # results around 2^-126
    for a, b, c in cases:
        a, b, c = a.to(device), b.to(device), c.to(device)
        for x in (a, a[:1].reshape(())):  # a tensor and a 0-d first factor
            if not _same(torch.addcmul(c, x, b), fma32(x, b, c)):
                return False
    return True


def _same(x: torch.Tensor, y: torch.Tensor) -> bool:
    nan = torch.isnan(x)
    return bool(torch.equal(nan, torch.isnan(y)) and torch.equal(x.view(torch.int32)[~nan],
                                                                  y.view(torch.int32)[~nan]))


def fma32_fast(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor, workspace: torch.Tensor | None = None,
               tuning: Tuning = DEFAULT) -> torch.Tensor:
    """:func:`fma32` (same arguments, same bits up to NaN payloads), cheaper where :func:`fused_addcmul`
    holds (one ``torch.addcmul``) or where :func:`reads_host` does (as follows).

    ``r = a·b + c`` is rounded once to float64 (the product is exact), then to fp32. Both roundings are
    to nearest and every fp32 midpoint is a float64 number, so the second rounding gives the correctly
    rounded fp32 result unless ``r`` *is* a midpoint (the first rounding may have landed on it from
    either side) or lies below ``2^-126`` (subnormal fp32 grid): then :func:`fma32` recomputes those
    entries. The test costs two reductions: the smallest fp32 magnitude of the result (a result of at
    most ``2^-126`` may come from a tiny ``r``) and the smallest ``bits << 35`` of ``r`` (``INT64_MIN``
    exactly when some entry's low 29 bits are ``1 << 28``); only when one fires are the entries found.

    ``workspace``: None, or a float64 tensor of at least ``3·c.numel()`` entries on ``c``'s device that
    holds the temporaries (no allocation); the result is then a view of it, valid until its next use.
    """
    n = c.numel()
    if n and fused_addcmul(c.device, tuning):
        out = None if workspace is None else workspace[:n].view(torch.float32)[:n]
        return torch.addcmul(c, a, b, out=out)
    if not reads_host(c.device, tuning) or n == 0:
        return fma32(a, b, c)
    if workspace is None:
        workspace = torch.empty(3 * n, dtype=torch.float64, device=c.device)
    r, c64 = workspace[:n], workspace[n: 2 * n]
    out, magnitude = workspace[2 * n: 3 * n].view(torch.float32).split(n)
    # r = a·b + c, in fma32's operand order (a NaN operand's payload propagates the same way).
    torch.mul(c64.copy_(a) if a.dim() else a.double(), r.copy_(b), out=r)
    r += c64.copy_(c)
    out.copy_(r)
    magnitude = torch.bitwise_and(out.view(torch.int32), 0x7FFFFFFF, out=magnitude.view(torch.int32))
    low = torch.bitwise_left_shift(r.view(torch.int64), 35, out=c64.view(torch.int64))  # c64 is spent
    if int(magnitude.min()) <= _FLT_MIN_BITS or int(low.min()) == _INT64_MIN:
        # The boundaries: ties, and non-zero r below 2^-126 (|r| < 2^-126 gives |out| <= 2^-126).
        fix = ((low == _INT64_MIN) | ((magnitude <= _FLT_MIN_BITS) & (r != 0))).nonzero().squeeze(1)
        if fix.numel():
            out[fix] = fma32(a if a.dim() == 0 else a[fix], b[fix], c[fix])
    return out


def perturb_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The scale ``perturb_`` computes with for ``W`` of ``dtype``: float64 for float64 ``W`` (an fp32
    scale widened exactly), else fp32 (a float64 scale rounded to nearest fp32 once)."""
    return scale.to(torch.float64 if dtype == torch.float64 else torch.float32)


def scale_active(scale: torch.Tensor) -> torch.Tensor:
    """Whether the perturbation applies (a bool 0-d tensor, never read on the host): the scale of
    :func:`perturb_scale` is finite and non-zero."""
    return torch.isfinite(scale) & (scale != 0)


Fma = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def perturbed(w: torch.Tensor, g: torch.Tensor, scale: torch.Tensor, adaptive: bool, fma: Fma = fma32
              ) -> torch.Tensor:
    """``w + scale·g`` (adaptive: ``w + scale·((w·w)·g)``) as the op contract computes it, in ``w``'s
    dtype: one fp32 fused multiply-add for fp32/bf16/fp16 ``w``, float64 operations each rounded once for
    float64 ``w`` (module docstring). ``scale`` is the 0-d tensor of :func:`perturb_scale`; ``fma`` is
    :func:`fma32` or :func:`fma32_fast` (the same bits)."""
    if w.dtype == torch.float64:
        return w + scale * (w * w * g if adaptive else g)
    w32, g32 = w.float(), g.float()
    if adaptive:
        g32 = w32 * w32 * g32  # fp32 products, each rounded once
    return fma(scale, g32, w32).to(w.dtype)


def axpby_scales(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``a`` and ``b`` ``axpby_`` computes with for ``X`` of ``dtype``: :func:`perturb_scale` of each
    (float64 for float64 ``X``, else each rounded to nearest fp32 once)."""
    return perturb_scale(a, dtype), perturb_scale(b, dtype)


def axpby(x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, fma: Fma = fma32
          ) -> torch.Tensor:
    """``a·x + b·y`` as the op contract computes it, in ``x``'s dtype (``y`` of the same dtype; ``a``,
    ``b`` the 0-d tensors of :func:`axpby_scales`): fp32/bf16/fp16 ``x``: ``fma(b, y, rn(a·x))`` in fp32,
    one rounded product and one fused multiply-add, then rounded once to ``x``'s dtype (``a = 1`` gives
    ``fma(b, y, x)``, :func:`perturbed`'s dense plain form); float64 ``x``: ``rn(rn(a·x) + rn(b·y))``, no
    FMA. Non-finite values propagate as IEEE arithmetic gives them (``0·inf`` is NaN). ``fma`` as in
    :func:`perturbed`."""
    if x.dtype == torch.float64:
        return a * x + b * y
    x32, y32 = x.float(), y.float()
    return fma(b, y32, a * x32).to(x.dtype)


def fp32_value(x: float) -> float:
    """``x`` rounded to the nearest fp32 value (``±inf`` beyond its range), as a Python float."""
    return torch.tensor(x, dtype=torch.float32).item()


def fisher_updated(f: torch.Tensor, g: torch.Tensor, alpha: float, fma: Fma = fma32) -> torch.Tensor:
    """``f + alpha·g²`` for the fp32 Fisher accumulator ``f``, ``g`` of any float dtype:
    ``fma(g32, rn(alpha32·g32), f)`` with ``g32 = rn(g)`` and ``alpha32`` the fp32 rounding of ``alpha``
    (csrc/ssam_math.h, ``fisher_update``, says why this order); an fp32 tensor. ``fma`` as in
    :func:`perturbed`."""
    g32 = g.float()
    return fma(g32, g32 * fp32_value(alpha), f)


NORM_BLOCK = 1 << 14
"""Entries per block of :func:`sq_norm`: a power of two below the 2^15 entries from which PyTorch's CPU
reductions split one output's sum across threads."""
NORM_CHUNK = 1 << 18
"""Entries :func:`sq_norm` squares per pass (a multiple of ``NORM_BLOCK``): a 2 MiB float64 workspace."""


def sq_norm(G: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ v_i²`` with ``v = g`` (``g · w`` with ``W``), a float64 0-d tensor on ``G``'s device, summed in
    one fixed order, so that the same input on the same device gives the same bits for any number of
    threads: ``v`` and ``v²`` in float64 (each product rounded once); each block of ``NORM_BLOCK`` entries
    (the last one padded with zeros, which add exactly) summed by ``torch.sum`` over the block as one row
    of a ``(blocks, NORM_BLOCK)`` view (PyTorch reduces each row whole on one thread, in an order fixed
    by the row's length: it splits a sum across threads only from 2^15 entries, and a sum of many rows
    by rows); then the blocks' sums, padded with zeros to a power of two, by halves added element by
    element down to one value (single IEEE additions in a fixed pairing). ``torch.dot``, used before,
    sums in MKL's thread-dependent order. The compiled backends sum in their own fixed orders (the native
    CPU kernel in interleaved lanes per block), equal to this one up to float64 rounding."""
    n = G.numel()
    blocks = -(-n // NORM_BLOCK)
    sums = torch.zeros(1 << max(blocks - 1, 0).bit_length(), dtype=torch.float64, device=G.device)
    work = torch.empty(min(NORM_CHUNK, blocks * NORM_BLOCK), dtype=torch.float64, device=G.device)
    for start in range(0, n, NORM_CHUNK):
        stop = min(start + NORM_CHUNK, n)
        rows = work[: -(-(stop - start) // NORM_BLOCK) * NORM_BLOCK]
        v = rows[: stop - start].copy_(G[start:stop])
        if W is not None:
            v.mul_(W[start:stop])
        v.mul_(v)
        rows[stop - start:].zero_()
        first = start // NORM_BLOCK
        torch.sum(rows.view(-1, NORM_BLOCK), dim=1, out=sums[first: first + rows.numel() // NORM_BLOCK])
    width = sums.numel()
    while width > 1:
        width //= 2
        sums[:width].add_(sums[width: 2 * width])
    return sums[0]
