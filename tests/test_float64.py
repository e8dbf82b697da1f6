"""float64 in every op and on every backend available on CPU, against float64 transcriptions
of the formulas (``oracles.perturb64`` etc.), at odd sizes.

The contract for float64 tensors: the perturbation is evaluated in float64 with each operation rounded
once (no fused multiply-add), so every backend gives the transcription's bits; the norm sums in float64
(order differs by backend, so within a relative 1e-12); the Fisher accumulator ``F`` stays float32 (``g``
and ``alpha`` rounded to fp32, one fp32 fused multiply-add: ``oracles.fisher_exact``); selection
compares float64 scores as their nearest fp32 values, ties earliest first.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as nnf

import ssam_kernels as sk
from ssam_kernels import ops
from ssam_kernels.ops import bitmask
from tests.oracles import (
    as_fp32_values,
    dynamic_update_positions,
    fisher_exact,
    perturb64,
    sq_norm64,
    top_k_positions,
)

BACKENDS = [b for b in ops.BACKENDS if ops._unavailable(b, "cpu") is None]
SIZES = [1, 33, 1025, 4099]
backends = pytest.mark.parametrize("backend", BACKENDS)
sizes = pytest.mark.parametrize("n", SIZES)


def _randn64(n: int, seed: int) -> torch.Tensor:
    """float64 values with full 53-bit mantissas (not fp32 values widened) of mixed magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    magnitude = 10.0 ** torch.randint(-3, 4, (n,), generator=gen)
    return torch.randn(n, generator=gen, dtype=torch.float64) * magnitude


def _bits(t: torch.Tensor) -> list[int]:
    return t.view(torch.int64).tolist()


@backends
@sizes
def test_grad_sq_norm(backend: str, n: int) -> None:
    G, W = _randn64(n, 1), _randn64(n, 2)
    for w in (None, W):
        got = ops.grad_sq_norm(G, w, backend=backend)
        want = sq_norm64(G.tolist(), w.tolist() if w is not None else None)
        assert got.dtype == torch.float64
        assert got.item() == pytest.approx(want, rel=1e-12, abs=0)


@backends
@sizes
@pytest.mark.parametrize("sparsity", [None, 0.5])
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("scale_dtype", [torch.float32, torch.float64])
def test_perturb_restore(backend: str, n: int, sparsity: float | None, adaptive: bool,
                         scale_dtype: torch.dtype) -> None:
    W0, G = _randn64(n, 3), _randn64(n, 4)
    # A scale that is not an fp32 value when float64: a float32 rounding of it would change the bits.
    scale = torch.tensor(0.1234567890123, dtype=scale_dtype)
    if sparsity is None:
        mask = offsets = None
        live = list(range(n))
    else:
        bits = torch.rand(n, generator=torch.Generator().manual_seed(n)) >= sparsity
        mask, offsets = bitmask.from_bool(bits)
        live = bits.nonzero().flatten().tolist()
    W = W0.clone()
    backup = torch.full((len(live),), float("nan"), dtype=torch.float64)
    ops.perturb_(W, G, mask, offsets, backup, scale, adaptive, backend=backend)
    want = W0.clone()
    want[live] = torch.tensor(perturb64(W0[live].tolist(), G[live].tolist(), scale.item(), adaptive),
                              dtype=torch.float64)
    assert _bits(W) == _bits(want)
    assert _bits(backup) == _bits(W0[live])
    ops.restore_(W, mask, offsets, backup, backend=backend)
    assert _bits(W) == _bits(W0)


@backends
@sizes
@pytest.mark.parametrize("alpha", [1.0, 0.37, 2.0**-24 + 2.0**-40])
def test_fisher_accumulate(backend: str, n: int, alpha: float) -> None:
    G = _randn64(n, 5)
    F = torch.rand(n, generator=torch.Generator().manual_seed(6))
    want = torch.tensor(fisher_exact(F.tolist(), G.tolist(), alpha), dtype=torch.float32)
    ops.fisher_accumulate_(F, G, alpha, backend=backend)
    assert F.dtype == torch.float32
    assert torch.equal(F.view(torch.int32), want.view(torch.int32))


@backends
def test_fisher_rounds_g_and_alpha_to_fp32_once(backend: str) -> None:
    """The update computes with the fp32 roundings of a float64 ``g`` and of ``alpha`` (the op contract).
    ``g = 1 + 2^-12`` gives ``g² = 1 + 2^-11 + 2^-24``, an fp32 tie that rounds to even (``1 + 2^-11``);
    with ``alpha = 1 + 2^-25`` used unrounded, ``alpha·g²`` is just above the tie (``1 + 2^-11 + 2^-23``),
    and ``g = 1 + 2^-12 + 2^-40`` (float64) used unrounded would be above it too."""
    tie_up = 1.0 + 2.0**-11 + 2.0**-23
    for g, alpha in ((1.0 + 2.0**-12, 1.0 + 2.0**-25), (1.0 + 2.0**-12 + 2.0**-40, 1.0)):
        F, G = torch.zeros(5), torch.full((5,), g, dtype=torch.float64)
        ops.fisher_accumulate_(F, G, alpha, backend=backend)
        assert F.tolist() == [1.0 + 2.0**-11] * 5 != [tie_up] * 5


