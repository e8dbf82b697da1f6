"""The element-wise arithmetic of the op contract (one correctly rounded fp32 fused multiply-add
instead of float64), against exact rational arithmetic (``oracles.fma_exact`` and friends).

First the PyTorch emulation of the fp32 FMA (``ops._arith.fma32``: float64 product, round-to-odd sum) on
every special value combination, on the inputs where a plain float64 evaluation rounds twice, on
cancellation, subnormals, overflow and random bit patterns; then ``perturb_`` and ``fisher_accumulate_``
of every backend available here on the same kind of inputs, bit for bit.
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssam_kernels import ops
from ssam_kernels.ops import Tuning, _arith, bitmask
from tests.oracles import fisher_exact, fma_exact, perturb64, perturb_exact, round_exact

BACKENDS = [b for b in ops.BACKENDS if ops._unavailable(b, "cpu") is None]
TINY = 2.0**-149  # smallest fp32 subnormal
FLT_MAX = float(torch.finfo(torch.float32).max)
SPECIAL = torch.tensor([0.0, -0.0, TINY, -TINY, 2.0**-126 - TINY, 2.0**-126, -(2.0**-126), 2.0**-75,
                        3 * 2.0**-76, 1.0, -1.0, 1.0 + 2.0**-23, -(1.0 - 2.0**-24), 1.0 + 2.0**-12, 0.1, -3.0,
                        2.0**64, FLT_MAX, -FLT_MAX, math.inf, -math.inf, math.nan],
                       dtype=torch.float32).tolist()
"""fp32 values: signed zeros, subnormals, the normal boundary, values whose products are fp32 ties
(``(1 + 2^-12)² = 1 + 2^-11 + 2^-24``) or land in the subnormal range, the largest finite, inf, NaN."""


def _f32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _assert_bits(got: torch.Tensor, want: list[float], dtype: torch.dtype = torch.float32) -> None:
    """Same bits as ``want`` (every NaN counts as equal to every NaN), first difference reported."""
    want_t = torch.tensor(want, dtype=torch.float64).to(dtype)  # exact: want holds dtype values
    nan = torch.isnan(want_t)
    assert torch.equal(torch.isnan(got), nan)
    int_dtype = {torch.float32: torch.int32, torch.float64: torch.int64}.get(dtype, torch.int16)
    same = got.view(int_dtype) == want_t.view(int_dtype)
    bad = (~same & ~nan).nonzero().flatten()
    assert bad.numel() == 0, f"{bad.numel()} differ, first {int(bad[0])}: {got[bad[0]]} != {want_t[bad[0]]}"


def _check_fma(a: list[float], b: list[float], c: list[float]) -> None:
    """Both emulations, ``fma32`` (round to odd) and ``fma32_fast`` (double rounding with the boundary
    cases repaired; with and without a workspace, and with a 0-d ``a``), against the exact result."""
    want = [fma_exact(x, y, z) for x, y, z in zip(a, b, c, strict=True)]
    A, B, C = _f32(a), _f32(b), _f32(c)
    _assert_bits(_arith.fma32(A, B, C), want)
    paths = [False, True] if _arith.hardware_fma(torch.device("cpu")) else [False]
    for fused in paths:  # the host-checked double rounding, and torch.addcmul where it is an FMA
        tuning = Tuning(fused_fma=fused)
        _assert_bits(_arith.fma32_fast(A, B, C, tuning=tuning), want)
        workspace = torch.empty(3 * len(c) + 5, dtype=torch.float64)
        _assert_bits(_arith.fma32_fast(A, B, C, workspace, tuning), want)
        for x in sorted(set(a), key=str)[:3]:  # a scalar first factor, as perturb_ passes the scale
            only = [i for i, v in enumerate(a) if v == x or (math.isnan(v) and math.isnan(x))]
            if only:
                got = _arith.fma32_fast(torch.tensor(x, dtype=torch.float32), B[only], C[only], tuning=tuning)
                _assert_bits(got, [want[i] for i in only])


def _naive(a: list[float], b: list[float], c: list[float]) -> torch.Tensor:
    """The double-rounding evaluation the emulation replaces: float64 ``a·b + c``, then fp32."""
    return (_f32(a).double() * _f32(b).double() + _f32(c).double()).float()


# ------------------------------------------------------------------------------------------------
# ops._arith.fma32 (the PyTorch emulation)
# ------------------------------------------------------------------------------------------------

def test_fma32_every_combination_of_special_values():
    a, b, c = zip(*itertools.product(SPECIAL, repeat=3), strict=True)
    _check_fma(list(a), list(b), list(c))


def _tie_products(n: int, seed: int) -> tuple[list[float], list[float]]:
    """``(a, b)`` whose exact product is odd with 24 or 25 significant bits, an fp32 tie when 25: ``a``
    odd with 13 and ``b`` odd with 12 significant bits, random exponents."""
    gen = torch.Generator().manual_seed(seed)
    a = ((2 * torch.randint(1 << 11, 1 << 12, (n,), generator=gen) + 1).double() * 2.0**-12
         * 2.0 ** torch.randint(-20, 20, (n,), generator=gen).double())
    b = ((2 * torch.randint(1 << 10, 1 << 11, (n,), generator=gen) + 1).double() * 2.0**-11
         * 2.0 ** torch.randint(-20, 20, (n,), generator=gen).double())
    sign = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double()
    return (a * sign).tolist(), b.tolist()


def test_fma32_ties_broken_by_a_tiny_addend():
    """``a·b`` an fp32 tie and ``c`` far below its last bit: float64 rounds the sum onto the tie, a second
    rounding then goes to even, but the exact sum lies on ``c``'s side of the tie."""
    a, b = _tie_products(4000, 1)
    gen = torch.Generator().manual_seed(2)
    # c: +-2^-k times the product's magnitude, k in [40, 100) (mostly below float64's last bit of the sum)
    scale = torch.tensor([abs(x * y) for x, y in zip(a, b, strict=True)], dtype=torch.float64)
    k = torch.randint(40, 100, (len(a),), generator=gen).double()
    sign = torch.where(torch.rand(len(a), generator=gen) < 0.5, -1.0, 1.0).double()
    c = _f32((sign * scale * 2.0 ** -k).tolist()).tolist()
    _check_fma(a, b, c)
    # The inputs do catch double rounding: the naive evaluation gets a good share of them wrong.
    want = _f32([fma_exact(x, y, z) for x, y, z in zip(a, b, c, strict=True)])
    assert int((_naive(a, b, c) != want).sum()) > len(a) // 10


