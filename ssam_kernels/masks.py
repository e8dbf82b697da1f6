"""Mask policies: which entries SSAM perturbs, and when that choice is refreshed.

A policy sees the optimizer's segments through a :class:`MaskContext` and returns one mask per segment
(int32 words + offsets, see :mod:`ssam_kernels.ops.bitmask`) with exactly ``k`` live entries in total,
where ``k = floor(N · (1 − sparsity))`` over all perturbed entries, computed exactly (:func:`live_count`).
``interval`` is in optimizer steps:

- :class:`FisherMask` (SSAM-F): top-k of the empirical Fisher diagonal, recomputed after every
  ``interval``-th step (as the reference code does); the initial mask is computed before the first
  perturbation, or is all-zeros with ``initial="zeros"`` (the reference code's unperturbed first steps).
- :class:`DynamicMask` (SSAM-D): starts random; at every ``interval``-th step drops the
  ``floor(dr(t) · k)`` live entries with the smallest ``|g|`` (or ``|w|``) at ``w`` and grows as many
  among the dead ones, at random (or by ``|g|``); ``dr(t) = drop_rate · (1 + cos(π t / T)) / 2`` with
  ``T = total_steps`` (constant ``drop_rate`` when ``total_steps`` is None). The new mask takes effect
  at the next step.
- :class:`RandomMask`: ``k`` entries at random, redrawn every ``interval`` steps (never if None).

Randomness comes from the counter-based hash ``h(seed, counter, j)`` of each entry's position, so masks
are the same on every backend and a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction

import torch

from . import ops
from .layout import Segment
from .ops import Communicator, bitmask

Mask = tuple[torch.Tensor, torch.Tensor]
"""``(words, offsets)`` of one segment."""


def check_sparsity(sparsity: object) -> float:
    """``sparsity`` itself, after checking it is a real number (not a bool) in [0, 1]."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, numbers.Real):
        raise TypeError(f"sparsity: expected a real number in [0, 1], got {type(sparsity).__name__} "
                        f"{sparsity!r}")
    if not 0 <= sparsity <= 1:
        raise ValueError(f"sparsity: expected a value in [0, 1], got {sparsity!r}")
    return sparsity


def live_count(numel: int, sparsity: float) -> int:
    """``K = floor(N · (1 − s))``: how many of ``N`` entries a mask of sparsity ``s`` keeps.

    Computed exactly, with ``s`` taken as the decimal it prints as (``Fraction(str(s))`` for a float:
    ``0.9`` means 9/10, not the binary double just below it), so ``N = 1000, s = 0.9`` gives 100 and
    ``N = 10, s = 0.9`` gives 1, where ``int(N * (1 - s))`` gives 99 and 0.
    """
    s = check_sparsity(sparsity)
    exact = Fraction(s) if isinstance(s, numbers.Rational) else Fraction(str(s))
    return math.floor(numel * (1 - exact))