def _tied64(n: int, seed: int) -> torch.Tensor:
    """float64 scores with ties that exist only after rounding to fp32 (1 and 1 + 2^-40), and exact ties."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randint(-3, 4, (n,), generator=gen).double()
    return base + torch.randint(0, 2, (n,), generator=gen).double() * 2.0**-40


@backends
@sizes
def test_select_topk(backend: str, n: int) -> None:
    scores = [_tied64(n, 7), _tied64(n // 2 + 1, 8)]
    values = as_fp32_values(torch.cat(scores).tolist())
    for k in (0, 1, n // 3, n):
        result = ops.select_topk(scores, k, backend=backend)
        got = torch.cat([bitmask.unpack(w, s.numel()) for (w, _), s in zip(result, scores, strict=True)])
        assert set(got.nonzero().flatten().tolist()) == top_k_positions(values, k)


@backends
@pytest.mark.parametrize("n", [33, 1025])
def test_dynamic_update(backend: str, n: int) -> None:
    live = torch.rand(n, generator=torch.Generator().manual_seed(9)) < 0.5
    drop, grow = _tied64(n, 10), _tied64(n, 11)
    n_drop = int(live.sum()) // 3
    result = ops.dynamic_update([bitmask.pack(live)], [drop], n_drop, [grow], 0, 0, backend=backend)
    got = set(bitmask.unpack(result[0][0], n).nonzero().flatten().tolist())
    want = dynamic_update_positions(set(live.nonzero().flatten().tolist()), as_fp32_values(drop.tolist()),
                                    n_drop, as_fp32_values(grow.tolist()), 0, 0)
    assert got == want


@backends
def test_topk_mask(backend: str) -> None:
    scores = [_tied64(35, 12).view(5, 7), _tied64(1025, 13)]
    masks = sk.topk_mask(scores, 0.75, backend=backend)
    values = as_fp32_values(torch.cat([s.reshape(-1) for s in scores]).tolist())
    k = int(sum(s.numel() for s in scores) * 0.25)
    got = torch.cat([m.reshape(-1) for m in masks]).nonzero().flatten().tolist()
    assert set(got) == top_k_positions(values, k)


@backends
@pytest.mark.parametrize("layout", ["flat", "tensors"])
@pytest.mark.parametrize("method", ["sam", "ssam-f", "ssam-d"])
def test_float64_model_matches_the_transcription(backend: str, layout: str, method: str) -> None:
    """End to end: SAM, SSAM-F and SSAM-D on a float64 model against a float64 transcription of the step
    (``w_adv = w + rho·g⊙m/(‖g‖ + eps)``, ``w ← w − lr·∇L(w_adv)``) with the mask the optimizer reports
    for that step, which must hold exactly K entries. float64 segments get a float64 scale, so only the
    norm's summation order separates the two."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Tanh(), torch.nn.Linear(9, 2)).double()
    weights = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 2, dtype=torch.float64)
    if method == "sam":
        opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, layout=layout, backend=backend)
    else:
        policy = (sk.FisherMask(model, nnf.mse_loss, [(x, y)], num_samples=16, interval=2)
                  if method == "ssam-f" else sk.DynamicMask(interval=2, drop_rate=0.5, seed=3))
        opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.7, mask=policy, lr=0.1,
                      layout=layout, backend=backend)

    def loss_at(ws: list[torch.Tensor]) -> list[torch.Tensor]:
        ws = [w.clone().requires_grad_(True) for w in ws]
        hidden = torch.tanh(nnf.linear(x, ws[0], ws[1]))
        return list(torch.autograd.grad(nnf.mse_loss(nnf.linear(hidden, ws[2], ws[3]), y), ws))

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = nnf.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(5):
        masks = opt.get_mask()
        assert sum(int(m.sum()) for m in masks) == opt.live_count  # exact K, every step
        g = loss_at(weights)
        norm = torch.sqrt(sum((gi * gi).sum() for gi in g))
        g_adv = loss_at([w + 0.05 / (norm + 1e-12) * gi * m
                         for w, gi, m in zip(weights, g, masks, strict=True)])
        weights = [w - 0.1 * gi for w, gi in zip(weights, g_adv, strict=True)]
        opt.step(closure)
        for p, w in zip(model.parameters(), weights, strict=True):
            assert p.dtype == torch.float64
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-14)
