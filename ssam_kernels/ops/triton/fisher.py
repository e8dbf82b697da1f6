"""``fisher_accumulate_``: ``F += alpha · G²`` in one streaming pass (``F`` float32, ``G`` any float).

``alpha`` reaches the kernel as a one-element fp32 tensor, rounded to nearest on the host as the op
contract says: a Python float argument would be typed fp32 by the GPU JIT but kept double by the
interpreter, so the CPU tests would not check what a GPU computes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._arith import fp32_value
from ..tuning import DEFAULT, Tuning
from . import _config
from ._config import launch_table
from ._math import fisher_updated


@triton.jit
def _fisher_entries(f_ptr, g_ptr, idx, inside, alpha):
    """``F[i] = F[i] + alpha · g_i²`` (:func:`._math.fisher_updated`: one fp32 fused multiply-add, as the
    reference) at ``idx`` where ``inside``."""
    g = tl.load(g_ptr + idx, mask=inside)
    f = tl.load(f_ptr + idx, mask=inside)
    tl.store(f_ptr + idx, fisher_updated(f, g, alpha), mask=inside)


@triton.jit
def _fisher_kernel(table_ptr, ENTRIES_AT, g_like, alpha_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                   TILES: tl.constexpr):
    """:func:`_fisher_entries` (as the reference) on the tile of the tensor that program's row of the
    launch table (:func:`._config.launch_table`) names. ``ALIGNED``: F and G start on 16-byte
    boundaries. The tiles stop at the last multiple of 16 entries below ``N`` (a mask constant over 16
    entries keeps the accesses vectors); the program holding that point does the ``N % 16`` last."""
    f_ptr, g_ptr, N, bulk, first = _config.streaming_row(table_ptr, ENTRIES_AT, tl.float32,
                                                         g_like.dtype.element_ty, ALIGNED, BLOCK, TILES)
    alpha = tl.load(alpha_ptr)
    for t in range(TILES):
        idx = first + t * BLOCK + tl.arange(0, BLOCK)
        _fisher_entries(f_ptr, g_ptr, idx, idx < bulk, alpha)
    if (bulk < N) & (bulk >= first) & (bulk < first + TILES * BLOCK):
        idx = bulk + tl.arange(0, _TAIL)
        _fisher_entries(f_ptr, g_ptr, idx, idx < N, alpha)


_TAIL = tl.constexpr(_config.TAIL)


@torch.library.custom_op("ssam_kernels::triton_fisher_accumulate_multi_", mutates_args=("F",))
def _fisher_accumulate_multi_(F: list[torch.Tensor], G: list[torch.Tensor], alpha: float, launch: list[int]
                              ) -> None:
    config = _config.from_ints(launch)
    for aligned in (True, False):  # one launch, or two where some tensors start off 16-byte boundaries
        index = [j for j, f in enumerate(F) if f.numel() > 0 and _config.aligned(f, G[j]) == aligned]
        if not index:
            continue
        device = F[index[0]].device
        columns = [(F[j].data_ptr(), G[j].data_ptr(), F[j].numel()) for j in index]
        table, programs, entries_at = launch_table(columns, [F[j].numel() for j in index],
                                                   config.block * config.tiles, device)
        alpha32 = torch.full((1,), fp32_value(alpha), dtype=torch.float32, device=device)
        with _config.on_device(F[index[0]]):
            _config.launch(_fisher_kernel, (programs,), config, table, entries_at, G[index[0]], alpha32,
                           ALIGNED=aligned, BLOCK=config.block, TILES=config.tiles)


def fisher_accumulate_multi_(F: list[torch.Tensor], G: list[torch.Tensor], alpha: float = 1.0, *,
                             tuning: Tuning = DEFAULT) -> None:
    """:func:`fisher_accumulate_` on every pair of the lists (``G`` of one device and dtype): one launch,
    two when some tensors do not start on 16-byte boundaries."""
    _fisher_accumulate_multi_(list(F), list(G), float(alpha), _config.as_ints(_config.launch_config(tuning)))


def fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float = 1.0, *, tuning: Tuning = DEFAULT
                       ) -> None:
    """``F += alpha · G²`` element-wise with one fp32 fused multiply-add (``alpha`` rounded to fp32);
    ``F`` is a float32 accumulator."""
    fisher_accumulate_multi_([F], [G], alpha, tuning=tuning)