def test_fma32_classic_double_rounding_case():
    a, b, c = [1.0 + 2.0**-12], [1.0 + 2.0**-12], [2.0**-80]
    assert _naive(a, b, c).item() == 1.0 + 2.0**-11  # float64 lands on the tie, which rounds to even
    assert _arith.fma32(_f32(a), _f32(b), _f32(c)).item() == 1.0 + 2.0**-11 + 2.0**-23
    _check_fma(a, b, [-(2.0**-80)])
    _check_fma(a, b, [TINY])


def test_fma32_cancellation():
    """``c`` cancels the product's fp32 rounding (the result is its exact low part, or zero) or nearly."""
    a, b = _tie_products(2000, 3)
    near = [-round_exact(x * y) for x, y in zip(a, b, strict=True)]
    ulp = [math.ulp(v) * 2.0**29 for v in near]  # fp32 ulp of the rounded product
    for shift in (-2, -1, 0, 1, 2):
        _check_fma(a, b, [v + shift * u for v, u in zip(near, ulp, strict=True)])
    exact_zero = [1.5, -2.0, 0.0]
    _check_fma(exact_zero, [2.0, 3.0, -5.0], [-3.0, 6.0, 0.0])  # +0, +0, -0 + 0 = +0


def test_fma32_subnormal_results_and_ties():
    """Products around the subnormal range, where the fp32 quantum is fixed at 2^-149."""
    gen = torch.Generator().manual_seed(4)
    n = 3000
    a = (torch.randint(1, 1 << 12, (n,), generator=gen).double() * 2.0 ** torch.randint(-90, -60, (n,),
                                                                                        generator=gen)).tolist()
    b = (torch.randint(1, 1 << 12, (n,), generator=gen).double() * 2.0 ** torch.randint(-90, -60, (n,),
                                                                                        generator=gen)).tolist()
    a, b = _f32(a).tolist(), _f32(b).tolist()
    c_choices = [0.0, -0.0, TINY, -TINY, 3 * TINY, 2.0**-126, -(2.0**-127), 2.0**-150 * 3]
    c = [c_choices[i % len(c_choices)] for i in range(n)]
    _check_fma(a, b, _f32(c).tolist())
    _check_fma([TINY, 0.5, 0.5, 1.5], [0.5, TINY, 3 * TINY, TINY], [0.0, -0.0, 0.0, TINY])


