"""The implementations users would pick instead of ssam_kernels, written here from their descriptions.

Two families, each working on per-parameter tensor lists:

- **refcode** — the published SSAM algorithm as the paper and its reference code describe it: a
  Python loop over parameters, a dense fp32 mask per parameter (1.0 live, 0.0 dead), a dense
  ``e_w = scale · g ⊙ m`` per parameter kept until the restore, ``p.add_(e_w)`` to perturb and
  ``p.sub_(e_w)`` to restore (not bit-exact), and mask updates by ``torch.topk`` over the
  concatenation of all parameters' scores. With no mask it is dense SAM in the common per-parameter
  style (``p.grad.norm()`` per parameter, ``e_w`` per parameter).
- **foreach** — the same mathematics with ``torch._foreach_*`` multi-tensor ops: the norm by
  ``_foreach_norm``, the perturbation by ``_foreach_add_`` of per-tensor dense masked products
  ``scale · g ⊙ m`` (mask in the weights' dtype) after a dense ``_foreach_copy_`` backup, the restore
  by ``_foreach_copy_`` (bit-exact).

:class:`LoopSSAM` is the refcode family as an optimizer with the interface of ``ssam_kernels.SSAM``
(``first_step`` / ``unperturb`` / ``second_step`` / ``step(closure)``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensors = Sequence[torch.Tensor]


# ----------------------------------------------------------------------------------------------------
# refcode: Python loops, dense fp32 masks, dense e_w
# ----------------------------------------------------------------------------------------------------

def loop_grad_norm(grads: Tensors) -> torch.Tensor:
    """``||g||`` as ``torch.norm(torch.stack([g.norm(2) for g in grads]))`` (per-parameter norms)."""
    return torch.norm(torch.stack([g.norm(p=2) for g in grads]), p=2)


def loop_perturb(params: Tensors, grads: Tensors, masks: Sequence[torch.Tensor | None],
                 scale: torch.Tensor) -> list[torch.Tensor]:
    """``e_w = scale · g ⊙ m`` per parameter (``m`` None: dense), ``p.add_(e_w)``; returns the ``e_w``
    (the state the restore needs)."""
    e_ws = []
    for p, g, m in zip(params, grads, masks, strict=True):
        e_w = g * scale.to(p)
        if m is not None:
            e_w = e_w * m
        p.add_(e_w)
        e_ws.append(e_w)
    return e_ws


def loop_restore(params: Tensors, e_ws: Tensors) -> None:
    """``p.sub_(e_w)`` per parameter."""
    for p, e_w in zip(params, e_ws, strict=True):
        p.sub_(e_w)


def loop_fisher_accumulate(fisher: Tensors, grads: Tensors) -> None:
    """``F += g²`` per parameter."""
    for f, g in zip(fisher, grads, strict=True):
        f.add_(g.float() ** 2)


def _split_like(flat: torch.Tensor, like: Tensors) -> list[torch.Tensor]:
    return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in like]), like, strict=True)]


def topk_masks(scores: Tensors, k: int) -> list[torch.Tensor]:
    """Dense fp32 masks of the ``k`` largest scores over all parameters: ``torch.topk`` over the
    concatenation, then a scatter of ones."""
    flat = torch.cat([s.reshape(-1) for s in scores])
    mask = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    mask[torch.topk(flat, k, sorted=False).indices] = 1.0
    return _split_like(mask, scores)


def topk_dynamic_masks(masks: Tensors, drop_scores: Tensors, n_drop: int,
                       generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """SSAM-D's update over all parameters with ``torch.topk``: drop the ``n_drop`` live entries with
    the smallest score, grow ``n_drop`` entries drawn uniformly among those dead before the update."""
    live = torch.cat([m.reshape(-1) for m in masks]) > 0
    score = torch.cat([s.reshape(-1).float() for s in drop_scores])
    drop = torch.topk(torch.where(live, score, math.inf), n_drop, largest=False, sorted=False).indices
    draw = torch.rand(score.numel(), generator=generator, device=score.device)
    grow = torch.topk(torch.where(live, -1.0, draw), n_drop, sorted=False).indices
    new = live.float()
    new[drop] = 0.0
    new[grow] = 1.0
    return _split_like(new, masks)


# ----------------------------------------------------------------------------------------------------
# foreach: multi-tensor ops over per-parameter lists
# ----------------------------------------------------------------------------------------------------

def foreach_grad_sq_norm(grads: Tensors) -> torch.Tensor:
    """``Σ ||g_p||²`` from ``torch._foreach_norm`` (fp32 norms)."""
    return torch.stack(torch._foreach_norm(list(grads), 2, dtype=torch.float32)).square().sum()


def foreach_perturb(params: Tensors, grads: Tensors, masks: Tensors, backups: Tensors,
                    scale: torch.Tensor) -> None:
    """Dense backup ``_foreach_copy_(backups, params)``, then ``p += scale · g ⊙ m``."""
    torch._foreach_copy_(list(backups), list(params))
    e_w = torch._foreach_mul(list(grads), list(masks))
    torch._foreach_mul_(e_w, scale)
    torch._foreach_add_(list(params), e_w)


def foreach_restore(params: Tensors, backups: Tensors) -> None:
    """``_foreach_copy_(params, backups)`` (bit-exact)."""
    torch._foreach_copy_(list(params), list(backups))


def foreach_axpby(xs: Tensors, ys: Tensors, a: torch.Tensor, b: torch.Tensor) -> None:
    """``x ← a·x + b·y`` per tensor with PyTorch's foreach ops (unfused: a temporary ``b·y`` per tensor)."""
    torch._foreach_mul_(list(xs), a)
    torch._foreach_add_(list(xs), torch._foreach_mul(list(ys), b))