@dataclass
class MaskContext:
    """What a policy may look at: the segments, their gradients at ``w`` and the current masks."""

    segments: Sequence[Segment]
    masks: Sequence[Mask] | None
    backend: str | None = None
    comm: Communicator | None = None  # sharded: selections span the ranks
    replicas: Communicator | None = None  # replicated: scores that differ per rank are summed
    grads_synced: bool = True  # False: the gradient at w is each rank's own (DDP no_sync)
    tuning: ops.Tuning | None = None

    def grads(self) -> list[torch.Tensor]:
        return [segment.grad() for segment in self.segments]

    def global_count(self, local: int) -> int:
        """``local`` summed over the ranks that share the selection (itself when not sharded)."""
        if self.comm is None:
            return local
        total = torch.tensor([local], dtype=torch.int64, device=self.segments[0].device)
        self.comm.all_reduce_(total)
        return int(total.item())

    def sum_over_replicas(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum per-rank scores over the replicas so every rank selects the same mask."""
        if self.replicas is not None:
            for t in tensors:
                self.replicas.all_reduce_(t)
        return tensors

    def random_mask(self, k: int, seed: int, counter: int) -> list[Mask]:
        """``k`` live entries at the largest hashes ``h(seed, counter, j)`` of the entries' positions."""
        segments = self.segments
        scores = ops.hash_scores([s.numel for s in segments], seed, counter, [s.position for s in segments],
                                 [s.device for s in segments], backend=self.backend, tuning=self.tuning)
        return ops.select_topk(scores, k, backend=self.backend, comm=self.comm, tuning=self.tuning)


def _check_interval(interval: object, allow_none: bool) -> int | None:
    if interval is None and allow_none:
        return None
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        expected = "a positive int or None" if allow_none else "a positive int"
        raise ValueError(f"interval: expected {expected}, got {interval!r}")
    return interval


def hash_counter(step: int) -> int:
    """The random-growth hash's 32-bit counter for a step count (``ops.hash_scores``' ``step``): counts past
    2^32 - 1 wrap, so no step count can make a refresh fail (it runs after the base step)."""
    return step & 0xFFFFFFFF


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise ValueError(f"seed: expected an int in [0, 2^32), got {seed!r}")
    return seed


class MaskPolicy:
    """Base class of the mask policies.

    ``uses_gradient``: the refresh reads the gradient at ``w``, so it is computed in ``first_step``
    (before the perturbation) and applied after the step; otherwise it runs after the step.
    """

    interval: int | None = None
    uses_gradient = False

    def initial(self, ctx: MaskContext, k: int) -> list[Mask]:
        """The mask used from the first step on."""
        raise NotImplementedError

    def refresh(self, ctx: MaskContext, k: int, step: int) -> list[Mask]:
        """The mask after ``step`` completed steps (called when ``step % interval == 0``)."""
        raise NotImplementedError

    def due(self, step: int) -> bool:
        """Whether the mask is refreshed once ``step`` steps have completed."""
        return self.interval is not None and step > 0 and step % self.interval == 0

    def __repr__(self) -> str:
        """The class, ``interval`` (None: never refreshed) and the policy's other plain settings."""
        settings = {"interval": self.interval} | {
            name: value for name, value in vars(self).items()
            if not name.startswith("_") and isinstance(value, (bool, int, float, str, type(None)))}
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in settings.items())})"

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        del state


