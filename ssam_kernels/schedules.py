"""When to take the sharpness-aware step: schedules that skip or approximate SAM's second pass.

SAM's real cost is its second forward/backward, not the optimizer's passes. A schedule decides, at each
step ``t`` (``opt.steps``: completed steps, counted from 0), whether the step is *sharpness-aware* (two
passes: the gradient at ``w + e`` steps the base optimizer) or *plain* (one pass: the gradient at ``w``).
The optimizer asks once per step, in ``first_step``; everything else (masks, backends, layouts, AMP,
distributed training) works as with every step sharpness-aware.

- :class:`EveryStep`: every step (SAM, SSAM; the default).
- :class:`EveryK`: steps with ``t % k == 0`` (Composer's ``interval``).
- :class:`LookSAM`: EveryK whose plain steps reuse the last sharpness-aware step's direction (Liu et al.,
  "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022, Algorithm 1): on the
  sharpness-aware steps the optimizer keeps ``g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) · g``, the component of the
  gradient at ``w + e`` orthogonal to the one at ``w``; the plain steps step with
  ``g + alpha · (‖g‖ / ‖g_v‖) · g_v``.
- :class:`AESAM`: the sharpness-aware step when ``‖g‖²`` is high relative to its running statistics
  (Jiang et al., "An Adaptive Policy to Employ Sharpness-Aware Minimization", ICLR 2023).

Norms are over every perturbed parameter, as SSAM's ``‖g‖`` (all ranks together under FSDP2), without
ASAM's weights. docs/usage.md ("Schedules") has the math and the memory each one takes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any


def _check_int(name: str, value: object, lowest: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if value < lowest:
        raise ValueError(f"{name}: expected an int >= {lowest}, got {value}")
    return value


def _check_real(name: str, value: object, low: float = -math.inf, high: float = math.inf,
                open_low: bool = False, open_high: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    value = float(value)
    too_low = value <= low if open_low else value < low
    too_high = value >= high if open_high else value > high
    if not math.isfinite(value) or too_low or too_high:
        interval = f"{'(' if open_low else '['}{low}, {high}{')' if open_high else ']'}"
        raise ValueError(f"{name}: expected a finite float in {interval}, got {value}")
    return value


class Schedule:
    """Decides, per step, whether the step is sharpness-aware.

    :meth:`sharpness_aware` is asked once per step and must not change the schedule; the optimizer calls
    :meth:`advance` once the step is taken (a step abandoned after an exception, or skipped by a
    ``GradScaler``, leaves the schedule as it was). ``reads_norm``: the decision reads ``‖g‖²`` on the
    host (one synchronisation per step on GPUs)."""

    reads_norm = False

    def sharpness_aware(self, step: int, sq_norm: Callable[[], float]) -> bool:
        """Whether step ``step`` takes the second pass. ``sq_norm()`` gives ``‖g‖²`` at ``w``."""
        raise NotImplementedError

    def advance(self) -> None:
        """The step decided last was taken."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s values; checked first, nothing changes on error."""
        if not isinstance(state, dict):
            raise TypeError(f"schedule state: expected a dict, got {type(state).__name__}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EveryStep(Schedule):
    """Every step is sharpness-aware: SAM and SSAM as published (two passes per step)."""

    def sharpness_aware(self, step: int, sq_norm: Callable[[], float]) -> bool:
        return True


class EveryK(Schedule):
    """Steps ``t % k == 0`` are sharpness-aware; the others are the base optimizer's plain step with the
    gradient at ``w`` (one pass). ``k=1`` is :class:`EveryStep`."""

    def __init__(self, k: int) -> None:
        self.k = _check_int("k", k, 1)

    def sharpness_aware(self, step: int, sq_norm: Callable[[], float]) -> bool:
        return step % self.k == 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(k={self.k})"


class LookSAM(EveryK):
    """Steps ``t % k == 0`` are sharpness-aware and keep ``g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) · g``; the other
    steps take one pass and step with ``g + alpha · (‖g‖ / ‖g_v‖) · g_v`` (Liu et al., CVPR 2022). The
    defaults ``k=5``, ``alpha=0.7`` are public implementations' (tune ``alpha``: docs/study.md). ``g_v``
    is kept in the parameters' dtype: one more tensor of the perturbed parameters' size. ``g_v = 0``
    (``g_s`` parallel to ``g``), or no ``g_v`` yet, steps with ``g``.
    """

    def __init__(self, k: int = 5, alpha: float = 0.7) -> None:
        super().__init__(k)
        self.alpha = _check_real("alpha", alpha, low=0.0)

    def __repr__(self) -> str:
        return f"LookSAM(k={self.k}, alpha={self.alpha})"


class AESAM(Schedule):
    """The sharpness-aware step when ``‖g‖²`` is high for the run so far (Jiang et al., ICLR 2023, AE-SAM).

    At step ``t``, with ``x = ‖g‖²`` at ``w``, the running mean and variance are updated first,
    ``μ ← δ·μ + (1 − δ)·x`` and ``σ² ← δ·σ² + (1 − δ)·(x − μ)²`` (from ``μ = σ² = 0``), and the step is
    sharpness-aware when ``x ≥ μ + c_t · σ``, with ``c_t`` linear from ``lambda_start`` at ``t = 0`` to
    ``lambda_end`` at ``t = total_steps`` (held there after): the paper's ``c_t = (t/T)·λ₁ + (1 − t/T)·λ₂``
    with ``λ₂ = lambda_start = 1`` and ``λ₁ = lambda_end = -1``, so the threshold falls and later steps
    are more often sharpness-aware; ``delta=0.9``. A non-finite ``x`` (an overflowed AMP step) takes the
    sharpness-aware step (whose perturbation is then skipped) and is not folded into the statistics.
    The decision reads ``‖g‖²`` on the host: one synchronisation per step on GPUs."""

    reads_norm = True

    def __init__(self, total_steps: int, delta: float = 0.9, lambda_start: float = 1.0,
                 lambda_end: float = -1.0) -> None:
        self.total_steps = _check_int("total_steps", total_steps, 1)
        self.delta = _check_real("delta", delta, 0.0, 1.0, open_low=True, open_high=True)
        self.lambda_start = _check_real("lambda_start", lambda_start)
        self.lambda_end = _check_real("lambda_end", lambda_end)
        self.mean = self.var = 0.0
        self._next: tuple[float, float] | None = None  # the statistics of the step decided last

    def threshold(self, step: int) -> float:
        """``c_t``."""
        progress = min(step / self.total_steps, 1.0)
        return self.lambda_start + (self.lambda_end - self.lambda_start) * progress

    def sharpness_aware(self, step: int, sq_norm: Callable[[], float]) -> bool:
        x = sq_norm()
        if not math.isfinite(x):
            self._next = None
            return True
        mean = self.delta * self.mean + (1 - self.delta) * x
        var = self.delta * self.var + (1 - self.delta) * (x - mean) ** 2
        self._next = (mean, var)
        return x >= mean + self.threshold(step) * math.sqrt(var)

    def advance(self) -> None:
        if self._next is not None:
            self.mean, self.var = self._next
            self._next = None

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        mean = _check_real("schedule state mean", state.get("mean"), low=0.0)
        var = _check_real("schedule state var", state.get("var"), low=0.0)
        self.mean, self.var, self._next = mean, var, None

    def __repr__(self) -> str:
        return (f"AESAM(total_steps={self.total_steps}, delta={self.delta}, "
                f"lambda_start={self.lambda_start}, lambda_end={self.lambda_end})")


def make_schedule(schedule: Schedule | None) -> Schedule:
    """The ``schedule=`` argument: a :class:`Schedule`, or None for :class:`EveryStep`."""
    if schedule is None:
        return EveryStep()
    if not isinstance(schedule, Schedule):
        raise TypeError(f"schedule: expected an ssam_kernels schedule (EveryStep(), EveryK(k), LookSAM(k, "
                        f"alpha), AESAM(total_steps)), got {type(schedule).__name__}")
    return schedule
