"""Nothing a user does strands perturbed weights, fools autograd or slips past the option checks (issue
24): transactional steps with a phase that tells the truth, version counters in every layout, options
checked when they are read, sparsity changes, checkpoint dtypes and ranges, the norm's overflow and
determinism, torch.optim's hooks and state, one stepping thread, and the errors of the smaller inputs."""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from ssam_kernels import SAM, SSAM, DynamicMask, RandomMask, ops
from ssam_kernels.ops import reference, vectorized
from tests.helpers import assert_same, batch, weights
from tests.helpers import seeded_mlp as make_model

LAYOUTS = ["flat", "tensors"]


def loss_of(model: nn.Module, seed: int = 0) -> torch.Tensor:
    x, y = batch(seed, dtype=next(model.parameters()).dtype)
    return nn.functional.cross_entropy(model(x), y)


def two_groups(model: nn.Module, layout: str = "flat", **kwargs) -> SSAM:
    """SSAM over the two Linear layers as two groups with different rho: two perturb_ calls per step."""
    groups = [{"params": model[0].parameters(), "rho": 0.1}, {"params": model[2].parameters(), "rho": 0.2}]
    return SSAM(groups, torch.optim.SGD, sparsity=0.5, mask=RandomMask(seed=1), layout=layout, lr=0.1,
                momentum=0.9, **kwargs)