def test_fma32_fast_repairs_inexact_boundaries():
    """The cases ``fma32_fast`` must detect: float64 rounds the exact sum onto an fp32 rounding boundary
    from one side, so the naive second rounding goes the wrong way. A midpoint in the normal range
    (tiny addend), a midpoint of the subnormal grid (``a·b = 2^-150 - 2^-190`` on ``(2^22 + 1)·2^-149``)
    and the overflow threshold (``FLT_MAX + 2^103 - 2^59``: below it, so ``FLT_MAX``, not inf)."""
    a = [1.0 + 2.0**-12, 2.0**-75 * (1 + 2.0**-20), 2.0**52 * (1 + 2.0**-22),
         -(1.0 + 2.0**-12), -(2.0**-75) * (1 + 2.0**-20), -(2.0**52) * (1 + 2.0**-22)]
    b = [1.0 + 2.0**-12, 2.0**-75 * (1 - 2.0**-20), 2.0**51 * (1 - 2.0**-22)] * 2
    c = [2.0**-80, 2.0**-127 + 2.0**-149, FLT_MAX, -(2.0**-80), -(2.0**-127 + 2.0**-149), -FLT_MAX]
    assert _f32(a).tolist() == a and _f32(b).tolist() == b and _f32(c).tolist() == c  # fp32 inputs
    want = [fma_exact(x, y, z) for x, y, z in zip(a, b, c, strict=True)]
    assert all(x != y for x, y in zip(_naive(a, b, c).tolist(), want, strict=True))  # naive: all wrong
    assert want[2] == FLT_MAX and want[5] == -FLT_MAX
    _check_fma(a, b, c)
    # Repeated inside large blocks of ordinary values: found wherever they are.
    gen = torch.Generator().manual_seed(9)
    n = 5000
    x, y, z = (torch.randn(n, generator=gen).tolist() for _ in range(3))
    where = torch.randperm(n, generator=gen)[: len(a)].tolist()
    for i, j in enumerate(where):
        x[j], y[j], z[j] = a[i], b[i], c[i]
    _check_fma(x, y, z)


def test_fma32_fast_on_other_devices_is_fma32(monkeypatch):
    """Where a reduction would synchronise with the host and PyTorch's ``addcmul`` is not an FMA,
    ``fma32_fast`` is ``fma32`` itself."""
    calls = []
    monkeypatch.setattr(_arith, "fma32", lambda *args: calls.append(args) or torch.zeros(1))
    other_device = Tuning(host_reads=False, fused_fma=False)
    _arith.fma32_fast(torch.tensor(1.0), _f32([2.0]), _f32([3.0]), tuning=other_device)
    assert len(calls) == 1


def _unfused_addcmul(wrong: Callable[[int], bool]):
    """``torch.addcmul`` that multiplies, rounds and then adds on the calls of ``n`` entries where
    ``wrong(n)`` holds (a kernel without FMA, or with an unfused remainder loop)."""
    addcmul = torch.addcmul

    def fake(c, a, b, *, out=None):
        if wrong(c.numel()):
            return torch.add(c, a * b, out=out)
        return addcmul(c, a, b, out=out)
    return fake


@pytest.mark.parametrize("wrong", [lambda n: True, lambda n: n % 16 == 7, lambda n: n > 50_000],
                         ids=["unfused", "unfused-remainder", "unfused-past-the-parallel-grain"])
def test_hardware_fma_probe_rejects_an_unfused_addcmul(wrong, monkeypatch):
    """The probe says no to ``addcmul`` kernels that round the product, wherever they do it."""
    if not _arith.hardware_fma(torch.device("cpu")):
        pytest.skip("this CPU's addcmul is not an FMA: nothing to break")
    monkeypatch.setattr(torch, "addcmul", _unfused_addcmul(wrong))
    assert not _arith._probe_addcmul(torch.device("cpu"))


