"""A whole SSAM training step under torch.compile, checked against the same steps run eagerly.

The model is compiled, and so is the step function; the optimizer's first_step / second_step run
eagerly between the compiled graphs (they are marked torch.compiler.disable). Two copies of the same
model train on the same batches, one eager and one compiled, and the script prints how far their weights
are apart and whether their SSAM masks agree (the mask is refreshed every --interval steps).

    python python/compiled_step.py                          # Inductor (needs a C++ compiler on CPU)
    python python/compiled_step.py --backend eager --steps 4
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from models import build_model
from torch import nn

import ssam_kernels as sk

loss_fn = nn.functional.cross_entropy
Step = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The docstring as written, and every option's default."""


def eager_train_step(model: nn.Module, opt: sk.SSAM) -> Step:
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)
        loss_fn(model(x), y).backward()
        opt.second_step(zero_grad=True)
        return loss.detach()

    return train_step


def compiled_train_step(model: nn.Module, opt: sk.SSAM, backend: str = "inductor") -> Step:
    """The recipe of docs/recipes.md, "torch.compile": the same step with the model and the step compiled,
    the optimizer eager."""
    compiled = torch.compile(model, backend=backend)

    @torch.compile(backend=backend)
    def train_step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        loss = loss_fn(compiled(x), y)
        loss.backward()
        opt.first_step(zero_grad=True)  # eager: SSAM's methods are never traced
        loss_fn(compiled(x), y).backward()
        opt.second_step(zero_grad=True)
        return loss.detach()

    return train_step


def make_ssam(model: nn.Module, interval: int) -> sk.SSAM:
    return sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, lr=0.05, momentum=0.9,
                   mask=sk.DynamicMask(interval=interval))


def main(argv: list[str] | None = None) -> dict[str, float | bool]:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=_HelpFormatter)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend")
    parser.add_argument("--steps", type=int, default=6, help="training steps")
    parser.add_argument("--interval", type=int, default=2, help="mask refresh interval (steps)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.interval < 1:
        parser.error("--steps and --interval must be positive")

    torch.manual_seed(args.seed)
    eager_model = build_model("mlp", (20,), 5, width=0.25)
    compiled_model = copy.deepcopy(eager_model)
    eager_opt, compiled_opt = make_ssam(eager_model, args.interval), make_ssam(compiled_model, args.interval)
    eager = eager_train_step(eager_model, eager_opt)
    compiled = compiled_train_step(compiled_model, compiled_opt, args.backend)
    for step in range(args.steps):
        x, y = torch.randn(16, 20), torch.randint(0, 5, (16,))
        losses = eager(x, y), compiled(x, y)
        print(f"step {step + 1}: loss eager {losses[0].item():.6f}, compiled {losses[1].item():.6f}")
    gap = max((p - q).abs().max().item() for p, q in
              zip(eager_model.parameters(), compiled_model.parameters(), strict=True))
    same_masks = all(torch.equal(a, b) for a, b in
                     zip(eager_opt.get_mask(), compiled_opt.get_mask(), strict=True))
    print(f"max |w_eager - w_compiled| = {gap:.3g}; masks equal: {same_masks}")
    return {"max_weight_gap": gap, "masks_equal": same_masks}


if __name__ == "__main__":
    main()
