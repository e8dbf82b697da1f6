"""SSAM's checkpoint codec: masks and backups per parameter, and validation before anything is loaded.

The optimizer works on segments (:mod:`ssam_kernels.layout`); a checkpoint stores one entry per
parameter (in ``param_groups`` order) so that it loads into either layout and, under FSDP2, reshards:

- masks: packed bits (``ceil(n / 32)`` int32 words per parameter), or, sharded, uint8 DTensors shaped and
  placed like the parameters (``torch.distributed.checkpoint`` saves and reshards them);
- backups (only while perturbed): the saved values of each parameter's live entries, in index order;
- the schedule's kind, state and decision for the step in progress, and LookSAM's ``g_v`` (one tensor per
  parameter, its shape and dtype; sharded: DTensors placed like the parameters) with ``‖g_v‖``.

:func:`validate` checks a whole :meth:`SSAM.ssam_state_dict` against the optimizer and returns a
:class:`Loaded` holding everything already decoded, so that applying it cannot fail half-way.

Load rules (also in docs/checkpoints.md):

- the phase must be ``idle``/``restored`` or ``perturbed``; a perturbed checkpoint must carry its backups,
  each in its parameter's dtype (a converted backup would not restore ``w`` bit for bit);
- the step count is an int in ``[0, 2^63 - 1]`` (the policies' 32-bit hash counters wrap past 2^32, so
  no count can make a refresh fail after the base step);
- every mask must have exactly the optimizer's ``K`` live entries (the rule of
  :func:`ssam_kernels.masks.live_count`), or none for ``FisherMask(initial="zeros")``; a checkpoint from
  another sparsity whose count differs is refused with a ``ValueError`` naming both counts;
- a dense (SAM) checkpoint loads into a masked SSAM with a fresh mask built at the next ``first_step``;
  a masked checkpoint loads into SAM without its mask; between different mask policies, or mid-step
  between dense and masked, it is refused;
- a checkpoint of another schedule (or of version 1 or 2, which had none) loads with this optimizer's
  schedule state as it is;
- ``version`` is at most :data:`FORMAT_VERSION`; checkpoints without one (version 1) have version 2's layout.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ._validation import check_group
from .layout import ParamLayout, local_tensor
from .masks import Mask, MaskPolicy
from .ops import bitmask
from .schedules import Schedule

FORMAT_VERSION = 3
MAX_STEPS = 2**63 - 1  # the step count is an int64 counter (torch.optim's state counts steps in tensors)
IDLE, PERTURBED, RESTORED = "idle", "perturbed", "restored"
PHASES = (IDLE, PERTURBED, RESTORED)


def policy_kind(policy: MaskPolicy | None) -> str:
    """The name a checkpoint records for the mask policy (``"dense"`` for SAM)."""
    return "dense" if policy is None else type(policy).__name__


# ----------------------------------------------------------------------------------------------------
# Masks as users see them: one bool tensor per parameter
# ----------------------------------------------------------------------------------------------------

def masks_per_param(layout: ParamLayout, params: Sequence[torch.Tensor], masks: Sequence[Mask] | None
                    ) -> list[torch.Tensor]:
    """Segment masks (None: dense) as one bool tensor per parameter of ``params`` (local shard shape);
    parameters outside the segments are all False."""
    per_param = {}
    for index, segment in enumerate(layout.segments):
        live = (torch.ones(segment.numel, dtype=torch.bool, device=segment.device) if masks is None
                else bitmask.unpack(masks[index][0], segment.numel))
        for p, (start, n) in zip(segment.params, segment.spans(), strict=True):
            per_param[id(p)] = live[start: start + n].view(local_tensor(p).shape)
    return [per_param.get(id(p), torch.zeros(local_tensor(p).shape, dtype=torch.bool, device=p.device))
            for p in params]


def masks_from_params(layout: ParamLayout, params: Sequence[torch.Tensor],
                      per_param: Sequence[torch.Tensor]) -> list[Mask]:
    """The inverse of :func:`masks_per_param`."""
    by_param = dict(zip(map(id, params), per_param, strict=True))
    return [bitmask.from_bool(torch.cat([by_param[id(p)].reshape(-1).to(s.device) for p in s.params]))
            for s in layout.segments]


def encode_masks(layout: ParamLayout, params: Sequence[torch.Tensor], masks: Sequence[Mask] | None,
                 sharded: bool) -> list[torch.Tensor]:
    """Per-parameter masks for a checkpoint: packed bits, or (sharded) uint8 DTensors."""
    per_param = masks_per_param(layout, params, masks)
    if not sharded:
        return [bitmask.pack(m.reshape(-1)) for m in per_param]
    from torch.distributed.tensor import DTensor

    return [DTensor.from_local(m.to(torch.uint8), p.device_mesh, p.placements, shape=p.shape,
                               stride=p.stride()) for m, p in zip(per_param, params, strict=True)]


def _decode_masks(name: str, encoded: object, layout: ParamLayout, params: Sequence[torch.Tensor],
                  sharded: bool) -> list[torch.Tensor]:
    """Checked per-parameter bool masks from a checkpoint entry (see :func:`encode_masks`)."""
    if not isinstance(encoded, (list, tuple)) or len(encoded) != len(params):
        raise ValueError(f"{name}: expected a list of {len(params)} tensors (one per parameter), got "
                         f"{_describe(encoded)}")
    in_layout = {id(p) for s in layout.segments for p in s.params}
    out = []
    for i, (e, p) in enumerate(zip(encoded, params, strict=True)):
        shape = local_tensor(p).shape
        if not isinstance(e, torch.Tensor):
            raise ValueError(f"{name}[{i}]: expected a tensor, got {type(e).__name__}")
        if sharded:
            local = local_tensor(e)
            if local.shape != shape:
                raise ValueError(f"{name}[{i}]: a mask of shape {tuple(local.shape)} for a parameter of "
                                 f"shape {tuple(shape)}")
            mask = local.to(device=p.device) != 0
        else:
            words = bitmask.num_words(shape.numel())
            if e.dtype != torch.int32 or e.dim() != 1 or e.numel() != words:
                raise ValueError(f"{name}[{i}]: expected {words} int32 words for a parameter of shape "
                                 f"{tuple(shape)}, got {e.dtype} of shape {tuple(e.shape)} (a checkpoint "
                                 "of another model?)")
            mask = bitmask.unpack(e.to(p.device), shape.numel()).view(shape)
        if id(p) not in in_layout and bool(mask.any()):
            raise ValueError(f"{name}[{i}]: live entries for a parameter this optimizer does not perturb")
        out.append(mask)
    return out


# ----------------------------------------------------------------------------------------------------
# Backups (while perturbed), per parameter
# ----------------------------------------------------------------------------------------------------

def param_backups(layout: ParamLayout, params: Sequence[torch.Tensor], masks: Sequence[Mask] | None,
                  backups: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The compact segment backups split per parameter (its live entries in index order)."""
    per_param = masks_per_param(layout, params, masks)
    counts = dict(zip(map(id, params), (int(m.sum()) for m in per_param), strict=True))
    by_param = {}
    for segment, backup in zip(layout.segments, backups, strict=True):
        position = 0
        for p in segment.params:
            by_param[id(p)] = backup[position: position + counts[id(p)]].clone()
            position += counts[id(p)]
    return [by_param.get(id(p), local_tensor(p).new_empty(0)) for p in params]