def test_hardware_fma_probe_tells_the_truth_under_each_cpu_capability():
    """Under PyTorch's ``DEFAULT`` CPU kernels (no FMA instruction) and the machine's best ones, the
    probe agrees with a direct comparison of ``addcmul`` and ``fma32`` on a million random triples, in a
    fresh process (the capability is chosen at start-up)."""
    code = ("import torch\nfrom ssam_kernels.ops import _arith\ng = torch.Generator().manual_seed(7)\n"
            "a, b, c = torch.randn(3, 1 << 20, generator=g).unbind(0)\n"
            "fused = torch.equal(torch.addcmul(c, a, b), _arith.fma32(a, b, c))\n"
            "print(torch.backends.cpu.get_cpu_capability(), fused, _arith.hardware_fma(torch.device('cpu')))")
    for capability in ("DEFAULT", None):
        env = {k: v for k, v in os.environ.items() if k != "ATEN_CPU_CAPABILITY"}
        if capability:
            env["ATEN_CPU_CAPABILITY"] = capability.lower()
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                             check=True).stdout.split()
        assert out[1] == out[2], f"capability {out[0]}: addcmul fused {out[1]}, probe says {out[2]}"


def test_fma32_overflow():
    big = [FLT_MAX, FLT_MAX, FLT_MAX, -FLT_MAX, 2.0**100, 2.0**64, FLT_MAX]
    other = [1.0 + 2.0**-23, 1.0, 1.0, 1.0, 2.0**40, 2.0**64, 2.0]
    # FLT_MAX + half its ulp is the tie with 2^128: it rounds to even, i.e. overflows to inf.
    add = [0.0, 2.0**103, 2.0**103 - 2.0**80, -(2.0**103), -FLT_MAX, -FLT_MAX, -FLT_MAX]
    _check_fma(big, other, add)
    got = _arith.fma32(_f32(big), _f32(other), _f32(add)).tolist()
    assert got[:4] == [math.inf, math.inf, FLT_MAX, -math.inf]


def test_fma32_random_bit_patterns():
    """Uniformly random fp32 bit patterns (every exponent, subnormals, inf and NaN) and random values of
    nearby magnitudes (cancellation)."""
    gen = torch.Generator().manual_seed(5)
    n = 20_000
    a, b, c = (torch.randint(-(1 << 31), 1 << 31, (n,), generator=gen, dtype=torch.int64).to(torch.int32)
               .view(torch.float32).tolist() for _ in range(3))
    _check_fma(a, b, c)
    x, y = torch.randn(n, generator=gen).tolist(), torch.randn(n, generator=gen).tolist()
    z = _f32([-(p * q) * (1 + e) for p, q, e in
              zip(x, y, (torch.randn(n, generator=gen) * 1e-6).tolist(), strict=True)]).tolist()
    _check_fma(x, y, z)


@given(st.floats(width=32), st.floats(width=32), st.floats(width=32))
def test_fma32_hypothesis(a: float, b: float, c: float):
    _check_fma([a], [b], [c])


def test_fma32_broadcasts_a_scalar():
    got = _arith.fma32(torch.tensor(1.0 + 2.0**-12), _f32([1.0 + 2.0**-12, 2.0]), _f32([2.0**-80, 1.0]))
    assert got.tolist() == [1.0 + 2.0**-11 + 2.0**-23, 3.0 + 2.0**-11]


# ------------------------------------------------------------------------------------------------
# perturb_ and fisher_accumulate_ of every backend, bit for bit
# ------------------------------------------------------------------------------------------------

