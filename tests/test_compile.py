"""A training step under torch.compile gives the weights and masks of the same step run eagerly
(docs/recipes.md, "torch.compile"): Dynamo compiles the model's forward/backward and breaks the graph
around SSAM's methods, which run eagerly (refreshes included)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ssam_kernels import SSAM, DynamicMask, FisherMask
from tests.helpers import seeded_mlp as make_model

STEPS = 6


def batches(count: int = STEPS, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(16, 5, generator=gen), torch.randint(0, 3, (16,), generator=gen))
            for _ in range(count)]


def make_optimizer(kind: str, model: nn.Module, layout: str = "auto") -> SSAM:
    if kind == "ssam-d":
        mask = DynamicMask(interval=2, drop_rate=0.5, seed=3)  # a refresh every 2 steps
    else:
        mask = FisherMask(model, nn.functional.cross_entropy, batches(1, seed=2), num_samples=16, interval=2)
    return SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, mask=mask, layout=layout, lr=0.1,
                momentum=0.9)


def run(kind: str, form: str, backend: str | None, layout: str = "auto"
        ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    model = make_model()
    opt = make_optimizer(kind, model, layout)

    def loss_fn(x, y):
        return nn.functional.cross_entropy(model(x), y)

    def two_steps(x, y):
        loss_fn(x, y).backward()
        opt.first_step(zero_grad=True)
        loss_fn(x, y).backward()
        opt.second_step(zero_grad=True)

    def with_closure(x, y):
        def closure():
            loss = loss_fn(x, y)
            loss.backward()
            return loss

        opt.step(closure)
        opt.zero_grad()

    step = two_steps if form == "two_steps" else with_closure
    if backend is not None:
        torch._dynamo.reset()
        step = torch.compile(step, backend=backend)
    masks = []
    for x, y in batches():
        step(x, y)
        masks.append(opt.get_mask())
    assert opt.steps == STEPS
    return [p.detach().clone() for p in model.parameters()], [m for ms in masks for m in ms]


def check(backend: str, exact: bool, layout: str = "auto") -> None:
    for kind in ("ssam-d", "ssam-f"):
        for form in ("two_steps", "closure"):
            eager_w, eager_m = run(kind, form, None, layout)
            got_w, got_m = run(kind, form, backend, layout)
            for a, b in zip(got_m, eager_m, strict=True):  # every step's mask, refreshes included
                assert torch.equal(a, b), (kind, form)
            for a, b in zip(got_w, eager_w, strict=True):
                if exact:
                    assert torch.equal(a, b), (kind, form)
                else:  # Inductor fuses the model's kernels: fp32 rounding differs
                    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layout", ["tensors", "flat"])
def test_compiled_step_eager_backend_is_bit_identical(layout):
    check("eager", exact=True, layout=layout)


def test_compiled_step_inductor_matches_eager():  # ~12 s on a loaded 2-core CPU: not marked slow
    check("inductor", exact=False)
