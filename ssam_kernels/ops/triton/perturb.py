"""``perturb_`` and ``restore_``: one pass each over the masked entries, with the compact backup.

A program owns ``CHUNKS`` whole 1024-entry chunks, viewed as a ``[CHUNKS·32 words, 32 bits]`` tile
(row ``r`` = mask word ``r``, column ``b`` = bit ``b``, so entry ``32·r + b``). The rank of a set bit is
``offsets[first chunk]`` plus the set bits of the earlier words of the tile (an exclusive scan of the
per-word counts) plus the set bits below it in its own word (an exclusive scan along the row): no
global scan, each chunk's ``offsets`` entry suffices. ``mask=None`` (dense SAM) is the same kernel with
``HAS_MASK=False`` and ``rank(i) = i``.

Bounds (``ssam_kernels.ops.perturb_``): bits at or past ``N`` are dropped before ranks are counted, and
an entry is selected only if its rank lies in ``[0, CAPACITY)``, the backup's length, so a short backup
or offsets that do not match the mask never address memory outside ``W`` and the backup. Offsets are
checked against the mask on the host for CPU tensors (the interpreter); on a GPU that would synchronise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..bitmask import check_offsets, num_chunks
from . import _config
from ._config import CONFIG, cdiv, launch_options
from ._convert import store_float64, to_float64

_DBL_MAX = tl.constexpr(1.7976931348623157e308)  # largest finite float64


@triton.jit
def _tile_ranks(mask_ptr, offsets_ptr, N, CAPACITY, HAS_MASK: tl.constexpr, CHUNKS: tl.constexpr):
    """``(index, selected, rank)`` of the entries of this program's tile, each ``[CHUNKS·32, 32]``:
    selected = set bit below ``N`` with ``0 <= rank < CAPACITY``."""
    ROWS: tl.constexpr = CHUNKS * 32  # a chunk of 1024 entries is 32 words
    pid = tl.program_id(0).to(tl.int64)
    word = pid * ROWS + tl.arange(0, ROWS)
    bit = tl.arange(0, 32)
    index = word[:, None] * 32 + bit[None, :]
    inside = index < N
    if HAS_MASK:
        words = tl.load(mask_ptr + word, mask=word * 32 < N, other=0)
        # Arithmetic shift of the int32 word; `& 1` keeps just bit b, so the sign does not leak in.
        bits = ((words[:, None] >> bit[None, :]) & 1) * inside.to(tl.int32)
        per_word = tl.sum(bits, axis=1)
        words_before = tl.cumsum(per_word, axis=0) - per_word
        in_word_before = tl.cumsum(bits, axis=1) - bits
        first = tl.load(offsets_ptr + pid * CHUNKS).to(tl.int64)
        rank = first + (words_before[:, None] + in_word_before).to(tl.int64)
        selected = (bits != 0) & (rank >= 0) & (rank < CAPACITY)
    else:
        rank = index
        selected = inside
    return index, selected, rank


@triton.jit
def _perturb_kernel(w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, scale_ptr, N, CAPACITY,
                    HAS_MASK: tl.constexpr, ADAPTIVE: tl.constexpr, CHUNKS: tl.constexpr):
    """``backup[rank(i)] = w_i``; if ``scale`` (fp32 or fp64) is finite and non-zero,
    ``w_i = w_i + scale·g_i`` (adaptive: ``w_i + scale·((w_i·w_i)·g_i)``) in float64, each operation
    rounded once, then stored as W's dtype the way the reference's ``.to(dtype)`` rounds: the products
    of fp32 inputs are exact in float64, so the result is the reference's bit for bit (fp32 arithmetic
    is off by several ulps where ``w`` and the step cancel); float64 W gets the float64 evaluation.
    The op is memory-bound: the float64 arithmetic costs no bandwidth on data-centre GPUs."""
    index, selected, rank = _tile_ranks(mask_ptr, offsets_ptr, N, CAPACITY, HAS_MASK, CHUNKS)
    w = tl.load(w_ptr + index, mask=selected)
    tl.store(backup_ptr + rank, w, mask=selected)
    scale = tl.load(scale_ptr).to(tl.float64)
    # NaN fails every comparison and ±inf exceeds DBL_MAX: only finite non-zero scales perturb.
    if (tl.abs(scale) <= _DBL_MAX) & (scale != 0.0):
        g64 = to_float64(tl.load(g_ptr + index, mask=selected))
        w64 = to_float64(w)
        if ADAPTIVE:
            g64 = w64 * w64 * g64
        result = w64 + scale * g64
        tl.store(w_ptr + index, store_float64(result, w_ptr.dtype.element_ty), mask=selected)


@triton.jit
def _restore_kernel(w_ptr, mask_ptr, offsets_ptr, backup_ptr, N, CAPACITY, HAS_MASK: tl.constexpr,
                    CHUNKS: tl.constexpr):
    """``w_i = backup[rank(i)]`` for the selected entries (a bit copy)."""
    index, selected, rank = _tile_ranks(mask_ptr, offsets_ptr, N, CAPACITY, HAS_MASK, CHUNKS)
    tl.store(w_ptr + index, tl.load(backup_ptr + rank, mask=selected), mask=selected)


def _grid(n: int) -> tuple[int]:
    return (cdiv(num_chunks(n), CONFIG.chunks),)


@torch.library.custom_op("ssam_triton::perturb_", mutates_args=("W", "backup"))
def _perturb_(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
              backup: torch.Tensor, scale: torch.Tensor, adaptive: bool) -> None:
    n = W.numel()
    if n == 0:
        return
    with _config.on_device(W):
        _perturb_kernel[_grid(n)](W, G, mask, offsets, backup, scale, n, backup.numel(),
                                  HAS_MASK=mask is not None, ADAPTIVE=adaptive, CHUNKS=CONFIG.chunks,
                                  **launch_options())


@torch.library.custom_op("ssam_triton::restore_", mutates_args=("W",))
def _restore_(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
              backup: torch.Tensor) -> None:
    n = W.numel()
    if n == 0:
        return
    with _config.on_device(W):
        _restore_kernel[_grid(n)](W, mask, offsets, backup, n, backup.numel(), HAS_MASK=mask is not None,
                                  CHUNKS=CONFIG.chunks, **launch_options())


def perturb_(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, scale: torch.Tensor, adaptive: bool = False) -> None:
    """For every set bit ``i`` (every ``i`` when ``mask`` is None): ``backup[rank(i)] = W[i]``; then, if
    the float32 0-d device tensor ``scale`` is finite and non-zero, ``W[i] = W[i] + scale·g_i``
    (``adaptive``: ``+ scale·w_i²·g_i``) in float64, rounded once to W's dtype. ``scale`` is read in the
    kernel (no host synchronisation). Bounds as in the module doc."""
    _check_offsets_on_cpu(W, mask, offsets)
    _perturb_(W, G, mask, offsets, backup, scale, bool(adaptive))


def restore_(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor) -> None:
    """``W[i] = backup[rank(i)]`` for every set bit ``i`` (every ``i`` when ``mask`` is None); bit-exact."""
    _check_offsets_on_cpu(W, mask, offsets)
    _restore_(W, mask, offsets, backup)


def _check_offsets_on_cpu(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None) -> None:
    """Offsets that do not match the mask raise on CPU tensors, as on every backend (free there)."""
    if mask is not None and offsets is not None and W.device.type == "cpu":
        check_offsets(mask, offsets, W.numel())