def _adversarial(dtype: torch.dtype, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W, G)`` of ``dtype``: fp32 tie products with tiny ``w`` (``scale = 1 + 2^-12`` times a 12-bit
    ``g``), cancellation (``w ≈ -scale·g``), random bit patterns, and the special values."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randint(1 << 11, 1 << 12, (n,), generator=gen).double() * 2.0 ** torch.randint(
        -20, 8, (n,), generator=gen).double()
    w = torch.where(torch.rand(n, generator=gen) < 0.5, -1.0, 1.0).double() * g * 2.0 ** -torch.randint(
        26, 60, (n,), generator=gen).double()
    cancel = n // 4
    w[:cancel] = -g[:cancel] * (1.0 + 2.0**-12) * (1 + torch.randn(cancel, generator=gen).double() * 1e-6)
    bits = torch.randint(-(1 << 31), 1 << 31, (n // 4,), generator=gen, dtype=torch.int64).to(torch.int32)
    w[-n // 4:] = bits.view(torch.float32).double()
    g[-n // 4:] = torch.randint(-(1 << 31), 1 << 31, (n // 4,), generator=gen, dtype=torch.int64).to(
        torch.int32).view(torch.float32).double()
    special = torch.tensor(SPECIAL, dtype=torch.float64)
    pairs = torch.tensor(list(itertools.product(SPECIAL, repeat=2)), dtype=torch.float64)
    W = torch.cat([w, pairs[:, 0], special]).to(dtype)
    G = torch.cat([g, pairs[:, 1], special.flip(0)]).to(dtype)
    return W, G


def _expected_perturb(W0: torch.Tensor, G: torch.Tensor, live: list[int], scale: torch.Tensor,
                      adaptive: bool) -> torch.Tensor:
    want = W0.clone()
    w, g = W0[live].double().tolist(), G[live].double().tolist()
    if W0.dtype == torch.float64:
        new = perturb64(w, g, scale.item(), adaptive)
    else:
        new = perturb_exact(w, g, scale.item(), adaptive, W0.dtype)
    want[live] = torch.tensor(new, dtype=torch.float64).to(W0.dtype)
    return want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_perturb_matches_the_exact_contract(backend, dtype, adaptive, masked):
    W0, G = _adversarial(dtype, 1500, 6)
    n = W0.numel()
    live = torch.rand(n, generator=torch.Generator().manual_seed(7)) < (0.6 if masked else 1.0)
    mask, offsets = bitmask.from_bool(live) if masked else (None, None)
    positions = live.nonzero().flatten().tolist()
    for scale in (torch.tensor(1.0 + 2.0**-12), torch.tensor(-0.37, dtype=torch.float64)):
        W = W0.clone()
        backup = torch.full((len(positions),), math.nan, dtype=dtype)
        ops.perturb_(W, G, mask, offsets, backup, scale, adaptive, backend=backend)
        _assert_bits(W, _expected_perturb(W0, G, positions, scale, adaptive).double().tolist(), dtype)
        assert torch.equal(backup.view(torch.uint8), W0[positions].view(torch.uint8))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [1e-50, 1e300, -1e39])
def test_perturb_float64_scale_rounds_to_fp32_before_the_activity_test(backend, scale):
    """A float64 scale with an fp32 ``W`` is rounded to fp32 first: ``1e-50`` becomes 0 and ``1e300`` inf,
    so ``W`` stays as it is (``-0.0`` too, and ``g = inf`` gives no NaN), while a float64 ``W`` uses it."""
    W0 = torch.tensor([-0.0, 1.0, 2.0, 3.0])
    G = torch.tensor([1.0, math.inf, 1.0, -1.0])
    W, backup = W0.clone(), torch.empty(4)
    ops.perturb_(W, G, None, None, backup, torch.tensor(scale, dtype=torch.float64), backend=backend)
    assert torch.equal(W.view(torch.int32), W0.view(torch.int32))
    W64 = W0.double()
    ops.perturb_(W64, G.double(), None, None, backup.double(), torch.tensor(scale, dtype=torch.float64),
                 backend=backend)
    assert W64[2].item() == 2.0 + scale


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("alpha", [1.0, 0.37, 2.0**-3, 1.0 + 2.0**-25, 1e-45, 1e39])
def test_fisher_matches_the_exact_contract(backend, dtype, alpha):
    F0, G = _adversarial(dtype, 1500, 8)
    F0 = F0.float().abs()  # an accumulator of squares; keeps its subnormals, inf and NaN
    if dtype == torch.float64:  # float64 G: values off the fp32 grid, rounded to fp32 first
        G = G * (1 + 2.0**-40)
    F = F0.clone()
    ops.fisher_accumulate_(F, G, alpha, backend=backend)
    _assert_bits(F, fisher_exact(F0.tolist(), G.tolist(), alpha))
