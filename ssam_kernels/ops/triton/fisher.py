"""``fisher_accumulate_``: ``F += alpha · G²`` in one streaming pass (``F`` float32, ``G`` any float)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._config import CONFIG, cdiv, launch_options
from ._convert import to_float32


@triton.jit
def _fisher_kernel(f_ptr, g_ptr, N, alpha, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """``F[i] = F[i] + alpha · (g_i · g_i)`` in float64, rounded once to fp32 (as the reference)."""
    first = tl.program_id(0).to(tl.int64) * (TILES * BLOCK)
    for t in range(TILES):
        idx = first + t * BLOCK + tl.arange(0, BLOCK)
        inside = idx < N
        g = to_float32(tl.load(g_ptr + idx, mask=inside))
        f = tl.load(f_ptr + idx, mask=inside)
        g64 = g.to(tl.float64)
        tl.store(f_ptr + idx, (f.to(tl.float64) + alpha * (g64 * g64)).to(tl.float32), mask=inside)


@torch.library.custom_op("ssam_triton::fisher_accumulate_", mutates_args=("F",))
def _fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float) -> None:
    n = F.numel()
    if n == 0:
        return
    tile = CONFIG.block * CONFIG.tiles
    _fisher_kernel[(cdiv(n, tile),)](F, G, n, alpha, BLOCK=CONFIG.block, TILES=CONFIG.tiles,
                                     **launch_options())


def fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float = 1.0) -> None:
    """``F += alpha · G²`` element-wise in float64, rounded once; ``F`` is a float32 accumulator."""
    _fisher_accumulate_(F, G, float(alpha))
