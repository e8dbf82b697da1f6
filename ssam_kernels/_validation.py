"""Argument checks shared by the optimizers: real numbers, types, and parameter groups.

Each raises ``TypeError`` (wrong type) or ``ValueError`` (bad value) naming the argument.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import torch

BaseOptimizer = type[torch.optim.Optimizer] | torch.optim.Optimizer
HUGE = 1e38  # rho or eps at or above this overflows the float32 scale: SAM would silently be off


def real(name: str, value: object, positive: bool = False) -> float:
    """A finite real ``value`` in ``[0, 1e38)`` (``(0, 1e38)`` if ``positive``), as a float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}: expected a real number, got {type(value).__name__} {value!r}")
    if not (math.isfinite(value) and (value > 0 if positive else value >= 0) and value < HUGE):
        bounds = "(0, 1e38)" if positive else "[0, 1e38)"
        raise ValueError(f"{name}: expected a finite value in {bounds}, got {value!r}")
    return float(value)


def check_keyword_only(optimizer: str, positional: tuple[Any, ...]) -> None:
    """The options after ``rho`` are keyword-only. davda54/sam's signature is ``(params, base_optimizer,
    rho, adaptive)``: a port that passes ``adaptive`` (or anything else) by position gets this error
    instead of a confusing one about another argument."""
    if positional:
        raise TypeError(f"{optimizer}() takes params, base_optimizer and rho by position; pass the other "
                        f"options by keyword (got {len(positional)} more positional argument(s): "
                        f"{', '.join(repr(v) for v in positional)}), e.g. adaptive=True, sparsity=0.5")


def check_type(name: str, value: object, kind: type | tuple[type, ...], expected: str) -> None:
    if not isinstance(value, kind):
        raise TypeError(f"{name}: expected {expected}, got {type(value).__name__} {value!r}")


def group_lists(params: Iterable[Any]) -> list[dict[str, Any]]:
    """The parameter groups as ``torch.optim.Optimizer`` reads ``params`` (a list of dicts, or one group
    of tensors), each with its ``params`` as a list, after checking that no tensor appears twice."""
    if isinstance(params, torch.Tensor):
        raise TypeError("params: expected an iterable of tensors or of dicts, got a single tensor")
    items = list(params)
    if not items:
        raise ValueError("params: optimizer got an empty parameter list")  # torch.optim's rule and words
    as_groups = all(isinstance(g, dict) for g in items)
    groups = [dict(g) for g in items] if as_groups else [{"params": items}]
    seen: dict[int, tuple[int, int]] = {}
    for index, group in enumerate(groups):
        members = group["params"]
        group["params"] = [members] if isinstance(members, torch.Tensor) else list(members)
        for position, p in enumerate(group["params"]):
            tensor = p[1] if isinstance(p, tuple) and len(p) == 2 else p  # (name, tensor) pairs
            if id(tensor) in seen:
                first = seen[id(tensor)]
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else "?"
                raise ValueError(f"params: the parameter of shape {shape} at group {index}, index {position} "
                                 f"is the same tensor as at group {first[0]}, index {first[1]}; give each "
                                 "parameter once")
            seen[id(tensor)] = (index, position)
    return groups


def check_group(index: int, group: dict[str, Any], eps: float) -> None:
    """SSAM's per-group options: ``rho`` a finite non-negative real with ``rho / eps < 1e38``,
    ``adaptive``/``perturb`` bools."""
    name = f"rho (param group {index})"
    rho = real(name, group["rho"])
    if rho / eps >= HUGE:
        raise ValueError(f"{name}: rho / eps = {rho / eps:.3g} would overflow the float32 scale "
                         f"rho / (||g|| + eps) of a small gradient (eps = {eps:g}); keep rho / eps below "
                         "1e38 (a smaller rho or a larger eps)")
    for key in ("adaptive", "perturb"):
        check_type(f"{key} (param group {index})", group[key], bool, "a bool")


def check_materialized(params: Iterable[Any]) -> None:
    """No parameter is on the meta device (it has no data for the optimizer to hold)."""
    for p in params:
        if isinstance(p, torch.Tensor) and p.is_meta:
            raise ValueError(f"params: a parameter of shape {tuple(p.shape)} is on the meta device (no "
                             "data); materialize the model (e.g. model.to_empty(device=...) and "
                             "initialize it) before building the optimizer")


def build_base(base: BaseOptimizer, kwargs: dict[str, Any], groups: list[dict[str, Any]],
               defaults: dict[str, Any]) -> torch.optim.Optimizer:
    """The base optimizer over SSAM's ``groups``: a class is built with ``**kwargs``; an instance must own
    exactly the same parameters and receives SSAM's per-group ``defaults`` (rho, adaptive, perturb)."""
    if isinstance(base, torch.optim.Optimizer):
        if kwargs:
            raise TypeError(f"base_optimizer: an optimizer instance takes no extra arguments, got "
                            f"{sorted(kwargs)}")
        ours = {id(p) for g in groups for p in g["params"]}
        theirs = {id(p) for g in base.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError("base_optimizer: the instance must own exactly the parameters given to SSAM")
        # SSAM's per-group options (rho, adaptive, perturb) carry over to the instance's groups
        owner = {id(p): g for g in groups for p in g["params"]}
        for index, group in enumerate(base.param_groups):
            for key, default in defaults.items():
                values = {owner[id(p)][key] for p in group["params"]}
                if len(values) > 1:
                    raise ValueError(f"base_optimizer: its param group {index} mixes parameters with "
                                     f"different {key!r} in SSAM's groups; build both with the same "
                                     "groups")
                if values and (value := values.pop()) != default:
                    group[key] = value
                else:
                    group.setdefault(key, default)
        return base
    if isinstance(base, type) and issubclass(base, torch.optim.Optimizer):
        return base(groups, **kwargs)
    raise TypeError(f"base_optimizer: expected a torch.optim.Optimizer class or instance, got {base!r}")
