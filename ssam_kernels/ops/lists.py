"""The one adapter from a backend's single-tensor primitives to list primitives.

A backend must provide the single-tensor primitives (``perturb_(W, G, ...)``); it may also provide list
primitives (``perturb_multi_([W, ...], [G, ...], ...)``: one call, usually one kernel launch, for a list
of one device and dtype). :func:`list_primitive` returns the backend's list primitive when it has one,
else the loop over its single primitive defined here, with the same meaning, so callers never branch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from types import ModuleType

import torch

from . import bitmask
from .tuning import DEFAULT, Tuning

_LOOPS: dict[str, Callable[..., object]] = {}


def _loop(name: str) -> Callable[[Callable[..., object]], Callable[..., object]]:
    """Registers the list form of primitive ``name`` built from single calls: ``loop(backend, index,
    *list_args, tuning=...)``, ``index`` the entries' positions in the caller's list (for error
    messages)."""
    def register(loop: Callable[..., object]) -> Callable[..., object]:
        _LOOPS[name] = loop
        return loop
    return register


def multi_name(name: str) -> str:
    """The list primitive's name: ``perturb_`` → ``perturb_multi_``, ``grad_sq_norm`` →
    ``grad_sq_norm_multi``."""
    return f"{name[:-1]}_multi_" if name.endswith("_") else f"{name}_multi"


def list_primitive(backend: ModuleType, name: str, index: Sequence[int] | None = None
                   ) -> Callable[..., object]:
    """``backend``'s list form of primitive ``name``: its own (``multi_name(name)``) or the loop over
    its single primitive; both take the list arguments and the keyword ``tuning``. ``index``: the
    positions of the list's entries in the caller's list, which errors name (``offsets[j]``); by default
    ``0 … len - 1``."""
    multi = getattr(backend, multi_name(name), None)
    if multi is not None:
        return multi
    loop = _LOOPS[name]

    def looped(first: list, *rest: object, tuning: Tuning = DEFAULT) -> object:
        return loop(backend, range(len(first)) if index is None else index, first, *rest, tuning=tuning)
    return looped


def sum_in_order(totals: Iterable[torch.Tensor]) -> torch.Tensor:
    """The float64 sum of 0-d tensors, added one by one in order (what a backend without a list
    primitive gives; the native CPU one adds its per-tensor totals the same way)."""
    total = None
    for t in totals:
        total = t if total is None else total + t
    return total


def _check_offsets_first(index: Sequence[int], Ws: list[torch.Tensor], masks: list, offs: list) -> None:
    """Offsets of CPU tensors checked against their masks for the whole list before the first write:
    wrong offsets anywhere leave every tensor unwritten (as the list primitives guarantee)."""
    for j, w, m, o in zip(index, Ws, masks, offs, strict=True):
        if m is not None and w.device.type == "cpu":
            bitmask.check_offsets(m, o, w.numel(), name=f"offsets[{j}]")


@_loop("grad_sq_norm")
def _grad_sq_norm(backend: ModuleType, index: Sequence[int], Gs: list, Ws: list, *, tuning: Tuning
                  ) -> torch.Tensor:
    return sum_in_order(backend.grad_sq_norm(g, w, tuning=tuning) for g, w in zip(Gs, Ws, strict=True))


@_loop("perturb_")
def _perturb(backend: ModuleType, index: Sequence[int], Ws: list, Gs: list, masks: list, offs: list,
             backups: list, scale: torch.Tensor, adaptive: bool, *, tuning: Tuning) -> None:
    _check_offsets_first(index, Ws, masks, offs)
    for w, g, m, o, b in zip(Ws, Gs, masks, offs, backups, strict=True):
        backend.perturb_(w, g, m, o, b, scale, adaptive, tuning=tuning)


@_loop("restore_")
def _restore(backend: ModuleType, index: Sequence[int], Ws: list, masks: list, offs: list, backups: list, *,
             tuning: Tuning) -> None:
    _check_offsets_first(index, Ws, masks, offs)
    for w, m, o, b in zip(Ws, masks, offs, backups, strict=True):
        backend.restore_(w, m, o, b, tuning=tuning)


@_loop("fisher_accumulate_")
def _fisher_accumulate(backend: ModuleType, index: Sequence[int], Fs: list, Gs: list, alpha: float, *,
                       tuning: Tuning) -> None:
    for f, g in zip(Fs, Gs, strict=True):
        backend.fisher_accumulate_(f, g, alpha, tuning=tuning)


@_loop("axpby_")
def _axpby(backend: ModuleType, index: Sequence[int], Xs: list, Ys: list, a: torch.Tensor, b: torch.Tensor, *,
           tuning: Tuning) -> None:
    for x, y in zip(Xs, Ys, strict=True):
        backend.axpby_(x, y, a, b, tuning=tuning)


@_loop("radix_histogram")
def _radix_histogram(backend: ModuleType, index: Sequence[int], scores: list, prefix: torch.Tensor,
                     shift: int, bits: int, largest: bool, filters: Sequence, filter_value: bool, *,
                     tuning: Tuning) -> torch.Tensor:
    """The sum of the single histograms."""
    return torch.stack([backend.radix_histogram(s, prefix, shift, bits, largest, f, filter_value,
                                                tuning=tuning)
                        for s, f in zip(scores, filters, strict=True)]).sum(dim=0)


@_loop("threshold_mask")
def _threshold_mask(backend: ModuleType, index: Sequence[int], scores: list, threshold: torch.Tensor,
                    tie_quota: torch.Tensor, largest: bool, filters: Sequence, filter_value: bool, *,
                    tuning: Tuning) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The single primitive per segment: each segment's ties counted by a one-bit histogram at
    ``threshold`` (``hist[t & 1]`` = keys equal to ``t``) and taken from the quota of the next."""
    words = []
    for s, f in zip(scores, filters, strict=True):
        words.append(backend.threshold_mask(s, threshold, tie_quota, largest, f, filter_value, tuning=tuning))
        ties = backend.radix_histogram(s, threshold, 0, 1, largest, f, filter_value, tuning=tuning)
        tie_quota = (tie_quota - ties.gather(0, threshold.view(1) & 1)[0]).clamp(min=0)
    return words, tie_quota
