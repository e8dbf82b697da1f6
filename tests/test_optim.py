"""SSAM / SAM optimizer semantics against float64 re-computations written here (DESIGN.md, "Testing").

Every expected value below is computed in this file (float64 autograd on a float64 copy of the model,
Python sorting for selections); the optimizer is never its own oracle.
"""

from __future__ import annotations

import copy
import decimal
import io
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ssam_kernels import SAM, SSAM, DynamicMask, FisherMask, RandomMask, topk_mask
from tests.helpers import assert_same, backward, batch, loss_fn, train, weights
from tests.helpers import build_optimizer as build
from tests.helpers import seeded_mlp as make_model

EPS = 1e-12


# ----------------------------------------------------------------------------------------------------
# Helpers: tiny models, data, float64 re-computations
# ----------------------------------------------------------------------------------------------------

def params64(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().double().clone() for p in model.parameters()]


def grads64(model: nn.Module, weights: list[torch.Tensor], x, y) -> list[torch.Tensor]:
    """Gradient of the loss in float64 at ``weights`` (a float64 copy of ``model``)."""
    m64 = copy.deepcopy(model).double()
    with torch.no_grad():
        for p, w in zip(m64.parameters(), weights, strict=True):
            p.copy_(w)
    loss = nn.functional.cross_entropy(m64(x.double()), y)
    return [g.detach() for g in torch.autograd.grad(loss, list(m64.parameters()))]


def fisher64(model: nn.Module, samples) -> list[torch.Tensor]:
    """Σ_i (∂ℓ(x_i, y_i)/∂w)² in float64, one sample at a time."""
    w = params64(model)
    total = [torch.zeros_like(t) for t in w]
    for x, y in samples:
        for i in range(x.shape[0]):
            for acc, g in zip(total, grads64(model, w, x[i:i + 1], y[i:i + 1]), strict=True):
                acc += g * g
    return total


def perturbation64(w, g, groups, masks=None):
    """e per parameter. ``groups``: list of (param indices, rho, adaptive, perturb)."""
    total = 0.0
    for idx, _rho, adaptive, perturb in groups:
        if perturb:
            for i in idx:
                total += float(((g[i] * w[i].abs()) if adaptive else g[i]).pow(2).sum())
    norm = math.sqrt(total)
    e = [torch.zeros_like(t) for t in w]
    for idx, rho, adaptive, perturb in groups:
        if not perturb:
            continue
        for i in idx:
            d = w[i] * w[i] * g[i] if adaptive else g[i]
            e[i] = rho * d / (norm + EPS)
            if masks is not None:
                e[i] = e[i] * masks[i].double()
    return e


def ref_k(n: int, sparsity: float) -> int:
    """``floor(n · (1 − s))`` in decimal arithmetic, ``s`` read as the decimal it prints as."""
    with decimal.localcontext(decimal.Context(prec=2000)):
        exact = decimal.Decimal(n) * (1 - decimal.Decimal(str(sparsity)))
        return int(exact.to_integral_value(rounding=decimal.ROUND_FLOOR))