class FisherMask(MaskPolicy):
    """SSAM-F: the ``k`` entries with the largest empirical Fisher information
    ``F = Σ_{i<num_samples} (∂ℓ_i/∂w)²`` of the first ``num_samples`` samples of ``data`` (see
    :func:`ssam_kernels.fisher_information`, which takes ``loss_fn``, ``data``, ``batch_size``,
    ``method``, ``loss_form`` and ``norm_eval`` as documented there).

    ``loss_fn(outputs, targets)`` with ``(inputs, targets)`` batches, ``loss_fn(model, batch)`` with any
    batch (e.g. the dict batches of Hugging Face models), or None for a model that returns its own loss
    (``model(**batch).loss``). By default normalization layers with running statistics score every
    sample in eval mode (``norm_eval=True``; their modes are restored), so a batch-norm model such as a
    ResNet works at any input size. Every argument is checked here, not at the first step; ``data``
    must be re-iterable (a ``DataLoader``, a list) when ``interval`` asks for more than one pass.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable[..., torch.Tensor] | None,
                 data: Iterable[object], num_samples: int = 128, interval: int | None = None,
                 batch_size: int | None = None, initial: str = "fisher", method: str = "auto",
                 loss_form: str = "auto", norm_eval: bool = True) -> None:
        from collections.abc import Iterator

        from .fisher import check_batch_size, check_data, check_method, resolve_loss_form

        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.loss_form = resolve_loss_form(loss_fn, loss_form)
        if initial not in ("fisher", "zeros"):
            raise ValueError(f"initial: expected 'fisher' or 'zeros', got {initial!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"num_samples: expected a positive int, got {num_samples!r}")
        if not isinstance(norm_eval, bool):
            raise TypeError(f"norm_eval: expected a bool, got {type(norm_eval).__name__}")
        check_data(data)
        self.interval = _check_interval(interval, allow_none=True)
        if isinstance(data, Iterator) and self.interval is not None:
            raise ValueError("data: an iterator is used up by the first Fisher pass, but interval="
                             f"{self.interval} refreshes the mask; pass a re-iterable (a DataLoader, a list)")
        self.model, self.loss_fn, self.data = model, loss_fn, data
        self.num_samples, self.batch_size = num_samples, check_batch_size(batch_size)
        self.method, self.norm_eval = check_method(method), norm_eval
        self.initial_kind = initial

    def _fisher_mask(self, ctx: MaskContext, k: int) -> list[Mask]:
        from .fisher import fisher_information

        params = [p for segment in ctx.segments for p in segment.params]
        fisher = dict(zip(map(id, params), fisher_information(
            self.model, self.loss_fn, self.data, self.num_samples, self.batch_size, params=params,
            method=self.method, backend=ctx.backend, tuning=ctx.tuning, loss_form=self.loss_form,
            norm_eval=self.norm_eval),
            strict=True))
        scores = [torch.cat([fisher[id(p)].reshape(-1) for p in segment.params]) for segment in ctx.segments]
        ctx.sum_over_replicas(scores)  # DDP: the Fisher of every rank's samples together
        return ops.select_topk(scores, k, backend=ctx.backend, comm=ctx.comm, tuning=ctx.tuning)

    def initial(self, ctx: MaskContext, k: int) -> list[Mask]:
        if self.initial_kind == "zeros":
            return [bitmask.from_bool(torch.zeros(s.numel, dtype=torch.bool, device=s.device))
                    for s in ctx.segments]
        return self._fisher_mask(ctx, k)

    def refresh(self, ctx: MaskContext, k: int, step: int) -> list[Mask]:
        return self._fisher_mask(ctx, k)


class DynamicMask(MaskPolicy):
    """SSAM-D: drop the weakest live entries and grow as many dead ones, every ``interval`` steps."""

    uses_gradient = True

    def __init__(self, interval: int = 100, drop_rate: float = 0.5, total_steps: int | None = None,
                 drop: str = "gradient", grow: str = "random", seed: int = 0) -> None:
        self.interval = _check_interval(interval, allow_none=False)
        if isinstance(drop_rate, bool) or not isinstance(drop_rate, numbers.Real):
            raise TypeError(f"drop_rate: expected a real number in [0, 1], got {type(drop_rate).__name__} "
                            f"{drop_rate!r}")
        if not 0.0 <= drop_rate <= 1.0:
            raise ValueError(f"drop_rate: expected a value in [0, 1], got {drop_rate!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)):
            raise TypeError(f"total_steps: expected a positive int or None, got {type(total_steps).__name__} "
                            f"{total_steps!r}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps: expected a positive int or None, got {total_steps!r}")
        if drop not in ("gradient", "weight"):
            raise ValueError(f"drop: expected 'gradient' or 'weight', got {drop!r}")
        if grow not in ("random", "gradient"):
            raise ValueError(f"grow: expected 'random' or 'gradient', got {grow!r}")
        self.drop_rate, self.total_steps, self.drop, self.grow = drop_rate, total_steps, drop, grow
        self.seed = _check_seed(seed)

    def rate(self, step: int) -> float:
        """``dr(t) = drop_rate · (1 + cos(π · min(t, T) / T)) / 2`` (constant without ``total_steps``)."""
        if self.total_steps is None:
            return self.drop_rate
        return self.drop_rate * (1 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps)) / 2

    def initial(self, ctx: MaskContext, k: int) -> list[Mask]:
        return ctx.random_mask(k, self.seed, 0)

    def refresh(self, ctx: MaskContext, k: int, step: int) -> list[Mask]:
        assert ctx.masks is not None, "a dynamic update needs the current mask"
        uses_abs_grad = "gradient" in (self.drop, self.grow)
        abs_grads = [g.abs() for g in ctx.grads()] if uses_abs_grad else []
        if not ctx.grads_synced:  # per-rank gradients (m-sharpness): agree on one mask
            ctx.sum_over_replicas(abs_grads)
        drop = abs_grads if self.drop == "gradient" else [s.weight.abs() for s in ctx.segments]
        grow = abs_grads if self.grow == "gradient" else "random"
        live = ctx.global_count(sum(int(offsets[-1]) for _, offsets in ctx.masks))
        numel = ctx.global_count(sum(s.numel for s in ctx.segments))
        n_drop = min(math.floor(self.rate(step) * k), live, numel - live)
        return ops.dynamic_update([words for words, _ in ctx.masks], drop, n_drop, grow, self.seed,
                                  hash_counter(step), backend=ctx.backend, comm=ctx.comm,
                                  positions=[s.position for s in ctx.segments], tuning=ctx.tuning)


class RandomMask(MaskPolicy):
    """``k`` entries chosen at random; redrawn every ``interval`` steps (never when None)."""

    def __init__(self, interval: int | None = None, seed: int = 0) -> None:
        self.interval = _check_interval(interval, allow_none=True)
        self.seed = _check_seed(seed)

    def initial(self, ctx: MaskContext, k: int) -> list[Mask]:
        return ctx.random_mask(k, self.seed, 0)

    def refresh(self, ctx: MaskContext, k: int, step: int) -> list[Mask]:
        return ctx.random_mask(k, self.seed, hash_counter(step))


def make_policy(mask: MaskPolicy | str | None) -> MaskPolicy | None:
    """The policy for the optimizer's ``mask`` argument; None means dense (SAM)."""
    if mask is None or isinstance(mask, MaskPolicy):
        return mask
    if not isinstance(mask, str):
        raise TypeError(f"mask: expected a MaskPolicy, None or a str, got {type(mask).__name__}")
    if mask == "dense":
        return None
    if mask == "dynamic":
        return DynamicMask()
    if mask == "random":
        return RandomMask()
    hint = " ('fisher' needs a model and data: use sk.FisherMask(...))" if mask == "fisher" else ""
    raise ValueError(f"mask: expected a MaskPolicy, None, 'dense', 'dynamic' or 'random', got {mask!r}{hint}")


