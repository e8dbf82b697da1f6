"""SSAM and SAM as drop-in ``torch.optim`` optimizers. They orchestrate; the ops compute.

One step (DESIGN.md, "Data flow of one step"), with ``m`` the mask and ``s`` the sparsity:

1. backward at ``w``; ``first_step()``: ``scale = rho / (||g|| + eps)`` with ``||g||`` over every
   perturbed entry (ASAM: ``|| |w| ⊙ g ||``), then ``w ← w + scale · g ⊙ m`` (ASAM: ``scale · w² ⊙ g
   ⊙ m``), keeping the old values of the live entries in a compact backup (``K = floor(N · (1 − s))``
   elements per step, not ``N``). A non-finite norm skips the perturbation (weights untouched).
2. backward at ``w + e``; ``second_step()``: restore ``w`` bit-exactly from the backup, take the base
   optimizer's step with the gradient at ``w + e``, and refresh the mask when the policy says so.

The class holds the parameters, groups, masks and run state and gathers the step's lists; the
computations on those lists are :mod:`ssam_kernels._step`'s. No host synchronisation happens on this
path; a mask refresh may synchronise.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from . import _step, checkpoint, ops
from ._validation import (
    BaseOptimizer,
    build_base,
    check_group,
    check_keyword_only,
    check_materialized,
    check_type,
    group_lists,
    real,
)
from ._warnings import warn
from .checkpoint import IDLE as _IDLE
from .checkpoint import PERTURBED as _PERTURBED
from .checkpoint import RESTORED as _RESTORED
from .distributed import ProcessGroupComm, resolve_mode
from .layout import (
    ParamLayout,
    Segment,
    check_distinct_storage,
    check_param,
    is_dtensor,
    local_tensor,
    zero_grads,
)
from .masks import Mask, MaskContext, MaskPolicy, check_sparsity, live_count, make_policy
from .ops.tuning import resolve as resolve_tuning
from .schedules import LookSAM, Schedule, make_schedule

_NO_FIRST_STEP = ("{what}: no first_step() was taken in this step (the weights were never perturbed); "
                  "call first_step() after the first backward, or step(closure)")


@dataclass
class _RunState:
    """Everything SSAM changes while it trains. One object, mutated and never rebound, so that wrappers
    that copy the optimizer's ``__dict__`` (Lightning's ``LightningOptimizer``) share it."""

    phase: str = _IDLE
    steps: int = 0
    started: bool = False  # the initial mask is built (lazily, at the first first_step or get_mask)
    masks: list[Mask] | None = None  # None: dense, or not built yet
    pending: list[Mask] | None = None  # a refresh computed in first_step, applied after the step
    backups: list[torch.Tensor] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    sharp: bool = False  # the step in progress is sharpness-aware (its schedule's decision)
    lookahead: _step.Lookahead = field(default_factory=_step.Lookahead)  # LookSAM's g_v
    fresh_grad: bool = False  # a gradient accumulated since the last zero_grad() or step
    lists: _step.StepListCache = field(default_factory=_step.StepListCache)
    stepping: dict[str, int] = field(default_factory=dict)  # who is inside a step method (SSAM._one_thread)

    def install(self, masks: list[Mask] | None, backups: list[torch.Tensor]) -> None:
        """The masks (None: dense, or not built yet) and their backups; the one place they are replaced,
        so the cached step lists, which hold the old ones, are dropped here."""
        self.masks, self.backups = masks, backups
        self.lists.invalidate()


def _grad_arrived(run: _RunState, segment: Segment | None, index: int, param: torch.Tensor) -> None:
    """Post-accumulate-grad hook: host-side bookkeeping only (no device work, no synchronisation)."""
    del param
    run.fresh_grad = True
    if segment is not None:
        segment.has_grad[index] = True


def _remove_hooks(handles: list[torch.utils.hooks.RemovableHandle]) -> None:
    """Remove the hooks an optimizer registered on its parameters. Runs at ``close()`` or when the
    optimizer is garbage collected (``weakref.finalize``): the hooks hold the optimizer's buffers, so
    leaving them would keep every rebuilt optimizer's memory alive as long as the parameters live."""
    for handle in handles:
        handle.remove()
    handles.clear()


