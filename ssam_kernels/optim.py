"""SSAM and SAM as drop-in ``torch.optim`` optimizers. They orchestrate; the ops compute.

One step (DESIGN.md, "Data flow of one step"), with ``m`` the mask and ``s`` the sparsity:

1. backward at ``w``; ``first_step()``: ``scale = rho / (||g|| + eps)`` with ``||g||`` over every
   perturbed entry (ASAM: ``|| |w| ⊙ g ||``), then ``w ← w + scale · g ⊙ m`` (ASAM: ``scale · w² ⊙ g
   ⊙ m``), keeping the old values of the live entries in a compact backup (``K = int(N · (1 − s))``
   elements per step, not ``N``). A non-finite norm skips the perturbation (weights untouched).
2. backward at ``w + e``; ``second_step()``: restore ``w`` bit-exactly from the backup, take the base
   optimizer's step with the gradient at ``w + e``, and refresh the mask when the policy says so.

No host synchronisation happens on this path; a mask refresh may synchronise.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch

from . import ops
from .distributed import ProcessGroupComm, resolve_mode
from .layout import ParamLayout, is_dtensor, local_tensor
from .masks import Mask, MaskContext, MaskPolicy, make_policy
from .ops import bitmask

_IDLE, _PERTURBED, _RESTORED = "idle", "perturbed", "restored"
BaseOptimizer = type[torch.optim.Optimizer] | torch.optim.Optimizer


class SSAM(torch.optim.Optimizer):
    """Sparse SAM: SAM whose perturbation touches only the entries of a mask chosen by a policy.

    Args:
        params: parameters or parameter groups. A group may set ``rho``, ``adaptive`` and
            ``perturb=False`` (exclude it from the perturbation, e.g. norms and biases).
        base_optimizer: a ``torch.optim.Optimizer`` class (built with ``**base_kwargs``) or an already
            built instance over the same parameters. Both share ``param_groups``, so LR schedulers work
            on either.
        rho: perturbation radius ``||e|| <= rho`` (>= 0).
        sparsity: fraction of perturbed-group entries *not* perturbed, in [0, 1].
        mask: a policy (:class:`FisherMask`, :class:`DynamicMask`, :class:`RandomMask`), ``"dynamic"``,
            ``"random"``, or None / ``"dense"`` for plain SAM (requires ``sparsity=0``).
        adaptive: ASAM's scale-invariant perturbation.
        eps: added to the norm before dividing.
        backend: ``"auto" | "reference" | "triton" | "native"`` (None: ``SSAM_KERNELS_BACKEND``).
        layout: ``"auto" | "flat" | "tensors"`` (see :mod:`ssam_kernels.layout`).
        distributed: ``"auto" | "none" | "replicated" | "sharded"``: how the ranks hold the model
            (DDP: replicated, FSDP2: sharded; see :mod:`ssam_kernels.distributed`).
        process_group: the ranks that train together (default: the default group).
        sync_perturbation: DDP only. False: each rank perturbs along its own gradient (m-sharpness);
            the first backward must then run under ``ddp_model.no_sync()``, which ``step(closure)``
            does for you when ``ddp_model`` is given.
        ddp_model: the ``DistributedDataParallel`` module, for ``step(closure)`` with
            ``sync_perturbation=False``.
    """

    def __init__(self, params: Iterable[Any], base_optimizer: BaseOptimizer,
                 rho: float = 0.05, sparsity: float = 0.5, mask: MaskPolicy | str | None = "dynamic",
                 adaptive: bool = False, eps: float = 1e-12, backend: str | None = None,
                 layout: str = "auto", distributed: str = "auto", process_group: Any = None,
                 sync_perturbation: bool = True, ddp_model: torch.nn.Module | None = None,
                 **base_kwargs: Any) -> None:
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not rho >= 0:
            raise ValueError(f"rho: expected a non-negative float, got {rho!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0 <= sparsity <= 1:
            raise ValueError(f"sparsity: expected a value in [0, 1], got {sparsity!r}")
        if not eps > 0:
            raise ValueError(f"eps: expected a positive float, got {eps!r}")
        self.policy = make_policy(mask)
        if self.policy is None and sparsity != 0:
            raise ValueError(f"sparsity: a dense mask (mask={mask!r}) perturbs every entry; use sparsity=0 "
                             "or a mask policy")
        super().__init__(params, {"rho": float(rho), "adaptive": bool(adaptive), "perturb": True})
        self.base_optimizer = self._build_base(base_optimizer, base_kwargs)
        self.param_groups = self.base_optimizer.param_groups
        self.defaults.update(self.base_optimizer.defaults)
        self.sparsity, self.eps, self.backend = float(sparsity), float(eps), backend
        for group in self.param_groups:
            if not group["rho"] >= 0:
                raise ValueError(f"rho: expected a non-negative float in every group, got {group['rho']!r}")
        perturbed = [list(g["params"]) if g["perturb"] else [] for g in self.param_groups]
        self.distributed = resolve_mode(distributed, any(is_dtensor(p) for ps in perturbed for p in ps))
        ranks = ProcessGroupComm(process_group) if self.distributed != "none" else None
        self.comm = ranks if self.distributed == "sharded" else None  # norm and selections span ranks
        self.replicas = ranks if self.distributed == "replicated" else None
        if not sync_perturbation and self.distributed != "replicated":
            raise ValueError("sync_perturbation: False applies to replicated (DDP) training only")
        self.sync_perturbation, self.ddp_model = bool(sync_perturbation), ddp_model
        self.layout = ParamLayout(perturbed, "tensors" if self.distributed == "sharded" else layout)
        for segment in self.layout.segments:
            ops.resolve_backend(backend, segment.device)  # fail now, not mid-training
        self._masks: list[Mask] | None = None  # None: dense, or not built yet (see _started)
        self._pending: list[Mask] | None = None  # a refresh computed in first_step, applied after the step
        self._backups: list[torch.Tensor] = []
        self._started = False
        self._phase = _IDLE
        self._steps = 0
        self.grad_norm: torch.Tensor | None = None  # ||g|| of the last first_step (float64, on device)
        self._numel = self._context().global_count(sum(s.numel for s in self.layout.segments))

    # ------------------------------------------------------------------------------------------------
    # Construction helpers
    # ------------------------------------------------------------------------------------------------

    def _build_base(self, base: BaseOptimizer, kwargs: dict[str, Any]) -> torch.optim.Optimizer:
        if isinstance(base, torch.optim.Optimizer):
            if kwargs:
                raise TypeError(f"base_optimizer: an optimizer instance takes no extra arguments, got "
                                f"{sorted(kwargs)}")
            ours = {id(p) for g in self.param_groups for p in g["params"]}
            theirs = {id(p) for g in base.param_groups for p in g["params"]}
            if ours != theirs:
                raise ValueError("base_optimizer: the instance must own exactly the parameters given to SSAM")
            # SSAM's per-group options (rho, adaptive, perturb) carry over to the instance's groups
            owner = {id(p): g for g in self.param_groups for p in g["params"]}
            for index, group in enumerate(base.param_groups):
                for key, default in self.defaults.items():
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
            return base(self.param_groups, **kwargs)
        raise TypeError(f"base_optimizer: expected a torch.optim.Optimizer class or instance, got {base!r}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "layout"):
            raise RuntimeError("add_param_group: SSAM's segments are fixed at construction; build a new "
                               "optimizer with all parameter groups")
        super().add_param_group(param_group)

    @property
    def live_count(self) -> int:
        """``K = int(N · (1 − sparsity))``: the number of perturbed entries the policy keeps."""
        return int(self._numel * (1 - self.sparsity))

    def _context(self) -> MaskContext:
        return MaskContext(self.layout.segments, self._masks, self.backend, self.comm,
                           self.replicas, self.sync_perturbation)

    def _set_masks(self, masks: list[Mask] | None) -> None:
        """Install masks (None: dense) and size the compact backups to each segment's live count."""
        self._masks = masks
        sizes = ([s.numel for s in self.layout.segments] if masks is None
                 else [int(offsets[-1]) for _, offsets in masks])
        self._backups = [torch.empty(n, dtype=s.dtype, device=s.device)
                         for n, s in zip(sizes, self.layout.segments, strict=True)]

    def _segment_masks(self) -> list[Mask] | list[tuple[None, None]]:
        """``(words, offsets)`` per segment; ``(None, None)`` everywhere when dense."""
        return self._masks or [(None, None)] * len(self.layout.segments)

    def _start(self) -> None:
        """Build the initial mask, before the first perturbation."""
        self._started = True
        if self.policy is None:
            self._set_masks(None)
        else:
            self._set_masks(self.policy.initial(self._context(), self.live_count))

    # ------------------------------------------------------------------------------------------------
    # The step
    # ------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Perturb the masked weights along the gradient at ``w``: ``w ← w + rho · g ⊙ m / (||g|| + eps)``."""
        if self._phase == _PERTURBED:
            raise RuntimeError("first_step: the weights are already perturbed; call second_step() (or "
                               "unperturb()) before the next first_step()")
        self._pending = None  # a refresh from a step the GradScaler skipped is void
        if not self._started:
            self._start()
        segments = self.layout.segments
        grads = self.layout.grads()
        groups = [self.param_groups[s.group] for s in segments]
        if self.policy is not None and self.policy.uses_gradient and self.policy.due(self._steps + 1):
            self._pending = self.policy.refresh(self._context(), self.live_count, self._steps + 1)
        if segments:
            home = segments[0].device
            totals = [ops.grad_sq_norm(G, s.weight if g["adaptive"] else None, backend=self.backend)
                      for s, G, g in zip(segments, grads, groups, strict=True)]
            total = torch.stack([t.to(home) for t in totals]).sum()
            if self.comm is not None:
                self.comm.all_reduce_(total)
            self.grad_norm = total.sqrt()
            # One scale per (rho, device). A non-finite norm gives a non-finite scale, which perturb_
            # treats as "leave W as it is" (the step is skipped, the backup still written).
            scales: dict[tuple[float, torch.device], torch.Tensor] = {}
            for segment, G, group, (words, offsets), backup in zip(
                    segments, grads, groups, self._segment_masks(), self._backups, strict=True):
                key = (group["rho"], segment.device)
                if key not in scales:
                    scale = group["rho"] / (self.grad_norm + self.eps)
                    scales[key] = scale.to(segment.device, torch.float32)
                ops.perturb_(segment.weight, G, words, offsets, backup, scales[key], group["adaptive"],
                             backend=self.backend)
        self._phase = _PERTURBED
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def unperturb(self) -> None:
        """Restore the weights if they are perturbed (bit-exact); a no-op otherwise."""
        if self._phase != _PERTURBED:
            return
        segments = zip(self.layout.segments, self._segment_masks(), self._backups, strict=True)
        for segment, (words, offsets), backup in segments:
            ops.restore_(segment.weight, words, offsets, backup, backend=self.backend)
        self._phase = _RESTORED

    def second_step(self, zero_grad: bool = False) -> None:
        """Restore ``w``, take the base optimizer's step with the gradient at ``w + e``, refresh the mask.

        Runs through :meth:`step`, so LR schedulers and optimizer step hooks see every step."""
        self.step()
        if zero_grad:
            self.zero_grad()

    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        """With a closure (forward + backward, returning the loss): the whole two-pass step, returning
        the loss at ``w``; the gradients are zeroed before each call of the closure. Without one: the
        second half of the step, as :meth:`second_step` (this is what ``GradScaler.step`` calls)."""
        if closure is None:
            self._finish_step()
            return None
        closure = torch.enable_grad()(closure)
        self.zero_grad()
        local_first_backward = not self.sync_perturbation and self.ddp_model is not None
        with self.ddp_model.no_sync() if local_first_backward else contextlib.nullcontext():
            loss = closure()
        self.first_step(zero_grad=True)
        closure()
        self._finish_step()
        return loss

    @torch.no_grad()
    def _finish_step(self) -> None:
        if self._phase == _IDLE:
            raise RuntimeError("second_step: no first_step() was taken in this step; the weights were "
                               "never perturbed")
        self.unperturb()
        self.base_optimizer.step()
        self._steps += 1
        self._phase = _IDLE
        if self._pending is not None:
            self._set_masks(self._pending)
            self._pending = None
        elif self.policy is not None and not self.policy.uses_gradient and self.policy.due(self._steps):
            self._set_masks(self.policy.refresh(self._context(), self.live_count, self._steps))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Zero the gradients. Perturbed parameters keep their ``.grad`` views and are zeroed in place
        (one fill per segment); the others follow ``set_to_none``."""
        self.layout.zero_grad()
        in_layout = {id(p) for s in self.layout.segments for p in s.params}
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) not in in_layout and p.grad is not None:
                    if set_to_none:
                        p.grad = None
                    else:
                        p.grad.zero_()

    @property
    def steps(self) -> int:
        """Completed optimizer steps."""
        return self._steps

    # ------------------------------------------------------------------------------------------------
    # Masks as users see them: one bool tensor per parameter
    # ------------------------------------------------------------------------------------------------

    def _params(self) -> list[torch.nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def _masks_per_param(self, masks: list[Mask] | None) -> list[torch.Tensor]:
        """Segment masks (None: dense) as one bool tensor per parameter, in ``param_groups`` order."""
        per_param = {}
        for index, segment in enumerate(self.layout.segments):
            live = (torch.ones(segment.numel, dtype=torch.bool, device=segment.device) if masks is None
                    else bitmask.unpack(masks[index][0], segment.numel))
            for p, (start, n) in zip(segment.params, segment.spans(), strict=True):
                per_param[id(p)] = live[start: start + n].view(local_tensor(p).shape)
        return [per_param.get(id(p), torch.zeros(local_tensor(p).shape, dtype=torch.bool, device=p.device))
                for p in self._params()]

    def _masks_from_params(self, per_param: list[torch.Tensor]) -> list[Mask]:
        """The inverse of :meth:`_masks_per_param`."""
        by_param = dict(zip(map(id, self._params()), per_param, strict=True))
        return [bitmask.from_bool(torch.cat([by_param[id(p)].reshape(-1).to(s.device) for p in s.params]))
                for s in self.layout.segments]

    def get_mask(self) -> list[torch.Tensor]:
        """One bool tensor per parameter (in ``param_groups`` order, local shard shape): which entries
        are perturbed. Parameters outside the perturbation are all False."""
        if not self._started:
            self._start()
        return self._masks_per_param(self._masks)

    def set_mask(self, mask: list[torch.Tensor]) -> None:
        """Perturb exactly the entries set in ``mask`` (bool tensors aligned with :meth:`get_mask`). It
        stays in force until the policy's next scheduled refresh."""
        if self._phase == _PERTURBED:
            raise RuntimeError("set_mask: the weights are perturbed; call second_step() or unperturb() first")
        params = self._params()
        if not isinstance(mask, (list, tuple)) or len(mask) != len(params):
            raise ValueError(f"mask: expected a list of {len(params)} bool tensors (one per parameter)")
        in_layout = {id(p) for s in self.layout.segments for p in s.params}
        for i, (m, p) in enumerate(zip(mask, params, strict=True)):
            if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != local_tensor(p).shape:
                raise ValueError(f"mask[{i}]: expected a bool tensor of shape {tuple(local_tensor(p).shape)}")
            if id(p) not in in_layout and bool(m.any()):
                raise ValueError(f"mask[{i}]: this parameter is not perturbed (frozen or perturb=False)")
        self._started = True
        self._pending = None
        self._set_masks(self._masks_from_params(list(mask)))

    # ------------------------------------------------------------------------------------------------
    # Checkpoints
    # ------------------------------------------------------------------------------------------------

    def _encode_masks(self, masks: list[Mask] | None) -> list[torch.Tensor]:
        """Per-parameter masks for a checkpoint: packed bits, or (sharded) uint8 DTensors shaped and
        placed like the parameters, which ``torch.distributed.checkpoint`` saves and reshards."""
        per_param = self._masks_per_param(masks)
        if self.distributed != "sharded":
            return [bitmask.pack(m.reshape(-1)) for m in per_param]
        from torch.distributed.tensor import DTensor

        return [DTensor.from_local(m.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape,
                                   stride=p.stride()) for m, p in zip(per_param, self._params(), strict=True)]

    def _decode_masks(self, encoded: list[torch.Tensor]) -> list[Mask]:
        params = self._params()
        if self.distributed == "sharded":
            per_param = [local_tensor(e).to(device=p.device, dtype=torch.bool) for e, p in
                         zip(encoded, params, strict=True)]
        else:
            per_param = [bitmask.unpack(e.to(p.device), local_tensor(p).numel()).view(local_tensor(p).shape)
                         for e, p in zip(encoded, params, strict=True)]
        return self._masks_from_params(per_param)

    def ssam_state_dict(self) -> dict[str, Any]:
        """SSAM's own state: step count, phase, the mask (one entry per parameter), a pending refresh and
        the backups while perturbed, the policy's state. With FSDP2 save it with
        ``torch.distributed.checkpoint`` beside ``get_optimizer_state_dict(model, opt.base_optimizer)``
        (see README, "Distributed training"); there it must be taken between steps."""
        if self.distributed == "sharded" and self._phase != _IDLE:
            raise RuntimeError("ssam_state_dict: a sharded checkpoint is taken between steps (after "
                               "second_step), not while the weights are perturbed")
        state = {"steps": self._steps, "phase": self._phase, "started": self._started,
                 "policy": self.policy.state_dict() if self.policy is not None else {}}
        if self._started and self.policy is not None:
            state["mask"] = self._encode_masks(self._masks)
        elif self.distributed == "sharded":  # a template for torch.distributed.checkpoint.load
            state["mask"] = self._encode_masks([bitmask.from_bool(torch.zeros(
                s.numel, dtype=torch.bool, device=s.device)) for s in self.layout.segments])
        if self._pending is not None:
            state["pending"] = self._encode_masks(self._pending)
        if self._phase == _PERTURBED:
            state["backups"] = self._param_backups()
        return state

    def load_ssam_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`ssam_state_dict` saved."""
        self._steps, self._phase, self._started = state["steps"], state["phase"], state["started"]
        if self._started:
            self._set_masks(self._decode_masks(state["mask"]) if self.policy is not None else None)
        self._pending = self._decode_masks(state["pending"]) if "pending" in state else None
        if "backups" in state:  # per parameter, so a mid-step checkpoint loads into either layout
            by_param = dict(zip(map(id, self._params()), state["backups"], strict=True))
            for segment, backup in zip(self.layout.segments, self._backups, strict=True):
                backup.copy_(torch.cat([by_param[id(p)].to(backup.device) for p in segment.params]))
        if self.policy is not None:
            self.policy.load_state_dict(state["policy"])

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict plus ``"ssam"``: :meth:`ssam_state_dict`."""
        state = self.base_optimizer.state_dict()
        state["ssam"] = self.ssam_state_dict()
        return state

    def _param_backups(self) -> list[torch.Tensor]:
        """The compact backups split per parameter (its live entries in index order), so that a
        checkpoint taken mid-step loads into either layout."""
        by_param = {}
        for index, (segment, backup) in enumerate(zip(self.layout.segments, self._backups, strict=True)):
            live = None if self._masks is None else bitmask.unpack(self._masks[index][0], segment.numel)
            position = 0
            for p, (start, n) in zip(segment.params, segment.spans(), strict=True):
                count = n if live is None else int(live[start: start + n].sum())
                by_param[id(p)] = backup[position: position + count].clone()
                position += count
        return [by_param.get(id(p), local_tensor(p).new_empty(0)) for p in self._params()]

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        ours = state.pop("ssam", None)
        self.base_optimizer.load_state_dict(state)
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict rebuilt the list
        if ours is not None:
            self.load_ssam_state_dict(ours)


class SAM(SSAM):
    """Dense SAM (``adaptive=True``: ASAM) through the same kernels, with no mask overhead:
    ``e = rho · g / (||g|| + eps)`` on every entry of the perturbed groups."""

    def __init__(self, params: Iterable[Any], base_optimizer: BaseOptimizer,
                 rho: float = 0.05, adaptive: bool = False, eps: float = 1e-12, backend: str | None = None,
                 layout: str = "auto", distributed: str = "auto", process_group: Any = None,
                 sync_perturbation: bool = True, ddp_model: torch.nn.Module | None = None,
                 **base_kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, sparsity=0.0, mask=None, adaptive=adaptive, eps=eps,
                         backend=backend, layout=layout, distributed=distributed, process_group=process_group,
                         sync_perturbation=sync_perturbation, ddp_model=ddp_model, **base_kwargs)