def topk_mask(scores: Sequence[torch.Tensor], sparsity: float, *, backend: str | None = None,
              tuning: ops.Tuning | None = None) -> list[torch.Tensor]:
    """Bool masks (shaped like ``scores``) selecting exactly ``k = floor(N · (1 − sparsity))`` entries
    (:func:`live_count`) of all tensors together: the largest scores, ties taken in tensor then index
    order, NaN lowest."""
    if isinstance(scores, torch.Tensor) or not isinstance(scores, Sequence):
        raise TypeError(f"scores: expected a list of tensors, got {type(scores).__name__}")
    check_sparsity(sparsity)
    flat = [s.detach().reshape(-1).contiguous() for s in scores]
    # select_topk compares int32 as unsigned (hash scores); a user's int32 scores are signed: flipping
    # the sign bit maps signed order onto unsigned order exactly
    flat = [s ^ torch.iinfo(torch.int32).min if s.dtype == torch.int32 else s for s in flat]
    k = live_count(sum(s.numel() for s in flat), sparsity)
    selected = ops.select_topk(flat, k, backend=backend, tuning=tuning)
    block_words = ops.tuning.resolve(tuning).mask_block_words
    return [bitmask.unpack(words, s.numel(), block_words).view(s.shape)
            for (words, _), s in zip(selected, scores, strict=True)]