def flat(ts) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def ref_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the k largest (NaN lowest), ties earliest first: Python sort."""
    vals = scores.double().tolist()
    def key(i):
        return (math.isnan(vals[i]), 0 if math.isnan(vals[i]) else -vals[i], i)

    order = sorted(range(len(vals)), key=key)
    out = torch.zeros(len(vals), dtype=torch.bool)
    out[order[:k]] = True
    return out


def assert_topk_of(mask: torch.Tensor, scores64: torch.Tensor, k: int, rtol: float = 1e-4) -> None:
    """``mask`` is a top-k of ``scores64`` up to fp32-vs-fp64 near-ties; exact ties in entry order."""
    assert int(mask.sum()) == k
    if k == 0:
        return
    t = scores64.sort(descending=True).values[k - 1].item()
    hi, lo = t + rtol * abs(t), t - rtol * abs(t)
    assert mask[scores64 > hi].all(), "an entry clearly above the k-th score was left out"
    assert not mask[scores64 < lo].any(), "an entry clearly below the k-th score was selected"
    exact = scores64 == t
    if t == 0 and exact.any():  # exact ties (zeros are exact in any precision): earliest first
        need = k - int((scores64 > 0).sum())
        first = exact.nonzero().flatten()[:need]
        assert mask[first].all() and int(mask[exact].sum()) == need


def mask_count(opt) -> int:
    return int(sum(int(m.sum()) for m in opt.get_mask()))


# ----------------------------------------------------------------------------------------------------
# SAM / ASAM against the formulas
# ----------------------------------------------------------------------------------------------------

def sgd64(w, g, buf, lr, momentum=0.0, weight_decay=0.0):
    out, new_buf = [], []
    for wi, gi, bi in zip(w, g, buf, strict=True):
        d = gi + weight_decay * wi
        if momentum:
            d = d.clone() if bi is None else momentum * bi + d
            new_buf.append(d)
        else:
            new_buf.append(None)
        out.append(wi - lr * d)
    return out, new_buf


GROUPINGS = {
    # (param index groups, rho, adaptive, perturb); model params: W1, b1, W2, b2
    "single": [([0, 1, 2, 3], 0.05, False, True)],
    "asam": [([0, 1, 2, 3], 0.5, True, True)],
    "per_group": [([0, 2], 0.1, False, True), ([1], 0.02, True, True), ([3], 0.3, False, False)],
}


@pytest.mark.parametrize("layout", ["flat", "tensors"])
@pytest.mark.parametrize("grouping", list(GROUPINGS))
@pytest.mark.parametrize("base", ["sgd", "momentum_wd"])
def test_sam_cycle_matches_float64(layout, grouping, base):
    model = make_model(1)
    ps = list(model.parameters())
    spec = GROUPINGS[grouping]
    groups = [{"params": [ps[i] for i in idx], "rho": rho, "adaptive": ad, "perturb": pt}
              for idx, rho, ad, pt in spec]
    kw = {"lr": 0.1} if base == "sgd" else {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01}
    opt = SAM(groups, torch.optim.SGD, rho=0.7, layout=layout, **kw)
    buf = [None] * 4
    for step in range(3):
        x, y = batch(step)
        w = params64(model)
        w32 = weights(model)
        g = grads64(model, w, x, y)
        e = perturbation64(w, g, spec)
        backward(model, x, y)
        opt.first_step(zero_grad=True)
        # the perturbed point: fp32 rounding of w + e; perturb=False params bit-identical
        for i, p in enumerate(model.parameters()):
            torch.testing.assert_close(p.detach().double(), w[i] + e[i], rtol=2e-7, atol=1e-8)
            if any(i in idx and not pt for idx, _, _, pt in spec):
                assert torch.equal(p.detach(), w32[i])
        g2 = grads64(model, [wi + ei for wi, ei in zip(w, e, strict=True)], x, y)
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        expected, buf = sgd64(w, g2, buf, **kw)
        for p, ref in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach().double(), ref, rtol=2e-5, atol=2e-6)
        assert opt.steps == step + 1


def test_perturb_false_not_in_norm():
    """A perturb=False group with a huge gradient must not shrink the others' perturbation."""
    model = make_model(2)
    ps = list(model.parameters())
    opt = SAM([{"params": ps[:3]}, {"params": ps[3:], "perturb": False}], torch.optim.SGD, rho=0.05, lr=0.0)
    x, y = batch(0)
    backward(model, x, y)
    ps[3].grad.fill_(1e6)
    w = params64(model)
    g = [p.grad.double().clone() for p in ps]
    e = perturbation64(w, g, [([0, 1, 2], 0.05, False, True), ([3], 0.05, False, False)])
    opt.first_step()
    now = flat([p.detach().double() for p in ps[:3]])
    torch.testing.assert_close(now, flat(w[:3]) + flat(e[:3]), rtol=2e-7, atol=1e-9)
    assert (now - flat(w[:3])).norm().item() == pytest.approx(0.05, rel=1e-4)
    assert torch.equal(ps[3].detach().double(), w[3])


# ----------------------------------------------------------------------------------------------------
# SSAM with a mask
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "tensors"])
@pytest.mark.parametrize("policy", ["random", "dynamic"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_ssam_masked_cycle(layout, policy, adaptive):
    model = make_model(3)
    sparsity = 0.7
    mask_policy = RandomMask(seed=5) if policy == "random" else DynamicMask(interval=2, seed=5)
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.3, sparsity=sparsity, mask=mask_policy,
               adaptive=adaptive, layout=layout, lr=0.05, momentum=0.5)
    n = sum(p.numel() for p in model.parameters())
    buf = [None] * 4
    for step in range(4):
        x, y = batch(step)
        masks = [m.clone() for m in opt.get_mask()]
        assert sum(int(m.sum()) for m in masks) == ref_k(n, sparsity)
        w32 = weights(model)
        w = params64(model)
        backward(model, x, y)
        g = [p.grad.double().clone() for p in model.parameters()]  # the unmasked gradient at w
        e = perturbation64(w, g, [([0, 1, 2, 3], 0.3, adaptive, True)], masks)
        opt.first_step(zero_grad=True)
        for p, w0, wi, ei, m in zip(model.parameters(), w32, w, e, masks, strict=True):
            now = p.detach()
            assert torch.equal(now[~m], w0[~m]), "an unmasked entry moved"
            torch.testing.assert_close(now.double()[m], (wi + ei)[m], rtol=2e-7, atol=1e-9)
            big = m & ((ei.abs() / wi.abs().clamp_min(1e-30)) > 1e-6)
            assert (now[big] != w0[big]).all(), "a masked entry with a real perturbation did not move"
        g2 = grads64(model, [wi + ei for wi, ei in zip(w, e, strict=True)], x, y)
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        expected, buf = sgd64(w, g2, buf, lr=0.05, momentum=0.5)
        for p, ref in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach().double(), ref, rtol=2e-5, atol=2e-6)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 40), min_size=1, max_size=4),
       sparsity=st.floats(0.0, 1.0), frozen=st.integers(0, 3), seed=st.integers(0, 2**32 - 1))