def state_after(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------------
# A step is all or nothing, and the phase tells the truth
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(("key", "value", "error"), [
    ("rho", -0.5, ValueError), ("rho", float("nan"), ValueError), ("rho", float("inf"), ValueError),
    ("rho", 1e300, ValueError), ("rho", "0.1", TypeError), ("adaptive", "yes", TypeError),
    ("perturb", False, ValueError),
])
def test_group_options_are_checked_when_read(layout, key, value, error):
    """A schedule that writes a bad value into the second group: first_step raises the constructor's
    error naming the group before it writes anything (the first group too stays at w), and the optimizer
    keeps working once the value is fixed."""
    model = make_model(1)
    opt = two_groups(model, layout)
    loss_of(model).backward()
    before = weights(model)
    good = opt.param_groups[1][key]
    opt.param_groups[1][key] = value
    with pytest.raises(error, match=rf"^{key} \(param group 1\)"):
        opt.first_step()
    assert_same(weights(model), before)
    opt.unperturb()  # the phase says idle: nothing to restore
    assert_same(weights(model), before)
    opt.param_groups[1][key] = good
    opt.first_step()
    assert not all(torch.equal(a, b) for a, b in zip(weights(model), before, strict=True))
    opt.second_step()


def test_a_group_added_to_the_base_optimizer_is_named():
    """A group added through the base optimizer (which shares param_groups) was never laid out: named,
    before any write."""
    model = make_model(2)
    opt = two_groups(model)
    opt.base_optimizer.add_param_group({"params": [nn.Parameter(torch.randn(4))]})
    loss_of(model).backward()
    before = weights(model)
    with pytest.raises(ValueError, match=r"^param_groups: 3 groups, 2 laid out; add groups with "):
        opt.first_step()
    assert_same(weights(model), before)


def test_eps_is_checked_when_read():
    model = make_model(2)
    opt = two_groups(model)
    loss_of(model).backward()
    opt.eps = -1.0
    with pytest.raises(ValueError, match=r"^eps"):
        opt.first_step()
    opt.eps = 1e-40  # rho / eps past 1e38: the float32 scale of a small gradient would overflow
    with pytest.raises(ValueError, match=r"^rho \(param group 0\): rho / eps"):
        opt.first_step()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_first_step_rolls_back_a_half_done_perturbation(layout, monkeypatch):
    """An exception between the two groups' perturb_ calls (here an interrupt in the second): the first
    group's weights are restored bit-exactly before it propagates, and the phase stays idle."""
    model = make_model(3)
    opt = two_groups(model, layout)
    loss_of(model).backward()
    before = weights(model)
    perturb = ops.perturb_
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        perturb(*args, **kwargs)
    monkeypatch.setattr(ops, "perturb_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.first_step()
    assert len(calls) == 2
    assert_same(weights(model), before)
    monkeypatch.setattr(ops, "perturb_", perturb)
    opt.unperturb()
    assert_same(weights(model), before)
    opt.first_step()  # not "already perturbed"
    opt.second_step()


@pytest.mark.parametrize("failing_pass", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_closure_step_restores_w_when_a_pass_raises(layout, failing_pass):
    """step(closure): whichever pass raises (KeyboardInterrupt here), the weights are w again, a model
    state dict saved in the handler holds w, the step count is unchanged and the next step works."""
    model = make_model(4)
    opt = two_groups(model, layout)
    before = state_after(model)
    passes = []

    def closure():
        passes.append(1)
        loss = loss_of(model)
        loss.backward()
        if len(passes) == failing_pass:
            raise KeyboardInterrupt
        return loss

    saved = None
    try:
        opt.step(closure)
    except KeyboardInterrupt:
        saved = state_after(model)
    assert saved is not None and len(passes) == failing_pass
    for key, value in before.items():
        assert torch.equal(saved[key], value), key
    assert opt.steps == 0
    passes.clear()
    opt.step(closure := lambda: loss_of(model).backward())
    assert opt.steps == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_perturbed_context_manager(layout):
    """``with opt.perturbed():`` around the second pass takes the same steps as first_step/second_step,
    and restores w (phase idle, step not counted) when the block raises."""
    runs = []
    for form in ("explicit", "context"):
        model = make_model(5)
        opt = two_groups(model, layout)
        for t in range(3):
            loss_of(model, t).backward()
            if form == "explicit":
                opt.first_step(zero_grad=True)
                loss_of(model, t).backward()
                opt.second_step(zero_grad=True)
            else:
                with opt.perturbed():
                    loss_of(model, t).backward()
        runs.append((weights(model), opt.get_mask(), opt.steps))
    assert_same(runs[0][0], runs[1][0])
    assert_same(runs[0][1], runs[1][1])
    assert runs[0][2] == runs[1][2] == 3
    loss_of(model).backward()
    before = weights(model)
    with pytest.raises(RuntimeError, match="boom"), opt.perturbed():
        assert not all(torch.equal(a, b) for a, b in zip(weights(model), before, strict=True))
        raise RuntimeError("boom")
    assert_same(weights(model), before)
    assert opt.steps == 3
    opt.first_step()  # idle again: a new step can start
    opt.second_step()


@pytest.mark.parametrize("layout", LAYOUTS)
def test_perturbed_context_manager_after_unscale_and_skipped_step(layout):
    """first_step called before the block (after a GradScaler's unscale_) is not repeated, and a block
    that restores and lets the scaler skip the base step is not finished on leaving."""
    model = make_model(6)
    opt = two_groups(model, layout)
    loss_of(model).backward()
    opt.first_step(zero_grad=True)
    before_first = opt.grad_norm.clone()
    with opt.perturbed():
        loss_of(model).backward()
        assert torch.equal(opt.grad_norm, before_first)
        opt.unperturb()  # a skipped scaler step: restored, no base step
    assert opt.steps == 0
    opt.first_step()
    opt.second_step()
    assert opt.steps == 1


@pytest.mark.parametrize("layout", LAYOUTS)
def test_in_place_changes_bump_version_counters(layout):
    """A graph saved before first_step (or before unperturb) refuses to backward, as for any in-place
    update of a saved tensor."""
    model = make_model(7)
    opt = two_groups(model, layout)
    loss_of(model).backward()
    stale = loss_of(model, 1)  # saves the weights at w
    opt.first_step(zero_grad=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()
    stale = loss_of(model, 2)  # saves w + e
    opt.unperturb()
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        stale.backward()


# ----------------------------------------------------------------------------------------------------
# sparsity after construction
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
def test_sparsity_change_takes_effect(layout):
    """Setting opt.sparsity gives the new K and the mask the policy's initial rule builds, exactly as
    a new optimizer with that sparsity (the step count goes on)."""
    model, fresh = make_model(8), make_model(8)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=RandomMask(seed=4), layout=layout,
               lr=0.1)
    loss_of(model).backward()
    opt.first_step(zero_grad=True)
    loss_of(model).backward()
    opt.second_step(zero_grad=True)
    reference_opt = SSAM(fresh.parameters(), torch.optim.SGD, sparsity=0.9, mask=RandomMask(seed=4),
                         layout=layout, lr=0.1)
    opt.sparsity = 0.9
    assert opt.sparsity == 0.9 and opt.live_count == reference_opt.live_count
    assert_same(opt.get_mask(), reference_opt.get_mask())
    assert sum(int(m.sum()) for m in opt.get_mask()) == reference_opt.live_count
    assert opt.steps == 1
    with pytest.raises(TypeError, match=r"^sparsity"):
        opt.sparsity = "0.5"
    with pytest.raises(ValueError, match=r"^sparsity"):
        opt.sparsity = 1.5
    loss_of(model).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match=r"^sparsity: the weights are perturbed"):
        opt.sparsity = 0.5
    opt.second_step()
    with pytest.raises(ValueError, match=r"^sparsity: a dense mask"):
        SAM(make_model(8).parameters(), torch.optim.SGD, lr=0.1).sparsity = 0.5


# ----------------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------------

def test_backups_converted_to_another_dtype_are_refused():
    """A mid-step checkpoint whose backups were converted (to bf16, fp16 or float64) would not restore w
    bit for bit: refused, and the failed load changes nothing."""
    model = make_model(9)
    opt = two_groups(model)
    loss_of(model).backward()
    opt.first_step()
    state = opt.state_dict()
    opt.second_step()
    masks, steps = opt.get_mask(), opt.steps
    for dtype in (torch.bfloat16, torch.float16, torch.float64):
        backups = [b.to(dtype) for b in state["ssam"]["backups"]]
        with pytest.raises(ValueError, match=r"^backups\[0\]: expected a 1-D torch.float32 tensor"):
            opt.load_state_dict({**state, "ssam": {**state["ssam"], "backups": backups}})
        assert opt.steps == steps and opt.state_dict()["ssam"]["phase"] == "idle"
        assert_same(opt.get_mask(), masks)
    opt.load_state_dict(state)  # as saved: loads, and the step finishes from the backups
    opt.second_step()


@pytest.mark.parametrize("policy", ["random", "dynamic"])
@pytest.mark.parametrize("steps", [2**32 - 1, 2**32 + 5, 2**63 - 2])
def test_any_loadable_step_count_keeps_refreshing(policy, steps):
    """A step count past the 32-bit hash counter loads and the refreshes of the next steps (after the
    base step for RandomMask, in first_step for DynamicMask) work: the counter wraps."""
    model = make_model(10)
    mask = RandomMask(interval=1, seed=2) if policy == "random" else DynamicMask(interval=1, seed=2)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=mask, lr=0.1)
    state = opt.state_dict()
    state["ssam"]["steps"] = steps
    opt.load_state_dict(state)
    for t in range(2):
        loss_of(model, t).backward()
        opt.first_step(zero_grad=True)
        loss_of(model, t).backward()
        opt.second_step(zero_grad=True)
    assert opt.steps == steps + 2
    assert sum(int(m.sum()) for m in opt.get_mask()) == opt.live_count


@pytest.mark.parametrize("steps", [2**63, 10**100, -1])
def test_step_counts_out_of_range_are_refused(steps):
    model = make_model(11)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=RandomMask(interval=1, seed=2), lr=0.1)
    state = opt.state_dict()
    state["ssam"]["steps"] = steps
    with pytest.raises(ValueError, match=r"^steps: expected an int in \[0, 2\^63 - 1\]"):
        opt.load_state_dict(state)
    assert opt.steps == 0


