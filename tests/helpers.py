"""Small helpers shared by the test files: the dtype lists, weight snapshots, exact comparison, a seeded
MLP with its batches, training loop and optimizers, counters of native op calls and Triton launches, and
the code blocks of the documentation."""

from __future__ import annotations

import itertools
import re
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

ROOT = Path(__file__).resolve().parents[1]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
"""The storage dtypes whose element-wise math runs in fp32 (the op contract)."""

ALL_DTYPES = [*DTYPES, torch.float64]
"""Every floating storage dtype (float64 computes in float64)."""
_PYTHON_BLOCK = re.compile(r"^( *)```python\n(.*?)^\1```", re.S | re.M)


def python_blocks(text: str, start: int = 0) -> list[tuple[int, str]]:
    """``(position, code)`` of the ```python blocks of a Markdown ``text`` from ``start``, the code of a
    block indented under a list item dedented."""
    return [(m.start(), textwrap.dedent(m.group(2))) for m in _PYTHON_BLOCK.finditer(text, start)]


def doc_block(page: str, heading: str) -> str:
    """The first ```python block after the heading of ``page`` (a path from the repository root, e.g.
    ``docs/recipes.md``) that starts with ``heading`` (without its ``#`` marks)."""
    text = (ROOT / page).read_text()
    start = re.compile(rf"^#+ {re.escape(heading)}", re.M).search(text)
    assert start is not None, f"{page}: no heading {heading!r}"
    found = python_blocks(text, start.end())
    assert found, f"{page}: no python block after {heading!r}"
    return found[0][1]


def weights(model: nn.Module) -> list[torch.Tensor]:
    """A detached copy of every parameter, in ``parameters()`` order."""
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    """The two lists hold bit-identical tensors."""
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def seeded_mlp(seed: int = 0, sizes: tuple[int, ...] = (5, 4, 3), dtype: torch.dtype = torch.float32
               ) -> nn.Sequential:
    """``Linear(sizes[0], sizes[1]) → Tanh → … → Linear(sizes[-2], sizes[-1])`` with weights drawn from
    ``seed`` (N(0, 0.25), drawn in fp32, then cast to ``dtype``)."""
    gen = torch.Generator().manual_seed(seed)
    layers: list[nn.Module] = []
    for d_in, d_out in itertools.pairwise(sizes):
        layers += [nn.Linear(d_in, d_out), nn.Tanh()]
    model = nn.Sequential(*layers[:-1])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(dtype)


