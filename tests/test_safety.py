"""The optimizer is never silently wrong: PyTorch's gradient semantics, argument checks,
exact K, set_mask's count, meta and empty parameter sets, atomic and documented checkpoint loads, the
closure conventions. Expected values come from plain PyTorch or from arithmetic written here."""

from __future__ import annotations

import copy
import decimal
import io

import pytest
import torch
from torch import nn

from ssam_kernels import SAM, SSAM, DynamicMask, FisherMask, RandomMask, topk_mask
from ssam_kernels.masks import live_count
from tests.helpers import assert_same, backward, batch, train, weights
from tests.helpers import seeded_mlp as make_model


def assert_state_equal(a, b) -> None:
    """Two (nested) state dicts are equal, tensors bit for bit."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_state_equal(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_state_equal(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def expect(exc, prefix, fn, contains: str = "") -> None:
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value).startswith(prefix), str(info.value)
    assert contains in str(info.value), str(info.value)


# ----------------------------------------------------------------------------------------------------
# 1. Parameters that got no gradient are not stepped (PyTorch's semantics)
# ----------------------------------------------------------------------------------------------------

class Branchy(nn.Module):
    """A trunk, a branch used in some steps only, and a head frozen mid-training."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(3)
        self.trunk, self.branch, self.out, self.head = (nn.Linear(5, 4), nn.Linear(4, 3), nn.Linear(4, 3),
                                                        nn.Linear(3, 3))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))

    def forward(self, x: torch.Tensor, use_branch: bool) -> torch.Tensor:
        h = torch.tanh(self.trunk(x))
        out = self.out(h) + (self.branch(h) if use_branch else 0)
        return self.head(out)


BASES = {
    "sgd_momentum_wd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}),
    "adamw": (torch.optim.AdamW, {"lr": 0.05, "weight_decay": 0.1}),
}


def branchy_run(optimizer_for, set_to_none: bool, two_pass: bool, steps: int = 7) -> list[torch.Tensor]:
    model = Branchy()
    opt = optimizer_for(model)
    for t in range(steps):
        if t == 4:
            model.head.requires_grad_(False)  # frozen mid-training
        x, y = batch(t)
        use_branch = t in (1, 2)  # the branch gets gradients in steps 1 and 2 only

        def loss_backward(model=model, x=x, y=y, use_branch=use_branch):
            nn.functional.cross_entropy(model(x, use_branch), y).backward()

        opt.zero_grad(set_to_none=set_to_none)
        loss_backward()
        if two_pass:
            opt.first_step()
            opt.zero_grad(set_to_none=set_to_none)
            loss_backward()
            opt.second_step()
        else:
            opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_rho_zero_takes_exactly_the_base_steps(layout, base, set_to_none):
    """With rho = 0, SAM is its base optimizer, bit for bit: a branch unused in a step and a layer
    frozen with requires_grad_(False) are not moved by momentum, Adam's moments or weight decay
    (set_to_none=True), and a parameter that had a gradient keeps a zero one and is stepped
    (set_to_none=False), exactly as in plain PyTorch."""
    cls, kwargs = BASES[base]
    expected = branchy_run(lambda m: cls(m.parameters(), **kwargs), set_to_none, two_pass=False)
    got = branchy_run(lambda m: SAM(m.parameters(), cls, rho=0.0, layout=layout, **kwargs), set_to_none,
                      two_pass=True)
    assert_same(got, expected)


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_module_zero_grad_and_assigned_grads_count_as_gradients(layout):
    """model.zero_grad() (PyTorch's, not ours) and a .grad assigned by hand are gradients like any
    other, and a parameter left with None (an unused bias) is skipped: with rho = 0 the result equals
    the base optimizer's."""
    runs = []
    for ours in (False, True):
        model = make_model(4)
        kwargs = {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.1}
        opt = (SAM(model.parameters(), torch.optim.SGD, rho=0.0, layout=layout, **kwargs) if ours
               else torch.optim.SGD(model.parameters(), **kwargs))
        for t in range(3):
            x, y = batch(t)
            for first_pass in ([True, False] if ours else [False]):
                model.zero_grad(set_to_none=True)
                model[0].weight.grad = torch.full_like(model[0].weight, 0.25)  # assigned; bias: no grad
                hidden = torch.tanh(x @ model[0].weight.detach().T)
                nn.functional.cross_entropy(model[2](hidden), y).backward()
                if first_pass:
                    opt.first_step()
            opt.step() if not ours else opt.second_step()
        runs.append(weights(model))
    assert_same(runs[1], runs[0])