def test_ssam_exact_k_random_shapes(sizes, sparsity, frozen, seed):
    params = [nn.Parameter(torch.randn(s)) for s in sizes]
    extra = nn.Parameter(torch.randn(frozen + 1))  # a perturb=False group: not counted in N
    opt = SSAM([{"params": params}, {"params": [extra], "perturb": False}], torch.optim.SGD,
               sparsity=sparsity, mask=RandomMask(seed=seed), lr=0.1)
    n = sum(sizes)
    masks = opt.get_mask()
    assert sum(int(m.sum()) for m in masks[:-1]) == ref_k(n, sparsity)
    assert not masks[-1].any()
    before = [p.detach().clone() for p in params] + [extra.detach().clone()]
    for p in [*params, extra]:
        p.grad = torch.randn_like(p)
    w = [p.detach().double() for p in [*params, extra]]
    g = [p.grad.double() for p in [*params, extra]]
    spec = [(list(range(len(params))), 0.05, False, True), ([len(params)], 0.05, False, False)]
    e = perturbation64(w, g, spec, masks)
    opt.first_step()
    for p, b, m, wi, ei in zip([*params, extra], before, masks, w, e, strict=True):
        assert torch.equal(p.detach()[~m], b[~m])
        torch.testing.assert_close(p.detach().double()[m], (wi + ei)[m], rtol=2e-7, atol=1e-8)
    opt.unperturb()
    assert_same([p.detach() for p in [*params, extra]], before)


# ----------------------------------------------------------------------------------------------------
# SSAM-F
# ----------------------------------------------------------------------------------------------------

class SwappableData:
    """An iterable whose content the test replaces; counts how often it is read."""

    def __init__(self, batches):
        self.batches, self.reads = batches, 0

    def __iter__(self):
        self.reads += 1
        return iter(self.batches)


def test_fisher_initial_mask_is_topk_of_float64_fisher():
    model = make_model(4)
    data = [batch(100, n=6)]
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.6,
               mask=FisherMask(model, loss_fn, data, num_samples=6), lr=0.1)
    n = sum(p.numel() for p in model.parameters())
    k = ref_k(n, 0.6)
    fisher = flat(fisher64(model, data))
    assert_topk_of(flat(opt.get_mask()), fisher, k)


def test_fisher_ties_in_entry_order():
    """Inputs with zero columns give weight entries with exactly zero Fisher: with k above the
    non-zero count, the zero-score ties are taken earliest first (DESIGN.md)."""
    model = make_model(5)
    x, y = batch(101, n=4)
    x[:, 1:4] = 0.0
    data = [(x, y)]
    fisher = flat(fisher64(model, data))
    nonzero = int((fisher > 0).sum())
    n = fisher.numel()
    sparsity = 1 - (nonzero + 5.5) / n
    k = ref_k(n, sparsity)
    assert k == nonzero + 5 and (fisher == 0).sum() > 5
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=sparsity,
               mask=FisherMask(model, loss_fn, data, num_samples=4), lr=0.1)
    mask = flat(opt.get_mask())
    assert torch.equal(mask, ref_topk(fisher, k))


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_fisher_refresh_schedule(layout):
    model = make_model(6)
    data = SwappableData([batch(200, n=4)])
    interval = 3
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, layout=layout,
               mask=FisherMask(model, loss_fn, data, num_samples=4, interval=interval), lr=0.2)
    k = opt.live_count
    current = flat(opt.get_mask())
    assert_topk_of(current, flat(fisher64(model, data.batches)), k)
    reads, changes = data.reads, 0
    for step in range(1, 10):
        data.batches = [batch(200 + step, n=4)]  # new Fisher data each step
        x, y = batch(step)
        backward(model, x, y)
        opt.first_step(zero_grad=True)
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        now = flat(opt.get_mask())
        if step % interval == 0:
            assert data.reads == reads + 1, f"no Fisher pass after step {step}"
            assert_topk_of(now, flat(fisher64(model, data.batches)), k)  # at the weights after the step
            changes += int(not torch.equal(now, current))
        else:
            assert data.reads == reads, f"a Fisher pass after step {step}"
            assert torch.equal(now, current), f"mask changed after step {step}"
        reads, current = data.reads, now
    assert changes >= 1  # the data changed, so the refreshed masks did too


def test_fisher_initial_zeros():
    model = make_model(7)
    data = [batch(300, n=4)]
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5,
               mask=FisherMask(model, loss_fn, data, num_samples=4, interval=2, initial="zeros"), lr=0.0)
    assert mask_count(opt) == 0
    for step in range(2):
        x, y = batch(step)
        backward(model, x, y)
        before = weights(model)
        opt.first_step(zero_grad=True)
        assert_same(weights(model), before)  # unperturbed first steps
        backward(model, x, y)
        opt.second_step(zero_grad=True)
    assert mask_count(opt) == opt.live_count
    assert_topk_of(flat(opt.get_mask()), flat(fisher64(model, data)), opt.live_count)
    x, y = batch(5)
    backward(model, x, y)
    before = weights(model)
    opt.first_step()
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), before, strict=True))


