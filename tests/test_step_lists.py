"""The step's cached op lists (``SSAM._step_lists``) and the per-tensor layout's gradient gathering
(``ParamLayout.grads``): built once, reused while nothing they hold changes, rebuilt exactly
when something does. Every step below is checked against a float64 re-computation of the perturbation
from what is in force at that step (mask, rho, adaptive, gradients, the parameters' current storage),
so a stale list shows as a wrong perturbation, not only as a changed cache object.
"""

from __future__ import annotations

import gc
import io
import weakref

import pytest
import torch
from torch import nn

from ssam_kernels import SSAM, DynamicMask, ops
from ssam_kernels.layout import ParamLayout, Segment
from tests.helpers import native_op_counts

EPS = 1e-12


class Net(nn.Module):
    """2-D, 1-D and 0-d parameters (the per-tensor layout flattens the gradients of all but the 1-D
    ones), and a head that is used only when asked (a parameter without a gradient on some steps)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.weight = nn.Parameter(torch.randn(6, 5, generator=gen) * 0.5)
        self.bias = nn.Parameter(torch.randn(6, generator=gen) * 0.5)
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.head = nn.Parameter(torch.randn(3, 6, generator=gen) * 0.5)

    def loss(self, seed: int, use_head: bool = True) -> torch.Tensor:
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1000 + seed))
        h = torch.tanh(x @ self.weight.t() + self.bias) * self.scale
        return (h @ self.head.t()).square().mean() if use_head else h.square().mean()


def expected_perturbation(opt: SSAM) -> dict[int, torch.Tensor]:
    """``id(param) -> w + e`` in float64 for every perturbed parameter, from the optimizer's groups, its
    mask in force (``get_mask``) and the parameters' ``.grad`` (None: zeros), as SSAM defines the step:
    ``e = rho · g ⊙ m / (||g|| + eps)`` (adaptive: ``rho · w² ⊙ g ⊙ m / (|| |w| ⊙ g || + eps)``), the
    norm over every perturbed entry."""
    params = [p for g in opt.param_groups for p in g["params"]]
    masks = {id(p): m for p, m in zip(params, opt.get_mask(), strict=True)}
    perturbed = {id(p) for s in opt.layout.segments for p in s.params}
    rows = []
    for group in opt.param_groups:
        for p in group["params"]:
            if id(p) in perturbed:
                w = p.detach().double()
                g = p.grad.double() if p.grad is not None else torch.zeros_like(w)
                rows.append((p, w, g, group["rho"], group["adaptive"]))
    norm = sum(float(((w.abs() * g) if adaptive else g).square().sum()) for _, w, g, _, adaptive in rows)
    norm **= 0.5
    return {id(p): w + rho * (w * w if adaptive else 1) * g * masks[id(p)] / (norm + EPS)
            for p, w, g, rho, adaptive in rows}


def checked_step(opt: SSAM, model: Net, seed: int, use_head: bool = True) -> None:
    """One two-pass step; the perturbed point is compared with :func:`expected_perturbation` and the
    weights after ``unperturb`` with the ones before, bit for bit."""
    model.loss(seed, use_head).backward()
    params = [p for g in opt.param_groups for p in g["params"]]
    before = [p.detach().clone() for p in params]
    expected = expected_perturbation(opt)
    opt.first_step()
    for p, old in zip(params, before, strict=True):
        if id(p) in expected:
            torch.testing.assert_close(p.detach().double(), expected[id(p)], rtol=2e-7, atol=1e-9)
        else:
            assert torch.equal(p.detach(), old)
    opt.unperturb()
    for p, old in zip(params, before, strict=True):
        assert torch.equal(p.detach(), old)
    opt.zero_grad()
    model.loss(seed, use_head).backward()
    opt.second_step(zero_grad=True)


def make_opt(model: Net, layout: str, **kwargs) -> SSAM:
    return SSAM([{"params": [model.weight, model.bias, model.scale]}, {"params": [model.head], "rho": 0.2}],
                torch.optim.SGD, rho=0.1, sparsity=0.5, mask=DynamicMask(interval=3, seed=4), layout=layout,
                lr=0.05, **kwargs)


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_step_lists_are_reused_and_rebuilt_exactly_when_their_inputs_change(layout):
    model = Net()
    opt = make_opt(model, layout)
    checked_step(opt, model, 0)
    lists = opt._run.lists.built
    checked_step(opt, model, 1)
    assert opt._run.lists.built is lists  # nothing changed: reused

    opt.param_groups[1]["rho"] = 0.05  # a rho schedule: read at each step, the lists stay
    model.loss(2).backward()
    opt.first_step()
    assert opt._run.lists.built is lists
    opt.unperturb()
    opt.zero_grad()
    checked_step(opt, model, 2)  # the third step: the mask is refreshed after it, the lists dropped
    assert opt._run.lists.built is None
    checked_step(opt, model, 3)  # the refreshed mask is in force
    assert opt._run.lists.built is not None and opt._run.lists.built is not lists
    lists = opt._run.lists.built

    opt.param_groups[0]["adaptive"] = True  # ASAM's norm needs the weights: rebuilt
    checked_step(opt, model, 4)
    assert opt._run.lists.built is not lists
    opt.param_groups[0]["adaptive"] = False

    current = opt.get_mask()  # all entries rolled by one: another mask with the same count
    rolled = torch.cat([m.reshape(-1) for m in current]).roll(1).split([m.numel() for m in current])
    flipped = [r.reshape(m.shape) for r, m in zip(rolled, current, strict=True)]
    lists = opt._run.lists.built
    opt.set_mask(flipped)
    checked_step(opt, model, 5)  # checks that the perturbation follows the mask set
    assert opt._run.lists.built is not lists

    state = io.BytesIO()
    torch.save(opt.state_dict(), state)  # 6 steps done, the mask refreshed after the 6th
    saved_mask = opt.get_mask()
    for step in (6, 7, 8):  # refreshed after the 9th
        checked_step(opt, model, step)
    assert not all(torch.equal(a, b) for a, b in zip(opt.get_mask(), saved_mask, strict=True))
    opt.load_state_dict(torch.load(io.BytesIO(state.getvalue()), weights_only=False))
    assert all(torch.equal(a, b) for a, b in zip(opt.get_mask(), saved_mask, strict=True))
    lists = opt._run.lists.built
    checked_step(opt, model, 9)  # with the loaded mask
    assert opt._run.lists.built is not lists

    extra = nn.Parameter(torch.randn(4, 2))
    opt.add_param_group({"params": [extra], "rho": 0.3})
    extra.grad = torch.randn(4, 2)  # the loss does not use it: its gradient is given by hand
    lists = opt._run.lists.built
    checked_step(opt, model, 10)
    assert opt._run.lists.built is not lists
    assert any(p is extra for s in opt.layout.segments for p in s.params)


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_replaced_backups_are_not_kept_alive_by_the_lists(layout):
    """A mask refresh at the end of a step installs new backups; the lists of the old ones must not keep
    them (up to N entries) alive through the next forward and backward."""
    model = Net(4)
    opt = SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=DynamicMask(interval=1, seed=2),
               layout=layout, lr=0.05)
    model.loss(0).backward()
    opt.first_step(zero_grad=True)
    old = [weakref.ref(b) for b in opt._run.backups]
    model.loss(0).backward()
    opt.second_step(zero_grad=True)  # refreshes the mask: new backups
    gc.collect()
    assert all(ref() is None for ref in old)
    checked_step(opt, model, 1)


@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_parameter_without_a_gradient_on_some_steps(layout):
    """The head gets no gradient on odd steps: it counts as zeros in the norm and the perturbation and
    is not stepped by the base optimizer (PyTorch's ``.grad`` None), on the cached lists."""
    model = Net(1)
    opt = make_opt(model, layout)
    for step in range(5):
        head = model.head.detach().clone()
        checked_step(opt, model, step, use_head=step % 2 == 0)
        assert torch.equal(model.head.detach(), head) == (step % 2 == 1)


@pytest.mark.parametrize("layout", ["flat", "tensors"])
@pytest.mark.parametrize("how", ["module_to", "data"])
def test_parameters_rebound_after_the_lists_are_built_are_followed(layout, how):
    """``model.to("cpu:0")`` (rebinds every ``p.data`` and ``p.grad.data``) or ``p.data = ...`` in the
    middle of training: the next steps perturb and restore the memory the model reads, and training
    goes on exactly as for a model that was not moved."""
    moved, still = Net(2), Net(2)
    opts = [make_opt(moved, layout), make_opt(still, layout)]
    for step in range(2):
        for model, opt in zip((moved, still), opts, strict=True):
            checked_step(opt, model, step)
    lists = opts[0]._run.lists.built
    if how == "module_to":
        moved.to("cpu:0")
    else:
        moved.weight.data = moved.weight.detach().clone()
        moved.bias.data = moved.bias.detach().clone()
    for step in range(2, 5):
        for model, opt in zip((moved, still), opts, strict=True):
            checked_step(opt, model, step)
    assert opts[0]._run.lists.built is not lists  # refreshed after step 3 (interval 3)
    for p, q in zip(moved.parameters(), still.parameters(), strict=True):
        assert torch.equal(p, q)
    for segment in opts[0].layout.segments:
        for p, (start, _) in zip(segment.params, segment.spans(), strict=True):
            assert p.data_ptr() == segment.weight[start:].data_ptr()


def _native_calls(opt: SSAM, model: Net) -> dict[str, int]:
    model.loss(0).backward()

    def run() -> None:
        opt.first_step(zero_grad=True)
        opt.second_step()
    return native_op_counts(run)


@pytest.mark.skipif(ops._unavailable("native", "cpu") is not None, reason="native extension not built")
@pytest.mark.parametrize("rhos", [(0.1, 0.1), (0.1, 0.2)])
def test_groups_share_a_perturb_call_when_their_rho_is_equal(rhos):
    """One perturb_ call per (rho, adaptive, device, precision): groups with the same rho at this step
    share it, even when a schedule made them equal after the lists were built."""
    model = Net(3)
    groups = [{"params": [model.weight, model.bias, model.scale], "rho": 0.3}, {"params": [model.head]}]
    opt = SSAM(groups, torch.optim.SGD, rho=0.1, sparsity=0.5, mask="random", layout="tensors", lr=0.1,
               backend="native")
    _native_calls(opt, model)  # builds the mask and the lists with rho 0.3 / 0.1
    opt.param_groups[0]["rho"], opt.param_groups[1]["rho"] = rhos
    assert _native_calls(opt, model) == {"ssam_kernels::grad_sq_norm_multi": 1,
                                         "ssam_kernels::perturb_multi_": len(set(rhos)),
                                         "ssam_kernels::restore_multi_": 1}


# ----------------------------------------------------------------------------------------------------
# ParamLayout.grads in the per-tensor layout
# ----------------------------------------------------------------------------------------------------

def _tensors_layout(dtypes: list[torch.dtype]) -> tuple[list[nn.Parameter], ParamLayout]:
    gen = torch.Generator().manual_seed(5)
    shapes = [(), (7,), (3, 5), (2, 3, 4), (1,), (0,), (4, 1)]
    params = [nn.Parameter(torch.randn(shape, generator=gen).to(dtypes[i % len(dtypes)]))
              for i, shape in enumerate(shapes)]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen).to(p.dtype)
    return params, ParamLayout([params], "tensors")


