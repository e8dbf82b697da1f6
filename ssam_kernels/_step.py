"""The step's computations on lists of tensors: the optimizer (:mod:`ssam_kernels.optim`) gathers the
lists and the options, these functions compute (the shape of ``torch.optim.adam``'s functional core).

One step, with ``m`` the mask: :func:`grad_norm` takes ``||g||`` over every perturbed entry (ASAM:
``|| |w| ⊙ g ||``); :func:`perturb` writes ``w ← w + rho / (||g|| + eps) · g ⊙ m`` (ASAM: ``· w² ⊙ g ⊙
m``) and keeps the old values of the live entries in compact backups; :func:`restore` writes them back,
bit-exact. Every call is one list op per (device, dtype) of the segments (:mod:`ssam_kernels.ops`), no
host synchronisation but the one :func:`grad_norm` documents.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from . import ops
from .layout import ParamLayout
from .masks import Mask

NORM_DOWN = 2.0 ** -600
"""What float64 gradients are multiplied by (exactly: a power of two) where their squares overflow the
norm's float64 sum: ``|g| ≤ 1.8e308`` becomes ``≤ 4.3e127``, whose square is below ``1.9e255``."""


@dataclass
class Partition:
    """The segments of one parameter group on one device with one scale precision (float64 for float64
    segments, float32 for the others: the op contract). They share a ``perturb_`` call, merged with the
    partitions of any other group that has the same ``rho`` and ``adaptive`` at that step."""

    group: int
    device: torch.device
    precision: torch.dtype
    index: list[int] | None  # its segments' places in the segment order; None: all of them, in order
    weights: list[torch.Tensor]
    words: list[torch.Tensor | None]
    offsets: list[torch.Tensor | None]
    backups: list[torch.Tensor]

    def perturb_args(self, grads: list[torch.Tensor]) -> list[list[Any]]:
        """``perturb_``'s lists ``W, G, mask, offsets, backup`` with this step's gradients."""
        picked = grads if self.index is None else [grads[i] for i in self.index]
        return [self.weights, picked, self.words, self.offsets, self.backups]


@dataclass
class StepLists:
    """The arguments of the step's list ops that do not change between steps; only the gradients are
    gathered per step."""

    version: int  # the layout's, when these were built
    adaptive: list[bool]  # each group's, when these were built
    norm_weights: list[torch.Tensor | None]  # grad_sq_norm's W: the weights of adaptive groups
    partitions: list[Partition]
    weights: list[torch.Tensor]  # restore_'s lists, every segment in order
    words: list[torch.Tensor | None]
    offsets: list[torch.Tensor | None]
    backups: list[torch.Tensor]
    wide: list[int]  # the float64 segments: the only ones whose squared gradients can overflow the norm


class StepListCache:
    """The step's :class:`StepLists`, built once and reused until what they were built from changes: the
    segments (``layout.version``: add_param_group) and the groups' ``adaptive`` are compared at each
    :meth:`get`; masks and backups are replaced only through the optimizer's one installing method,
    which calls :meth:`invalidate` (so the lists never keep replaced backups alive either)."""

    def __init__(self) -> None:
        self._lists: StepLists | None = None

    @property
    def built(self) -> StepLists | None:
        """The lists in the cache; None until the next :meth:`get` builds them."""
        return self._lists

    def invalidate(self) -> None:
        self._lists = None

    def get(self, layout: ParamLayout, masks: Sequence[Mask] | None, backups: list[torch.Tensor],
            adaptive: list[bool]) -> StepLists:
        lists = self._lists
        if lists is None or lists.version != layout.version or lists.adaptive != adaptive:
            lists = self._lists = _build(layout, masks, backups, adaptive)
        return lists


def _build(layout: ParamLayout, masks: Sequence[Mask] | None, backups: list[torch.Tensor],
           adaptive: list[bool]) -> StepLists:
    segments = layout.segments
    masks = masks or [(None, None)] * len(segments)
    weights, words, offsets = [s.weight for s in segments], [m for m, _ in masks], [o for _, o in masks]
    where: dict[tuple[int, torch.device, torch.dtype], list[int]] = {}
    for i, segment in enumerate(segments):
        precision = torch.float64 if segment.dtype == torch.float64 else torch.float32
        where.setdefault((segment.group, segment.device, precision), []).append(i)
    partitions = [
        Partition(group, device, precision, None if len(index) == len(segments) else index,
                  *([items[i] for i in index] for items in (weights, words, offsets, backups)))
        for (group, device, precision), index in where.items()]
    return StepLists(layout.version, adaptive, [s.weight if adaptive[s.group] else None for s in segments],
                     partitions, weights, words, offsets, backups,
                     [i for i, s in enumerate(segments) if s.dtype == torch.float64])