# ----------------------------------------------------------------------------------------------------
# SSAM-D
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_dynamic_update_semantics(layout):
    model = make_model(8, sizes=(6, 5, 4))
    total, interval, drop_rate = 12, 2, 0.6
    policy = DynamicMask(interval=interval, drop_rate=drop_rate, total_steps=total, seed=11)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.6, mask=policy, layout=layout, lr=0.1)
    n = sum(p.numel() for p in model.parameters())
    k = ref_k(n, 0.6)
    mask = flat(opt.get_mask())
    assert int(mask.sum()) == k
    updates = 0
    for t in range(1, total + 1):
        x, y = batch(t, d_in=6, classes=4)
        backward(model, x, y)
        g_abs = flat([p.grad.detach().abs() for p in model.parameters()]).double()
        w_before = weights(model)
        opt.first_step(zero_grad=True)
        changed = flat(weights(model)) != flat(w_before)
        assert not (changed & ~mask).any(), "the update step perturbed with the new mask"
        backward(model, x, y)
        if t % 4 < 2:  # restored bit-exactly with the mask it used, by unperturb() ...
            opt.unperturb()
            assert_same(weights(model), w_before)
            expected = None
        else:  # ... or inside second_step: then the plain-SGD step from the restored w, in fp32
            expected = [w.add(p.grad, alpha=-0.1) for w, p in zip(w_before, model.parameters(), strict=True)]
        opt.second_step(zero_grad=True)
        if expected is not None:
            assert_same(weights(model), expected)
        new = flat(opt.get_mask())
        assert int(new.sum()) == k
        if t % interval == 0:
            n_drop = math.floor(drop_rate * (1 + math.cos(math.pi * t / total)) / 2 * k)
            dropped, grown = mask & ~new, new & ~mask
            assert int(dropped.sum()) == n_drop and int(grown.sum()) == n_drop
            live = mask.nonzero().flatten().tolist()
            smallest = sorted(live, key=lambda i: (g_abs[i].item(), i))[:n_drop]
            expect = torch.zeros(n, dtype=torch.bool)
            expect[smallest] = True
            assert torch.equal(dropped, expect)
            assert not (grown & mask).any()  # grown entries were dead before
            updates += n_drop > 0
        else:
            assert torch.equal(new, mask)
        mask = new
    assert updates >= 3


def test_dynamic_rate_schedule():
    p = DynamicMask(interval=1, drop_rate=0.5, total_steps=10)
    for t in [0, 1, 5, 9, 10, 15]:
        assert p.rate(t) == pytest.approx(0.5 * (1 + math.cos(math.pi * min(t, 10) / 10)) / 2)
    assert DynamicMask(drop_rate=0.3).rate(1000) == 0.3


# ----------------------------------------------------------------------------------------------------
# Exact resume
# ----------------------------------------------------------------------------------------------------

def save(model, opt) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    return buf.getvalue()


def restore(kind, blob, layout="flat"):
    state = torch.load(io.BytesIO(blob), weights_only=False)
    model = make_model(99)  # different initial weights: all must come from the checkpoint
    opt = build(kind, model, layout)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    return model, opt


@pytest.mark.parametrize("kind", ["fisher", "dynamic", "dynamic_groups"])
def test_exact_resume(kind):
    steps = 5
    ref_model = make_model(9)
    ref_opt = build(kind, ref_model)
    train(ref_model, ref_opt, 2 * steps)

    model = make_model(9)
    opt = build(kind, model)
    train(model, opt, steps)
    blob = save(model, opt)
    del model, opt
    model, opt = restore(kind, blob)
    train(model, opt, steps, start=steps)
    assert_same(weights(model), weights(ref_model))
    assert_same(opt.get_mask(), ref_opt.get_mask())
    assert opt.steps == ref_opt.steps == 2 * steps


@pytest.mark.parametrize("kind", ["fisher", "dynamic"])
def test_exact_resume_mid_step(kind):
    """Saved between first_step and second_step (perturbed weights, backups, pending dynamic update)."""
    steps = 3  # step 4 is a dynamic update step: the pending refresh is in the checkpoint
    ref_model = make_model(10)
    ref_opt = build(kind, ref_model)
    train(ref_model, ref_opt, 2 * steps)

    model = make_model(10)
    opt = build(kind, model)
    train(model, opt, steps)
    x, y = batch(steps)
    backward(model, x, y)
    opt.first_step(zero_grad=True)
    blob = save(model, opt)
    del model, opt
    model, opt = restore(kind, blob)
    backward(model, x, y)
    opt.second_step(zero_grad=True)
    train(model, opt, steps - 1, start=steps + 1)
    assert_same(weights(model), weights(ref_model))
    assert_same(opt.get_mask(), ref_opt.get_mask())


# ----------------------------------------------------------------------------------------------------
# GradScaler
# ----------------------------------------------------------------------------------------------------

