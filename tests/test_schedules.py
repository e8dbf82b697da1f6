"""Schedules (ssam_kernels.schedules): which steps take SAM's second pass, against an oracle written from
the papers' formulas; how every form of the step uses them; checkpoints; every mask policy, layout and
backend; AMP's skipped steps; the arguments' errors."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import ssam_kernels as sk
from tests.helpers import ALL_DTYPES, backward, batch, build_optimizer, loss_fn, seeded_mlp, train, weights

RHO, LR, EPS = 0.1, 0.1, 1e-12


def schedules(total: int = 12) -> dict[str, sk.Schedule]:
    return {"every_step": sk.EveryStep(), "every_3": sk.EveryK(3), "looksam": sk.LookSAM(3, 0.7),
            "aesam": sk.AESAM(total)}


SCHEDULES = list(schedules())


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def oracle(model: torch.nn.Sequential, schedule: sk.Schedule, steps: int
           ) -> tuple[list[bool], tuple[float, float]]:
    """SAM (dense, SGD) under ``schedule``, written from the papers' formulas in float64 over the whole
    parameter vector: returns the decisions and AE-SAM's final (mean, variance), and leaves the model
    trained."""
    params = list(model.parameters())
    gv = gv_norm = None
    mean = var = 0.0
    decisions = []

    def gradient(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss_fn(model(x), y).backward()
        return flat([p.grad for p in params])

    def assign(vector: torch.Tensor) -> None:
        position = 0
        for p in params:
            p.data.copy_(vector[position: position + p.numel()].view_as(p))
            position += p.numel()

    for t in range(steps):
        x, y = batch(t, 8, 5, 3, torch.float64)
        w = flat([p.detach() for p in params]).clone()
        g = gradient(x, y)
        norm = g.norm()
        if isinstance(schedule, sk.AESAM):
            sq = float(norm) ** 2
            mean = schedule.delta * mean + (1 - schedule.delta) * sq
            var = schedule.delta * var + (1 - schedule.delta) * (sq - mean) ** 2
            progress = min(t / schedule.total_steps, 1)
            c = schedule.lambda_start + (schedule.lambda_end - schedule.lambda_start) * progress
            sharp = sq >= mean + c * math.sqrt(var)
        elif isinstance(schedule, sk.EveryK):
            sharp = t % schedule.k == 0
        else:
            sharp = True
        decisions.append(sharp)
        if sharp:
            assign(w + RHO * g / (norm + EPS))
            direction = gradient(x, y)
            if isinstance(schedule, sk.LookSAM):
                gv = direction - (g @ direction) / (norm * norm) * g
                gv_norm = gv.norm()
        elif isinstance(schedule, sk.LookSAM) and gv is not None:
            direction = g + schedule.alpha * norm / gv_norm * gv
        else:
            direction = g
        assign(w - LR * direction)
    return decisions, (mean, var)


def run(opt: torch.optim.Optimizer, model: torch.nn.Sequential, steps: int, start: int = 0) -> list[bool]:
    """The two-step form over ``batch(start)``, …; returns first_step's results."""
    decisions = []
    for t in range(start, start + steps):
        x, y = batch(t, 8, 5, 3, model[0].weight.dtype)
        backward(model, x, y)
        sharp = opt.first_step(zero_grad=True)
        if sharp:
            backward(model, x, y)
        opt.second_step(zero_grad=True)
        decisions.append(sharp)
    return decisions


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_matches_the_papers_formulas(name, layout):
    steps = 12
    expected_model = seeded_mlp(1, dtype=torch.float64)
    expected, statistics = oracle(expected_model, schedules(steps)[name], steps)
    model = seeded_mlp(1, dtype=torch.float64)
    opt = sk.SAM(model.parameters(), torch.optim.SGD, rho=RHO, eps=EPS, lr=LR, layout=layout,
                 schedule=schedules(steps)[name], backend="reference")
    assert run(opt, model, steps) == expected
    if name == "aesam":
        assert (opt.schedule.mean, opt.schedule.var) == pytest.approx(statistics, rel=1e-12)
    assert 0 < sum(expected) <= steps and (name == "every_step") == all(expected)
    torch.testing.assert_close(weights(model), weights(expected_model), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", SCHEDULES)
def test_closure_runs_once_on_plain_steps(name):
    model = seeded_mlp(2)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, schedule=schedules()[name])
    calls = []
    for t in range(7):
        x, y = batch(t)
        count = len(calls)

        def closure(x=x, y=y):
            calls.append(1)
            return backward(model, x, y)

        loss = opt.step(closure)
        assert loss is not None and opt.steps == t + 1
        calls_now = len(calls) - count
        assert calls_now in (1, 2)
        if name in ("every_3", "looksam"):
            assert calls_now == (2 if t % 3 == 0 else 1)
        if name == "every_step":
            assert calls_now == 2


