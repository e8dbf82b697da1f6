"""``grad_sq_norm``: the squared gradient norm in one pass, deterministic, accumulated in float64.

Each program squares its entries in float64 (the product of two exact fp32→fp64 values, so a plain
fp32 gradient's squares are exact; float64 gradients are read as they are) and writes one float64
partial; the partials, a fixed-size buffer for a given ``N``, are then summed by ``torch.sum``. No
float atomics: the same input on the same device always gives the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ._config import CONFIG, cdiv, launch_options
from ._convert import to_float64


@triton.jit
def _sq_norm_kernel(g_ptr, w_ptr, partial_ptr, N, ADAPTIVE: tl.constexpr, BLOCK: tl.constexpr,
                    TILES: tl.constexpr):
    """``partial[p] = Σ (g_i·|w_i|)²`` (or ``Σ g_i²``) over the ``TILES · BLOCK`` entries of program ``p``."""
    first = tl.program_id(0).to(tl.int64) * (TILES * BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    for t in range(TILES):
        idx = first + t * BLOCK + tl.arange(0, BLOCK)
        inside = idx < N
        v = to_float64(tl.load(g_ptr + idx, mask=inside, other=0.0))
        if ADAPTIVE:
            v = v * to_float64(tl.load(w_ptr + idx, mask=inside, other=0.0))
        acc += v * v
    tl.store(partial_ptr + tl.program_id(0), tl.sum(acc, axis=0))


@torch.library.custom_op("ssam_triton::grad_sq_norm", mutates_args=())
def _grad_sq_norm(G: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
    n = G.numel()
    if n == 0:
        return torch.zeros((), dtype=torch.float64, device=G.device)
    tile = CONFIG.block * CONFIG.tiles
    partials = torch.empty(cdiv(n, tile), dtype=torch.float64, device=G.device)
    with _config.on_device(G):
        _sq_norm_kernel[(partials.numel(),)](G, W if W is not None else G, partials, n,
                                             ADAPTIVE=W is not None, BLOCK=CONFIG.block, TILES=CONFIG.tiles,
                                             **launch_options())
    return partials.sum()


@_grad_sq_norm.register_fake
def _(G: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
    return G.new_empty((), dtype=torch.float64)


def grad_sq_norm(G: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ g_i²``, or ``Σ (g_i · |w_i|)²`` when ``W`` is given; a float64 0-d tensor on ``G``'s device.

    Squares are formed and summed in float64; deterministic (fixed partials, fixed reduction order).
    """
    return _grad_sq_norm(G, W)