def scaled_cycle(model, opt, scaler, x, y, poison_first=None, poison_second=None):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    if poison_first is not None:
        next(model.parameters()).grad[0, 0] = poison_first
    opt.first_step(zero_grad=True)
    perturbed = weights(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(model(x), y)
    scaler.scale(loss).backward()
    if poison_second is not None:
        next(model.parameters()).grad[0, 0] = poison_second
    opt.unperturb()
    scaler.step(opt)
    scaler.update()
    opt.zero_grad()  # a skipped step leaves the non-finite grads behind
    return perturbed


@pytest.mark.parametrize("kind", ["sam", "dynamic"])
def test_gradscaler_direction_is_scale_invariant(kind):
    a, b = make_model(11), make_model(11)
    opt_a, opt_b = build(kind, a), build(kind, b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**14)
    x, y = batch(0)
    start = weights(a)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_a = loss_fn(a(x), y)
        loss_b = loss_fn(b(x), y)
    scaler.scale(loss_a).backward()
    loss_b.backward()
    opt_a.first_step()
    opt_b.first_step()
    moved = False
    for pa, pb, w0 in zip(a.parameters(), b.parameters(), start, strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=1e-6, atol=1e-9)
        moved |= not torch.equal(pa.detach(), w0)
    assert moved


@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
def test_gradscaler_nonfinite_skips(poison):
    model = make_model(12)
    opt = build("dynamic", model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(0)
    start = weights(model)
    perturbed = scaled_cycle(model, opt, scaler, x, y, poison_first=poison, poison_second=poison)
    assert_same(perturbed, start)  # non-finite norm: perturbation skipped
    assert_same(weights(model), start)  # scaler skipped the step: weights neither perturbed nor stepped
    assert opt.steps == 0 and scaler.get_scale() == 2.0**9
    # a finite first pass but a non-finite second: the perturbation happened, the step is skipped,
    # the weights are restored
    perturbed = scaled_cycle(model, opt, scaler, x, y, poison_second=poison)
    assert not all(torch.equal(a, b) for a, b in zip(perturbed, start, strict=True))
    assert_same(weights(model), start)
    assert opt.steps == 0
    # the next cycle works
    scaled_cycle(model, opt, scaler, x, y)
    assert opt.steps == 1
    after = weights(model)
    assert all(torch.isfinite(w).all() for w in after)
    assert not all(torch.equal(a, b) for a, b in zip(after, start, strict=True))


def test_gradscaler_step_matches_unscaled():
    """Scaled (power-of-two) losses give the same trajectory as unscaled ones, up to rounding."""
    a, b = make_model(13), make_model(13)
    opt_a, opt_b = build("sam", a), build("sam", b)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=1000)
    for t in range(3):
        x, y = batch(t)
        scaled_cycle(a, opt_a, scaler, x, y)
        backward(b, x, y)
        opt_b.first_step(zero_grad=True)
        backward(b, x, y)  # fp32, so compare loosely: the bf16 autocast forward differs
        opt_b.second_step(zero_grad=True)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa.detach(), pb.detach(), rtol=0.05, atol=5e-3)


# ----------------------------------------------------------------------------------------------------
# Layouts, dtypes, closure
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sam", "dynamic", "fisher", "dynamic_groups"])
def test_layouts_give_identical_trajectories(kind):
    runs = []
    for layout in ("flat", "tensors"):
        model = make_model(14)
        opt = build(kind, model, layout)
        assert opt.layout.kind == layout
        train(model, opt, 20)
        runs.append((weights(model), opt.get_mask()))
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["sam", "dynamic", "fisher"])
def test_low_precision_params(dtype, kind):
    model = make_model(15, dtype=dtype)
    opt = build(kind, model, dtype=dtype)
    start = weights(model)
    for t in range(4):
        x, y = batch(t, dtype=dtype)
        backward(model, x, y)
        opt.first_step(zero_grad=True)
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        assert all(torch.isfinite(p).all() and p.dtype == dtype for p in model.parameters())
        if kind != "sam":
            assert mask_count(opt) == opt.live_count == ref_k(sum(p.numel() for p in model.parameters()), 0.5)
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), start, strict=True))


@pytest.mark.parametrize("kind", ["sam", "dynamic"])
def test_closure_equals_two_step(kind):
    a, b = make_model(16), make_model(16)
    opt_a, opt_b = build(kind, a), build(kind, b)
    for t in range(5):
        x, y = batch(t)

        def closure(model=a, x=x, y=y):
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss

        loss = opt_a.step(closure)
        opt_a.zero_grad()
        expected_loss = backward(b, x, y)
        opt_b.first_step(zero_grad=True)
        backward(b, x, y)
        opt_b.step()  # step() without a closure is second_step
        opt_b.zero_grad()
        assert torch.equal(loss.detach(), expected_loss.detach())
    assert_same(weights(a), weights(b))
    assert_same(opt_a.get_mask(), opt_b.get_mask())
    assert opt_a.steps == opt_b.steps == 5


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------

def test_phase_errors_leave_weights_untouched():
    model = make_model(17)
    opt = build("dynamic", model)
    x, y = batch(0)
    backward(model, x, y)
    start = weights(model)
    with pytest.raises(RuntimeError, match="second_step"):
        opt.second_step()
    assert_same(weights(model), start)
    opt.first_step()
    perturbed = weights(model)
    with pytest.raises(RuntimeError, match="first_step"):
        opt.first_step()
    assert_same(weights(model), perturbed)
    opt.second_step()
    assert opt.steps == 1


def _expect(exc, prefix, fn):
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value).startswith(prefix), str(info.value)


