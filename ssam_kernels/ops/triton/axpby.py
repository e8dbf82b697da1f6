"""``axpby_``: ``X = a·X + b·Y`` in one streaming pass (``X``, ``Y`` of one float dtype).

``a`` and ``b`` are the op's 0-d device tensors, read in the kernel (no host synchronisation) and converted
as ``perturb_``'s scale is (:func:`._math.load_scale`: fp32, rounded to nearest once, unless ``X`` is
float64). The tiles are Fisher's (:func:`._config.streaming_row`): one launch per list and alignment.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tuning import DEFAULT, Tuning
from . import _config
from ._config import launch_table
from ._math import axpby, load_scale


@triton.jit
def _axpby_entries(x_ptr, y_ptr, idx, inside, a, b):
    """``X[i] = a·X[i] + b·Y[i]`` (:func:`._math.axpby`: one fp32 product and one fused multiply-add, as
    the reference) at ``idx`` where ``inside``."""
    y = tl.load(y_ptr + idx, mask=inside)
    x = tl.load(x_ptr + idx, mask=inside)
    tl.store(x_ptr + idx, axpby(x, y, a, b), mask=inside)


@triton.jit
def _axpby_kernel(table_ptr, ENTRIES_AT, x_like, a_ptr, b_ptr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
                  TILES: tl.constexpr):
    """:func:`_axpby_entries` on the tile of the tensor that the program's row of the launch table
    (:func:`._config.launch_table`) names. ``ALIGNED``: X and Y start on 16-byte boundaries. The tiles
    stop at the last multiple of 16 entries below ``N``; the program holding that point does the rest."""
    x_ptr, y_ptr, N, bulk, first = _config.streaming_row(table_ptr, ENTRIES_AT, x_like.dtype.element_ty,
                                                         x_like.dtype.element_ty, ALIGNED, BLOCK, TILES)
    a, _ = load_scale(a_ptr, x_like.dtype.element_ty)
    b, _ = load_scale(b_ptr, x_like.dtype.element_ty)
    for t in range(TILES):
        idx = first + t * BLOCK + tl.arange(0, BLOCK)
        _axpby_entries(x_ptr, y_ptr, idx, idx < bulk, a, b)
    if (bulk < N) & (bulk >= first) & (bulk < first + TILES * BLOCK):
        idx = bulk + tl.arange(0, _TAIL)
        _axpby_entries(x_ptr, y_ptr, idx, idx < N, a, b)


_TAIL = tl.constexpr(_config.TAIL)


@torch.library.custom_op("ssam_kernels::triton_axpby_multi_", mutates_args=("X",))
def _axpby_multi_(X: list[torch.Tensor], Y: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                  launch: list[int]) -> None:
    config = _config.from_ints(launch)
    for aligned in (True, False):  # one launch, or two where some tensors start off 16-byte boundaries
        index = [j for j, x in enumerate(X) if x.numel() > 0 and _config.aligned(x, Y[j]) == aligned]
        if not index:
            continue
        columns = [(X[j].data_ptr(), Y[j].data_ptr(), X[j].numel()) for j in index]
        table, programs, entries_at = launch_table(columns, [X[j].numel() for j in index],
                                                   config.block * config.tiles, X[index[0]].device)
        with _config.on_device(X[index[0]]):
            _config.launch(_axpby_kernel, (programs,), config, table, entries_at, X[index[0]], a, b,
                           ALIGNED=aligned, BLOCK=config.block, TILES=config.tiles)


def axpby_multi_(X: list[torch.Tensor], Y: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor, *,
                 tuning: Tuning = DEFAULT) -> None:
    """:func:`axpby_` on every pair of the lists (one device and dtype): one launch, two when some tensors
    do not start on 16-byte boundaries."""
    _axpby_multi_(list(X), list(Y), a, b, _config.as_ints(_config.launch_config(tuning)))


def axpby_(X: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, tuning: Tuning = DEFAULT
           ) -> None:
    """``X = a·X + b·Y`` element-wise: ``fma(b, y, rn(a·x))`` in fp32 with ``a``, ``b`` rounded to fp32,
    then rounded to ``X``'s dtype (float64 X: float64 operations, each rounded once)."""
    axpby_multi_([X], [Y], a, b, tuning=tuning)
