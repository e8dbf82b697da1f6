"""A wrong kernel never reaches the user's weights: the first-use check of the compiled backends.

The first time a compiled backend (``native``, ``triton``, ``cuda_sim``) is resolved for a device and a
dtype in a process, :func:`verdict` runs every op of that backend on a few thousand entries (tensors of
1, 37, 1061 and 2053 entries, one of them starting off its 16-byte alignment: they cross packs, chunks
and tails), masked and dense, single and list forms, adaptive or not, and the exact-k selection and the
hash, against the ``vectorized`` backend on the same device. The inputs are multiples of 1/64 (exact in
every float dtype, squares and sums exact in float64), so every result, norms included, must agree bit
for bit (any NaN with any NaN). The verdict is kept for the process.

On a mismatch (or an exception) :func:`ssam_kernels.ops.resolve_backend` warns once, naming the device,
its compute capability, the backend, the op and the dtype; ``backend="auto"`` moves on to the next
backend (native, then Triton, then vectorized), and a backend asked for by name raises instead.
``SSAM_KERNELS_SELFCHECK=0`` turns the check off. It runs eagerly: the optimizer resolves its backend
when it is built, and a call made while ``torch.compile`` traces is not checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

import torch

from .._warnings import warn
from . import bitmask, select

ENV_VAR = "SSAM_KERNELS_SELFCHECK"
CHECKED_BACKENDS = ("native", "triton", "cuda_sim")
SIZES = (1, 37, 1024 + 37, 2 * 1024 + 5)

_verdicts: dict[tuple[str, torch.device, torch.dtype], str | None] = {}
_UNKNOWN = "not checked yet"


def enabled() -> bool:
    """Whether the check runs (``SSAM_KERNELS_SELFCHECK`` unset, or anything but 0/false/off/no)."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in ("0", "false", "off", "no")


def verdict(name: str, load: Callable[[], ModuleType], device: torch.device, dtype: torch.dtype
            ) -> str | None:
    """None when backend ``name`` passed the check on ``device`` with ``dtype`` (or is not checked: the
    check is off, or torch.compile is tracing), else what went wrong (warned once, the first time).
    ``load()`` gives the backend's module; it is called only when the check runs."""
    key = (name, device, dtype)
    known = _verdicts.get(key, _UNKNOWN)
    if known is None or not enabled() or torch.compiler.is_compiling():
        return None
    if known is _UNKNOWN:
        from . import vectorized

        problem = _first_difference(load(), vectorized, device, dtype)
        known = _verdicts[key] = None if problem is None else (
            f"ssam_kernels self-check: backend {name!r} on {_describe(device)} gives wrong results for "
            f"{problem} ({dtype}); it is not used there")
        if known is not None:
            warn(known, RuntimeWarning)
    return known


def _describe(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    return str(device)


def _same(a: object, b: object) -> bool:
    """Equal structure; tensors of equal dtype, shape and bits, any NaN equal to any NaN."""
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(map(_same, a, b))
    if a is None or b is None:
        return a is b
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.is_floating_point():
        nan = torch.isnan(a) & torch.isnan(b)
        a, b = torch.where(nan, 0, a), torch.where(nan, 0, b)
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}.get(a.element_size(), a.dtype)
    return torch.equal(a.view(bits), b.view(bits))


def _inputs(device: torch.device, dtype: torch.dtype) -> dict[str, list]:
    """The known-answer inputs: multiples of 1/64 in [-1, 1] (integers for int32), every other tensor
    masked (a random half of its entries), the last one a view 1 element into its storage."""
    gen = torch.Generator().manual_seed(0x55A4)

    def values(n: int) -> torch.Tensor:
        x = torch.randint(-64, 65, (n,), generator=gen)
        return (x.to(dtype) if dtype == torch.int32 else (x.double() / 64).to(dtype)).to(device)

    def misaligned(t: torch.Tensor) -> torch.Tensor:
        storage = torch.zeros(t.numel() + 1, dtype=t.dtype, device=device)
        storage[1:].copy_(t)
        return storage[1:]

    x = [values(n) for n in SIZES]
    y = [values(n) for n in SIZES]
    x[-1], y[-1] = misaligned(x[-1]), misaligned(y[-1])
    masks = [bitmask.from_bool(torch.rand(n, generator=gen) < 0.5) if j % 2 == 0 else (None, None)
             for j, n in enumerate(SIZES)]
    return {"x": x, "y": y, "words": [None if w is None else w.to(device) for w, _ in masks],
            "offsets": [None if o is None else o.to(device) for _, o in masks],
            "live": [n if w is None else int(bitmask.count(w))
                     for (w, _), n in zip(masks, SIZES, strict=True)]}


