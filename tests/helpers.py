"""Small helpers shared by the optimizer test files: weight snapshots, exact comparison, a seeded MLP."""

from __future__ import annotations

import torch
from torch import nn


def weights(model: nn.Module) -> list[torch.Tensor]:
    """A detached copy of every parameter, in ``parameters()`` order."""
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """The two lists hold bit-identical tensors."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def seeded_mlp() -> nn.Module:
    """``Linear(6, 8) → Tanh → Linear(8, 3)`` with weights drawn from a fixed seed (N(0, 0.25))."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model
