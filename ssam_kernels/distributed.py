"""SSAM under torch.distributed: replicated (DDP) and sharded (FSDP2) training.

Two ways the ranks can hold the model, and what SSAM does in each:

- **replicated** (``DistributedDataParallel``): every rank holds all parameters and, after DDP's
  all-reduce, the same gradients, so the norm, the perturbation and every mask computed from them are
  already identical on every rank. The one input that differs per rank is the data: SSAM-F sums the
  Fisher of each rank's samples over the ranks (one all-reduce per refresh), which is the Fisher of all
  their samples together, as one process would compute it. With ``sync_perturbation=False`` the first
  backward runs under ``no_sync`` and each rank perturbs along its own gradient (m-sharpness); SSAM-D's
  drop scores ``|g|`` are then summed over the ranks so the masks stay identical.
- **sharded** (FSDP2 ``fully_shard``): each rank holds a shard of every parameter (a DTensor), so the
  optimizer works on the local shards (``layout="tensors"``). The squared norm is all-reduced, and
  the mask selections add their radix histograms over the ranks and share the tie budget in rank
  order, so the global mask has exactly K live entries and equals the one-process mask of the full
  tensors (where no ties or random growth are involved). Per refresh that is a few all-reduces of at
  most 2048 counts and one all-gather of a count; the scores never travel.

:class:`ProcessGroupComm` is the :class:`ssam_kernels.ops.Communicator` over a process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

MODES = ("auto", "none", "replicated", "sharded")


class ProcessGroupComm:
    """Sums over the ranks of a ``torch.distributed`` process group (``None``: the default group)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        self.group = group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(self.group)

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its sum over the ranks."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)

    def exclusive_prefix(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks before this one (zeros on the first rank)."""
        gathered = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(gathered, tensor.contiguous(), group=self.group)
        return torch.stack(gathered[: self.rank]).sum(dim=0) if self.rank else torch.zeros_like(tensor)


def resolve_mode(mode: str, has_dtensor: bool) -> str:
    """The distributed mode for ``mode`` (``"auto"``: sharded with DTensor parameters, replicated when
    a process group of more than one rank is initialised, else none)."""
    if mode not in MODES:
        raise ValueError(f"distributed: expected one of {MODES}, got {mode!r}")
    if mode != "auto":
        if mode != "none" and not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"distributed: {mode!r} needs an initialised torch.distributed process group")
        return mode
    if has_dtensor:
        return "sharded"
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return "replicated"
    return "none"