def test_plain_step_is_the_base_optimizers_step():
    """EveryK's plain steps: the weights move as the base optimizer alone moves them, and first_step leaves
    the gradients as they are even with zero_grad=True."""
    model, base_model = seeded_mlp(3), seeded_mlp(3)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, momentum=0.9, schedule=sk.EveryK(2))
    base = torch.optim.SGD(base_model.parameters(), lr=LR, momentum=0.9)
    run(opt, model, 1)  # step 0: sharpness-aware
    base_model.load_state_dict(model.state_dict())
    base.load_state_dict(copy.deepcopy(opt.base_optimizer.state_dict()))  # not its momentum tensors
    x, y = batch(1)
    backward(model, x, y)
    backward(base_model, x, y)
    grads = [p.grad.clone() for p in model.parameters()]
    assert opt.first_step(zero_grad=True) is False
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grads, strict=True))
    opt.second_step()
    base.step()
    assert all(torch.equal(a, b) for a, b in zip(weights(model), weights(base_model), strict=True))


def test_perturbed_block_gets_the_decision():
    model = seeded_mlp(4)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=RHO, lr=LR, schedule=sk.EveryK(2))
    seen = []
    for t in range(5):
        x, y = batch(t)
        backward(model, x, y)
        with opt.perturbed() as sharp:
            seen.append(sharp)
            if sharp:
                backward(model, x, y)
    assert seen == [True, False, True, False, True] and opt.steps == 5
    x, y = batch(9)
    backward(model, x, y)
    before = weights(model)
    with pytest.raises(RuntimeError, match="plain"), opt.perturbed():
        backward(model, x, y)  # a second backward on a plain step would add to its gradients
    assert all(torch.equal(a, b) for a, b in zip(weights(model), before, strict=True))
    assert opt.steps == 5


@pytest.mark.parametrize("name", SCHEDULES)
@pytest.mark.parametrize("kind", ["sam", "dynamic", "fisher", "dynamic_groups"])
@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_checkpoint_resumes_bit_identically(name, kind, layout):
    """Every schedule with every mask policy and layout: a checkpoint taken mid-run (between steps, and
    for LookSAM also mid-step) resumes the run bit for bit."""
    model = seeded_mlp(5)
    opt = build_optimizer(kind, model, layout, schedule=schedules()[name])
    train(model, opt, 4)
    state, model_state = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    train(model, opt, 5, start=4)
    resumed_model = seeded_mlp(6)
    resumed_model.load_state_dict(model_state)
    resumed = build_optimizer(kind, resumed_model, layout, schedule=schedules()[name])
    resumed.load_state_dict(state)
    train(resumed_model, resumed, 5, start=4)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed_model), weights(model), strict=True))


def test_looksam_checkpoint_mid_step():
    model = seeded_mlp(7)
    opt = build_optimizer("dynamic", model, schedule=sk.LookSAM(2, 0.5))
    train(model, opt, 2)
    x, y = batch(2)
    backward(model, x, y)
    assert opt.first_step(zero_grad=True)
    state = copy.deepcopy(opt.state_dict())
    assert state["ssam"]["lookahead"]["norm"] is None  # the buffers hold g until the step finishes
    saved = copy.deepcopy(model.state_dict())
    backward(model, x, y)
    opt.second_step(zero_grad=True)
    train(model, opt, 3, start=3)
    resumed_model = seeded_mlp(8)
    resumed_model.load_state_dict(saved)
    resumed = build_optimizer("dynamic", resumed_model, schedule=sk.LookSAM(2, 0.5))
    resumed.load_state_dict(state)
    backward(resumed_model, x, y)
    resumed.second_step(zero_grad=True)
    train(resumed_model, resumed, 3, start=3)
    assert all(torch.equal(a, b) for a, b in zip(weights(resumed_model), weights(model), strict=True))