# ----------------------------------------------------------------------------------------------------
# The norm: overflow-safe, deterministic
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("magnitude", [1e200, 1e300])
def test_float64_gradients_whose_squares_overflow_still_perturb(layout, adaptive, magnitude):
    """||g|| (ASAM: || |w| ⊙ g ||) of float64 gradients near 1e200 overflows as a sum of squares; the
    perturbation is still w + rho · g / ||g|| (ASAM: w + s · w² · g), the norm computed here with Python
    floats scaled the same way. A float32 parameter beside them (its own segment) counts in the norm."""
    gen = torch.Generator().manual_seed(20)
    params = [nn.Parameter(torch.randn(n, generator=gen, dtype=torch.float64)) for n in (7, 5)]
    params.append(nn.Parameter(torch.randn(3, generator=gen)))
    grads = [torch.randn(n, generator=gen, dtype=torch.float64) * magnitude for n in (7, 5)]
    grads.append(torch.randn(3, generator=gen))
    opt = SAM(params, torch.optim.SGD, rho=0.5, adaptive=adaptive, layout=layout, lr=0.1)
    before = [p.detach().clone() for p in params]
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    opt.first_step()
    terms = [(gi * (abs(wi) if adaptive else 1.0)) / magnitude for w, g in zip(before, grads, strict=True)
             for wi, gi in zip(w.tolist(), g.tolist(), strict=True)]
    assert opt.grad_norm.item() == pytest.approx(math.sqrt(sum(t * t for t in terms)) * magnitude, rel=1e-12)
    scale = 0.5 / (opt.grad_norm + opt.eps)
    for p, w, g in zip(params[:2], before[:2], grads[:2], strict=True):
        assert torch.equal(p.detach(), w + scale * ((w * w) * g if adaptive else g))
        assert not torch.equal(p.detach(), w)
    assert torch.equal(params[2].detach(), before[2])  # its share rounds to 0 in float32
    opt.second_step()
    assert all(torch.isfinite(p).all() for p in params)


