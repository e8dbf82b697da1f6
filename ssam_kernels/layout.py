"""Segments: what one kernel launch covers (DESIGN.md, "Segments").

A segment is a 1-D weight view ``W`` and its gradient ``G`` of the same dtype over some parameters of
one parameter group. Two layouts produce them:

- ``"tensors"`` (also ``"auto"``, the default): one segment per parameter (its ``view(-1)``); each
  parameter keeps its own storage and its ``.grad`` is PyTorch's. The list ops still make one call per op
  per (device, dtype), whatever the number of tensors.
- ``"flat"`` (opt-in): one segment per (param group, device, dtype), in order of first appearance. The
  parameters' data and ``.grad`` become views into two contiguous buffers, packed back to back with no
  padding (so no padding entry exists that a mask could select). It saves per-tensor host work; what it
  changes for the user is in docs/usage.md, "The flat layout".

Segments are split by parameter group because ``rho`` and ``adaptive`` are per group; a group added
later gets segments after the existing ones (:meth:`ParamLayout.add_group`). Frozen parameters
(``requires_grad=False``) belong to no segment. Distinct parameters must not overlap in memory
(:func:`check_distinct_storage`), and parameters must stay where the layout put them
(:meth:`ParamLayout.reattach`). Both layouts give the same entry order
when a group has one (device, dtype), hence the same masks and results.

Which parameters have a gradient (PyTorch's ``.grad is None``) is kept as in PyTorch. The tensors
layout uses ``.grad`` itself. The flat layout keeps its views in ``.grad`` for good (so backward
accumulates into the buffer) and records per parameter whether a gradient arrived since the last
``zero_grad(set_to_none=True)`` (``Segment.has_grad``, set by the optimizer's post-accumulate-grad
hooks); :meth:`ParamLayout.hide_missing_grads` shows the others as ``None`` to the base optimizer.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

LAYOUTS = ("auto", "flat", "tensors")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")
# C-level getters: the step reads them for every parameter, through map() rather than a Python loop.
_GRAD = operator.attrgetter("grad")
_LAYOUT = operator.attrgetter("layout")
_DTYPE = operator.attrgetter("dtype")


@functools.cache
def _dtensor_class() -> type | None:
    """``torch.distributed.tensor.DTensor``, imported once (the step asks for every parameter)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed support
        return None
    return DTensor