@pytest.mark.parametrize("dtypes", [[torch.float32],
                                    [torch.float32, torch.bfloat16, torch.float64, torch.float16]])
def test_tensor_grads_usual_step_matches_segment_grads_without_calling_it(monkeypatch, dtypes):
    params, layout = _tensors_layout(dtypes)
    params[2].grad = torch.randn(5, 3).to(params[2].dtype).t()  # not contiguous: flattened by a copy
    expected = [s.grad() for s in layout.segments]

    def forbidden(self: Segment) -> torch.Tensor:
        raise AssertionError("the usual step must not call Segment.grad per segment")
    monkeypatch.setattr(Segment, "grad", forbidden)
    got = layout.grads()
    for g, e, p in zip(got, expected, params, strict=True):
        assert g.dim() == 1 and g.is_contiguous() and g.dtype == p.dtype
        assert torch.equal(g, e) and torch.equal(g, p.grad.reshape(-1))
    assert got[1] is params[1].grad  # 1-D: the gradient itself, no view made


def test_tensor_grads_missing_and_bad_gradients_take_the_checked_path():
    params, layout = _tensors_layout([torch.float32])
    params[3].grad = None
    got = layout.grads()
    assert torch.equal(got[3], torch.zeros(24)) and params[3].grad is None
    assert all(torch.equal(g, p.grad.reshape(-1)) for i, (g, p) in enumerate(zip(got, params, strict=True))
               if i != 3)
    params[1].grad = torch.zeros(7).to_sparse()
    with pytest.raises(TypeError, match=r"^params: sparse gradients"):
        layout.grads()


def test_tensor_grads_hold_no_gradient_after_the_call():
    """Nothing is cached between calls: a gradient dropped by ``zero_grad(set_to_none=True)`` is freed."""
    params, layout = _tensors_layout([torch.float32])
    layout.grads()
    dropped = [weakref.ref(p.grad) for p in params]
    layout.zero_grad(set_to_none=True)
    gc.collect()
    assert all(ref() is None for ref in dropped) and all(p.grad is None for p in params)


def test_tensor_layout_zero_grad_keeps_pytorch_semantics():
    params, layout = _tensors_layout([torch.float32])
    params[0].grad = None
    grads = [p.grad for p in params]
    layout.zero_grad(set_to_none=False)
    assert params[0].grad is None
    assert all(p.grad is g and not g.any() for p, g in zip(params[1:], grads[1:], strict=True))