def foreach_fisher_accumulate(fisher: Tensors, grads: Tensors) -> None:
    """``F += g ⊙ g`` with ``_foreach_addcmul_``."""
    torch._foreach_addcmul_(list(fisher), list(grads), list(grads))


# ----------------------------------------------------------------------------------------------------
# The refcode family as an optimizer
# ----------------------------------------------------------------------------------------------------

class LoopSSAM:
    """Reference-code-style SSAM (``policy`` ``"fisher"`` or ``"dynamic"``) or, with ``policy=None``,
    dense SAM in the common per-parameter style. The base optimizer takes the step.

    ``fisher`` holds one score tensor per parameter (the Fisher diagonal, estimated elsewhere);
    ``interval``: refresh the mask after every ``interval``-th step (None: never). SSAM-D drops
    ``floor(drop_rate · K)`` entries by ``|g|`` at ``w`` and grows as many at random.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], base: torch.optim.Optimizer, rho: float = 0.05,
                 sparsity: float = 0.0, policy: str | None = None, fisher: Tensors | None = None,
                 interval: int | None = None, drop_rate: float = 0.5, eps: float = 1e-12,
                 seed: int = 0) -> None:
        if policy not in (None, "fisher", "dynamic"):
            raise ValueError(f"policy: expected None, 'fisher' or 'dynamic', got {policy!r}")
        if policy == "fisher" and fisher is None:
            raise ValueError("fisher: required by policy='fisher'")
        self.params, self.base, self.rho, self.eps = list(params), base, rho, eps
        self.policy, self.fisher, self.interval, self.drop_rate = policy, fisher, interval, drop_rate
        self.k = int(sum(p.numel() for p in self.params) * (1 - sparsity))
        self.generator = torch.Generator(self.params[0].device).manual_seed(seed)
        self.masks: list[torch.Tensor | None] = [None] * len(self.params)
        if policy == "fisher":
            self.masks = topk_masks(fisher, self.k)
        elif policy == "dynamic":
            draw = [torch.rand(p.shape, generator=self.generator, device=p.device) for p in self.params]
            self.masks = topk_masks(draw, self.k)
        self.state: dict[int, dict[str, Any]] = {}
        self.steps = 0

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        grads = [p.grad for p in self.params]
        if self.policy == "dynamic" and self._due(self.steps + 1):  # |g| at w, as the reference code
            n_drop = math.floor(self.drop_rate * self.k)
            self.masks = topk_dynamic_masks(self.masks, [g.abs() for g in grads], n_drop, self.generator)
        scale = self.rho / (loop_grad_norm(grads) + self.eps)
        for p, e_w in zip(self.params, loop_perturb(self.params, grads, self.masks, scale), strict=True):
            self.state.setdefault(id(p), {})["e_w"] = e_w
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self) -> None:
        loop_restore(self.params, [self.state[id(p)]["e_w"] for p in self.params])

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        self.unperturb()
        self.base.step()
        self.steps += 1
        if self.policy == "fisher" and self._due(self.steps):
            self.masks = topk_masks(self.fisher, self.k)
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The two-pass step with a closure that zeroes the gradients, runs forward and backward."""
        with torch.enable_grad():
            loss = closure()
        self.first_step()
        with torch.enable_grad():
            closure()
        self.second_step()
        return loss

    def zero_grad(self) -> None:
        self.base.zero_grad(set_to_none=False)

    def _due(self, step: int) -> bool:
        return self.interval is not None and step % self.interval == 0