def grad_norm(grads: list[torch.Tensor], lists: StepLists, *, device: torch.device,
              comm: ops.Communicator | None, backend: str | None, tuning: ops.Tuning | None,
              weighted: bool = True) -> torch.Tensor:
    """``||g||`` (ASAM: ``|| |w| ⊙ g ||``; ``weighted=False``: ``||g||`` for every group) over every
    perturbed entry, float64 on ``device`` (summed over the ranks with ``comm``). The float64 sum of
    squares overflows only for float64 gradients past ~1e154 (fp32 ones stay below 1e77 each): where it
    does, the float64 segments' gradients are scaled by :data:`NORM_DOWN` (exact) and the sum taken again,
    so that every finite gradient gets its finite norm. Telling needs a host read of the sum, made only
    when a float64 segment exists (free on CPU, a synchronisation on GPUs)."""
    def sq_sum(index: Sequence[int], scale: float = 1.0) -> torch.Tensor:
        gs = [grads[i] * scale if scale != 1.0 else grads[i] for i in index]
        weights = [lists.norm_weights[i] if weighted else None for i in index]
        total = ops.grad_sq_norm(gs, weights, backend=backend, tuning=tuning).to(device)
        if comm is not None:
            comm.all_reduce_(total)
        return total

    every = range(len(grads))
    total = sq_sum(every)
    if not lists.wide or not bool(torch.isinf(total)):
        return total.sqrt()
    scaled = sq_sum(lists.wide, NORM_DOWN)
    narrow = [i for i in every if i not in lists.wide]
    if narrow:  # the other segments' squares, on the same scale (they do not overflow)
        scaled += sq_sum(narrow) * (NORM_DOWN * NORM_DOWN)
    return scaled.sqrt() / NORM_DOWN


PerturbCall = tuple[list[list[Any]], torch.Tensor, bool]
"""One ``perturb_`` call: its lists ``(W, G, mask, offsets, backup)``, its scale and ``adaptive``."""


def perturb_calls(grads: list[torch.Tensor], lists: StepLists, options: list[tuple[float, bool]],
                  norm: torch.Tensor, eps: float) -> list[PerturbCall]:
    """The step's ``perturb_`` calls: one per (rho, adaptive, device, precision), the segments sharing a
    scale ``rho / (||g|| + eps)``. ``rho / eps < 1e38`` (checked by the optimizer), so the scale is finite
    in float32 for every gradient; a non-finite norm gives a non-finite scale, which perturb_ treats as
    "leave W as it is" (the step is skipped, the backup still written). ``options``: each group's
    ``(rho, adaptive)``."""
    calls: dict[tuple[float, bool, torch.device, torch.dtype], list[Partition]] = {}
    for part in lists.partitions:
        rho, adaptive = options[part.group]
        calls.setdefault((rho, adaptive, part.device, part.precision), []).append(part)
    prepared = []
    for (rho, adaptive, device, precision), parts in calls.items():
        scale = (rho / (norm + eps)).to(device, precision)
        args = parts[0].perturb_args(grads) if len(parts) == 1 else [
            list(itertools.chain.from_iterable(items))
            for items in zip(*(part.perturb_args(grads) for part in parts), strict=True)]
        prepared.append((args, scale, adaptive))
    return prepared


def perturb(calls: list[PerturbCall], *, backend: str | None, tuning: ops.Tuning | None,
            modified: Callable[[], None]) -> None:
    """Runs the ``perturb_`` calls, all or nothing: if one raises, what the calls before it perturbed is
    restored (each list op checks all its arguments before it writes) and the exception propagates.
    ``modified()`` runs once the weights were written (perturbed, or perturbed and restored)."""
    done: list[list[list[Any]]] = []
    try:
        for args, scale, adaptive in calls:
            ops.perturb_(*args, scale, adaptive, backend=backend, tuning=tuning)
            done.append(args)
    except BaseException:
        for W, _, words, offsets, backups in reversed(done):
            ops.restore_(W, words, offsets, backups, backend=backend, tuning=tuning)
        raise
    finally:
        if done:
            modified()


def restore(lists: StepLists, *, backend: str | None, tuning: ops.Tuning | None) -> None:
    """``w`` back from the backups, bit-exact: one ``restore_`` list op over every segment."""
    ops.restore_(lists.weights, lists.words, lists.offsets, lists.backups, backend=backend, tuning=tuning)