class SSAM(torch.optim.Optimizer):
    """Sparse SAM: SAM whose perturbation touches only the entries of a mask chosen by a policy.

    Args:
        params: parameters or parameter groups, each tensor once. A group may set ``rho``, ``adaptive``
            and ``perturb=False`` (exclude it from the perturbation, e.g. norms and biases).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**base_kwargs``) or an already
            built instance over the same parameters. Both share ``param_groups``, so LR schedulers work
            on either.
        rho: perturbation radius ``||e|| <= rho``, finite, >= 0.
        sparsity: fraction of perturbed-group entries *not* perturbed, in [0, 1]; the mask keeps
            ``K = floor(N · (1 − sparsity))`` entries (:func:`ssam_kernels.masks.live_count`).
        mask: a policy (:class:`FisherMask`, :class:`DynamicMask`, :class:`RandomMask`), ``"dynamic"``,
            ``"random"``, or None / ``"dense"`` for plain SAM (requires ``sparsity=0``).
        adaptive: ASAM's scale-invariant perturbation.
        eps: added to the norm before dividing (finite, > 0).
        backend: ``"auto" | "reference" | "vectorized" | "triton" | "native"`` (None:
            ``SSAM_KERNELS_BACKEND``).
        tuning: the block sizes and launch shapes of the PyTorch and Triton backends
            (:class:`ssam_kernels.ops.Tuning`; None: the production ones). Masks and perturbations keep
            their bits, but on Triton the norm's last bits follow its tile shape.
        layout: ``"auto" | "flat" | "tensors"`` (see :mod:`ssam_kernels.layout`).
        distributed: ``"auto" | "none" | "replicated" | "sharded"``: how the ranks hold the model
            (DDP: replicated, FSDP2: sharded; see :mod:`ssam_kernels.distributed`).
        process_group: the ranks that train together (default: the default group).
        sync_perturbation: DDP only. False: each rank perturbs along its own gradient (m-sharpness);
            the first backward must then run under ``ddp_model.no_sync()``, which ``step(closure)``
            does for you when ``ddp_model`` is given.
        ddp_model: the ``DistributedDataParallel`` module, for ``step(closure)`` with
            ``sync_perturbation=False``.
        schedule: which steps are sharpness-aware (:mod:`ssam_kernels.schedules`): ``EveryStep()`` (the
            default, None), ``EveryK(k)``, ``LookSAM(k, alpha)``, ``AESAM(total_steps)``. The other steps
            take one forward/backward.

    Gradients follow PyTorch: a parameter that received no gradient since ``zero_grad()`` (``.grad``
    None in plain PyTorch) is not stepped by the base optimizer, in both layouts. The step's methods
    run eagerly under ``torch.compile`` (Dynamo breaks the graph around them).
    """

    def __init__(self, params: Iterable[Any], base_optimizer: BaseOptimizer, rho: float = 0.05,
                 *positional: Any, sparsity: float = 0.5, mask: MaskPolicy | str | None = "dynamic",
                 adaptive: bool = False, eps: float = 1e-12, backend: str | None = None,
                 tuning: ops.Tuning | None = None, layout: str = "auto", distributed: str = "auto",
                 process_group: Any = None, sync_perturbation: bool = True,
                 ddp_model: torch.nn.Module | None = None,
                 schedule: Schedule | None = None, **base_kwargs: Any) -> None:
        check_keyword_only(type(self).__name__, positional)
        rho, eps = real("rho", rho), real("eps", eps, positive=True)
        sparsity = check_sparsity(sparsity)
        check_type("adaptive", adaptive, bool, "a bool")
        check_type("sync_perturbation", sync_perturbation, bool, "a bool")
        check_type("backend", backend, (str, type(None)), "a str or None")
        check_type("layout", layout, str, "a str")
        check_type("distributed", distributed, str, "a str")
        check_type("ddp_model", ddp_model, (torch.nn.Module, type(None)), "a torch.nn.Module or None")
        self.policy = make_policy(mask)
        self.schedule = make_schedule(schedule)
        if self.policy is None and sparsity != 0:
            raise ValueError(f"sparsity: a dense mask (mask={mask!r}) perturbs every entry; use sparsity=0 "
                             "or a mask policy")
        super().__init__(group_lists(params), {"rho": rho, "adaptive": adaptive, "perturb": True})
        self.base_optimizer = build_base(base_optimizer, base_kwargs, self.param_groups, self.defaults)
        self.param_groups = self.base_optimizer.param_groups  # one list, updated in place on load
        self.defaults.update(self.base_optimizer.defaults)
        self.eps, self.backend, self.tuning = eps, backend, resolve_tuning(tuning)
        for index, group in enumerate(self.param_groups):
            check_group(index, group, eps)
        perturbed = [list(g["params"]) if g["perturb"] else [] for g in self.param_groups]
        self.distributed = resolve_mode(distributed, any(is_dtensor(p) for ps in perturbed for p in ps))
        ranks = ProcessGroupComm(process_group) if self.distributed != "none" else None
        self.comm = ranks if self.distributed == "sharded" else None  # norm and selections span ranks
        self.replicas = ranks if self.distributed == "replicated" else None
        if not sync_perturbation and self.distributed != "replicated":
            raise ValueError("sync_perturbation: False applies to replicated (DDP) training only")
        self.sync_perturbation, self.ddp_model = sync_perturbation, ddp_model
        check_materialized(self._params())
        check_distinct_storage([g["params"] for g in self.param_groups])
        self.layout = ParamLayout(perturbed, "tensors" if self.distributed == "sharded" else layout)
        self._run = _RunState()
        self._hooks: list[torch.utils.hooks.RemovableHandle] = []  # on the parameters; removed by _release
        self._release = weakref.finalize(self, _remove_hooks, self._hooks)
        self._outside: list[torch.nn.Parameter] = []  # not in a segment: plain PyTorch zero_grad
        self._laid_out: list[bool] = []  # each group's perturb when it was laid out (it decided the segments)
        self._sparsity = sparsity  # as given, for live_count (0.9 means 9/10)
        for index, group in enumerate(self.param_groups):
            self._attach(group, [s for s in self.layout.segments if s.group == index])
        self._live_count = self._count_live()

    # ------------------------------------------------------------------------------------------------
    # Parameter groups and their segments
    # ------------------------------------------------------------------------------------------------

    def _attach(self, group: dict[str, Any], segments: list[Segment]) -> None:
        """Bookkeeping for a laid-out group: its backend is checked, its parameters outside the segments
        are zeroed as in plain PyTorch, and its trainable parameters get gradient hooks."""
        for segment in segments:
            ops.resolve_backend(self.backend, segment.device, segment.dtype)  # fail now, not mid-training
        self._laid_out.append(group["perturb"])
        in_layout = {id(p) for s in segments for p in s.params}
        self._outside += [p for p in group["params"] if id(p) not in in_layout]
        where = {id(p): (segment, index) for segment in segments
                 if segment.grad_buffer is not None for index, p in enumerate(segment.params)}
        for p in group["params"]:
            # One post-accumulate-grad hook per trainable parameter: it records that a gradient arrived
            # (flat layout: which parameter; any layout: that one arrived since the last zero_grad).
            # FSDP2 writes the shards' .grad directly (no accumulation hook fires): they are skipped.
            if p.requires_grad and not is_dtensor(p):
                segment, index = where.get(id(p), (None, 0))
                hook = functools.partial(_grad_arrived, self._run, segment, index)
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    def _count_live(self) -> int:
        numel = self._context().global_count(sum(s.numel for s in self.layout.segments))
        return live_count(numel, self._sparsity)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a parameter group after construction (fine-tuning: unfreeze a backbone and add it, with
        its own ``lr``, ``rho``, ``adaptive`` or ``perturb``). Options it leaves out take SSAM's and the
        base optimizer's defaults. The group joins the shared ``param_groups``, and its trainable
        parameters (when ``perturb``) get segments after the existing ones, so they are perturbed from
        the next step.

        The mask: ``K = floor(N · (1 − sparsity))`` is recomputed over the new ``N``, and the mask is
        rebuilt by the policy's ``initial`` at the next :meth:`first_step` (a pending refresh is
        dropped), as for a new optimizer; the step count and the policy's schedule go on. Refused while
        the weights are perturbed, and for a parameter that is already in a group."""
        if not hasattr(self, "layout"):  # torch.optim.Optimizer.__init__ adds the initial groups
            super().add_param_group(param_group)
            return
        with self._one_thread("add_param_group"):
            self._add_param_group(param_group)

    def _add_param_group(self, param_group: dict[str, Any]) -> None:
        self._refuse_if_perturbed("add_param_group")
        self._refuse_if_closed("add_param_group")
        check_type("param_group", param_group, dict, "a dict")
        index = len(self.param_groups)
        group = group_lists([*self.param_groups, param_group])[index]  # duplicates raise here
        for key in ("rho", "adaptive", "perturb"):
            group.setdefault(key, self.defaults[key])
        check_group(index, group, self.eps)
        check_materialized(group["params"])
        check_distinct_storage([g["params"] for g in [*self.param_groups, group]])
        if self.distributed != "sharded" and any(is_dtensor(p) for p in group["params"]):
            raise ValueError("param_group: DTensor (FSDP2) parameters need an optimizer built over sharded "
                             "parameters (distributed='sharded')")
        for p in group["params"]:
            if p.requires_grad and group["perturb"]:
                check_param(p)
                ops.resolve_backend(self.backend, p.device, p.dtype)
        self.base_optimizer.add_param_group(group)  # the last check (its own options); nothing changed yet
        self._run.lookahead = _step.Lookahead()  # LookSAM's g_v lacks the new parameters
        group = self.param_groups[-1]
        self._attach(group, self.layout.add_group(group["params"] if group["perturb"] else []))
        self._live_count = self._count_live()
        self._restart_masks()

    def _restart_masks(self) -> None:
        """After K changed: the mask is built again by the policy's ``initial`` at the next first_step."""
        run = self._run
        run.started, run.pending = False, None
        run.install(None, [])

    def _check_params(self) -> None:
        """Host-side checks at each first_step: parameters moved since they were laid out are followed
        or refused (:meth:`ParamLayout.reattach`); a parameter unfrozen since is reported."""
        self._refuse_if_closed("first_step")
        self.layout.reattach()
        unfrozen = self.layout.newly_trainable()
        if unfrozen:
            where = {id(p): (g, i) for g, group in enumerate(self.param_groups)
                     for i, p in enumerate(group["params"])}
            names = ", ".join(f"group {where[id(p)][0]} index {where[id(p)][1]} (shape {tuple(p.shape)})"
                              for p in unfrozen if id(p) in where)
            warn(f"SSAM: {len(unfrozen)} parameter(s) were frozen when the optimizer was built and require a "
                 f"gradient now ({names}); the base optimizer steps them but SSAM does not perturb them. To "
                 "perturb them, build the optimizer over the trainable parameters only and add the unfrozen "
                 "ones with opt.add_param_group({'params': ...}), or rebuild the optimizer after unfreezing")

    @property
    def live_count(self) -> int:
        """``K = floor(N · (1 − sparsity))`` (exact, :func:`ssam_kernels.masks.live_count`): the number
        of perturbed entries the policy keeps."""
        return self._live_count

    @property
    def grad_norm(self) -> torch.Tensor | None:
        """``||g||`` of the last sharpness-aware first_step (float64, on device); None before the first."""
        return self._run.grad_norm

    @property
    def steps(self) -> int:
        """Completed optimizer steps."""
        return self._run.steps

    def close(self) -> None:
        """Hand the parameters back as plain PyTorch ones: restore the weights if they are perturbed,
        remove the gradient hooks SSAM registered on the parameters (this also happens when the optimizer
        is garbage collected), and in the flat layout give every parameter still in the buffers its own
        storage again, with ``.grad`` None where no gradient arrived since ``zero_grad``. The optimizer
        cannot step afterwards; its state dict can still be saved."""
        self.unperturb()
        self._release()
        self.layout.release()

    def __repr__(self) -> str:
        """``torch.optim``'s repr (each group's options) with SSAM's own settings on its first line."""
        requested = self.backend or os.environ.get(ops.ENV_VAR) or "auto"
        devices = dict.fromkeys(s.device.type for s in self.layout.segments) if requested == "auto" else {}
        resolved = ", ".join(  # what auto picked per device type
            f"{d}: {ops.resolve_backend(self.backend, torch.device(d)).__name__.rpartition('.')[2]}"
            for d in devices)
        settings = (f"sparsity={self.sparsity}, mask={self.policy!r}, rho={self.defaults['rho']}, "
                    f"adaptive={self.defaults['adaptive']}, eps={self.eps}, layout={self.layout.kind!r}, "
                    f"backend={requested!r}{f' ({resolved})' if resolved else ''}, "
                    f"{f'tuning={self.tuning!r}, ' if self.tuning != ops.Tuning() else ''}"
                    f"base_optimizer={type(self.base_optimizer).__name__}, schedule={self.schedule!r}")
        head, _, groups = super().__repr__().partition("\n")
        return f"{head}{settings}\n{groups}"

    @property
    def sparsity(self) -> float:
        """The fraction of the perturbed groups' entries that are not perturbed, in [0, 1]. Setting it
        takes effect at the next :meth:`first_step`, as :meth:`add_param_group` does: ``K`` is recomputed
        and the mask rebuilt by the policy's ``initial`` (a pending refresh is dropped; the step count
        and the refresh schedule go on). Checked as the constructor checks it; refused while perturbed."""
        return float(self._sparsity)

    @sparsity.setter
    def sparsity(self, value: float) -> None:
        with self._one_thread("sparsity"):
            self._refuse_if_perturbed("sparsity")
            value = check_sparsity(value)
            if self.policy is None and value != 0:
                raise ValueError("sparsity: a dense mask (mask=None) perturbs every entry; use sparsity=0 "
                                 "or a mask policy")
            self._sparsity = value
            self._live_count = self._count_live()
            self._restart_masks()

    @property
    def state(self) -> defaultdict:
        """The base optimizer's per-parameter state (momentum buffers, Adam's moments); SSAM's own state
        is in :meth:`ssam_state_dict`."""
        return self.base_optimizer.state

    @state.setter
    def state(self, value: defaultdict) -> None:
        if "base_optimizer" in self.__dict__:  # torch.optim.Optimizer.__init__ sets one before it exists
            self.base_optimizer.state = value

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def _context(self) -> MaskContext:
        return MaskContext(self.layout.segments, self._run.masks, self.backend, self.comm,
                           self.replicas, self.sync_perturbation, self.tuning)

    def _set_masks(self, masks: list[Mask] | None) -> None:
        """Install masks (None: dense) and size the compact backups to each segment's live count."""
        sizes = ([s.numel for s in self.layout.segments] if masks is None
                 else [int(offsets[-1]) for _, offsets in masks])
        self._run.install(masks, [torch.empty(n, dtype=s.dtype, device=s.device)
                                  for n, s in zip(sizes, self.layout.segments, strict=True)])

    def _step_lists(self) -> _step.StepLists:
        """The step's list-op arguments but the gradients (:class:`~ssam_kernels._step.StepListCache`)."""
        run, adaptive = self._run, [group["adaptive"] for group in self.param_groups]
        return run.lists.get(self.layout, run.masks, run.backups, adaptive)

    def _start(self) -> None:
        """Build the initial mask, before the first perturbation."""
        self._run.started = True
        if self.policy is None or not self.layout.segments:  # dense, or nothing to perturb
            self._set_masks(None)
        else:
            self._set_masks(self._policy_masks(self.policy.initial))

    def _policy_masks(self, method: Callable[..., list[Mask]], *step: int) -> list[Mask]:
        """``policy.initial`` / ``policy.refresh``. A policy's own backward passes (FisherMask's
        ``method="backward"``) fire the gradient hooks; they are not the user's gradients, so what the
        hooks recorded is put back."""
        fresh, seen = self._run.fresh_grad, [list(s.has_grad) for s in self.layout.segments]
        try:
            return method(self._context(), self.live_count, *step)
        finally:
            self._run.fresh_grad = fresh
            for segment, flags in zip(self.layout.segments, seen, strict=True):
                segment.has_grad[:] = flags

    def _refuse_if_closed(self, what: str) -> None:
        if not self._release.alive:
            raise RuntimeError(f"{what}: this optimizer was closed (close()); build a new one")

    @contextlib.contextmanager
    def _one_thread(self, what: str) -> Iterator[None]:
        """Refuse ``what`` (a method that changes the weights or the run state) from a second thread while
        another thread is inside one: their writes to the weights, the backups and the phase would
        interleave. Calls from the thread inside nest (step(closure) calls first_step)."""
        stepping, me = self._run.stepping, threading.get_ident()
        if stepping.setdefault("thread", me) != me:  # one atomic dict operation: no lock to pickle
            raise RuntimeError(f"{what}: another thread is inside a step of this optimizer; an SSAM "
                               "optimizer takes its steps from one thread at a time")
        stepping["depth"] = stepping.get("depth", 0) + 1
        try:
            yield
        finally:
            stepping["depth"] -= 1
            if not stepping["depth"]:
                del stepping["depth"], stepping["thread"]

    def _refuse_if_perturbed(self, what: str) -> None:
        if self._run.phase == _PERTURBED:
            raise RuntimeError(f"{what}: the weights are perturbed (between first_step and second_step); "
                               "call second_step() or unperturb() first, so the backup is not lost")

    # ------------------------------------------------------------------------------------------------
    # The step. Every method that changes the weights or the state runs eagerly under torch.compile
    # (torch.compiler.disable): Dynamo traces the model around them, never the optimizer's bookkeeping.
    # ------------------------------------------------------------------------------------------------

    @torch.compiler.disable
    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> bool:
        """The first half of the step, at ``w`` with its gradient ``g``. Returns whether the step is
        sharpness-aware (the schedule's decision, :mod:`ssam_kernels.schedules`):

        - ``True``: the masked weights were perturbed along ``g``, ``w ← w + rho · g ⊙ m / (||g|| + eps)``;
          compute the gradient at ``w + e`` next, then call :meth:`second_step`;
        - ``False``: a plain step; the weights are ``w`` and the gradients are left as they are (LookSAM:
          ``g + alpha · (‖g‖ / ‖g_v‖) · g_v``), even with ``zero_grad=True``; call :meth:`second_step`
          without another backward.

        All or nothing: every group's options are checked before the first weight is written, and if a
        perturbation call raises anyway (an interrupt between two calls), the weights it already changed
        are restored, bit-exact, before the exception propagates; the phase stays what it was."""
        with self._one_thread("first_step"):
            run = self._run
            if run.phase == _PERTURBED:
                raise RuntimeError("first_step: the weights are already perturbed; call second_step() (or "
                                   "unperturb()) before the next first_step()")
            options = self._group_options()
            run.pending = None  # a refresh from a step the GradScaler skipped is void
            self._check_params()
            if not run.started:
                self._start()
            segments = self.layout.segments
            grads = self.layout.grads()
            policy = self.policy
            if segments and policy is not None and policy.uses_gradient and policy.due(run.steps + 1):
                run.pending = self._policy_masks(policy.refresh, run.steps + 1)
            plain_norm = functools.cache(functools.partial(self._plain_norm, grads))
            run.sharp = self.schedule.sharpness_aware(run.steps, lambda: self._decision_sq_norm(plain_norm))
            if not run.sharp:
                self._plain_first_step(grads, plain_norm)
                return False
            if segments:
                lists = self._step_lists()
                if isinstance(self.schedule, LookSAM):
                    run.lookahead.keep(grads)
                    if self.replicas is not None and not self.sync_perturbation:
                        self._average_over_replicas(run.lookahead.buffers)  # g_v's g: the global one
                weighted = any(w is not None for w in lists.norm_weights)  # ASAM groups
                run.grad_norm = plain_norm() if not weighted else _step.grad_norm(
                    grads, lists, device=segments[0].device, comm=self.comm, backend=self.backend,
                    tuning=self.tuning)
                calls = _step.perturb_calls(grads, lists, options, run.grad_norm, self.eps)
                _step.perturb(calls, backend=self.backend, tuning=self.tuning,
                              modified=self.layout.mark_modified)
            run.phase = _PERTURBED
            if zero_grad:
                self.zero_grad()
            return True

    def _plain_norm(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """``‖g‖`` over the perturbed segments without ASAM's weights (all ranks together when sharded)."""
        if not self.layout.segments:
            return torch.zeros((), dtype=torch.float64)
        return _step.grad_norm(grads, self._step_lists(), device=self.layout.segments[0].device,
                               comm=self.comm, backend=self.backend, tuning=self.tuning, weighted=False)

    def _decision_sq_norm(self, plain_norm: Callable[[], torch.Tensor]) -> float:
        """``‖g‖²`` for a schedule's decision, read on the host: the same on every rank (DDP with
        ``sync_perturbation=False``, whose first gradients are each rank's own: their mean over ranks)."""
        sq = plain_norm() ** 2
        if self.replicas is not None and not self.sync_perturbation:
            sq = sq.clone()
            self.replicas.all_reduce_(sq)
            sq /= self.replicas.world_size
        return float(sq)

    def _plain_first_step(self, grads: list[torch.Tensor], plain_norm: Callable[[], torch.Tensor]) -> None:
        """First half of a plain step: the gradients made the global ones (DDP with
        ``sync_perturbation=False``) and, for LookSAM, ``g_v``'s direction added."""
        run = self._run
        if self.replicas is not None and not self.sync_perturbation:
            # the first backward ran under no_sync: average what DDP's backward would have
            self._average_over_replicas(grads + [p.grad for p in self._outside if p.grad is not None])
        if isinstance(self.schedule, LookSAM) and self.layout.segments:
            _step.looksam_reuse(run.lookahead, grads, plain_norm(), self.schedule.alpha, backend=self.backend,
                                tuning=self.tuning)
        run.phase = _RESTORED

    def _average_over_replicas(self, tensors: list[torch.Tensor]) -> None:
        for tensor in tensors:
            self.replicas.all_reduce_(tensor)
        torch._foreach_div_(tensors, self.replicas.world_size)

    def _group_options(self) -> list[tuple[float, bool]]:
        """Each group's ``(rho, adaptive)`` as it is now (a schedule may change them), checked by the
        constructor's rules, with ``eps``; a group's ``perturb`` decided its segments when it was laid out
        and cannot change."""
        eps = real("eps", self.eps, positive=True)
        if len(self.param_groups) != len(self._laid_out):
            raise ValueError(f"param_groups: {len(self.param_groups)} groups, {len(self._laid_out)} laid "
                             "out; add groups with opt.add_param_group (not the base optimizer's), which "
                             "lays out their parameters")
        options = []
        for index, group in enumerate(self.param_groups):
            check_group(index, group, eps)
            if group["perturb"] != self._laid_out[index]:
                raise ValueError(f"perturb (param group {index}): {group['perturb']} now, "
                                 f"{self._laid_out[index]} when the group was laid out, which fixed the "
                                 "perturbed parameters; build a new optimizer, or add the parameters as a "
                                 "new group (add_param_group)")
            options.append((group["rho"], group["adaptive"]))
        return options

    @torch.compiler.disable
    @torch.no_grad()
    def unperturb(self) -> None:
        """Restore the weights if they are perturbed (bit-exact); a no-op otherwise."""
        with self._one_thread("unperturb"):
            run = self._run
            if run.phase != _PERTURBED:
                return
            _step.restore(self._step_lists(), backend=self.backend, tuning=self.tuning)
            self.layout.mark_modified()
            run.phase = _RESTORED

    def _abandon_step(self) -> None:
        """Undo the step in progress after an exception: ``w`` restored (bit-exact) if perturbed, the
        refresh computed for the step dropped, the phase idle."""
        self.unperturb()
        self._run.phase = _IDLE
        self._run.pending = None
        self._run.sharp = False

    @contextlib.contextmanager
    def perturbed(self, zero_grad: bool = True) -> Iterator[bool]:
        """The second pass of the two-step form, made all or nothing::

            loss_fn(model(x), y).backward()
            with opt.perturbed() as sharp:            # first_step(zero_grad=True)
                if sharp:                             # always True with the default schedule
                    loss_fn(model(x), y).backward()   # at w + e
            # second_step(zero_grad=True) ran on leaving the block

        On entry :meth:`first_step` (unless it was already taken: call ``first_step()`` yourself first,
        e.g. after ``scaler.unscale_(opt)``); the block gets its result, whether the step is
        sharpness-aware. On leaving :meth:`second_step`, unless the block already finished or undid the
        step (``opt.unperturb(); scaler.step(opt)``). A plain step's block must not run a backward (it
        would add to the step's gradients): one that does raises ``RuntimeError`` on leaving, with the
        step abandoned. If the block raises (``KeyboardInterrupt`` included), the weights are restored to
        ``w`` bit-exact, the step is abandoned (phase idle) and the exception propagates: a
        ``model.state_dict()`` saved in the handler holds ``w``, never ``w + e``."""
        run = self._run
        if run.phase == _IDLE:
            self.first_step(zero_grad=zero_grad)
        sharp = run.phase == _PERTURBED
        if not sharp:
            run.fresh_grad = False  # so that a backward in the block shows
        try:
            yield sharp
        except BaseException:
            with self._one_thread("perturbed"):
                self._abandon_step()
            raise
        if not sharp and run.fresh_grad:
            with self._one_thread("perturbed"):
                self._abandon_step()
            raise RuntimeError("perturbed: this step is plain (its schedule takes no second pass; the block "
                               "got False) but a backward ran in the block and added to the step's "
                               "gradients; the step was abandoned. Run the block's backward only when it "
                               "gets True: `with opt.perturbed() as sharp: if sharp: ...`")
        if run.phase == _PERTURBED or (not sharp and run.phase == _RESTORED):
            self.second_step(zero_grad=zero_grad)

    @torch.compiler.disable
    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w``, take the base optimizer's step with the gradient at ``w + e``, refresh the mask.

        Runs through :meth:`step`, so LR schedulers, optimizer step hooks and wrappers that count steps
        (Lightning's ``LightningOptimizer``) see every step."""
        with self._one_thread("second_step"):
            if self._run.phase == _IDLE:
                raise RuntimeError(_NO_FIRST_STEP.format(what="second_step"))
            self.step()
            if zero_grad:
                self.zero_grad()

    @torch.compiler.disable
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """Without a closure: the second half of the step, as :meth:`second_step` (this is what
        ``GradScaler.step`` calls).

        With a closure (forward + backward, returning the loss), by what has happened so far:

        - nothing since ``zero_grad()`` or the last step: the whole step, two passes when it is
          sharpness-aware and one when its schedule says plain (:meth:`first_step`); the gradients are
          zeroed before each call of the closure; returns the loss at ``w``;
        - a backward already ran (``loss.backward(); opt.step(closure)``, the convention of davda54/sam
          and pytorch_optimizer): that gradient is the first pass; the closure runs once, at ``w + e``,
          and its loss is returned (a plain step: the closure does not run, returns None);
        - the weights are perturbed (``first_step()`` was called; Lightning's wrapper calls
          ``step(closure)`` from ``second_step()``): the closure is the second pass; it runs once,
          without zeroing the gradients, and the step is finished;
        - ``first_step()`` returned False, or ``unperturb()`` was called: the closure does not run; the
          step is finished with the gradients there are; returns None.

        If anything raises on the way (the closure in either pass, ``KeyboardInterrupt`` included), the
        weights are restored to ``w`` bit-exact, the step is abandoned (phase idle) and the exception
        propagates.
        """
        with self._one_thread("step"):
            if closure is None:
                self._finish_step()
                return None
            try:
                return self._closure_step(torch.enable_grad()(closure))
            except BaseException:
                self._abandon_step()
                raise

    def _closure_step(self, closure: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        run = self._run
        if run.phase == _IDLE and run.fresh_grad:
            self.first_step(zero_grad=True)
        if run.phase == _PERTURBED:
            loss = closure()
            self._finish_step()
            return loss
        if run.phase == _RESTORED:  # a plain step (or an unperturbed one): its gradients are in
            self._finish_step()
            return None
        self.zero_grad()
        local_first_backward = not self.sync_perturbation and self.ddp_model is not None
        with self.ddp_model.no_sync() if local_first_backward else contextlib.nullcontext():
            loss = closure()
        if self.first_step(zero_grad=True):
            closure()
        self._finish_step()
        return loss

    @torch.no_grad()
    def _finish_step(self) -> None:
        """Restore ``w``, take the base step, then count the step (the state is consistent from here: a
        refresh computed after the base step that raises leaves the step taken and the mask as it was)."""
        run = self._run
        if run.phase == _IDLE:
            raise RuntimeError(_NO_FIRST_STEP.format(what="step"))
        self.unperturb()
        if run.sharp and isinstance(self.schedule, LookSAM) and self.layout.segments:
            _step.looksam_project(run.lookahead, self.layout.grads(), self._step_lists(),
                                  device=self.layout.segments[0].device, comm=self.comm, backend=self.backend,
                                  tuning=self.tuning)
        with self.layout.hide_missing_grads():  # no gradient since zero_grad: not stepped, as in PyTorch
            self.base_optimizer.step()
        self.schedule.advance()
        run.steps += 1
        run.phase = _IDLE
        run.sharp = False
        run.fresh_grad = False
        if run.pending is not None:
            self._set_masks(run.pending)
            run.pending = None
        elif (self.layout.segments and self.policy is not None and not self.policy.uses_gradient
              and self.policy.due(run.steps)):
            self._set_masks(self._policy_masks(self.policy.refresh, run.steps))

    @torch.compiler.disable
    def zero_grad(self, set_to_none: bool = True) -> None:
        """PyTorch's ``zero_grad``. ``set_to_none=True``: no parameter has a gradient until the next
        backward (parameters that then receive none are not stepped). ``False``: gradients are zeroed
        and a parameter that had one keeps it (zero) and is stepped. In the flat layout the ``.grad``
        views stay in place (one fill per segment) and show zeros; which ones count as None is
        tracked on the host and applied when the base optimizer steps."""
        self.layout.zero_grad(set_to_none)
        zero_grads(self._outside, set_to_none)
        self._run.fresh_grad = False

    # ------------------------------------------------------------------------------------------------
    # Masks as users see them: one bool tensor per parameter
    # ------------------------------------------------------------------------------------------------

    def get_mask(self) -> list[torch.Tensor]:
        """One bool tensor per parameter (in ``param_groups`` order, local shard shape): which entries
        are perturbed. Parameters outside the perturbation are all False."""
        if not self._run.started:
            self._start()
        return checkpoint.masks_per_param(self.layout, self._params(), self._run.masks)

    def set_mask(self, mask: list[torch.Tensor]) -> None:
        """Perturb exactly the entries set in ``mask`` (bool tensors aligned with :meth:`get_mask`),
        which must hold exactly :attr:`live_count` live entries in total (the policies keep that count).
        It stays in force until the policy's next scheduled refresh."""
        with self._one_thread("set_mask"):
            self._set_mask(mask)

    def _set_mask(self, mask: list[torch.Tensor]) -> None:
        self._refuse_if_perturbed("set_mask")
        if self.policy is None:
            raise ValueError("mask: this optimizer is dense (SAM, or SSAM with mask=None): it perturbs every "
                             "entry and takes no mask; use SSAM with a mask policy to choose the entries")
        params = self._params()
        if not isinstance(mask, (list, tuple)) or len(mask) != len(params):
            raise ValueError(f"mask: expected a list of {len(params)} bool tensors (one per parameter)")
        in_layout = {id(p) for s in self.layout.segments for p in s.params}
        for i, (m, p) in enumerate(zip(mask, params, strict=True)):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != local_tensor(p).shape:
                raise ValueError(f"mask[{i}]: expected a bool tensor of shape {tuple(local_tensor(p).shape)}")
            if id(p) not in in_layout and bool(m.any()):
                raise ValueError(f"mask[{i}]: this parameter is not perturbed (frozen or perturb=False)")
        count = self._context().global_count(sum(int(m.sum()) for m in mask))
        if count != self.live_count:
            raise ValueError(f"mask: {count} live entries given; this optimizer keeps exactly K = "
                             f"{self.live_count} (sparsity {self.sparsity})")
        self._run.started = True
        self._run.pending = None
        self._set_masks(checkpoint.masks_from_params(self.layout, params, list(mask)))

    # ------------------------------------------------------------------------------------------------
    # Checkpoints (codec and validation: ssam_kernels.checkpoint)
    # ------------------------------------------------------------------------------------------------

    def ssam_state_dict(self) -> dict[str, Any]:
        """SSAM's own state: format version, step count, phase, the mask (one entry per parameter), a
        pending refresh and the backups while perturbed, the policy's kind and state, the sparsity and
        K, the schedule's kind, state and decision for the step in progress, and LookSAM's ``g_v``.
        With FSDP2 save it with ``torch.distributed.checkpoint`` beside
        ``get_optimizer_state_dict(model, opt.base_optimizer)`` (see docs/distributed.md); there it must
        be taken between steps."""
        run, params, sharded = self._run, self._params(), self.distributed == "sharded"
        if sharded and run.phase != _IDLE:
            raise RuntimeError("ssam_state_dict: a sharded checkpoint is taken between steps (after "
                               "second_step), not while the weights are perturbed")
        state = {"version": checkpoint.FORMAT_VERSION, "steps": run.steps, "phase": run.phase,
                 "started": run.started, "policy_kind": checkpoint.policy_kind(self.policy),
                 "sparsity": self.sparsity, "live_count": self.live_count,
                 "policy": self.policy.state_dict() if self.policy is not None else {}}
        if run.started and self.policy is not None:
            state["mask"] = checkpoint.encode_masks(self.layout, params, run.masks, sharded)
        elif sharded:  # a template for torch.distributed.checkpoint.load
            state["mask"] = checkpoint.encode_masks(self.layout, params, [
                ops.bitmask.from_bool(torch.zeros(s.numel, dtype=torch.bool, device=s.device))
                for s in self.layout.segments], sharded)
        if run.pending is not None:
            state["pending"] = checkpoint.encode_masks(self.layout, params, run.pending, sharded)
        if run.phase == _PERTURBED:
            state["backups"] = checkpoint.param_backups(self.layout, params, run.masks, run.backups)
        state["schedule"] = {"kind": type(self.schedule).__name__, "state": self.schedule.state_dict(),
                             "sharp": run.sharp}
        look = run.lookahead
        if look.buffers and (look.norm is not None or run.sharp):  # g_v, or the g of the step in progress
            state["lookahead"] = {"buffers": checkpoint.encode_lookahead(self.layout, params, look.buffers,
                                                                         sharded),
                                  "norm": None if look.norm is None else look.norm.clone()}
        return state

    def _validate(self, state: object) -> checkpoint.Loaded:
        return checkpoint.validate(state, layout=self.layout, params=self._params(), policy=self.policy,
                                   schedule=self.schedule, live_count=self.live_count,
                                   sharded=self.distributed == "sharded",
                                   global_count=self._context().global_count)

    def _apply(self, loaded: checkpoint.Loaded) -> None:
        """Install a validated checkpoint (nothing here can fail on a checked one but the policy's own
        load, which runs first)."""
        if loaded.policy_state is not None and self.policy is not None:
            self.policy.load_state_dict(loaded.policy_state)
        if loaded.schedule_state is not None:
            self.schedule.load_state_dict(loaded.schedule_state)
        run = self._run
        run.steps, run.phase, run.started = loaded.steps, loaded.phase, loaded.started
        run.sharp = loaded.sharp
        run.lookahead = _step.Lookahead(*loaded.lookahead) if loaded.lookahead else _step.Lookahead()
        run.pending, run.grad_norm, run.fresh_grad = loaded.pending, None, False
        if loaded.backups is not None:
            run.install(loaded.masks, loaded.backups)
        elif loaded.started:
            self._set_masks(loaded.masks)
        else:
            run.install(None, [])

    def load_ssam_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`ssam_state_dict` saved. Everything is checked first (see
        :mod:`ssam_kernels.checkpoint` for the rules); on error nothing changes. Refused while the
        weights are perturbed."""
        with self._one_thread("load_ssam_state_dict"):
            self._refuse_if_perturbed("load_ssam_state_dict")
            self._apply(self._validate(state))

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"ssam"``: :meth:`ssam_state_dict`. The hooks registered
        with ``register_state_dict_pre_hook`` / ``register_state_dict_post_hook`` run as in torch.optim
        (a post hook may return a replacement)."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state = self.base_optimizer.state_dict()
        state["ssam"] = self.ssam_state_dict()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, state)
            if result is not None:
                state = result
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load :meth:`state_dict` atomically: SSAM's part is checked first, then the base optimizer
        loads (rolled back if it raises), then SSAM's part is applied. Refused while perturbed. The hooks
        registered with ``register_load_state_dict_pre_hook`` (which may return a replacement) and
        ``register_load_state_dict_post_hook`` run as in torch.optim."""
        with self._one_thread("load_state_dict"):
            for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
                result = pre_hook(self, state_dict)
                if result is not None:
                    state_dict = result
            self._load_state_dict(state_dict)
            for post_hook in self._optimizer_load_state_dict_post_hooks.values():
                post_hook(self)

    def _load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._refuse_if_perturbed("load_state_dict")
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict: expected a dict, got {type(state_dict).__name__}")
        state = dict(state_dict)
        ours = state.pop("ssam", None)
        checkpoint.check_loaded_groups(state.get("param_groups"), self.param_groups,
                                       real("eps", self.eps, positive=True))
        loaded = self._validate(ours) if ours is not None else None
        base, groups = self.base_optimizer, self.param_groups
        kept_state, kept_groups = base.state, list(groups)  # the base's load replaces both, never mutates
        try:
            base.load_state_dict(state)
            groups[:] = base.param_groups  # keep the one list SSAM, the base and any wrapper share
            base.param_groups = groups
            if loaded is not None:
                self._apply(loaded)
        except BaseException:
            base.state = kept_state
            groups[:] = kept_groups
            base.param_groups = groups
            raise


class SAM(SSAM):
    """Dense SAM (``adaptive=True``: ASAM) through the same kernels, with no mask overhead:
    ``e = rho · g / (||g|| + eps)`` on every entry of the perturbed groups. Takes :class:`SSAM`'s
    arguments but ``sparsity`` and ``mask`` (always 0 and none)."""

    def __init__(self, params: Iterable[Any], base_optimizer: BaseOptimizer, rho: float = 0.05,
                 *positional: Any, **kwargs: Any) -> None:
        for fixed in ("sparsity", "mask"):
            if fixed in kwargs:
                raise TypeError(f"SAM() got {fixed}={kwargs[fixed]!r}: SAM perturbs every entry; use SSAM "
                                "for a sparse mask")
        super().__init__(params, base_optimizer, rho, *positional, sparsity=0.0, mask=None, **kwargs)