def _decode_backups(encoded: object, layout: ParamLayout, params: Sequence[torch.Tensor],
                    per_param_masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Checked segment backups from per-parameter ones: each holds its parameter's live count."""
    if not isinstance(encoded, (list, tuple)) or len(encoded) != len(params):
        raise ValueError(f"backups: expected a list of {len(params)} tensors (one per parameter), got "
                         f"{_describe(encoded)}")
    by_param = {}
    for i, (b, p, m) in enumerate(zip(encoded, params, per_param_masks, strict=True)):
        live, dtype = int(m.sum()), local_tensor(p).dtype
        if not isinstance(b, torch.Tensor) or b.dim() != 1 or b.numel() != live or b.dtype != dtype:
            # the parameter's dtype exactly: a converted backup would not restore w bit for bit
            raise ValueError(f"backups[{i}]: expected a 1-D {dtype} tensor of the parameter's {live} live "
                             f"entries, got {_describe(b)}")
        by_param[id(p)] = b
    return [torch.cat([by_param[id(p)].to(s.device, s.dtype) for p in s.params]) for s in layout.segments]


# ----------------------------------------------------------------------------------------------------
# LookSAM's g_v, per parameter
# ----------------------------------------------------------------------------------------------------

def encode_lookahead(layout: ParamLayout, params: Sequence[torch.Tensor], buffers: Sequence[torch.Tensor],
                     sharded: bool) -> list[torch.Tensor]:
    """Segment buffers as one tensor per parameter of ``params`` (its local shape; sharded: a DTensor
    placed like the parameter); parameters outside the segments get an empty tensor."""
    by_param = {}
    for segment, buffer in zip(layout.segments, buffers, strict=True):
        for p, (start, n) in zip(segment.params, segment.spans(), strict=True):
            by_param[id(p)] = buffer[start: start + n].view(local_tensor(p).shape).clone()
    if not sharded:
        return [by_param.get(id(p), local_tensor(p).new_empty(0)) for p in params]
    from torch.distributed.tensor import DTensor

    return [DTensor.from_local(by_param.get(id(p), local_tensor(p).new_zeros(local_tensor(p).shape)),
                               p.device_mesh, p.placements, shape=p.shape, stride=p.stride()) for p in params]


def _decode_lookahead(encoded: object, layout: ParamLayout, params: Sequence[torch.Tensor]
                      ) -> list[torch.Tensor]:
    """Checked segment buffers from :func:`encode_lookahead`'s per-parameter tensors."""
    if not isinstance(encoded, (list, tuple)) or len(encoded) != len(params):
        raise ValueError(f"lookahead: expected a list of {len(params)} tensors (one per parameter), got "
                         f"{_describe(encoded)}")
    by_param = dict(zip(map(id, params), range(len(params)), strict=True))
    buffers = []
    for segment in layout.segments:
        parts = []
        for p in segment.params:
            i, local = by_param[id(p)], local_tensor(p)
            e = local_tensor(encoded[i]) if isinstance(encoded[i], torch.Tensor) else encoded[i]
            if not isinstance(e, torch.Tensor) or e.shape != local.shape or e.dtype != local.dtype:
                raise ValueError(f"lookahead[{i}]: expected a {local.dtype} tensor of shape "
                                 f"{tuple(local.shape)} (LookSAM's g_v for the parameter), got "
                                 f"{_describe(e)}")
            parts.append(e.reshape(-1))
        buffers.append(torch.cat(parts).to(segment.device) if parts else segment.weight.new_empty(0))
    return buffers


def _describe(value: object) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {tuple(value.shape)}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)}"
    return type(value).__name__


