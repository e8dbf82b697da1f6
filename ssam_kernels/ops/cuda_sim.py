"""The ``cuda_sim`` backend, for tests: the CUDA kernels of ``csrc/cuda`` run on CPU tensors.

``ssam_kernels._cuda_sim`` is the CUDA extension's launchers and device code, unchanged, compiled by the
host C++ compiler against ROCm's HIP-CPU runtime with the simulator of ``csrc/sim`` (32-lane warps with
warp-local collectives, a checker of divergent collectives, and global memory checked against the
tensors of each launch). Its ops are ``torch.ops.ssam_cuda_sim.*``, with the schemas of
``torch.ops.ssam_kernels.*``. It is built only when ``SSAM_HIP_CPU_DIR`` names HIP-CPU at build time::

    SSAM_HIP_CPU_DIR=../shared/third_party/hip-cpu pip install --no-build-isolation -e .

It is slow (every GPU thread is a fiber) and never chosen by ``backend="auto"``: ask for it by name. What
it catches and what it cannot (races, memory ordering, ``__CUDA_ARCH__`` branches, timing):
``docs/DESIGN.md``, "cuda_sim".
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .native import CompiledOps

try:
    from .. import _cuda_sim
except ImportError as exc:  # built only with SSAM_HIP_CPU_DIR
    _cuda_sim = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""

BUCKET_MASK_DEVICES = ("cpu",)
"""The CUDA bucket-path kernel runs here on CPU tensors (:func:`ssam_kernels.ops.select` takes that path)."""
CHECKS_OVERLAP = ("cpu",)
"""The CUDA launchers apply the overlap rule to whole calls (``native.CHECKS_OVERLAP``)."""

_OPS = CompiledOps("ssam_cuda_sim")


def __getattr__(name: str) -> object:
    """The backend's op functions are :class:`~.native.CompiledOps`' methods over
    ``torch.ops.ssam_cuda_sim``."""
    return getattr(_OPS, name)


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why cuda_sim cannot run on ``device`` tensors, or None if it can (CPU tensors, when built)."""
    if _cuda_sim is None:
        return (f"the cuda_sim extension ssam_kernels._cuda_sim is not built ({_IMPORT_ERROR}); build it "
                "with "
                "SSAM_HIP_CPU_DIR=<HIP-CPU> pip install --no-build-isolation -e . (docs/building.md)")
    if torch.device(device).type != "cpu":
        return "cuda_sim runs the CUDA kernels on CPU tensors only"
    return None


def launch_shape() -> tuple[int, int, int]:
    """The simulated ``(SM count, resident blocks per SM, grid cap)`` the launchers size grids with."""
    return _cuda_sim.configuration()


@contextlib.contextmanager
def simulated(sms: int, blocks_per_sm: int, max_grid_blocks: int) -> Iterator[None]:
    """Launches inside run on a GPU of ``sms`` SMs with ``blocks_per_sm`` resident blocks of every kernel
    and grids of at most ``max_grid_blocks`` blocks (the default shape is an H100's: 132, 6, 2^16). A small
    shape runs the grid-stride loops, several warps per block and multi-block reductions at small sizes."""
    previous = _cuda_sim.configuration()
    _cuda_sim.configure(sms, blocks_per_sm, max_grid_blocks)
    try:
        yield
    finally:
        _cuda_sim.configure(*previous)