# ----------------------------------------------------------------------------------------------------
# 2-3. Arguments
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_duplicated_parameter_is_refused(layout):
    ps = list(make_model(5).parameters())
    sgd = torch.optim.SGD
    expect(ValueError, "params", lambda: SSAM([*ps, ps[2]], sgd, layout=layout, lr=0.1), "(3, 4)")
    expect(ValueError, "params", lambda: SSAM([{"params": ps[:3]}, {"params": [ps[0], ps[3]]}], sgd,
                                              layout=layout, lr=0.1), "(4, 5)")
    expect(ValueError, "params", lambda: SAM([ps[1], ps[1]], sgd, layout=layout, lr=0.1), "index 1")


@pytest.mark.parametrize(("kwargs", "error", "name"), [
    ({"rho": float("inf")}, ValueError, "rho"),
    ({"rho": float("nan")}, ValueError, "rho"),
    ({"rho": 1e38}, ValueError, "rho"),
    ({"eps": float("inf")}, ValueError, "eps"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"eps": 1e38}, ValueError, "eps"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"sparsity": "0.5"}, TypeError, "sparsity"),
    ({"sparsity": True}, TypeError, "sparsity"),
    ({"rho": "a"}, TypeError, "rho"),
    ({"rho": None}, TypeError, "rho"),
    ({"eps": None}, TypeError, "eps"),
    ({"layout": 3}, TypeError, "layout"),
    ({"backend": 1}, TypeError, "backend"),
    ({"adaptive": "yes"}, TypeError, "adaptive"),
    ({"adaptive": 1}, TypeError, "adaptive"),
    ({"distributed": None}, TypeError, "distributed"),
    ({"sync_perturbation": "no"}, TypeError, "sync_perturbation"),
    ({"ddp_model": "model"}, TypeError, "ddp_model"),
    ({"mask": 3}, TypeError, "mask"),
])
def test_bad_hyperparameters_are_named(kwargs, error, name):
    ps = list(make_model(6).parameters())
    expect(error, name, lambda: SSAM(ps, torch.optim.SGD, **{"lr": 0.1, **kwargs}))


@pytest.mark.parametrize(("group", "error"), [
    ({"rho": float("inf")}, ValueError), ({"rho": -1.0}, ValueError), ({"rho": 1e39}, ValueError),
    ({"rho": "0.1"}, TypeError), ({"perturb": 0}, TypeError), ({"perturb": "False"}, TypeError),
    ({"adaptive": "yes"}, TypeError), ({"adaptive": None}, TypeError),
])
def test_bad_per_group_options_are_named(group, error):
    ps = list(make_model(7).parameters())
    key = next(iter(group))
    expect(error, key, lambda: SSAM([{"params": ps[:2]}, {"params": ps[2:], **group}], torch.optim.SGD,
                                    lr=0.1), "param group 1")


# ----------------------------------------------------------------------------------------------------
# 4-6. K, set_mask, meta and empty parameter sets
# ----------------------------------------------------------------------------------------------------

def decimal_k(n: int, sparsity: str) -> int:
    with decimal.localcontext(decimal.Context(prec=100)):
        return int((n * (1 - decimal.Decimal(sparsity))).to_integral_value(rounding=decimal.ROUND_FLOOR))


@pytest.mark.parametrize(("n", "sparsity"), [(1000, "0.9"), (10, "0.9"), (10, "0.7"), (100, "0.07"),
                                             (3, "0.1"), (7, "1"), (7, "0"), (49, "0.51")])
def test_live_count_is_not_lost_to_rounding(n, sparsity):
    k = decimal_k(n, sparsity)
    assert live_count(n, float(sparsity)) == k
    assert (live_count(1000, 0.9), live_count(10, 0.9)) == (100, 1)
    params = [nn.Parameter(torch.randn(n))]
    opt = SSAM(params, torch.optim.SGD, sparsity=float(sparsity), mask=RandomMask(seed=1), lr=0.1)
    assert opt.live_count == k and int(opt.get_mask()[0].sum()) == k
    (mask,) = topk_mask([torch.randn(n)], float(sparsity))
    assert int(mask.sum()) == k