def is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (e.g. an FSDP2 parameter shard)."""
    dtensor = _dtensor_class()
    return dtensor is not None and isinstance(t, dtensor)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The rank-local part of ``t``: its local shard for a DTensor, ``t`` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


@dataclass
class Segment:
    """Parameters of one group covered by one kernel launch.

    ``weight`` is the 1-D weight view; ``starts[i]`` is where ``params[i]`` begins in it. ``grad()``
    returns the matching 1-D gradient, repaired first if the parameters' ``.grad`` were replaced.
    ``position`` is where the segment's first entry stands in the entry order of the *unsharded*
    model (as one process would lay it out): the random-growth hash of entry ``i`` is taken at
    ``position + i``, so sharded and single-process runs draw the same random masks. ``has_grad[i]``
    (flat layout): whether ``params[i]`` received a gradient since the last ``zero_grad(set_to_none=True)``.
    """

    group: int
    params: list[torch.nn.Parameter]
    starts: list[int]
    weight: torch.Tensor
    grad_buffer: torch.Tensor | None = None  # flat layout only
    grad_views: list[torch.Tensor] = field(default_factory=list)  # flat layout only
    position: int = 0
    has_grad: list[bool] = field(default_factory=list)  # flat layout only; mutated, never rebound

    @property
    def numel(self) -> int:
        return self.weight.numel()

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def spans(self) -> list[tuple[int, int]]:
        """``(start, numel)`` of each parameter inside the segment."""
        return [(s, local_tensor(p).numel()) for s, p in zip(self.starts, self.params, strict=True)]

    def grad(self) -> torch.Tensor:
        """The segment's 1-D gradient; a missing ``.grad`` counts as zeros.

        Flat layout: a ``.grad`` that is not our view (``module.zero_grad()`` then backward, DDP's
        bucket views, user assignment) is copied into the buffer, re-pointed at it and counts as a
        received gradient. ``.grad`` that is None stays None (the base optimizer skips such
        parameters) and its span is zeroed.
        """
        if self.grad_buffer is None:
            grad = self.params[0].grad  # the DTensor's own .grad: its local tensor has none
            if grad is None:
                return torch.zeros_like(self.weight)
            grad = local_tensor(grad)
            _check_grad(grad, local_tensor(self.params[0]))
            return grad.reshape(-1)
        if all(map(operator.is_, map(_GRAD, self.params), self.grad_views)):  # the usual step: C calls only
            return self.grad_buffer
        for index, (param, view, (start, n)) in enumerate(
                zip(self.params, self.grad_views, self.spans(), strict=True)):
            grad = param.grad
            if grad is view:
                continue
            span = self.grad_buffer[start: start + n]
            if grad is None:
                span.zero_()
                continue
            _check_grad(grad, param)
            span.copy_(grad.reshape(-1))
            param.grad = view
            self.has_grad[index] = True
        return self.grad_buffer

    def zero_grad(self, set_to_none: bool) -> None:
        """``Optimizer.zero_grad`` for these parameters. Tensors layout: exactly PyTorch's. Flat: one
        fill of the buffer, the views stay in ``.grad``; ``set_to_none`` forgets which parameters had
        a gradient (they count as None until a gradient arrives), ``False`` keeps it (a parameter that
        had one keeps a zero gradient and is stepped)."""
        if self.grad_buffer is None:
            zero_grads(self.params, set_to_none)
            return
        self.grad_buffer.zero_()
        for index, (param, view) in enumerate(zip(self.params, self.grad_views, strict=True)):
            if param.grad is not view:
                self.has_grad[index] = param.grad is not None and not set_to_none
                param.grad = view
        if set_to_none:
            self.has_grad[:] = [False] * len(self.params)

    def missing_grads(self) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
        """Flat layout: ``(param, view)`` of the parameters whose ``.grad`` is our view but which
        received no gradient since the last ``zero_grad(set_to_none=True)`` (PyTorch: ``.grad`` None)."""
        if all(self.has_grad):  # the usual step: one check, not one .grad read per parameter
            return []
        return [(p, view) for p, view, seen in zip(self.params, self.grad_views, self.has_grad, strict=True)
                if not seen and p.grad is view]


def zero_grads(params: Iterable[torch.Tensor], set_to_none: bool) -> None:
    """PyTorch's ``Optimizer.zero_grad`` for ``params``: ``.grad`` set to None, or zeroed in place."""
    for param in params:
        if param.grad is not None:
            if set_to_none:
                param.grad = None
            else:
                param.grad.zero_()


def _check_grad(grad: torch.Tensor, param: torch.Tensor) -> None:
    if grad.is_sparse:
        raise TypeError("params: sparse gradients are not supported (SSAM needs dense gradients)")
    if grad.shape != param.shape or grad.dtype != param.dtype:
        raise ValueError(f"params: a gradient of shape {tuple(grad.shape)} and dtype {grad.dtype} does "
                         f"not match its parameter ({tuple(param.shape)}, {param.dtype})")


def check_param(param: object) -> torch.nn.Parameter:
    """``param`` itself, after checking it is a real floating-point tensor SSAM can hold."""
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"params: expected tensors, got {type(param).__name__}")
    if param.is_complex():
        raise TypeError("params: complex parameters are not supported")
    if param.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        raise TypeError("params: expected float32, float64, bfloat16 or float16 parameters, "
                        f"got {param.dtype}")
    return param