# ----------------------------------------------------------------------------------------------------
# LookSAM (ssam_kernels.schedules.LookSAM): g_v, kept between sharpness-aware steps
# ----------------------------------------------------------------------------------------------------

DOT_BLOCK = 1 << 22
"""Entries per float64 partial product in :func:`_dot`: its temporaries stay at two of 32 MiB."""


@dataclass
class Lookahead:
    """LookSAM's ``g_v`` per segment (the segments' dtypes) and ``‖g_v‖`` (float64, 0-d). ``norm`` is None
    while ``buffers`` hold no ``g_v``: before the first sharpness-aware step, and between a
    sharpness-aware ``first_step`` (the buffers then hold ``g``) and its ``second_step``."""

    buffers: list[torch.Tensor] = field(default_factory=list)
    norm: torch.Tensor | None = None

    def matches(self, grads: list[torch.Tensor]) -> bool:
        """Whether the buffers are laid out as ``grads`` (not after parameters were added or moved)."""
        return [(b.shape, b.dtype, b.device) for b in self.buffers] == [(g.shape, g.dtype, g.device)
                                                                        for g in grads]

    def keep(self, grads: list[torch.Tensor]) -> None:
        """The first half of a sharpness-aware step: ``g`` into the buffers (allocated at first use)."""
        if not self.matches(grads):
            self.buffers = [torch.empty_like(g) for g in grads]
        torch._foreach_copy_(self.buffers, grads)
        self.norm = None


def _per_device(tensors: list[torch.Tensor]) -> dict[torch.device, list[int]]:
    where: dict[torch.device, list[int]] = {}
    for i, t in enumerate(tensors):
        where.setdefault(t.device, []).append(i)
    return where


def _axpby(X: list[torch.Tensor], Y: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor, *,
           backend: str | None, tuning: ops.Tuning | None) -> None:
    """``X ← a·X + b·Y`` with float64 scalars ``a``, ``b``: one list op per device of ``X``."""
    for device, index in _per_device(X).items():
        ops.axpby_([X[i] for i in index], [Y[i] for i in index], a.to(device), b.to(device), backend=backend,
                   tuning=tuning)


def _dot(X: list[torch.Tensor], Y: list[torch.Tensor], *, device: torch.device,
         comm: ops.Communicator | None) -> torch.Tensor:
    """``⟨X, Y⟩`` in float64 on ``device`` (summed over the ranks with ``comm``), in blocks of
    :data:`DOT_BLOCK` entries. Once per LookSAM period, so plain PyTorch."""
    total = torch.zeros((), dtype=torch.float64, device=device)
    for x, y in zip(X, Y, strict=True):
        for start in range(0, x.numel(), DOT_BLOCK):
            end = start + DOT_BLOCK
            total += torch.dot(x[start:end].double(), y[start:end].double()).to(device)
    if comm is not None:
        comm.all_reduce_(total)
    return total


def looksam_project(look: Lookahead, grads: list[torch.Tensor], lists: StepLists, *, device: torch.device,
                    comm: ops.Communicator | None, backend: str | None, tuning: ops.Tuning | None) -> None:
    """The second half of a sharpness-aware step, ``grads`` holding ``g_s`` and the buffers ``g``:
    ``g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) · g`` into the buffers (``‖g‖ = 0``: ``g_v = g_s``), and ``‖g_v‖``."""
    g_sq = grad_norm(look.buffers, lists, device=device, comm=comm, backend=backend, tuning=tuning,
                     weighted=False) ** 2
    dot = _dot(look.buffers, grads, device=device, comm=comm)
    coefficient = torch.where(g_sq > 0, dot / g_sq, 0.0)
    _axpby(look.buffers, grads, -coefficient, torch.ones_like(coefficient), backend=backend, tuning=tuning)
    look.norm = grad_norm(look.buffers, lists, device=device, comm=comm, backend=backend, tuning=tuning,
                          weighted=False)


def looksam_reuse(look: Lookahead, grads: list[torch.Tensor], g_norm: torch.Tensor, alpha: float, *,
                  backend: str | None, tuning: ops.Tuning | None) -> None:
    """A plain LookSAM step: ``g ← g + alpha · (‖g‖ / ‖g_v‖) · g_v`` in place (no ``g_v`` yet, or
    ``‖g_v‖ = 0``: ``g`` unchanged). ``g_norm``: ``‖g‖`` (float64, 0-d)."""
    if look.norm is None or not look.matches(grads):
        return
    scale = torch.where(look.norm > 0, alpha * g_norm.to(look.norm.device) / look.norm, 0.0)
    _axpby(grads, look.buffers, torch.ones_like(scale), scale, backend=backend, tuning=tuning)