def test_set_mask_with_another_count_is_refused():
    model = make_model(8)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=DynamicMask(interval=1, seed=2),
               lr=0.1)
    k = opt.live_count
    before = opt.get_mask()
    for delta in (-1, 1):
        masks = [m.clone() for m in before]
        flat = torch.cat([m.reshape(-1) for m in masks])
        index = (flat if delta < 0 else ~flat).nonzero()[0].item()
        for m in masks:  # flip one entry: K - 1 or K + 1 live entries
            if index < m.numel():
                m.view(-1)[index] ^= True
                break
            index -= m.numel()
        expect(ValueError, "mask", lambda masks=masks: opt.set_mask(masks), f"{k + delta} live entries")
        assert_same(opt.get_mask(), before)
    train(model, opt, 3)
    assert sum(int(m.sum()) for m in opt.get_mask()) == k
    dense = SAM(make_model(8).parameters(), torch.optim.SGD, lr=0.1)
    expect(ValueError, "mask", lambda: dense.set_mask([torch.ones_like(m) for m in dense.get_mask()]))


def test_meta_parameters_are_refused_at_construction():
    with torch.device("meta"):
        model = make_model(9)
    expect(ValueError, "params", lambda: SSAM(model.parameters(), torch.optim.SGD, lr=0.1), "meta")


@pytest.mark.parametrize("how", ["perturb_false", "all_frozen"])
@pytest.mark.parametrize("kind", ["dynamic", "random", "fisher", "sam"])
def test_empty_perturbed_set_behaves_as_the_base_optimizer(how, kind):
    runs = []
    for ours in (False, True):
        model = make_model(10)
        if how == "all_frozen":
            model.requires_grad_(False)
        params = [{"params": list(model.parameters()), "perturb": how != "perturb_false"}]
        if not ours:
            opt = torch.optim.SGD(params[0]["params"], lr=0.1, momentum=0.9)
        elif kind == "sam":
            opt = SAM(params, torch.optim.SGD, lr=0.1, momentum=0.9)
        else:
            mask = {"dynamic": DynamicMask(interval=1), "random": RandomMask(interval=1),
                    "fisher": FisherMask(model, nn.functional.cross_entropy, [batch(99)], num_samples=4,
                                         interval=1)}[kind]
            opt = SSAM(params, torch.optim.SGD, sparsity=0.5, mask=mask, lr=0.1, momentum=0.9)
        model[2].requires_grad_(True)  # all_frozen: unfrozen after construction, trained by the base only
        for t in range(3):
            x, y = batch(t)
            opt.zero_grad()
            before = weights(model)
            backward(model, x, y)
            if ours:
                opt.first_step()
                assert_same(weights(model), before)  # nothing to perturb
                assert opt.live_count == 0
            opt.step() if not ours else opt.second_step()
        runs.append(weights(model))
    assert not all(torch.equal(a, b) for a, b in zip(runs[0], weights(make_model(10)), strict=True))
    assert_same(runs[1], runs[0])


# ----------------------------------------------------------------------------------------------------
# 7-9. Checkpoints
# ----------------------------------------------------------------------------------------------------

def build(model, kind="dynamic", sparsity=0.5, layout="flat"):
    if kind == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.1, layout=layout, lr=0.1, momentum=0.9)
    mask = DynamicMask(interval=2, seed=3) if kind == "dynamic" else RandomMask(interval=2, seed=3)
    return SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=sparsity, mask=mask, layout=layout,
                lr=0.1, momentum=0.9, weight_decay=1e-3)


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    return torch.load(io.BytesIO(buf.getvalue()), weights_only=False)


def trained(seed, kind="dynamic", sparsity=0.5, steps=3, mid_step=False, sizes=(5, 4, 3)):
    model = make_model(seed, sizes)
    opt = build(model, kind, sparsity)
    train(model, opt, steps)
    if mid_step:
        backward(model, *batch(steps))
        opt.first_step(zero_grad=True)
    return model, opt


def assert_unchanged_and_usable(model, opt, state_before, weights_before):
    assert_state_equal(opt.state_dict(), state_before)
    assert_same(weights(model), weights_before)
    steps = opt.steps
    train(model, opt, 2, start=10)
    assert opt.steps == steps + 2


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_failed_load_changes_nothing(layout):
    """A mid-step checkpoint of a model with other shapes (same number of tensors) is refused before
    anything changes: the state dict and weights are as before and training goes on."""
    _, other = trained(11, mid_step=True, sizes=(5, 6, 3))
    blob = roundtrip(other.state_dict())
    model = make_model(12)
    opt = build(model, layout=layout)
    train(model, opt, 2)
    before, w = copy.deepcopy(opt.state_dict()), weights(model)
    groups = opt.param_groups
    with pytest.raises(ValueError, match=r"^(mask|backups)\[0\]"):
        opt.load_state_dict(blob)
    assert opt.param_groups is groups is opt.base_optimizer.param_groups
    assert_unchanged_and_usable(model, opt, before, w)