# ----------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------

@dataclass
class Loaded:
    """A validated SSAM checkpoint, decoded for this optimizer. ``masks``: segment masks, or None
    (dense, or a fresh mask at the next first_step when ``started`` is False)."""

    steps: int
    phase: str
    started: bool
    masks: list[Mask] | None
    pending: list[Mask] | None
    backups: list[torch.Tensor] | None  # segment backups, only when perturbed
    policy_state: dict | None  # None: not the same policy kind, leave the policy as it is
    sharp: bool  # the step in progress is sharpness-aware
    schedule_state: dict | None  # None: not the same schedule kind, leave the schedule as it is
    lookahead: tuple[list[torch.Tensor], torch.Tensor | None] | None  # LookSAM's buffers and norm


def validate(state: object, *, layout: ParamLayout, params: Sequence[torch.Tensor],
             policy: MaskPolicy | None, schedule: Schedule, live_count: int, sharded: bool,
             global_count: Callable[[int], int]) -> Loaded:
    """Check ``state`` (from :meth:`SSAM.ssam_state_dict`) against the optimizer and decode it, without
    changing anything. Raises ``ValueError`` / ``TypeError`` naming the offending entry."""
    if not isinstance(state, dict):
        raise TypeError(f"state: expected a dict, got {type(state).__name__}")
    version = state.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(f"version: this ssam_kernels reads SSAM checkpoints of versions 1 to "
                         f"{FORMAT_VERSION}, got {version!r}")
    for key in ("steps", "phase", "started", "policy"):
        if key not in state:
            raise ValueError(f"state: not an SSAM state dict (no {key!r} entry)")
    steps, phase, started = state["steps"], state["phase"], state["started"]
    if isinstance(steps, bool) or not isinstance(steps, int) or not 0 <= steps <= MAX_STEPS:
        raise ValueError(f"steps: expected an int in [0, 2^63 - 1], got {steps!r}")
    if phase not in PHASES:
        raise ValueError(f"phase: expected one of {PHASES}, got {phase!r}")
    if not isinstance(started, bool):
        raise ValueError(f"started: expected a bool, got {started!r}")
    if not isinstance(state["policy"], dict):
        raise ValueError(f"policy: expected a dict, got {type(state['policy']).__name__}")
    # version 1 recorded no kind: a mask entry (outside a sharded template) means a masked policy
    theirs = state.get("policy_kind", "masked" if started and "mask" in state else "dense")
    ours = policy_kind(policy)
    perturbed = phase == PERTURBED
    if theirs != ours and "dense" not in (theirs, ours) and theirs != "masked":
        raise ValueError(f"policy_kind: the checkpoint's mask policy is {theirs}, this optimizer's is {ours}")
    if theirs != ours and perturbed and "dense" in (theirs, ours):
        raise ValueError(f"phase: a checkpoint taken mid-step (perturbed) by a {theirs} optimizer cannot "
                         f"continue in a {ours} one; save between steps")

    def checked(name: str) -> tuple[list[Mask], list[torch.Tensor]]:
        per_param = _decode_masks(name, state[name], layout, params, sharded)
        count = global_count(sum(int(m.sum()) for m in per_param))
        zeros_allowed = getattr(policy, "initial_kind", None) == "zeros" and name == "mask"
        if count != live_count and not (count == 0 and zeros_allowed):
            raise ValueError(f"{name}: the checkpoint's mask has {count} live entries, this optimizer keeps "
                             f"K = {live_count} (sparsity {state.get('sparsity', 'unknown')} in the "
                             "checkpoint); build the optimizer with the checkpoint's sparsity")
        return masks_from_params(layout, params, per_param), per_param

    masks = pending = backups = None
    per_param = None
    if policy is not None and started:
        if theirs == "dense":
            started = False  # SAM -> SSAM: a fresh mask at the next first_step
        else:
            masks, per_param = checked("mask")
            if "pending" in state:
                pending, _ = checked("pending")
    if perturbed:
        if "backups" not in state:
            raise ValueError("backups: a checkpoint taken mid-step (perturbed) must carry its backups")
        if per_param is None:  # dense: every entry of the segments is live
            per_param = masks_per_param(layout, params, None)
        backups = _decode_backups(state["backups"], layout, params, per_param)
    same_policy = theirs == ours or theirs == "masked"
    sharp, schedule_state, lookahead = _checked_schedule(state, layout, params, schedule)
    return Loaded(steps, phase, started, masks, pending, backups, state["policy"] if same_policy else None,
                  sharp and phase != IDLE, schedule_state, lookahead)