def batch(seed: int, n: int = 8, d_in: int = 5, classes: int = 3, dtype: torch.dtype = torch.float32
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` inputs of ``d_in`` features and class labels, drawn from ``seed``."""
    gen = torch.Generator().manual_seed(10_000 + seed)
    return torch.randn(n, d_in, generator=gen).to(dtype), torch.randint(0, classes, (n,), generator=gen)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy, computed in fp32 for low-precision outputs."""
    return nn.functional.cross_entropy(out.float(), y)


def backward(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = loss_fn(model(x), y)
    loss.backward()
    return loss


def train(model: nn.Sequential, opt: torch.optim.Optimizer, steps: int, start: int = 0, n: int = 8) -> None:
    """``steps`` steps of the two-step form (``first_step``, the second backward when it returns True,
    ``second_step``) on ``batch(start)``, ``batch(start + 1)``, … of ``n`` rows, shaped for the model's
    first and last layers and on its device."""
    first, last = model[0], model[-1]
    for t in range(start, start + steps):
        x, y = batch(t, n, first.in_features, last.out_features, first.weight.dtype)
        x, y = x.to(first.weight.device), y.to(first.weight.device)
        backward(model, x, y)
        if opt.first_step(zero_grad=True):
            backward(model, x, y)
        opt.second_step(zero_grad=True)


def build_optimizer(kind: str, model: nn.Module, layout: str = "flat", dtype: torch.dtype = torch.float32,
                    **options: object) -> torch.optim.Optimizer:
    """The optimizer of ``kind`` over ``model`` (a :func:`seeded_mlp` of two layers): ``sam``, ``dynamic``,
    ``fisher`` (SSAM with that mask) or ``dynamic_groups`` (per-group rho and adaptive, a group that is
    not perturbed); ``options`` go to the constructor (``schedule=``, ``backend=``)."""
    from ssam_kernels import SAM, SSAM, DynamicMask, FisherMask  # after conftest.py chose Triton's mode

    if kind == "fisher":
        data = [batch(400, n=4, dtype=dtype)]
        policy = FisherMask(model, loss_fn, data, num_samples=4, interval=2)
    elif kind == "dynamic":
        policy = DynamicMask(interval=2, drop_rate=0.5, total_steps=12, seed=3)
    elif kind == "sam":
        return SAM(model.parameters(), torch.optim.SGD, rho=0.1, layout=layout, lr=0.1, momentum=0.9,
                   **options)
    elif kind == "dynamic_groups":
        ps = list(model.parameters())
        groups = [{"params": [ps[0], ps[3]], "rho": 0.2}, {"params": [ps[1]], "perturb": False},
                  {"params": [ps[2]], "adaptive": True, "rho": 0.5}]
        return SSAM(groups, torch.optim.SGD, rho=0.1, sparsity=0.6, layout=layout, lr=0.1, momentum=0.9,
                    mask=DynamicMask(interval=2, drop_rate=0.5, total_steps=12, seed=3), **options)
    else:
        raise AssertionError(kind)
    return SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, mask=policy, layout=layout,
                lr=0.1, momentum=0.9, weight_decay=1e-3, **options)


def native_op_counts(fn: Callable[[], object], exclude: str | None = None) -> dict[str, int]:
    """How many times each ``ssam_kernels::`` op ran during ``fn()`` (torch.profiler), leaving out the ops
    whose name contains ``exclude``."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: dict[str, int] = {}
    for event in prof.events():
        if event.name.startswith("ssam_kernels::") and (exclude is None or exclude not in event.name):
            counts[event.name] = counts.get(event.name, 0) + 1
    return counts


def triton_launch_log(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """A list that receives the kernel name of every Triton launch from now on (``_config.launch`` wrapped
    for the test)."""
    from ssam_kernels.ops.triton import _config

    launches: list[str] = []
    launch = _config.launch

    def counted(kernel, grid, *args, **kwargs):
        launches.append(kernel.__name__)
        launch(kernel, grid, *args, **kwargs)
    monkeypatch.setattr(_config, "launch", counted)
    return launches


def cpu_backend(name: str):
    """The module of backend ``name`` for CPU tensors."""
    from ssam_kernels import ops

    return ops.resolve_backend(name, torch.device("cpu"))


SCORE_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32]
"""Every score dtype of the selection ops (int32: hashes, compared as unsigned)."""
SEGMENT_SIZES = [0, 1, 31, 1025, 33, 4099, 2048, 0, 64, 7]
"""Segment sizes of the selection list tests: empty, single, not multiples of a word or a chunk."""


def selection_scores(n: int, dtype: torch.dtype, gen: torch.Generator, ties: bool,
                     specials: bool | None = None) -> torch.Tensor:
    """Random scores of ``dtype``: with ``ties`` few distinct values (many equal keys), else normal
    (int32: uniform over a small or the whole range); ``specials`` (default ``ties``): NaN, -0.0, 0.0, inf
    and -inf at random entries."""
    if dtype == torch.int32:
        high = 4 if ties else 1 << 31
        return torch.randint(-high, high, (n,), generator=gen, dtype=torch.int32)
    x = ((torch.randint(-3, 4, (n,), generator=gen) / 2) if ties else torch.randn(n, generator=gen)).double()
    if (ties if specials is None else specials) and n:
        values = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")], dtype=torch.float64)
        x[torch.randint(0, n, (min(n, 5),), generator=gen)] = values[: min(n, 5)]
    return x.to(dtype)


_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def assert_same_values(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Equal dtype, shape and bits, except that any NaN equals any NaN (the NaN contract of
    docs/DESIGN.md: a NaN's payload is not promised)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, (actual.dtype, actual.shape)
    if actual.is_floating_point():
        both_nan = torch.isnan(actual) & torch.isnan(expected)
        actual, expected = torch.where(both_nan, 0, actual), torch.where(both_nan, 0, expected)
    view = _BITS.get(actual.dtype, actual.dtype)
    mismatch = (actual.view(view) != expected.view(view)).nonzero()
    assert mismatch.numel() == 0, (f"{mismatch.numel()} entries differ, first at "
                                   f"{mismatch[:5].flatten().tolist()}")