def test_base_load_error_is_rolled_back():
    """If the base optimizer's own load raises after replacing its state, the old state comes back."""
    _, source = trained(13)
    blob = roundtrip(source.state_dict())
    model = make_model(14)
    opt = build(model)
    train(model, opt, 2)
    before, w = copy.deepcopy(opt.state_dict()), weights(model)

    def fail(optimizer):
        raise RuntimeError("post-hook failure")

    handle = opt.base_optimizer.register_load_state_dict_post_hook(fail)
    with pytest.raises(RuntimeError, match="post-hook failure"):
        opt.load_state_dict(blob)
    handle.remove()
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert_unchanged_and_usable(model, opt, before, w)


@pytest.mark.parametrize("mutate", ["phase", "steps", "started", "version", "backups_dtype", "mask_dtype",
                                    "mask_count", "group_perturb", "group_rho"])
def test_malformed_checkpoints_are_refused_without_change(mutate):
    _, source = trained(15, mid_step=True)
    blob = roundtrip(source.state_dict())
    ssam = blob["ssam"]
    if mutate == "phase":
        ssam["phase"] = "halfway"
    elif mutate == "steps":
        ssam["steps"] = -1
    elif mutate == "started":
        ssam["started"] = "yes"
    elif mutate == "version":
        ssam["version"] = 99
    elif mutate == "backups_dtype":
        ssam["backups"][0] = ssam["backups"][0].to(torch.int64)
    elif mutate == "mask_dtype":
        ssam["mask"][0] = ssam["mask"][0].float()
    elif mutate == "mask_count":
        ssam["mask"][0] = torch.full_like(ssam["mask"][0], -1)  # every entry live
    elif mutate == "group_perturb":
        blob["param_groups"][0]["perturb"] = False
    else:
        blob["param_groups"][0]["rho"] = float("nan")
    model = make_model(16)
    opt = build(model)
    train(model, opt, 1)
    before, w = copy.deepcopy(opt.state_dict()), weights(model)
    with pytest.raises(ValueError):
        opt.load_state_dict(blob)
    assert_unchanged_and_usable(model, opt, before, w)


def test_loading_while_perturbed_is_refused_and_keeps_the_backup():
    _, source = trained(17)
    blob = roundtrip(source.state_dict())
    model = make_model(18)
    opt = build(model)
    train(model, opt, 1)
    w = weights(model)
    backward(model, *batch(5))
    opt.first_step(zero_grad=True)
    for load in (lambda: opt.load_state_dict(blob), lambda: opt.load_ssam_state_dict(blob["ssam"])):
        expect(RuntimeError, "load", load, "perturbed")
    opt.unperturb()
    assert_same(weights(model), w)
    opt.load_state_dict(blob)
    assert opt.steps == source.steps


def test_checkpoint_from_another_sparsity():
    """Same K: loads (the mask is kept). Another K: refused, naming both counts."""
    _, source = trained(19, sparsity=0.5)
    blob = roundtrip(source.state_dict())
    n = sum(p.numel() for p in make_model(0).parameters())
    opt = build(make_model(20), sparsity=0.7)
    expect(ValueError, "mask", lambda: opt.load_state_dict(blob),
           f"{live_count(n, 0.5)} live entries, this optimizer keeps K = {live_count(n, 0.7)}")
    near = 0.5 + 0.5 / n / 2  # another sparsity with the same K
    assert live_count(n, near) == live_count(n, 0.5)
    opt = build(make_model(20), sparsity=near)
    opt.load_state_dict(blob)
    assert_same(opt.get_mask(), source.get_mask())


