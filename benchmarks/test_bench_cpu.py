"""pytest-benchmark microbenchmarks of the CPU paths: every op of every CPU backend and the baselines,
at one mid size, through the same cases as ``benchmarks.kernels``.

Not part of the test suite (``testpaths = ["tests"]``); run with
``python -m pytest benchmarks/ --benchmark-only`` (add ``--benchmark-json=out.json`` to keep results).
"""

from __future__ import annotations

import pytest
import torch

import ssam_kernels as sk
from benchmarks import kernels

N = 1 << 18
SPARSITY = 0.5
CPU_BACKENDS = [b for b, devices in sk.available_backends().items()
                if "cpu" in devices and b not in ("triton", "cuda_sim")]  # interpreter and simulator
CASES = kernels._cases(CPU_BACKENDS)


@pytest.fixture(scope="module")
def inputs() -> kernels.Inputs:
    return kernels.Inputs(N, int(N * (1 - SPARSITY)), torch.float32, torch.device("cpu"), 200, SPARSITY)


@pytest.mark.parametrize(("op", "impl", "builder", "backend"), CASES,
                         ids=[f"{op}-{impl}" for op, impl, _, _ in CASES])
def test_op(benchmark, inputs: kernels.Inputs, op: str, impl: str, builder: kernels.Builder,
            backend: str | None) -> None:
    benchmark.group = op
    benchmark.extra_info["bytes"] = kernels.op_bytes(op, inputs.n, inputs.k, inputs.W.element_size())
    benchmark.pedantic(builder(inputs, backend), rounds=20, warmup_rounds=2)