def test_argument_errors():
    ps = list(make_model(18).parameters())
    sgd = torch.optim.SGD
    _expect(ValueError, "rho", lambda: SSAM(ps, sgd, rho=-0.1, lr=0.1))
    _expect(ValueError, "rho", lambda: SSAM([{"params": ps, "rho": -1.0}], sgd, lr=0.1))
    _expect(ValueError, "sparsity", lambda: SSAM(ps, sgd, sparsity=1.5, lr=0.1))
    _expect(ValueError, "sparsity", lambda: SSAM(ps, sgd, sparsity=-0.1, lr=0.1))
    _expect(ValueError, "mask", lambda: SSAM(ps, sgd, mask="bogus", lr=0.1))
    _expect(ValueError, "mask", lambda: SSAM(ps, sgd, mask="fisher", lr=0.1))
    _expect(ValueError, "sparsity", lambda: SSAM(ps, sgd, mask=None, sparsity=0.5, lr=0.1))
    _expect(TypeError, "base_optimizer", lambda: SSAM(ps, "sgd", lr=0.1))
    _expect(TypeError, "base_optimizer", lambda: SSAM(ps, nn.Linear, lr=0.1))
    complex_param = nn.Parameter(torch.randn(3, dtype=torch.complex64))
    _expect(TypeError, "params", lambda: SSAM([complex_param], sgd, lr=0.1))
    _expect(ValueError, "layout", lambda: SSAM(ps, sgd, layout="bogus", lr=0.1))
    _expect(ValueError, "sparsity", lambda: topk_mask([torch.randn(4)], 1.5))


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_sparse_gradients_rejected(layout):
    emb = nn.Embedding(10, 3, sparse=True)
    opt = SSAM(emb.parameters(), torch.optim.SGD, sparsity=0.5, mask="random", layout=layout, lr=0.1)
    emb.zero_grad(set_to_none=True)  # flat: otherwise the sparse grad accumulates into the dense view
    emb(torch.tensor([1, 2])).sum().backward()
    assert emb.weight.grad.is_sparse
    start = emb.weight.detach().clone()
    _expect(TypeError, "params", lambda: opt.first_step())
    assert torch.equal(emb.weight.detach(), start)


# ----------------------------------------------------------------------------------------------------
# Base optimizer instance, schedulers, set_mask / get_mask
# ----------------------------------------------------------------------------------------------------

def test_base_instance_and_scheduler():
    model = make_model(19)
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = SSAM(model.parameters(), base, sparsity=0.5, mask="random")
    assert opt.base_optimizer is base and opt.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for t in range(2):
        x, y = batch(t)
        backward(model, x, y)
        opt.first_step(zero_grad=True)
        backward(model, x, y)
        opt.step()
        opt.zero_grad()
        sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)
    # the base step really uses the scheduled lr: a third plain-SGD step with lr 0.025
    x, y = batch(2)
    backward(model, x, y)
    w = params64(model)
    opt.first_step(zero_grad=True)
    backward(model, x, y)
    g2 = [p.grad.double().clone() for p in model.parameters()]
    opt.second_step()
    for p, wi, gi in zip(model.parameters(), w, g2, strict=True):
        torch.testing.assert_close(p.detach().double(), wi - 0.025 * gi, rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match=r"^base_optimizer"):
        SSAM(list(model.parameters())[:2], torch.optim.SGD(model.parameters(), lr=0.1))


def random_k_mask(model: nn.Module, k: int, seed: int) -> list[torch.Tensor]:
    """Bool masks shaped like the parameters with exactly ``k`` entries set, at random."""
    n = sum(p.numel() for p in model.parameters())
    live = torch.zeros(n, dtype=torch.bool)
    live[torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k]] = True
    return [m.view(p.shape) for m, p in zip(live.split([p.numel() for p in model.parameters()]),
                                            model.parameters(), strict=True)]


def test_set_mask_round_trip_and_lifetime():
    model = make_model(20)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=DynamicMask(interval=3, seed=1),
               lr=0.1)
    chosen = random_k_mask(model, opt.live_count, seed=0)
    opt.set_mask(chosen)
    assert_same(opt.get_mask(), chosen)
    for t in range(1, 4):
        x, y = batch(t)
        backward(model, x, y)
        before = weights(model)
        opt.first_step(zero_grad=True)
        for p, b, m in zip(model.parameters(), before, chosen, strict=True):
            assert torch.equal(p.detach()[~m], b[~m])
            assert (p.detach()[m] != b[m]).all()
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        if t < 3:
            assert_same(opt.get_mask(), chosen)
    assert not all(torch.equal(a, b) for a, b in zip(opt.get_mask(), chosen, strict=True))  # refreshed


def test_random_mask_without_interval_keeps_set_mask():
    model = make_model(21)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=RandomMask(interval=None), lr=0.1)
    initial = opt.get_mask()
    assert sum(int(m.sum()) for m in initial) == opt.live_count
    chosen = random_k_mask(model, opt.live_count, seed=1)
    assert not all(torch.equal(a, b) for a, b in zip(chosen, initial, strict=True))
    opt.set_mask(chosen)
    train(model, opt, 6)
    assert_same(opt.get_mask(), chosen)


def test_set_mask_rejects_bad_input():
    ps = list(make_model(22).parameters())
    opt = SSAM([{"params": ps[:3]}, {"params": ps[3:], "perturb": False}], torch.optim.SGD,
               sparsity=0.5, mask="random", lr=0.1)
    good = [torch.zeros(p.shape, dtype=torch.bool) for p in ps]
    _expect(ValueError, "mask", lambda: opt.set_mask(good[:3]))
    _expect(ValueError, "mask[0]", lambda: opt.set_mask([good[0].float(), *good[1:]]))
    bad = [m.clone() for m in good]
    bad[3][0] = True
    _expect(ValueError, "mask[3]", lambda: opt.set_mask(bad))


# ----------------------------------------------------------------------------------------------------
# topk_mask
# ----------------------------------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(sizes=st.lists(st.integers(0, 70), min_size=1, max_size=4), sparsity=st.floats(0.0, 1.0),
       levels=st.integers(1, 6), nan_frac=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 2**31),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int32]))