def test_checkpoint_between_sam_and_ssam():
    """SAM -> SSAM: a fresh mask at the next first_step; SSAM -> SAM: dense, the mask is dropped;
    mid-step, or between two mask policies: refused."""
    sam_model, sam = trained(21, kind="sam")
    model = make_model(22)
    model.load_state_dict(sam_model.state_dict())
    opt = build(model)
    opt.load_state_dict(roundtrip(sam.state_dict()))
    assert opt.steps == sam.steps
    assert sum(int(m.sum()) for m in opt.get_mask()) == opt.live_count
    train(model, opt, 2, start=3)

    ssam_model, ssam = trained(23)
    model = make_model(24)
    model.load_state_dict(ssam_model.state_dict())
    dense = build(model, kind="sam")
    dense.load_state_dict(roundtrip(ssam.state_dict()))
    assert all(m.all() for m in dense.get_mask())
    train(model, dense, 2, start=3)

    _, mid = trained(25, kind="sam", mid_step=True)
    expect(ValueError, "phase", lambda: build(make_model(26)).load_state_dict(roundtrip(mid.state_dict())))
    _, mid = trained(27, mid_step=True)
    to_sam = build(make_model(28), "sam")
    expect(ValueError, "phase", lambda: to_sam.load_state_dict(roundtrip(mid.state_dict())))
    expect(ValueError, "policy_kind",
           lambda: build(make_model(29), "random").load_state_dict(roundtrip(ssam.state_dict())))


def test_checkpoint_has_a_version_and_version_1_loads():
    model, opt = trained(30)
    state = roundtrip(opt.state_dict())
    assert state["ssam"]["version"] == 3 and state["ssam"]["policy_kind"] == "DynamicMask"
    for key in ("version", "policy_kind", "sparsity", "live_count", "schedule"):  # not in version 1
        del state["ssam"][key]
    fresh = make_model(31)
    fresh.load_state_dict(model.state_dict())
    resumed = build(fresh)
    resumed.load_state_dict(state)
    assert_same(resumed.get_mask(), opt.get_mask())


def test_param_groups_stay_one_list_across_loads():
    _, source = trained(32)
    opt = build(make_model(33))
    groups = opt.param_groups
    opt.load_state_dict(roundtrip(source.state_dict()))
    assert opt.param_groups is groups is opt.base_optimizer.param_groups
    assert groups[0]["lr"] == 0.1 and "momentum_buffer" in next(iter(opt.base_optimizer.state.values()))


# ----------------------------------------------------------------------------------------------------
# 13. step(closure) after a backward (davda54 / pytorch_optimizer convention)
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sam", "dynamic"])
def test_closure_after_backward_uses_it_as_the_first_pass(kind):
    a, b = make_model(34), make_model(34)
    opt_a, opt_b = build(a, kind), build(b, kind)
    calls = 0
    for t in range(4):
        x, y = batch(t)

        def closure(x=x, y=y):
            nonlocal calls
            calls += 1
            return backward(a, x, y)

        backward(a, x, y)  # loss.backward(); opt.step(closure); opt.zero_grad()
        opt_a.step(closure)
        opt_a.zero_grad()
        backward(b, x, y)
        opt_b.first_step(zero_grad=True)
        backward(b, x, y)
        opt_b.second_step(zero_grad=True)
    assert calls == 4  # one closure call per step: two passes in all, not three
    assert_same(weights(a), weights(b))
    assert_same(opt_a.get_mask(), opt_b.get_mask())


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_policy_backward_passes_are_not_user_gradients(layout):
    """FisherMask(method="backward") runs backward passes of its own at every refresh: they must not
    look like a gradient of the user's (step(closure) would then skip its first pass)."""
    model = make_model(36)
    mask = FisherMask(model, nn.functional.cross_entropy, [batch(98)], num_samples=4, interval=1,
                      method="backward")
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=mask, layout=layout, lr=0.1)
    calls = 0
    for t in range(3):
        x, y = batch(t)

        def closure(x=x, y=y):
            nonlocal calls
            calls += 1
            return backward(model, x, y)

        opt.step(closure)
    assert calls == 6 and opt.steps == 3


def test_closure_while_perturbed_is_the_second_pass():
    a, b = make_model(35), make_model(35)
    opt_a, opt_b = build(a), build(b)
    for t in range(3):
        x, y = batch(t)
        backward(a, x, y)
        opt_a.first_step(zero_grad=True)
        loss = opt_a.step(lambda x=x, y=y: backward(a, x, y))
        assert torch.isfinite(loss)
        opt_a.zero_grad()
        backward(b, x, y)
        opt_b.first_step(zero_grad=True)
        backward(b, x, y)
        opt_b.second_step(zero_grad=True)
    assert_same(weights(a), weights(b))
    assert opt_a.steps == 3