def test_huge_rho_is_refused_at_construction():
    """rho / eps ≥ 1e38 would overflow the float32 scale of a small gradient, so the perturbation would
    be silently skipped: refused, naming rho."""
    with pytest.raises(ValueError, match=r"^rho \(param group 0\): rho / eps"):
        SSAM(make_model(12).parameters(), torch.optim.SGD, rho=1e30, lr=0.1)
    opt = SAM(make_model(12).parameters(), torch.optim.SGD, rho=1e30, eps=1.0, lr=0.1)  # ratio 1e30: fine
    for p in opt.param_groups[0]["params"]:
        p.grad = torch.full_like(p, 1e-30)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    opt.first_step()
    assert not all(torch.equal(p, b) for p, b in zip(opt.param_groups[0]["params"], before, strict=True))
    opt.second_step()


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 4096, 100_000, 300_001])
@pytest.mark.parametrize("weighted", [False, True])
def test_python_norms_are_the_same_bits_for_any_thread_count(threads, dtype, n, weighted):
    """reference and vectorized give one result, bit for bit, with 1 and 2 intra-op threads (and to each
    other); it equals the float64 sum of squares up to rounding."""
    gen = torch.Generator().manual_seed(n)
    G, W = torch.randn(n, generator=gen).to(dtype), torch.randn(n, generator=gen).to(dtype)
    results = []
    for count in (1, 2):
        torch.set_num_threads(count)
        for module in (reference, vectorized):
            results.append(module.grad_sq_norm(G, W if weighted else None))
    assert all(torch.equal(r, results[0]) for r in results), [r.item() for r in results]
    v = G.double() * (W.double() if weighted else 1)
    assert results[0].item() == pytest.approx(float((v * v).sum()), rel=1e-12)


# ----------------------------------------------------------------------------------------------------
# torch.optim's hooks and state; one stepping thread; error names
# ----------------------------------------------------------------------------------------------------

def test_state_dict_hooks_fire():
    opt = two_groups(make_model(13))
    seen = []
    opt.register_state_dict_pre_hook(lambda o: seen.append(("pre", o is opt)))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "extra"})
    opt.register_load_state_dict_post_hook(lambda o: seen.append(("load", o is opt)))
    state = opt.state_dict()
    assert state["extra"] == 1 and "ssam" in state
    opt.load_state_dict(state)
    assert seen == [("pre", True), ("load", True)]


def test_state_is_the_base_optimizers():
    model = make_model(14)
    opt = two_groups(model)
    loss_of(model).backward()
    opt.first_step(zero_grad=True)
    loss_of(model).backward()
    opt.second_step()
    assert opt.state is opt.base_optimizer.state
    assert len(opt.state) == 4 and all("momentum_buffer" in s for s in opt.state.values())
    opt.load_state_dict(opt.state_dict())
    assert opt.state is opt.base_optimizer.state and len(opt.state) == 4


