"""``grad_sq_norm``: the squared gradient norm in one pass, deterministic, accumulated in float64.

Each program squares its entries in float64 (the product of two exact fp32→fp64 values, so a plain
fp32 gradient's squares are exact; float64 gradients are read as they are) and writes one float64
partial; the partials, a fixed-size buffer for a given ``N``, are then summed by ``torch.sum``. No
float atomics: the same input on the same device always gives the same bits. A list of tensors is one
launch over a table of (tensor, tile) rows (:func:`._config.launch_table`) per kind (with and without
``W``) and alignment (:func:`grad_sq_norm_multi`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tuning import DEFAULT, Tuning
from . import _config
from ._config import launch_table
from ._convert import to_float64


@triton.jit
def _squares(g_ptr, w_ptr, idx, inside, ADAPTIVE: tl.constexpr):
    """``(g_i·w_i)²`` (or ``g_i²``) in float64 at ``idx`` where ``inside``, else 0."""
    v = to_float64(tl.load(g_ptr + idx, mask=inside, other=0.0))
    if ADAPTIVE:
        v = v * to_float64(tl.load(w_ptr + idx, mask=inside, other=0.0))
    return v * v


@triton.jit
def _sq_norm_kernel(table_ptr, ENTRIES_AT, g_like, partial_ptr, ADAPTIVE: tl.constexpr,
                    ALIGNED: tl.constexpr, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """``partial[p] = Σ (g_i·|w_i|)²`` (or ``Σ g_i²``) over the ``TILES · BLOCK`` entries of tile ``t``
    of tensor ``j``, where ``(j, t)`` is program ``p``'s row of the launch table
    (:func:`._config.launch_table`). ``ALIGNED``: G (and W) start on 16-byte boundaries.

    The tiles stop at the last multiple of 16 entries below ``N``, so their mask is constant over 16
    entries and the loads stay vectors; the program holding that point adds the ``N % 16`` last."""
    g_ptr, w_ptr, N, bulk, first = _config.streaming_row(table_ptr, ENTRIES_AT, g_like.dtype.element_ty,
                                                         g_like.dtype.element_ty, ALIGNED, BLOCK, TILES)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for t in range(TILES):
        idx = first + t * BLOCK + tl.arange(0, BLOCK)
        acc += _squares(g_ptr, w_ptr, idx, idx < bulk, ADAPTIVE)
    total = tl.sum(acc, axis=0)
    if (bulk < N) & (bulk >= first) & (bulk < first + TILES * BLOCK):
        idx = bulk + tl.arange(0, _TAIL)
        total += tl.sum(_squares(g_ptr, w_ptr, idx, idx < N, ADAPTIVE), axis=0)
    tl.store(partial_ptr + tl.program_id(0), total)


_TAIL = tl.constexpr(_config.TAIL)


@torch.library.custom_op("ssam_kernels::triton_grad_sq_norm_multi", mutates_args=())
def _grad_sq_norm_multi(G: list[torch.Tensor], W: list[torch.Tensor | None], launch: list[int]
                        ) -> torch.Tensor:
    config = _config.from_ints(launch)
    tile = config.block * config.tiles
    partials = []
    # One launch for the plain entries, one for the ASAM ones, each split by alignment.
    for adaptive, aligned in ((False, True), (False, False), (True, True), (True, False)):
        index = [j for j, w in enumerate(W) if (w is not None) == adaptive and G[j].numel() > 0
                 and _config.aligned(G[j], *([w] if adaptive else [])) == aligned]
        if not index:
            continue
        columns = [(G[j].data_ptr(), W[j].data_ptr() if adaptive else 0, G[j].numel()) for j in index]
        table, programs, entries_at = launch_table(columns, [G[j].numel() for j in index], tile, G[0].device)
        partial = torch.empty(programs, dtype=torch.float64, device=G[0].device)
        with _config.on_device(G[0]):
            _config.launch(_sq_norm_kernel, (programs,), config, table, entries_at, G[index[0]], partial,
                           ADAPTIVE=adaptive, ALIGNED=aligned, BLOCK=config.block, TILES=config.tiles)
        partials.append(partial)
    if not partials:
        return torch.zeros((), dtype=torch.float64, device=G[0].device)
    return torch.cat(partials).sum() if len(partials) > 1 else partials[0].sum()


@_grad_sq_norm_multi.register_fake
def _(G: list[torch.Tensor], W: list[torch.Tensor | None], launch: list[int]) -> torch.Tensor:
    return G[0].new_empty((), dtype=torch.float64)


def grad_sq_norm_multi(G: list[torch.Tensor], W: list[torch.Tensor | None], *, tuning: Tuning = DEFAULT
                       ) -> torch.Tensor:
    """The list form of :func:`grad_sq_norm` (one device and dtype): one launch for the entries without
    ``W`` and one for those with it (each split by :func:`._config.aligned`), each program writing one
    float64 partial of one tensor's tile; the partials (plain ones first) summed by ``torch.sum``:
    deterministic, a function of the sizes, of which tensors start 16-byte aligned and of the tile shape
    (``tuning.triton``) only."""
    return _grad_sq_norm_multi(list(G), list(W), _config.as_ints(_config.launch_config(tuning)))


def grad_sq_norm(G: torch.Tensor, W: torch.Tensor | None = None, *, tuning: Tuning = DEFAULT) -> torch.Tensor:
    """``Σ g_i²``, or ``Σ (g_i · |w_i|)²`` when ``W`` is given; a float64 0-d tensor on ``G``'s device.

    Squares are formed and summed in float64; deterministic (fixed partials, fixed reduction order).
    A list of one: the same tiles and partials as the list form.
    """
    return grad_sq_norm_multi([G], [W], tuning=tuning)
