"""Sharpness of a trained model at its final weights ``w``, on a fixed batch ``(x, y)`` of training data.

With ``L(w)`` the mean cross-entropy on that batch (model in eval mode, so batch-norm uses its running
statistics and ``L`` is a deterministic function of ``w``):

- ``hessian_top_eigenvalue``: ``λ_max`` of ``H = ∇²L(w)`` by power iteration, ``v ← Hv / ||Hv||``, with
  Hessian-vector products ``Hv = ∂/∂t ∇L(w + t·v)|_{t=0}`` (forward-over-reverse, ``torch.func.jvp`` of
  ``torch.func.grad``), never forming ``H``. Power iteration finds the eigenvalue of largest magnitude;
  near a minimum that is the largest (positive) one.
- ``random_loss_increase``: ``E_u[L(w + r · u / ||u||)] − L(w)`` over Gaussian directions ``u``. To second
  order it is ``r² · tr(H) / (2d)`` for ``d`` parameters: tiny at SAM's radius in a large model, so it is
  reported at ``rho`` and at a larger radius too.
- ``adversarial_loss_increase``: ``L(w + rho · g / ||g||) − L(w)`` with ``g = ∇L(w)``: SAM's one-step
  approximation of the worst perturbation of radius ``rho``.

Norms and dot products run over all parameters together, as SAM's do.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp

Params = dict[str, torch.Tensor]


def _dot(a: Params, b: Params) -> torch.Tensor:
    return torch.stack([(a[k] * b[k]).sum() for k in a]).sum()


def _axpy(alpha: float | torch.Tensor, x: Params, y: Params) -> Params:
    """``y + alpha · x``."""
    return {k: y[k] + alpha * x[k] for k in y}


def _loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[Params], torch.Tensor]:
    def loss(params: Params) -> torch.Tensor:
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    return loss


def _weights(model: nn.Module) -> Params:
    return {name: p.detach() for name, p in model.named_parameters()}


def hessian_top_eigenvalue(model: nn.Module, x: torch.Tensor, y: torch.Tensor, iterations: int = 100,
                           tol: float = 1e-4, seed: int = 0) -> tuple[float, int]:
    """``(λ_max, iterations used)``: power iteration stops when ``λ`` changes by less than ``tol``
    relative, or after ``iterations`` Hessian-vector products."""
    model.eval()
    loss, w = _loss_of(model, x, y), _weights(model)
    generator = torch.Generator().manual_seed(seed)
    v = {k: torch.randn(t.shape, generator=generator).to(t) for k, t in w.items()}

    def hvp(v: Params) -> Params:
        return jvp(grad(loss), (w,), (v,))[1]

    eigenvalue = 0.0
    for i in range(1, iterations + 1):
        norm = _dot(v, v).sqrt()
        v = {k: t / norm for k, t in v.items()}
        hv = hvp(v)
        new = _dot(v, hv).item()  # the Rayleigh quotient vᵀHv of the unit vector v
        converged = abs(new - eigenvalue) <= tol * abs(new)
        eigenvalue, v = new, hv
        if converged:
            return eigenvalue, i
    return eigenvalue, iterations


@torch.no_grad()
def random_loss_increase(model: nn.Module, x: torch.Tensor, y: torch.Tensor, radius: float,
                         draws: int = 10, seed: int = 0) -> float:
    """``mean_u L(w + radius · u/||u||) − L(w)`` over ``draws`` Gaussian directions ``u``."""
    model.eval()
    loss, w = _loss_of(model, x, y), _weights(model)
    generator = torch.Generator().manual_seed(seed)
    base, increases = loss(w), []
    for _ in range(draws):
        u = {k: torch.randn(t.shape, generator=generator).to(t) for k, t in w.items()}
        increases.append(loss(_axpy(radius / _dot(u, u).sqrt(), u, w)) - base)
    return torch.stack(increases).mean().item()


def adversarial_loss_increase(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float) -> float:
    """``L(w + rho · g/||g||) − L(w)``, ``g = ∇L(w)``."""
    model.eval()
    loss, w = _loss_of(model, x, y), _weights(model)
    g = grad(loss)(w)
    with torch.no_grad():
        return (loss(_axpy(rho / _dot(g, g).sqrt(), g, w)) - loss(w)).item()


def sharpness(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rho: float, random_radius: float,
              seed: int = 0) -> dict:
    """All three measures (and ``L(w)``) on the batch ``(x, y)`` at radius ``rho``, and the random one
    at ``random_radius`` too."""
    eigenvalue, iterations = hessian_top_eigenvalue(model, x, y, seed=seed)
    with torch.no_grad():
        base = _loss_of(model, x, y)(_weights(model)).item()
    return {"loss": base, "hessian_top_eigenvalue": eigenvalue, "power_iterations": iterations,
            "random_loss_increase": random_loss_increase(model, x, y, rho, seed=seed),
            "random_loss_increase_large": random_loss_increase(model, x, y, random_radius, seed=seed),
            "adversarial_loss_increase": adversarial_loss_increase(model, x, y, rho)}
