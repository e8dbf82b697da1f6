"""Parameters that change after the optimizer is built: groups added later, layers unfrozen later,
parameters moved or rebound (``model.to``, ``p.data = ...``), and parameters that share storage."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

from ssam_kernels import SAM, SSAM, FisherMask
from tests import helpers
from tests.helpers import batch, loss_fn, seeded_mlp, train

MODES = ("SAM", "SSAM-D", "SSAM-F")
SIZES = (5, 7, 3)  # the model's layer widths
BASES = {"SGD": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
         "AdamW": (torch.optim.AdamW, {"lr": 0.01})}


def make_opt(mode: str, model: nn.Module, groups: list, base: str, layout: str) -> SSAM:
    cls, kwargs = BASES[base]
    if mode == "SAM":
        return SAM(groups, cls, rho=0.1, layout=layout, **kwargs)
    mask = (FisherMask(model, loss_fn, [batch(99)], num_samples=4, interval=2) if mode == "SSAM-F"
            else "dynamic")
    return SSAM(groups, cls, rho=0.1, sparsity=0.5, mask=mask, layout=layout, **kwargs)


def live(opt: SSAM) -> int:
    return sum(int(m.sum()) for m in opt.get_mask())


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


BACKBONE = {"lr": 0.05, "rho": 0.2}  # a group with its own options


# ----------------------------------------------------------------------------------------------------
# add_param_group
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "tensors"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("mode", MODES)
def test_group_added_before_training_trains_as_if_given_at_construction(mode, base, layout):
    added, built = seeded_mlp(sizes=SIZES), seeded_mlp(sizes=SIZES)
    opt = make_opt(mode, added, [{"params": added[2].parameters()}], base, layout)
    opt.add_param_group({"params": added[0].parameters(), **BACKBONE})
    ref = make_opt(mode, built, [{"params": built[2].parameters()},
                                 {"params": built[0].parameters(), **BACKBONE}], base, layout)
    assert opt.live_count == ref.live_count == (5 * 7 + 7 + 7 * 3 + 3) // (2 if mode != "SAM" else 1)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in ref.param_groups]
    assert [g["rho"] for g in opt.param_groups] == [0.1, 0.2]
    train(added, opt, 3)
    train(built, ref, 3)
    assert_same_weights(added, built)
    assert live(opt) == opt.live_count


@pytest.mark.parametrize("layout", ["flat", "tensors"])
@pytest.mark.parametrize("base", sorted(BASES))
@pytest.mark.parametrize("mode", MODES)
def test_unfrozen_backbone_added_mid_training_is_perturbed_and_resumes(mode, base, layout):
    """The fine-tuning recipe: train the head, unfreeze the backbone and add it as a group. The new
    group is perturbed from the next step with exact K over the new N, is restored bit-exactly, and a
    checkpoint taken after add_param_group loads into an optimizer built with the same groups."""
    model = seeded_mlp(sizes=SIZES)
    model[0].requires_grad_(False)
    opt = make_opt(mode, model, [{"params": model[2].parameters()}], base, layout)
    train(model, opt, 2)
    head_k = opt.live_count
    model[0].requires_grad_(True)
    opt.add_param_group({"params": model[0].parameters(), **BACKBONE})
    n = sum(p.numel() for p in model.parameters())
    assert opt.live_count == (n if mode == "SAM" else n // 2) > head_k
    x, y = batch(2)
    loss_fn(model(x), y).backward()
    params = [p for group in opt.param_groups for p in group["params"]]  # get_mask's order
    before = [p.detach().clone() for p in params]
    opt.first_step(zero_grad=True)
    masks = opt.get_mask()
    assert sum(int(m.sum()) for m in masks) == opt.live_count
    for p, b, m in zip(params, before, masks, strict=True):
        assert torch.equal(p[~m], b[~m])  # only live entries move
    assert any(not torch.equal(p, b) for p, b in zip(params[2:], before[2:], strict=True))  # the backbone
    opt.unperturb()
    for p, b in zip(params, before, strict=True):
        assert torch.equal(p, b)  # restored bit-exactly
    loss_fn(model(x), y).backward()
    opt.second_step(zero_grad=True)
    assert opt.steps == 3
    # checkpoint after add_param_group -> an optimizer built with the same groups
    state = copy.deepcopy(opt.state_dict())
    twin = copy.deepcopy(model)
    resumed = make_opt(mode, twin, [{"params": twin[2].parameters()},
                                    {"params": twin[0].parameters(), **BACKBONE}], base, layout)
    resumed.load_state_dict(state)
    train(model, opt, 3, 3)
    train(twin, resumed, 3, 3)
    assert_same_weights(model, twin)
    assert live(resumed) == resumed.live_count


def test_add_param_group_refusals_and_options():
    model = seeded_mlp(sizes=SIZES)
    opt = SSAM([{"params": model[2].parameters()}], torch.optim.SGD, sparsity=0.5, lr=0.1)
    with pytest.raises(ValueError, match="same tensor"):
        opt.add_param_group({"params": [model[2].weight]})
    with pytest.raises(TypeError, match="param_group"):
        opt.add_param_group([model[0].weight])
    with pytest.raises(ValueError, match="rho"):
        opt.add_param_group({"params": [model[0].weight], "rho": -1.0})
    assert len(opt.param_groups) == 1 and opt.live_count == (7 * 3 + 3) // 2  # nothing changed
    x, y = batch(0)
    loss_fn(model(x), y).backward()
    opt.first_step()
    with pytest.raises(RuntimeError, match="perturbed"):
        opt.add_param_group({"params": [model[0].weight]})
    opt.unperturb()
    # perturb=False: stepped by the base optimizer, outside the perturbation (K unchanged)
    opt.add_param_group({"params": model[0].parameters(), "perturb": False, "lr": 0.0})
    assert opt.live_count == (7 * 3 + 3) // 2 and opt.param_groups[1]["lr"] == 0.0
    assert opt.base_optimizer.param_groups is opt.param_groups
    train(model, opt, 2, 1)
    assert not any(m.any() for m in opt.get_mask()[2:])


# ----------------------------------------------------------------------------------------------------
# A layer unfrozen after construction
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_layer_unfrozen_after_construction_is_reported_once(layout):
    model = seeded_mlp(sizes=SIZES)
    model[0].requires_grad_(False)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, lr=0.1, layout=layout)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 1)  # nothing unfrozen: silent
    model[0].requires_grad_(True)
    with pytest.warns(UserWarning, match=r"add_param_group") as record:
        train(model, opt, 1, 1)
    assert len(record) == 1 and "2 parameter(s)" in str(record[0].message)
    assert "group 0 index 0 (shape (7, 5))" in str(record[0].message)
    assert record[0].filename == helpers.__file__  # points at the caller of first_step (train)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(model, opt, 1, 2)  # reported once


# ----------------------------------------------------------------------------------------------------
# model.to / p.data = ... after the optimizer is built
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("zero_grad_first", [False, True])
@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_model_moved_to_the_same_device_trains_as_if_not_moved(layout, zero_grad_first):
    """``model.to("cpu:0")`` (accelerate on CPU) copies every parameter and its gradient: the optimizer
    follows (the copies' values are kept), whether or not the gradients were reset after the move."""
    moved, still = seeded_mlp(sizes=SIZES), seeded_mlp(sizes=SIZES)
    opt = SSAM(moved.parameters(), torch.optim.AdamW, sparsity=0.5, lr=0.01, layout=layout)
    ref = SSAM(still.parameters(), torch.optim.AdamW, sparsity=0.5, lr=0.01, layout=layout)
    moved.to("cpu:0")
    with torch.no_grad():
        moved[0].weight.add_(1.0)  # changed after the move: must survive
        still[0].weight.add_(1.0)
    if zero_grad_first:
        moved.zero_grad()
        still.zero_grad()
    train(moved, opt, 3)
    train(still, ref, 3)
    assert_same_weights(moved, still)
    for segment in opt.layout.segments:
        for p, (start, _) in zip(segment.params, segment.spans(), strict=True):
            assert p.data_ptr() == segment.weight[start:].data_ptr()


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_parameter_data_rebound_is_copied_into_the_optimizer(layout):
    model = seeded_mlp(sizes=SIZES)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, lr=0.1, layout=layout)
    new = model[2].weight.detach().clone() * 3
    model[2].weight.data = new.clone()
    x, y = batch(0)
    loss_fn(model(x), y).backward()
    opt.first_step(zero_grad=True)
    opt.unperturb()
    assert torch.equal(model[2].weight, new)
    segment = next(s for s in opt.layout.segments if any(p is model[2].weight for p in s.params))
    assert segment.weight.untyped_storage().data_ptr() == model[2].weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("layout", ["flat", "tensors"])