def test_a_second_thread_cannot_step_concurrently():
    model = make_model(15)
    opt = two_groups(model)
    inside, release = threading.Event(), threading.Event()
    errors = []

    def closure():
        loss = loss_of(model)
        loss.backward()
        inside.set()
        release.wait(30)
        return loss

    def other():
        inside.wait(30)
        for call in (opt.first_step, opt.second_step, opt.unperturb, lambda: opt.step(closure)):
            try:
                call()
            except RuntimeError as exc:
                errors.append(str(exc))
        release.set()

    thread = threading.Thread(target=other)
    thread.start()
    opt.step(closure)
    thread.join()
    assert len(errors) == 4 and all("another thread is inside a step" in e for e in errors), errors
    assert opt.steps == 1


def test_step_without_first_step_names_the_method_called():
    opt = two_groups(make_model(16))
    with pytest.raises(RuntimeError, match=r"^step: no first_step"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"^second_step: no first_step"):
        opt.second_step()


def test_empty_parameter_list_is_refused():
    with pytest.raises(ValueError, match=r"^params: optimizer got an empty parameter list"):
        SSAM([], torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"^params: optimizer got an empty parameter list"):
        SAM(iter([]), torch.optim.SGD, lr=0.1)


def test_set_mask_on_a_dense_optimizer_says_it_is_dense():
    opt = SAM(make_model(17).parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match=r"^mask: this optimizer is dense") as info:
        opt.set_mask(opt.get_mask())
    assert "live entries" not in str(info.value)


@pytest.mark.parametrize(("kwargs", "error"), [
    ({"drop_rate": "0.5"}, TypeError), ({"drop_rate": True}, TypeError), ({"drop_rate": None}, TypeError),
    ({"drop_rate": float("nan")}, ValueError), ({"drop_rate": 1.5}, ValueError),
    ({"total_steps": True}, TypeError), ({"total_steps": 2.0}, TypeError), ({"total_steps": 0}, ValueError),
])
def test_dynamic_mask_arguments_are_named(kwargs, error):
    with pytest.raises(error, match=f"^{next(iter(kwargs))}: "):
        DynamicMask(**kwargs)


@pytest.mark.parametrize("backend", ["reference", "vectorized", "native"])
def test_positions_and_bases_are_checked_the_same_in_every_backend(backend):
    if ops._unavailable(backend, "cpu") is not None:
        pytest.skip(f"{backend} unavailable")
    words = [torch.zeros(1, dtype=torch.int32)]
    scores = [torch.randn(20)]
    for positions, error in (([-5], ValueError), ([2**63 - 10], ValueError), ([1.5], TypeError)):
        with pytest.raises(error, match=r"^positions\[0\]: "):
            ops.dynamic_update(words, scores, 0, "random", 1, 2, positions=positions, backend=backend)
    with pytest.raises(ValueError, match=r"^base: "):
        ops.hash_scores(20, 1, 2, base=2**63 - 5, backend=backend)
    for sizes, bases, device, error, named in (
            ([20, 3], [0, 2**63 - 2], "cpu", ValueError, r"base\[1\]"),
            ([20, -1], [0, 5], "cpu", ValueError, r"n\[1\]"),
            ([20, 3], 0, "cpu", TypeError, "base"),
            ([20, 3], [0], "cpu", ValueError, "base"),
            ([20, 3], [0, 20], ["cpu"], ValueError, "device"),
            ([20, 3], [0, 20], ["cpu", "nowhere"], ValueError, r"device\[1\]"),
            ([20, 3], [0, 20], ["cpu", 1.5], TypeError, r"device\[1\]")):
        with pytest.raises(error, match=f"^{named}: "):
            ops.hash_scores(sizes, 1, 2, bases, device, backend=backend)


@pytest.mark.parametrize("backend", ["reference", "vectorized", "native"])
def test_a_none_entry_is_a_type_error_naming_it(backend):
    if ops._unavailable(backend, "cpu") is not None:
        pytest.skip(f"{backend} unavailable")
    G, B = [torch.randn(5), torch.randn(5)], [torch.empty(5), torch.empty(5)]
    with pytest.raises(TypeError, match=r"^W\[0\]: expected a torch.Tensor, got NoneType"):
        ops.perturb_([None, G[0]], G, None, None, B, torch.tensor(0.1), backend=backend)
    with pytest.raises(TypeError, match=r"^W\[1\]: expected a torch.Tensor, got NoneType"):
        ops.perturb_([G[0], None], G, None, None, B, torch.tensor(0.1), backend=backend)