def test_topk_mask_exact_k_and_tie_order(sizes, sparsity, levels, nan_frac, seed, dtype):
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for s in sizes:  # few distinct values: many ties; some NaN; 2-D shapes where possible
        t = torch.randint(0, levels, (s,), generator=gen).to(torch.float32) - 2.0
        if dtype != torch.int32:  # int32 scores: signed integers, the largest first
            t[torch.rand(s, generator=gen) < nan_frac] = float("nan")
        scores.append(t.to(dtype).view(2, s // 2) if s % 2 == 0 and s else t.to(dtype))
    n = sum(sizes)
    k = ref_k(n, sparsity)
    out = topk_mask(scores, sparsity)
    assert [o.shape for o in out] == [s.shape for s in scores]
    assert all(o.dtype == torch.bool for o in out)
    assert torch.equal(flat(out), ref_topk(flat([s.float() for s in scores]), k))


# ----------------------------------------------------------------------------------------------------
# More policies and parameter kinds
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("drop", "grow"), [("weight", "random"), ("gradient", "gradient"),
                                          ("weight", "gradient")])
def test_dynamic_drop_and_grow_criteria(drop, grow):
    model = make_model(23)
    policy = DynamicMask(interval=1, drop_rate=0.4, drop=drop, grow=grow, seed=2)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=policy, lr=0.1)
    k = opt.live_count
    for t in range(1, 4):
        mask = flat(opt.get_mask())
        x, y = batch(t)
        backward(model, x, y)
        g_abs = flat([p.grad.abs() for p in model.parameters()]).double()
        w_abs = flat([p.detach().abs() for p in model.parameters()]).double()
        opt.first_step(zero_grad=True)
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        new = flat(opt.get_mask())
        n_drop = math.floor(0.4 * k)
        drop_score = w_abs if drop == "weight" else g_abs
        live, dead = mask.nonzero().flatten().tolist(), (~mask).nonzero().flatten().tolist()
        expect_drop = sorted(live, key=lambda i: (drop_score[i].item(), i))[:n_drop]
        dropped, grown = mask & ~new, new & ~mask
        assert sorted(dropped.nonzero().flatten().tolist()) == sorted(expect_drop)
        assert int(grown.sum()) == n_drop and not (grown & mask).any()
        if grow == "gradient":
            expect_grow = sorted(dead, key=lambda i: (-g_abs[i].item(), i))[:n_drop]
            assert sorted(grown.nonzero().flatten().tolist()) == sorted(expect_grow)


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_mixed_dtypes_and_frozen(layout):
    """Parameters of several dtypes in one group (flat: several segments) and a frozen one: exact K over
    the trainable entries, the frozen parameter never touched, the perturbation per the formula."""
    a = nn.Parameter(torch.randn(7, 3))
    b = nn.Parameter(torch.randn(11).to(torch.bfloat16))
    c = nn.Parameter(torch.randn(5))
    frozen = nn.Parameter(torch.randn(4), requires_grad=False)
    ps = [a, b, frozen, c]
    opt = SSAM(ps, torch.optim.SGD, rho=0.2, sparsity=0.4, mask=RandomMask(seed=9), layout=layout, lr=0.1)
    assert opt.live_count == ref_k(37, 0.4)
    masks = opt.get_mask()
    assert sum(int(m.sum()) for m in masks) == opt.live_count and not masks[2].any()
    for p in (a, b, c):
        p.grad = torch.randn_like(p)
    before = [p.detach().clone() for p in ps]
    w = [p.detach().double() for p in ps]
    g = [p.grad.double() if p.grad is not None else torch.zeros_like(w[i]) for i, p in enumerate(ps)]
    e = perturbation64(w, g, [([0, 1, 3], 0.2, False, True)], masks)
    opt.first_step()
    for p, b0, wi, ei, m in zip(ps, before, w, e, masks, strict=True):
        assert torch.equal(p.detach()[~m], b0[~m])
        if p.dtype == torch.float32:
            torch.testing.assert_close(p.detach().double()[m], (wi + ei)[m], rtol=2e-7, atol=1e-9)
        else:  # one rounding of the fp32 result to bf16: within one bf16 ulp
            torch.testing.assert_close(p.detach().double()[m], (wi + ei)[m], rtol=2**-8, atol=1e-6)
    opt.second_step()
    assert torch.equal(frozen.detach(), before[2])


def test_unused_parameter_same_in_both_layouts():
    """A parameter that never gets a gradient (an unused head) must be treated alike by both layouts
    (DESIGN.md: both layouts give the same results); with weight decay, a zero gradient and no
    gradient differ."""
    runs = []
    for layout in ("flat", "tensors"):
        model = make_model(24)
        unused = nn.Linear(3, 2)
        with torch.no_grad():
            unused.weight.fill_(1.0)
            unused.bias.fill_(1.0)
        params = [*model.parameters(), *unused.parameters()]
        opt = SSAM(params, torch.optim.SGD, sparsity=0.5, mask="random", layout=layout, lr=0.1,
                   momentum=0.9, weight_decay=0.1)
        train(model, opt, 3)
        runs.append([p.detach().clone() for p in params])
    assert_same(runs[0], runs[1])