def test_checkpoint_of_another_schedule_loads_fresh_state():
    model = seeded_mlp(9)
    opt = build_optimizer("dynamic", model, schedule=sk.AESAM(10))
    train(model, opt, 3)
    assert opt.schedule.mean > 0
    other = build_optimizer("dynamic", seeded_mlp(9), schedule=sk.EveryK(2))
    other.load_state_dict(opt.state_dict())
    assert other.steps == 3
    same = build_optimizer("dynamic", seeded_mlp(9), schedule=sk.AESAM(10))
    same.load_state_dict(opt.state_dict())
    assert (same.schedule.mean, same.schedule.var) == (opt.schedule.mean, opt.schedule.var)
    bad = opt.state_dict()
    bad["ssam"]["schedule"]["state"]["var"] = -1.0
    fresh = build_optimizer("dynamic", seeded_mlp(9), schedule=sk.AESAM(10))
    with pytest.raises(ValueError, match="var"):
        fresh.load_state_dict(bad)
    assert fresh.steps == 0 and fresh.schedule.mean == 0.0


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", ["reference", "vectorized", "native"])
def test_looksam_on_every_backend_and_dtype(dtype, backend):
    """LookSAM's list ops on each CPU backend give the reference backend's weights: bit for bit where the
    op contract is bit-exact (fp32 arithmetic), within rounding for float64 (whose norm may be summed in
    another order)."""
    if "cpu" not in sk.available_backends().get(backend, []):
        pytest.skip(f"{backend} is not built here")
    results = []
    for name in ("reference", backend):
        model = seeded_mlp(10, dtype=dtype)
        opt = build_optimizer("dynamic", model, dtype=dtype, schedule=sk.LookSAM(2, 0.7), backend=name)
        train(model, opt, 6)
        results.append(weights(model))
    if dtype == torch.float64:
        torch.testing.assert_close(*results, rtol=1e-12, atol=1e-15)
    else:
        assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    assert all(torch.isfinite(w).all() for w in results[0])


@pytest.mark.parametrize("name", ["aesam", "looksam"])
def test_amp_skipped_steps_leave_the_schedule_as_it_was(name):
    """A GradScaler step skipped for an overflow: AE-SAM's statistics and LookSAM's g_v stay what they
    were (AE-SAM does not fold a non-finite ‖g‖² in; LookSAM drops the g_v the step would have made)."""
    model = seeded_mlp(11)
    opt = build_optimizer("dynamic", model, schedule=schedules()[name])
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    for t in range(4):
        x, y = batch(t)
        scaler.scale(loss_fn(model(x), y)).backward()
        if t == 3:
            next(model.parameters()).grad[0, 0] = math.inf
        scaler.unscale_(opt)
        before = opt.state_dict()["ssam"]
        if opt.first_step(zero_grad=True):
            scaler.scale(loss_fn(model(x), y)).backward()
        opt.unperturb()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    assert opt.steps == 3  # the overflowed step was skipped
    after = opt.state_dict()["ssam"]
    assert after["schedule"]["state"] == before["schedule"]["state"]
    if name == "aesam":
        assert math.isfinite(opt.schedule.mean) and opt.schedule.mean > 0
    else:  # step 3 was sharpness-aware: its buffers held g, which the skipped step never turned into g_v
        assert after["lookahead"]["norm"] is None


@pytest.mark.parametrize("make, error, match", [
    (lambda: sk.EveryK(0), ValueError, "k:"),
    (lambda: sk.EveryK(2.0), TypeError, "k:"),
    (lambda: sk.LookSAM(5, -0.1), ValueError, "alpha"),
    (lambda: sk.LookSAM(5, math.nan), ValueError, "alpha"),
    (lambda: sk.AESAM(0), ValueError, "total_steps"),
    (lambda: sk.AESAM(10, delta=1.0), ValueError, "delta"),
    (lambda: sk.AESAM(10, lambda_start="1"), TypeError, "lambda_start"),
    (lambda: sk.SSAM(seeded_mlp(0).parameters(), torch.optim.SGD, lr=0.1, schedule="every_step"), TypeError,
     "schedule"),
])
def test_bad_arguments_name_the_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_repr_and_defaults():
    assert repr(sk.LookSAM()) == "LookSAM(k=5, alpha=0.7)"
    aesam = sk.AESAM(100)
    assert (aesam.delta, aesam.lambda_start, aesam.lambda_end) == (0.9, 1.0, -1.0)
    assert aesam.threshold(0) == 1.0 and aesam.threshold(50) == 0.0 and aesam.threshold(500) == -1.0
    opt = sk.SSAM(seeded_mlp(0).parameters(), torch.optim.SGD, lr=0.1)
    assert isinstance(opt.schedule, sk.EveryStep)
