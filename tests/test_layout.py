"""Segments: flat buffers and per-tensor views give the same data; replaced grads are repaired."""

from __future__ import annotations

import copy

import pytest
import torch

from ssam_kernels import ops
from ssam_kernels.layout import ParamLayout


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.ReLU(), torch.nn.Linear(7, 3))


def backward(model: torch.nn.Module, seed: int = 0) -> None:
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(seed))
    model(x).square().sum().backward()


def test_flat_params_and_grads_are_views_into_one_buffer():
    model = small_model()
    before = [p.detach().clone() for p in model.parameters()]
    layout = ParamLayout([list(model.parameters())], "flat")
    (segment,) = layout.segments
    assert segment.numel == sum(p.numel() for p in model.parameters())
    for i, (p, old, (start, _)) in enumerate(zip(model.parameters(), before, segment.spans(), strict=True)):
        assert torch.equal(p, old)  # values kept
        assert p.data_ptr() == segment.weight[start:].data_ptr()
        # no gradient yet: .grad is the (zero) view so backward accumulates into the buffer, and the
        # parameter counts as having none (the base optimizer sees None, see hide_missing_grads)
        assert p.grad is segment.grad_views[i] and not segment.has_grad[i]
    with layout.hide_missing_grads():
        assert all(p.grad is None for p in model.parameters())
    assert all(p.grad is v for p, v in zip(model.parameters(), segment.grad_views, strict=True))
    backward(model)
    expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    assert torch.equal(layout.grads()[0], expected)
    for p, (start, _) in zip(model.parameters(), segment.spans(), strict=True):
        assert p.grad.data_ptr() == segment.grad_buffer[start:].data_ptr()  # re-pointed at the buffer
    layout.zero_grad()
    backward(model, seed=1)  # accumulates into the views: no repair needed
    assert all(p.grad.data_ptr() == segment.grad_buffer[start:].data_ptr()
               for p, (start, _) in zip(model.parameters(), segment.spans(), strict=True))


def test_flat_and_tensors_layouts_agree():
    flat_model, tensors_model = small_model(), small_model()
    flat = ParamLayout([list(flat_model.parameters())], "flat")
    tensors = ParamLayout([list(tensors_model.parameters())], "tensors")
    assert len(tensors.segments) == 4 and len(flat.segments) == 1
    backward(flat_model)
    backward(tensors_model)
    assert torch.equal(flat.segments[0].weight, torch.cat([s.weight for s in tensors.segments]))
    assert torch.equal(flat.grads()[0], torch.cat(tensors.grads()))
    flat_norm = ops.grad_sq_norm(flat.grads()[0])
    tensors_norm = sum(ops.grad_sq_norm(g) for g in tensors.grads())
    assert flat_norm.float() == tensors_norm.float()  # float64 totals: same fp32 norm


@pytest.mark.parametrize("how", ["set_to_none", "assigned", "none"])
def test_replaced_grads_are_detected_and_repaired(how):
    model = small_model()
    layout = ParamLayout([list(model.parameters())], "flat")
    backward(model, seed=1)
    stale = layout.grads()[0].clone()
    if how == "set_to_none":
        model.zero_grad(set_to_none=True)
        backward(model, seed=2)
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    elif how == "assigned":
        for p in model.parameters():
            p.grad = torch.randn_like(p)
        expected = torch.cat([p.grad.reshape(-1) for p in model.parameters()])
    else:
        model[0].weight.grad = None
        expected = stale.clone()
        expected[: model[0].weight.numel()] = 0
    grad = layout.grads()[0]
    assert not torch.equal(grad, stale)
    assert torch.equal(grad, expected)
    segment = layout.segments[0]
    for p, view in zip(segment.params, segment.grad_views, strict=True):
        assert p.grad is (None if how == "none" and p is model[0].weight else view)


def test_zero_grad_is_in_place():
    model = small_model()
    layout = ParamLayout([list(model.parameters())], "flat")
    backward(model)
    buffer = layout.segments[0].grad_buffer
    layout.zero_grad()
    assert layout.segments[0].grad_buffer is buffer and not buffer.any()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_segments_split_by_group_dtype_and_skip_frozen():
    model = small_model()
    model[0].bias.requires_grad_(False)
    model[2].half()
    groups = [[model[0].weight, model[0].bias], [model[2].weight, model[2].bias]]
    layout = ParamLayout(groups, "flat")
    assert [(s.group, s.dtype, s.numel) for s in layout.segments] == [
        (0, torch.float32, 35), (1, torch.float16, 24)]
    assert all(p is not model[0].bias for s in layout.segments for p in s.params)


def test_training_through_flat_views_matches_plain_training():
    plain, flat_model = small_model(), small_model()
    ParamLayout([list(flat_model.parameters())], "flat")
    for model in (plain, flat_model):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            opt.zero_grad()
            backward(model, seed=step)
            opt.step()
    for a, b in zip(plain.parameters(), flat_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_bad_layout_and_params():
    with pytest.raises(ValueError, match=r"^layout:"):
        ParamLayout([list(small_model().parameters())], "packed")
    with pytest.raises(TypeError, match=r"^params:"):
        ParamLayout([[torch.nn.Parameter(torch.zeros(3, dtype=torch.complex64))]])
    with pytest.raises(TypeError, match=r"^params:"):
        ParamLayout([[torch.nn.Parameter(torch.zeros(3, dtype=torch.float8_e4m3fn))]])  # float64 is supported
    model = copy.deepcopy(small_model())
    layout = ParamLayout([list(model.parameters())], "flat")
    model[0].weight.grad = torch.zeros(7, 5).to_sparse()
    with pytest.raises(TypeError, match=r"^params:"):
        layout.grads()