def _flat_segments(group: int, params: list[torch.nn.Parameter]) -> list[Segment]:
    by_key: dict[tuple[torch.device, torch.dtype], list[torch.nn.Parameter]] = {}
    for p in params:
        by_key.setdefault((p.device, p.dtype), []).append(p)
    segments = []
    for (device, dtype), members in by_key.items():
        sizes = [p.numel() for p in members]
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        weight = torch.empty(sum(sizes), dtype=dtype, device=device)
        grads = torch.zeros(sum(sizes), dtype=dtype, device=device)
        views, has_grad = [], []
        with torch.no_grad():
            for p, start, n in zip(members, starts, sizes, strict=True):
                weight[start: start + n].copy_(p.reshape(-1))
                p.data = weight[start: start + n].view_as(p)
                views.append(grads[start: start + n].view_as(p))
                has_grad.append(p.grad is not None)  # a missing .grad stays missing for the base step
                if p.grad is not None:
                    _check_grad(p.grad, p)
                    views[-1].copy_(p.grad)
                p.grad = views[-1]
        segments.append(Segment(group, members, starts, weight, grads, views, has_grad=has_grad))
    return segments


def check_distinct_storage(groups: Sequence[Sequence[torch.Tensor]]) -> None:
    """Raise ``ValueError`` if two distinct parameters overlap in memory (``b.data = a.data``, views of
    one tensor): the flat layout would copy them apart (untying them), and any layout would perturb and
    restore the shared entries twice, leaving wrong weights. One ``Parameter`` object used by several
    modules (how tied weights are usually written) is one parameter and is fine."""
    spans = []  # (device, first byte, end byte, group, index, param)
    for g, params in enumerate(groups):
        for i, p in enumerate(params):
            local = local_tensor(p)
            if isinstance(local, torch.Tensor) and local.numel() and not local.is_meta:
                reach = 1 + sum((size - 1) * stride for size, stride in zip(local.shape, local.stride(),
                                                                             strict=True))
                start = local.data_ptr()
                spans.append((str(local.device), start, start + reach * local.element_size(), g, i, p))
    spans.sort(key=lambda s: s[:2])
    for before, after in itertools.pairwise(spans):  # sorted by start: any overlap shows in neighbours
        if before[0] == after[0] and after[1] < before[2]:
            raise ValueError(
                f"params: the parameters at group {before[3]}, index {before[4]} (shape "
                f"{tuple(before[5].shape)}) and group {after[3]}, index {after[4]} (shape "
                f"{tuple(after[5].shape)}) share memory; SSAM would perturb and restore it twice (and the "
                "flat layout would untie them). Tie weights as one Parameter (e.g. decoder.weight = "
                "encoder.weight), or give the optimizer one of them")


def _tensor_segment(group: int, param: torch.nn.Parameter) -> Segment:
    local = local_tensor(param)
    if not local.is_contiguous():
        with torch.no_grad():
            param.data = param.data.contiguous()
        local = local_tensor(param)
    return Segment(group, [param], [0], local.view(-1))


def _shard_offset(param: torch.Tensor) -> int:
    """Row-major offset, in the full parameter, of the first entry of this rank's shard (0 unless a
    DTensor). A ``Shard(0)`` shard (FSDP2's placement) is one contiguous run of the full tensor."""
    if not is_dtensor(param):
        return 0
    # Private but stable since torch 2.4; the public DTensor API has no local-offset query.
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    strides = torch.empty(param.shape, device="meta").stride()
    return sum(o * s for o, s in zip(offset, strides, strict=True))