@pytest.mark.parametrize("change", ["dtype", "bfloat16", "device", "shape"])
def test_parameter_moved_to_another_dtype_device_or_shape_raises(layout, change):
    if change == "device" and not torch.cuda.is_available():
        pytest.skip("needs a second device (CUDA)")  # CPU -> meta builds new Parameter objects
    model = seeded_mlp(sizes=SIZES)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, lr=0.1, layout=layout)
    if change == "dtype":
        model.to(torch.float64)
    elif change == "bfloat16":
        model.to(torch.bfloat16)
    elif change == "device":
        model.to("cuda")
    else:
        model[0].weight.data = torch.zeros(35)
    with pytest.raises(ValueError, match="build the optimizer after moving or converting the model"):
        opt.first_step()
    assert opt._run.phase == "idle"


# ----------------------------------------------------------------------------------------------------
# Parameters that share storage
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["flat", "tensors", "auto"])
@pytest.mark.parametrize("how", ["data", "views"])
def test_distinct_parameters_sharing_storage_are_refused(layout, how):
    if how == "data":
        a, b = nn.Parameter(torch.randn(4, 3)), nn.Parameter(torch.randn(4, 3))
        b.data = a.data
    else:
        base = torch.randn(10)
        a, b = nn.Parameter(base[:6]), nn.Parameter(base[4:])
    other = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match=r"group 0, index 1 .* group 1, index 0 .* share memory"):
        SSAM([{"params": [other, a]}, {"params": [b]}], torch.optim.SGD, lr=0.1, layout=layout)
    with pytest.raises(ValueError, match="share memory"):  # perturb=False or frozen: still refused
        SSAM([{"params": [a]}, {"params": [b], "perturb": False}], torch.optim.SGD, lr=0.1, layout=layout)
    opt = SSAM([a], torch.optim.SGD, lr=0.1, layout=layout)
    b.data = a.data  # the flat layout moved a: tie again, then add
    with pytest.raises(ValueError, match="share memory"):
        opt.add_param_group({"params": [b]})
    disjoint = torch.randn(10)  # views that do not overlap are distinct parameters
    SSAM([nn.Parameter(disjoint[:5]), nn.Parameter(disjoint[5:])], torch.optim.SGD, lr=0.1, layout=layout)