def _checked_schedule(state: dict, layout: ParamLayout, params: Sequence[torch.Tensor], schedule: Schedule
                      ) -> tuple[bool, dict | None, tuple[list[torch.Tensor], torch.Tensor | None] | None]:
    """The schedule's entries of a checkpoint: the step's decision, the schedule's state when it is of
    ``schedule``'s kind (loaded into a copy first, so a bad one raises here), and LookSAM's g_v."""
    entry = state.get("schedule")
    if entry is None:  # versions 1 and 2: every step sharpness-aware
        return state["phase"] == PERTURBED, None, None
    if not isinstance(entry, dict) or not isinstance(entry.get("kind"), str) \
            or not isinstance(entry.get("state"), dict) or not isinstance(entry.get("sharp"), bool):
        raise ValueError("schedule: expected a dict with a str 'kind', a dict 'state' and a bool 'sharp', "
                         f"got {entry!r:.200}")
    if entry["kind"] != type(schedule).__name__:
        return entry["sharp"], None, None
    copy.deepcopy(schedule).load_state_dict(entry["state"])
    lookahead = None
    if "lookahead" in state:
        saved = state["lookahead"]
        if not isinstance(saved, dict) or "buffers" not in saved or "norm" not in saved:
            raise ValueError("lookahead: expected a dict with 'buffers' and 'norm'")
        norm = saved["norm"]
        if norm is not None and not (isinstance(norm, torch.Tensor) and norm.dim() == 0
                                     and norm.dtype == torch.float64):
            raise ValueError(f"lookahead: 'norm' must be None or a 0-d float64 tensor, got {_describe(norm)}")
        device = layout.segments[0].device if layout.segments else torch.device("cpu")
        lookahead = (_decode_lookahead(saved["buffers"], layout, params),
                     None if norm is None else local_tensor(norm).to(device))
    return entry["sharp"], entry["state"], lookahead


def check_loaded_groups(saved: object, groups: Sequence[dict[str, Any]], eps: float) -> None:
    """The checkpoint's ``param_groups`` carry valid SSAM options (``rho``, ``adaptive``, ``perturb``; the
    constructor's rules, with the optimizer's ``eps``), and the same ``perturb`` as the optimizer's
    ``groups`` (which decides the segments)."""
    if not isinstance(saved, list):
        return  # the base optimizer's load reports it
    for index, (group, ours) in enumerate(zip(saved, groups, strict=False)):
        if not isinstance(group, dict):
            raise ValueError(f"param_groups[{index}]: expected a dict, got {type(group).__name__}")
        options = {key: group.get(key, ours[key]) for key in ("rho", "adaptive", "perturb")}
        check_group(index, options, eps)
        if options["perturb"] != ours["perturb"]:
            raise ValueError(f"param_groups[{index}]: perturb={options['perturb']} in the checkpoint, "
                             f"{ours['perturb']} here; build the optimizer with the checkpoint's groups")