class ParamLayout:
    """The segments of an optimizer's parameter groups, in entry order (groups, then segments).

    Parameters must stay where the layout put them. :meth:`reattach` (cheap: one pointer comparison per
    parameter) follows a parameter whose storage was replaced by the same dtype, device and shape
    (``model.to("cpu:0")``, ``p.data = ...``) and refuses a change of dtype, device or shape.
    :meth:`newly_trainable` reports parameters that were frozen when their group was added and require
    a gradient now (they are in no segment).
    """

    def __init__(self, groups: Sequence[Sequence[torch.nn.Parameter]], kind: str = "auto") -> None:
        if kind not in LAYOUTS:
            raise ValueError(f"layout: expected one of {LAYOUTS}, got {kind!r}")
        self.kind = "tensors" if kind == "auto" else kind
        self.segments: list[Segment] = []
        self.groups = 0  # groups added so far (a group's index is its place in param_groups)
        self._frozen: list[torch.nn.Parameter] = []  # frozen when added: in no segment
        self._tracked: list[torch.nn.Parameter] = []  # for reattach: params and where they must point
        self._pointers: list[int] = []
        self._shapes: dict[int, torch.Size] = {}  # id(param) -> its shape when laid out
        self._position = 0  # full (unsharded) entries laid out so far
        self.version = 0  # bumped by add_group: what callers cache per set of segments is then stale
        # Tensors layout, for grads() and zero_grad() without a method call per segment: the parameter of
        # each segment, its dtype, the segments whose parameter is not 1-D (their gradient is flattened),
        # and whether any is a DTensor (then every gradient goes through Segment.grad).
        self._params: list[torch.nn.Parameter] = []
        self._dtypes: list[torch.dtype] = []
        self._reshaped: list[int] = []
        self._dtensors = False
        self._views: list[torch.nn.Parameter] = []  # flat layout: the parameters that are views of a buffer
        for params in groups:
            self.add_group(params)

    def add_group(self, params: Sequence[torch.nn.Parameter]) -> list[Segment]:
        """Lay out one more parameter group (its trainable parameters; none if it is not perturbed) after
        the others, and return its new segments. The existing segments do not change."""
        trainable = [check_param(p) for p in params if p.requires_grad]
        if self.kind == "flat" and any(is_dtensor(p) for p in trainable):
            raise ValueError("layout: 'flat' cannot hold DTensor (FSDP2) parameters; use 'tensors'")
        index, self.groups = self.groups, self.groups + 1
        if self.kind == "flat":
            segments = _flat_segments(index, trainable)
        else:
            segments = [_tensor_segment(index, p) for p in trainable]
        for segment in segments:
            segment.position = self._position + _shard_offset(segment.params[0])
            self._position += sum(p.numel() for p in segment.params)  # full (unsharded) sizes
            for p in segment.params:
                if not is_dtensor(p) and p.numel():  # FSDP2 owns its shards' storage
                    self._tracked.append(p)
                    self._pointers.append(p.data_ptr())
                    self._shapes[id(p)] = p.shape
        self._frozen += [p for p in params if not p.requires_grad]
        if self.kind == "flat":
            self._views += [p for segment in segments for p in segment.params]
        if self.kind == "tensors":
            first = len(self._params)
            self._reshaped += [first + i for i, s in enumerate(segments) if s.params[0].dim() != 1]
            self._params += [s.params[0] for s in segments]
            self._dtypes += [s.dtype for s in segments]
            self._dtensors = self._dtensors or any(is_dtensor(s.params[0]) for s in segments)
        self.segments += segments
        self.version += 1
        return segments

    @torch.no_grad()
    def release(self) -> None:
        """Flat layout: give every parameter still in a segment's buffers its own storage and its
        gradient PyTorch's value (a copy, or None where no gradient arrived since the last
        ``zero_grad(set_to_none=True)``), so the buffers are freed with the optimizer. Parameters bound
        elsewhere since (another optimizer's layout) are left alone. The tensors layout has nothing to
        give back."""
        for segment in self.segments:
            if segment.grad_buffer is None:
                continue
            buffer = segment.weight.untyped_storage().data_ptr()
            for index, (p, view) in enumerate(zip(segment.params, segment.grad_views, strict=True)):
                if p.untyped_storage().data_ptr() == buffer:
                    p.data = p.data.clone()
                if p.grad is view:
                    p.grad = view.clone() if segment.has_grad[index] else None

    def mark_modified(self) -> None:
        """Tell autograd that the segments' weights were changed in place (perturbed or restored), as
        every in-place op does: a graph that saved a parameter before then refuses to backward through it.
        A per-tensor segment is a view of its parameter, so the op's own bump reaches the parameter; a
        flat one is a buffer of which the parameters are views with counters of their own, bumped here."""
        if self._views:
            torch.autograd.graph.increment_version(self._views)

    def newly_trainable(self) -> list[torch.nn.Parameter]:
        """Parameters frozen when their group was laid out that now require a gradient (``[]`` in one
        host-side pass over the frozen ones). They are reported once: the layout forgets them."""
        if not any(map(_REQUIRES_GRAD, self._frozen)):
            return []
        found = [p for p in self._frozen if p.requires_grad]
        self._frozen = [p for p in self._frozen if not p.requires_grad]
        return found

    @torch.no_grad()
    def reattach(self) -> None:
        """Point parameters whose storage was replaced since they were laid out back at the segments.

        ``Module.to`` rebinds ``p.data`` (and ``p.grad.data``) with copies even for a device that
        differs only in spelling (accelerate moves a model for DDP on CPU with ``model.to("cpu:0")``);
        the optimizer would then perturb and restore memory the model no longer reads. A parameter with
        the same dtype, device and shape has its current values (and its gradient's) copied into the
        segment and is bound to it again: nothing is lost. A change of dtype, device or shape cannot be
        followed: ``ValueError``. The usual call costs one ``data_ptr()`` per parameter, on the host.
        """
        if list(map(torch.Tensor.data_ptr, self._tracked)) == self._pointers:  # C calls only
            return
        for segment in self.segments:
            for index, (p, (start, n)) in enumerate(zip(segment.params, segment.spans(), strict=True)):
                view = segment.weight[start: start + n]
                if is_dtensor(p) or not n or p.data_ptr() == view.data_ptr():
                    continue
                if p.device != segment.device or p.dtype != segment.dtype or p.shape != self._shapes[id(p)]:
                    raise ValueError(
                        f"params: a parameter laid out as {tuple(self._shapes[id(p)])} {segment.dtype} on "
                        f"{segment.device} is now {tuple(p.shape)} {p.dtype} on {p.device}: it moved after "
                        "the SSAM optimizer was built (model.to(...) or p.data = ...), so the optimizer no "
                        "longer holds its weights; build the optimizer after moving or converting the model")
                view.copy_(p.reshape(-1))
                p.data = view.view_as(p)
                if segment.grad_buffer is None:
                    continue
                # Module.to rebinds our gradient view's data too (``p.grad.data = ...``); the view must
                # point at the buffer again even when it is not in .grad now (zero_grad puts it back).
                grad, span = segment.grad_views[index], segment.grad_buffer[start: start + n]
                if grad.data_ptr() != span.data_ptr():
                    if p.grad is grad:
                        span.copy_(grad.reshape(-1))
                    grad.data = span.view_as(p)

    def grads(self) -> list[torch.Tensor]:
        """Each segment's current 1-D gradient, as :meth:`Segment.grad` gives it (repaired where
        ``.grad`` was replaced; zeros for a missing one).

        Tensors layout: the usual step (every parameter has a dense gradient of its dtype, no DTensor)
        reads ``.grad`` and checks it for all parameters in C-level passes (``map``), and flattens only
        the gradients of parameters that are not 1-D; anything else goes through :meth:`Segment.grad`,
        which also raises the error for a bad gradient. Nothing is kept between calls: a gradient
        dropped by ``zero_grad(set_to_none=True)`` is freed as in PyTorch.
        """
        if self.kind == "flat" or self._dtensors:
            return [segment.grad() for segment in self.segments]
        grads = list(map(_GRAD, self._params))
        if (any(map(operator.is_, grads, itertools.repeat(None)))
                or not all(map(operator.is_, map(_LAYOUT, grads), itertools.repeat(torch.strided)))
                or list(map(_DTYPE, grads)) != self._dtypes):
            return [segment.grad() for segment in self.segments]
        for index in self._reshaped:  # PyTorch keeps .grad the parameter's shape: 1-D ones are 1-D
            grads[index] = grads[index].reshape(-1)
        return grads

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``Optimizer.zero_grad`` over the segments (see :meth:`Segment.zero_grad`)."""
        if self.kind == "flat":
            for segment in self.segments:
                segment.zero_grad(set_to_none)
            return
        zero_grads(self._params, set_to_none)  # one loop, not a Segment.zero_grad call per parameter

    @contextlib.contextmanager
    def hide_missing_grads(self) -> Iterator[None]:
        """Inside: flat-layout parameters that received no gradient have ``.grad`` None (what the base
        optimizer would see in plain PyTorch, so it skips them); their views are put back on exit."""
        hidden = [] if self.kind != "flat" else [pair for segment in self.segments
                                                 for pair in segment.missing_grads()]
        for param, _ in hidden:
            param.grad = None
        try:
            yield
        finally:
            for param, view in hidden:
                param.grad = view
