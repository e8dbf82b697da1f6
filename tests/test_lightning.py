"""SSAM under Lightning's manual optimization, through ``LightningOptimizer`` (README, "Lightning")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ssam_kernels as sk

lightning = pytest.importorskip("lightning")

STEPS = 4


def make_model() -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen))
            for _ in range(STEPS)]


def make_optimizer(params) -> sk.SSAM:
    return sk.SSAM(params, torch.optim.SGD, rho=0.1, sparsity=0.5, mask=sk.DynamicMask(interval=2, seed=3),
                   lr=0.1, momentum=0.9, weight_decay=1e-3)


# --- the README recipe ("Lightning"), verbatim but for the names above ---
class SSAMModule(lightning.LightningModule):
    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.automatic_optimization = False  # SSAM's two passes are written out in training_step

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = nn.functional.cross_entropy(self.model(x), y)
        self.manual_backward(loss)
        opt.first_step(zero_grad=True)
        self.manual_backward(nn.functional.cross_entropy(self.model(x), y))
        opt.second_step(zero_grad=True)  # one optimizer step: trainer.global_step += 1
        return loss

    def configure_optimizers(self):
        return make_optimizer(self.model.parameters())
# --- end of the recipe ---


def test_manual_optimization_through_the_wrapper_matches_plain_pytorch():
    module = SSAMModule(make_model())
    data = torch.utils.data.DataLoader(batches(), batch_size=None, shuffle=False)
    trainer = lightning.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                                enable_checkpointing=False, enable_progress_bar=False,
                                enable_model_summary=False)
    trainer.fit(module, data)
    assert trainer.global_step == STEPS

    model = make_model()
    opt = make_optimizer(model.parameters())
    for x, y in batches():
        nn.functional.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    for a, b in zip(module.model.parameters(), model.parameters(), strict=True):
        assert torch.equal(a.detach(), b.detach())
    lightning_opt = module.optimizers(use_pl_optimizer=False)
    assert lightning_opt.steps == opt.steps == STEPS
    for a, b in zip(lightning_opt.get_mask(), opt.get_mask(), strict=True):
        assert torch.equal(a, b)
