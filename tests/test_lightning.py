"""SSAM under Lightning's manual optimization, through ``LightningOptimizer`` (docs/recipes.md,
"Lightning")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssam_kernels as sk
from tests.helpers import doc_block
from tests.helpers import seeded_mlp as make_model

lightning = pytest.importorskip("lightning")

STEPS = 4


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(STEPS)]


def recipe_module() -> type:
    """The ``SSAMModule`` of docs/recipes.md, "Lightning", executed as written."""
    code = doc_block("docs/recipes.md", "Lightning")
    namespace = {"lightning": lightning, "torch": torch, "nn": nn, "sk": sk}
    exec(compile(code, "docs/recipes.md (Lightning)", "exec"), namespace)
    return namespace["SSAMModule"]


def with_schedule(schedule: sk.Schedule | None) -> type:
    """The recipe's module, its optimizer built with ``schedule``."""
    recipe = recipe_module()
    if schedule is None:
        return recipe

    class Scheduled(recipe):
        def configure_optimizers(self):
            opt = super().configure_optimizers()
            return type(opt)(self.model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5,
                             mask=sk.DynamicMask(interval=2), lr=0.1, momentum=0.9, schedule=schedule)

    return Scheduled


@pytest.mark.parametrize("schedule", [None, "looksam"])
def test_manual_optimization_through_the_wrapper_matches_plain_pytorch(schedule):
    """The recipe in Lightning and the same steps in plain PyTorch: the same weights and masks; with a
    schedule, plain steps run one forward pass (counted) and sharpness-aware ones two."""
    make = (lambda: None) if schedule is None else (lambda: sk.LookSAM(k=2, alpha=0.7))
    forwards = []
    model = make_model()
    model.register_forward_hook(lambda *_: forwards.append(1))
    module = with_schedule(make())(model)
    data = torch.utils.data.DataLoader(batches(), batch_size=None, shuffle=False)
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    trainer.fit(module, data)
    assert trainer.global_step == STEPS

    assert len(forwards) == (2 * STEPS if schedule is None else 2 * STEPS - STEPS // 2)

    model = make_model()
    opt = with_schedule(make())(model).configure_optimizers()  # the same optimizer, in plain PyTorch
    for x, y in batches():
        nn.functional.cross_entropy(model(x), y).backward()
        if opt.first_step(zero_grad=True):
            nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for a, b in zip(module.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())
    lightning_opt = module.optimizers(use_pl_optimizer=False)
    assert lightning_opt.steps == opt.steps == STEPS
    for a, b in zip(lightning_opt.get_mask(), opt.get_mask(), strict=True):
        assert torch.equal(a, b)