def _runs(module: ModuleType, device: torch.device, dtype: torch.dtype
          ) -> list[tuple[str, Callable[[], object]]]:
    """``(op, run)`` pairs: each ``run()`` calls the backend's primitive on fresh copies of the inputs
    and returns what it wrote or returned."""
    a = _inputs(device, dtype)
    x, y, words, offsets, live = a["x"], a["y"], a["words"], a["offsets"], a["live"]
    total = sum(SIZES)

    def select_run() -> object:
        return select.select_with_offsets(x, total // 3, True, [module] * len(x))

    runs: list[tuple[str, Callable[[], object]]] = [
        ("select_topk", select_run),
        ("hash_scores", lambda: module.hash_scores(total, 12345, 67, 2**32 - 1000, device)),
    ]
    if dtype == torch.int32:
        return runs
    scale_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor(0.25, dtype=scale_dtype, device=device)

    def perturb(adaptive: bool, index: list[int]) -> object:
        w = [x[i].clone() for i in index]
        b = [torch.full((live[i],), 3.0, dtype=dtype, device=device) for i in index]
        g, m, o = [y[i] for i in index], [words[i] for i in index], [offsets[i] for i in index]
        multi = getattr(module, "perturb_multi_", None)
        if multi is not None and len(index) > 1:
            multi(w, g, m, o, b, scale, adaptive)
        else:
            for args in zip(w, g, m, o, b, strict=True):
                module.perturb_(*args, scale, adaptive)
        return w, b

    def restore(index: list[int]) -> object:
        w = [y[i].clone() for i in index]
        b = [x[i][: live[i]].clone() for i in index]
        m, o = [words[i] for i in index], [offsets[i] for i in index]
        multi = getattr(module, "restore_multi_", None)
        if multi is not None and len(index) > 1:
            multi(w, m, o, b)
        else:
            for args in zip(w, m, o, b, strict=True):
                module.restore_(*args)
        return w

    def norm(index: list[int], adaptive: list[bool]) -> object:
        g = [y[i] for i in index]
        w = [x[i] if a else None for i, a in zip(index, adaptive, strict=True)]
        multi = getattr(module, "grad_sq_norm_multi", None)
        if multi is not None and len(index) > 1:
            return multi(g, w)
        totals = [module.grad_sq_norm(*args) for args in zip(g, w, strict=True)]
        return totals[0] if len(index) == 1 else sum(totals[1:], totals[0])  # the list's total, in order

    # axpby_'s a in the data's precision, b float64 (rounded to fp32 for fp32/bf16/fp16 X): both read paths.
    a, b = torch.tensor(0.75, dtype=scale_dtype, device=device), torch.tensor(-1.5, dtype=torch.float64,
                                                                              device=device)

    def axpby(index: list[int]) -> object:
        xs, ys = [x[i].clone() for i in index], [y[i] for i in index]
        multi = getattr(module, "axpby_multi_", None)
        if multi is not None and len(index) > 1:
            multi(xs, ys, a, b)
        else:
            for args in zip(xs, ys, strict=True):
                module.axpby_(*args, a, b)
        return xs

    def fisher(index: list[int]) -> object:
        f = [(x[i].float().abs() + 0.5).contiguous() for i in index]
        g = [y[i] for i in index]
        multi = getattr(module, "fisher_accumulate_multi_", None)
        if multi is not None and len(index) > 1:
            multi(f, g, 1.0)
        else:
            for args in zip(f, g, strict=True):
                module.fisher_accumulate_(*args, 1.0)
        return f

    every = list(range(len(x)))
    return [*runs,
            ("grad_sq_norm", lambda: [norm([2], [False]), norm([3], [True])]),
            ("grad_sq_norm (list)", lambda: norm(every, [True, False, True, False])),
            ("perturb_", lambda: [perturb(False, [2]), perturb(True, [3])]),
            ("perturb_ (list)", lambda: [perturb(False, every), perturb(True, every)]),
            ("restore_", lambda: [restore([2]), restore([3])]),
            ("restore_ (list)", lambda: restore(every)),
            ("fisher_accumulate_", lambda: fisher([2])),
            ("fisher_accumulate_ (list)", lambda: fisher(every)),
            ("axpby_", lambda: [axpby([2]), axpby([3])]),
            ("axpby_ (list)", lambda: axpby(every))]


def _first_difference(module: ModuleType, oracle: ModuleType, device: torch.device, dtype: torch.dtype
                      ) -> str | None:
    """The first op whose result on ``module`` differs from ``oracle``'s (or raises), or None."""
    expected = {op: run() for op, run in _runs(oracle, device, dtype)}
    for op, run in _runs(module, device, dtype):
        try:
            got = run()
        except Exception as exc:  # a failing kernel is as unusable as a wrong one
            return f"{op} (it raised {type(exc).__name__}: {exc})"
        if not _same(got, expected[op]):
            return op
    return None