def test_tied_weights_as_one_parameter_stay_tied_and_are_restored_exactly():
    """Tied weights written as one Parameter used by two modules (``decoder.weight = encoder.weight``):
    perturbed once, restored bit-exactly, still tied after steps, same result in both layouts."""
    def tied() -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 4))
        model[2].weight = model[0].weight
        return model

    def loss(model: nn.Module, seed: int) -> torch.Tensor:
        x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
        return model(x).pow(2).mean()

    results = {}
    for kind in ("flat", "tensors"):
        model = tied()
        opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.5, sparsity=0.5, lr=0.1, layout=kind)
        for step in range(3):
            loss(model, step).backward()
            before = [p.detach().clone() for p in model.parameters()]
            opt.first_step(zero_grad=True)
            assert not torch.equal(model[0].weight, before[0]) or not torch.equal(model[0].bias, before[1])
            loss(model, step).backward()  # at w + e
            opt.unperturb()
            for p, b in zip(model.parameters(), before, strict=True):
                assert torch.equal(p, b)
            opt.second_step(zero_grad=True)
        assert model[2].weight is model[0].weight
        assert model[2].weight.data_ptr() == model[0].weight.data_ptr()
        results[kind] = [p.detach().clone() for p in model.parameters()]
    for p, q in zip(results["flat"], results["tensors"], strict=True):
        assert torch.equal(p, q)