def test_base_instance_keeps_per_group_options():
    """Per-group rho / perturb=False given to SSAM survive a base optimizer passed as an instance."""
    model = make_model(25)
    ps = list(model.parameters())
    base = torch.optim.SGD([{"params": ps[:3]}, {"params": ps[3:], "lr": 0.0}], lr=0.0)
    opt = SSAM([{"params": ps[:3], "rho": 0.3}, {"params": ps[3:], "perturb": False}], base,
               sparsity=0.0, mask=None)
    x, y = batch(0)
    backward(model, x, y)
    w = params64(model)
    g = [p.grad.double().clone() for p in ps]
    e = perturbation64(w, g, [([0, 1, 2], 0.3, False, True), ([3], 0.05, False, False)])
    opt.first_step()
    for p, wi, ei in zip(ps, w, e, strict=True):
        torch.testing.assert_close(p.detach().double(), wi + ei, rtol=2e-7, atol=5e-8)
    assert torch.equal(ps[3].detach().double(), w[3])
    opt.second_step()
    mixed = torch.optim.SGD(ps, lr=0.1)
    with pytest.raises(ValueError, match=r"^base_optimizer"):
        SSAM([{"params": ps[:3], "rho": 0.3}, {"params": ps[3:]}], mixed, sparsity=0.0, mask=None)


@pytest.mark.parametrize("mid_step", [False, True])
@pytest.mark.parametrize("kind", ["sam", "dynamic"])
def test_resume_across_layouts(kind, mid_step):
    """A checkpoint of a flat-layout run continues in the tensors layout exactly (one dtype: same
    entry order, DESIGN.md), also when saved between first_step and second_step."""
    steps = 3
    ref_model = make_model(26)
    ref_opt = build(kind, ref_model, "flat")
    train(ref_model, ref_opt, 2 * steps)

    model = make_model(26)
    opt = build(kind, model, "flat")
    train(model, opt, steps)
    x, y = batch(steps)
    if mid_step:
        backward(model, x, y)
        opt.first_step(zero_grad=True)
    blob = save(model, opt)
    model, opt = restore(kind, blob, "tensors")
    assert opt.layout.kind == "tensors"
    if mid_step:
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        train(model, opt, steps - 1, start=steps + 1)
    else:
        train(model, opt, steps, start=steps)
    assert_same(weights(model), weights(ref_model))
    assert_same(opt.get_mask(), ref_opt.get_mask())


@pytest.mark.parametrize("sparsity", [0.0, 1.0])
@pytest.mark.parametrize("policy", ["dynamic", "random"])
def test_sparsity_extremes(sparsity, policy):
    model = make_model(27)
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=sparsity, lr=0.1,
               mask=DynamicMask(interval=1, seed=4) if policy == "dynamic" else RandomMask(interval=1))
    n = sum(p.numel() for p in model.parameters())
    for t in range(3):
        x, y = batch(t)
        backward(model, x, y)
        before = weights(model)
        opt.first_step(zero_grad=True)
        moved = [not torch.equal(a, b) for a, b in zip(weights(model), before, strict=True)]
        assert all(moved) if sparsity == 0.0 else not any(moved)
        backward(model, x, y)
        opt.second_step(zero_grad=True)
        assert mask_count(opt) == ref_k(n, sparsity)


@pytest.mark.parametrize("poison_first", [True, False])
def test_gradscaler_skipped_cycle_leaves_no_trace(poison_first):
    """An inf cycle (skipped by the scaler) on a dynamic-update step leaves no trace: the run equals
    one without it (the scale after the skip equals the other run's constant scale)."""
    runs = []
    for skip in (False, True):
        model = make_model(28)
        opt = build("dynamic", model)  # interval 2: step 2 and 4 update the mask
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10 if skip else 2.0**9, growth_interval=10**6)
        for t in range(5):
            x, y = batch(t)
            if skip and t == 1:
                scaled_cycle(model, opt, scaler, *batch(50), poison_second=float("inf"),
                             poison_first=float("inf") if poison_first else None)
            scaled_cycle(model, opt, scaler, x, y)
        assert opt.steps == 5 and scaler.get_scale() == 2.0**9
        runs.append((weights(model), opt.get_mask()))
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])


def test_topk_mask_signed_int32_and_rejected_dtypes():
    scores = torch.tensor([-1, 0, 2**31 - 1, -(2**31), 1, -2], dtype=torch.int32)
    (out,) = topk_mask([scores], 0.5)
    assert out.tolist() == [False, True, True, False, True, False]
    _expect(TypeError, "scores", lambda: topk_mask([torch.zeros(3, dtype=torch.int64)], 0.5))
    _expect(TypeError, "scores", lambda: topk_mask(torch.zeros(3), 0.5))


def test_two_step_form_is_seen_by_lr_schedulers_and_step_hooks():
    """second_step runs through step(): a scheduler on SSAM sees the step (no 'scheduler before
    optimizer' warning), the base optimizer gets the new lr, and step hooks fire once per step."""
    model = torch.nn.Linear(3, 2)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    hook_calls = []
    opt.register_step_post_hook(lambda *args: hook_calls.append(args))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(2):
            model(torch.randn(4, 3)).sum().backward()
            opt.first_step(zero_grad=True)
            model(torch.randn(4, 3)).sum().backward()
            opt.second_step(zero_grad=True)
            scheduler.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.025)
    assert len(hook_calls) == 2
