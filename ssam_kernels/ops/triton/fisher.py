"""``fisher_accumulate_``: ``F += alpha · G²`` in one streaming pass (``F`` float32, ``G`` any float).

``alpha`` reaches the kernel as a one-element float64 tensor: a Python float argument would be typed
fp32 by the GPU JIT (the interpreter keeps it double), rounding ``alpha`` before the float64 arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config
from ._config import CONFIG, cdiv, launch_options
from ._convert import to_float64


@triton.jit
def _fisher_kernel(f_ptr, g_ptr, alpha_ptr, N, BLOCK: tl.constexpr, TILES: tl.constexpr):
    """``F[i] = F[i] + alpha · (g_i · g_i)`` in float64, rounded once to fp32 (as the reference)."""
    first = tl.program_id(0).to(tl.int64) * (TILES * BLOCK)
    alpha = tl.load(alpha_ptr)
    for t in range(TILES):
        idx = first + t * BLOCK + tl.arange(0, BLOCK)
        inside = idx < N
        g64 = to_float64(tl.load(g_ptr + idx, mask=inside))
        f = tl.load(f_ptr + idx, mask=inside)
        tl.store(f_ptr + idx, (f.to(tl.float64) + alpha * (g64 * g64)).to(tl.float32), mask=inside)


@torch.library.custom_op("ssam_triton::fisher_accumulate_", mutates_args=("F",))
def _fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float) -> None:
    n = F.numel()
    if n == 0:
        return
    tile = CONFIG.block * CONFIG.tiles
    alpha64 = torch.full((1,), alpha, dtype=torch.float64, device=F.device)
    with _config.on_device(F):
        _fisher_kernel[(cdiv(n, tile),)](F, G, alpha64, n, BLOCK=CONFIG.block, TILES=CONFIG.tiles,
                                         **launch_options())


def fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float = 1.0) -> None:
    """``F += alpha · G²`` element-wise in float64, rounded once; ``F`` is a float32 accumulator."""
    _fisher_accumulate_(F, G, float(alpha))
