"""Launch configuration shared by the Triton kernels: one fixed configuration per mode, no autotuning.

Triton decides at decoration time whether ``@triton.jit`` compiles for a GPU or runs in its NumPy
interpreter (``TRITON_INTERPRET=1``), so the mode is read once, when this package is imported. The
interpreter pays per operation rather than per element, so its tiles are large; on a GPU the tiles
are sized for bandwidth-bound streaming. Each call takes its shapes from its ``tuning``
(:func:`launch_config`): tests pass small ones to exercise multi-program paths on small inputs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from functools import cache

import torch
import triton
import triton.language as tl

from ..tuning import TRITON_GPU, TRITON_INTERPRETER, TritonLaunch, Tuning

INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")
"""Whether the kernels were decorated in interpreter mode (they then run on CPU tensors)."""


def launch_config(tuning: Tuning) -> TritonLaunch:
    """The launch shapes of one call: ``tuning.triton``, else the mode's (:data:`.tuning.TRITON_GPU` on a
    GPU, :data:`.tuning.TRITON_INTERPRETER` in the interpreter)."""
    if tuning.triton is not None:
        return tuning.triton
    return TRITON_INTERPRETER if INTERPRET else TRITON_GPU


def as_ints(config: TritonLaunch) -> list[int]:
    """``config`` as the ``int[]`` argument of the registered ops (their schemas take no objects)."""
    return list(_fields(config))


@cache
def _fields(config: TritonLaunch) -> tuple[int, ...]:
    return dataclasses.astuple(config)  # once per configuration: astuple costs microseconds per call


def from_ints(values: list[int]) -> TritonLaunch:
    """The inverse of :func:`as_ints`."""
    return _launch_of(tuple(values))


@cache
def _launch_of(values: tuple[int, ...]) -> TritonLaunch:
    return TritonLaunch(*values)  # once per configuration: its checks cost microseconds


@cache
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def persistent_programs(device: torch.device, config: TritonLaunch) -> int:
    """How many programs a grid-stride (persistent) kernel launches on ``device``."""
    if device.type == "cuda" and not INTERPRET:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return config.programs_per_sm * _sm_count(index)
    return config.interpret_programs


def launch_options(config: TritonLaunch) -> dict[str, int | bool]:
    """Compile options of every launch. ``enable_fp_fusion=False``: every fp operation but the explicit
    ``tl.fma`` of :mod:`._math` is rounded as written, as the reference rounds it (the float64 ``W``
    path, ASAM's fp32 products and Fisher's ``alpha·g`` must not be fused into an FMA); stating it also
    silences Triton 3.9's default-change warning."""
    return {"num_warps": config.num_warps, "enable_fp_fusion": False}


ALIGN = 16
"""Bytes of the widest global access (``ld.global.v4.b32``): the alignment :func:`aligned` checks."""


def aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's data starts on an :data:`ALIGN`-byte boundary. A launch over such tensors
    may tell the compiler so (``tl.multiple_of``) and get vector accesses; a view may start anywhere
    (a flat segment's, a slice's), so the ops check each tensor of a list and launch the others apart."""
    return all(t.data_ptr() % ALIGN == 0 for t in tensors)


def vector_entries(t: torch.Tensor) -> int:
    """Entries of ``t``'s dtype in one :data:`ALIGN`-byte vector access (4 fp32, 8 bf16/fp16, 2 fp64)."""
    return ALIGN // t.element_size()


TAIL = 16
"""The streaming tiles of a tensor stop at the last multiple of ``TAIL`` entries below ``N`` (a mask
constant over 16 entries keeps the accesses vectors); the program holding that point does the rest."""
_ALIGN = tl.constexpr(ALIGN)
_TAIL = tl.constexpr(TAIL)


@triton.jit
def streaming_row(table_ptr, ENTRIES_AT, first_ty: tl.constexpr, second_ty: tl.constexpr,
                  ALIGNED: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """This program's row of a 3-column launch table (:func:`launch_table`: two addresses and ``N``) as
    ``(first, second, N, bulk, start)``: the two pointers typed ``first_ty`` / ``second_ty`` (declared
    :data:`ALIGN`-byte aligned under ``ALIGNED``), the entries ``N``, ``bulk`` = ``N`` rounded down to a
    multiple of :data:`TAIL`, and the first entry of the program's ``TILES · BLOCK`` tile."""
    pid = tl.program_id(0).to(tl.int64)
    row = table_ptr + ENTRIES_AT + tl.load(table_ptr + 2 * pid) * 3
    first = tl.load(row).to(tl.pointer_type(first_ty))
    second = tl.load(row + 1).to(tl.pointer_type(second_ty))
    if ALIGNED:
        first = tl.multiple_of(first, _ALIGN)
        second = tl.multiple_of(second, _ALIGN)
    N = tl.load(row + 2)
    bulk = tl.multiple_of(N - N % _TAIL, _TAIL)
    start = tl.load(table_ptr + 2 * pid + 1) * (TILES * BLOCK)
    return first, second, N, bulk, start


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for non-negative ints."""
    return -(-a // b)


def on_device(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """The context every launch runs in: Triton launches on the *current* CUDA device and its current
    stream, so the device of the op's tensors ``t`` is made current for the launch (a no-op on CPU)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def launch(kernel: object, grid: tuple[int, ...], config: TritonLaunch, *args: object, **kwargs: object
           ) -> None:
    """``kernel[grid](*args, **kwargs)`` with :func:`launch_options` of ``config``: every launch goes
    through here (tests record the launches by wrapping it)."""
    kernel[grid](*args, **kwargs, **launch_options(config))


def launch_table(columns: list[tuple[int, ...]], sizes: list[int], tile: int, device: torch.device
                 ) -> tuple[torch.Tensor, int, int]:
    """The launch table of a kernel over a list of tensors: an int64 tensor on ``device`` with one
    ``(tensor, tile)`` row per program (``sizes[j]`` units of tensor ``j``, ``tile`` units per program;
    an empty tensor has none), then ``columns[j]`` (addresses, then sizes) per tensor. Each program loads
    its row, then its tensor's: one launch covers the list and a tile never spans two tensors.
    Returns ``(table, programs, entries_at)``, ``entries_at`` the index of the first tensor row."""
    # Built with tensor ops on the host: a 100M-entry list has tens of thousands of programs.
    tiles = torch.tensor([cdiv(n, tile) for n in sizes], dtype=torch.int64)
    count = int(tiles.sum())
    owner = torch.repeat_interleave(torch.arange(len(sizes)), tiles)
    first = torch.repeat_interleave(torch.cumsum(tiles, 0) - tiles, tiles)
    rows = torch.stack([owner, torch.arange(count) - first], dim=1).view(-1)
    table = torch.cat([rows, torch.tensor(columns, dtype=torch.int64).view(-1)])
    if device.type == "cuda":
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("ssam_kernels (Triton): a list op cannot be captured in a CUDA graph: it "
                               "copies its launch table from host memory at every call. Run the optimizer "
                               "step outside the captured region (e.g. torch.compile without "
                               "mode='reduce-overhead' around it).")
        table = table.pin_memory()  # an asynchronous copy: the host does not wait for the GPU
    return table.to(device, non_blocking=True), count, 2 * count
