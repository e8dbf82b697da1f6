"""``perturb_`` and ``restore_``: one pass each over the masked entries, with the compact backup.

A program owns ``CHUNKS`` whole 1024-entry chunks, viewed as a ``[CHUNKS·32 words, 32 bits]`` tile
(row ``r`` = mask word ``r``, column ``b`` = bit ``b``, so entry ``32·r + b``). The rank of a set bit is
``offsets[first chunk]`` plus the set bits of the earlier words of the tile (an exclusive scan of the
per-word counts) plus the set bits below it in its own word (an exclusive scan along the row): no
global scan, each chunk's ``offsets`` entry suffices. ``mask=None`` (dense SAM) is the same kernel with
``HAS_MASK=False`` and ``rank(i) = i``.

Lists (issue 15): one launch covers every tensor of a list (one device and dtype; masked and dense
entries in two launches). The launch table, an int64 device tensor, holds one ``(tensor, tile)`` row per
program and one row of addresses and sizes per tensor; each program loads its row and runs the tile
code of the single-tensor case, so a tile never spans two tensors and the offsets stay per chunk. The
single-tensor ops are lists of one.

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
from ._config import CONFIG, launch_table
from ._math import load_scale, perturbed


@triton.jit
def _tile_ranks(mask_ptr, offsets_ptr, N, CAPACITY, pid, HAS_MASK: tl.constexpr, CHUNKS: tl.constexpr):
    """``(index, selected, rank)`` of the entries of tile ``pid`` (int64) of a tensor, each
    ``[CHUNKS·32, 32]``: selected = set bit below ``N`` with ``0 <= rank < CAPACITY``."""
    ROWS: tl.constexpr = CHUNKS * 32  # a chunk of 1024 entries is 32 words
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
def _perturb_tile(w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, scale_ptr, N, CAPACITY, tile,
                  HAS_MASK: tl.constexpr, ADAPTIVE: tl.constexpr, CHUNKS: tl.constexpr):
    """``backup[rank(i)] = w_i``; if ``scale`` (fp32 or fp64, rounded to fp32 unless W is float64) is
    finite and non-zero, ``w_i = w_i + scale·g_i`` (adaptive: ``w_i + scale·((w_i·w_i)·g_i)``) as
    :func:`._math.perturbed` computes it: one correctly rounded fp32 fused multiply-add (float64 W:
    float64 operations), the reference's result bit for bit, with no float64 arithmetic for consumer
    GPUs to run at 1/64 rate."""
    index, selected, rank = _tile_ranks(mask_ptr, offsets_ptr, N, CAPACITY, tile, HAS_MASK, CHUNKS)
    w = tl.load(w_ptr + index, mask=selected)
    tl.store(backup_ptr + rank, w, mask=selected)
    scale, active = load_scale(scale_ptr, w_ptr.dtype.element_ty)
    if active:
        g = tl.load(g_ptr + index, mask=selected)
        tl.store(w_ptr + index, perturbed(w, g, scale, ADAPTIVE), mask=selected)


@triton.jit
def _restore_tile(w_ptr, mask_ptr, offsets_ptr, backup_ptr, N, CAPACITY, tile, HAS_MASK: tl.constexpr,
                  CHUNKS: tl.constexpr):
    """``w_i = backup[rank(i)]`` for the selected entries (a bit copy)."""
    index, selected, rank = _tile_ranks(mask_ptr, offsets_ptr, N, CAPACITY, tile, HAS_MASK, CHUNKS)
    tl.store(w_ptr + index, tl.load(backup_ptr + rank, mask=selected), mask=selected)


@triton.jit
def _table_entry(table_ptr, ENTRIES_AT, w_like, off_like):
    """The tensor and tile of this program from the launch table (:func:`._config.launch_table`):
    ``(w, g, mask, offsets, backup, N, CAPACITY, tile)``, the pointers typed like ``w_like`` /
    ``off_like``."""
    pid = tl.program_id(0).to(tl.int64)
    entry = tl.load(table_ptr + 2 * pid)
    tile = tl.load(table_ptr + 2 * pid + 1)
    row = table_ptr + ENTRIES_AT + entry * _COLUMNS
    w_ptr = tl.load(row).to(tl.pointer_type(w_like.dtype.element_ty))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(w_like.dtype.element_ty))
    mask_ptr = tl.load(row + 2).to(tl.pointer_type(tl.int32))
    offsets_ptr = tl.load(row + 3).to(tl.pointer_type(off_like.dtype.element_ty))
    backup_ptr = tl.load(row + 4).to(tl.pointer_type(w_like.dtype.element_ty))
    return w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, tl.load(row + 5), tl.load(row + 6), tile


@triton.jit
def _perturb_kernel(table_ptr, ENTRIES_AT, w_like, off_like, scale_ptr, HAS_MASK: tl.constexpr,
                    ADAPTIVE: tl.constexpr, CHUNKS: tl.constexpr):
    """:func:`_perturb_tile` on the tile of every program of the table: all tensors in one launch."""
    w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, n, capacity, tile = _table_entry(
        table_ptr, ENTRIES_AT, w_like, off_like)
    _perturb_tile(w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, scale_ptr, n, capacity, tile, HAS_MASK,
                  ADAPTIVE, CHUNKS)


@triton.jit
def _restore_kernel(table_ptr, ENTRIES_AT, w_like, off_like, HAS_MASK: tl.constexpr, CHUNKS: tl.constexpr):
    """:func:`_restore_tile` on the tile of every program of the table."""
    w_ptr, _, mask_ptr, offsets_ptr, backup_ptr, n, capacity, tile = _table_entry(
        table_ptr, ENTRIES_AT, w_like, off_like)
    _restore_tile(w_ptr, mask_ptr, offsets_ptr, backup_ptr, n, capacity, tile, HAS_MASK, CHUNKS)


_COLUMNS = tl.constexpr(7)  # per tensor: w, g, mask, offsets, backup (addresses), N, backup length


def _launch(kernel: triton.JITFunction, W: list[torch.Tensor], G: list[torch.Tensor],
            mask: list[torch.Tensor | None], offsets: list[torch.Tensor | None], backup: list[torch.Tensor],
            *args: object, **constexprs: object) -> None:
    """One launch per kind of entry (masked, dense) over the table of those entries."""
    for masked in (True, False):
        index = [j for j, m in enumerate(mask) if (m is not None) == masked and W[j].numel() > 0]
        if not index:
            continue
        ws, ms, os_ = [W[j] for j in index], [mask[j] for j in index], [offsets[j] for j in index]
        if masked and len({o.dtype for o in os_}) > 1:  # one offsets dtype per launch
            os_ = [o.to(torch.int64) for o in os_]
        columns = [(W[j].data_ptr(), G[j].data_ptr(), m.data_ptr() if masked else 0,
                    o.data_ptr() if masked else 0, backup[j].data_ptr(), W[j].numel(), backup[j].numel())
                   for j, m, o in zip(index, ms, os_, strict=True)]
        chunks = [num_chunks(w.numel()) for w in ws]
        table, programs, entries_at = launch_table(columns, chunks, CONFIG.chunks, ws[0].device)
        with _config.on_device(ws[0]):
            _config.launch(kernel, (programs,), table, entries_at, ws[0], os_[0] if masked else table, *args,
                           HAS_MASK=masked, CHUNKS=CONFIG.chunks, **constexprs)


@torch.library.custom_op("ssam_triton::perturb_multi_", mutates_args=("W", "backup"))
def _perturb_multi_(W: list[torch.Tensor], G: list[torch.Tensor], mask: list[torch.Tensor | None],
                    offsets: list[torch.Tensor | None], backup: list[torch.Tensor], scale: torch.Tensor,
                    adaptive: bool) -> None:
    _launch(_perturb_kernel, W, G, mask, offsets, backup, scale, ADAPTIVE=adaptive)


@torch.library.custom_op("ssam_triton::restore_multi_", mutates_args=("W",))
def _restore_multi_(W: list[torch.Tensor], mask: list[torch.Tensor | None],
                    offsets: list[torch.Tensor | None], backup: list[torch.Tensor]) -> None:
    _launch(_restore_kernel, W, W, mask, offsets, backup)


def perturb_multi_(W: list[torch.Tensor], G: list[torch.Tensor], mask: list[torch.Tensor | None],
                   offsets: list[torch.Tensor | None], backup: list[torch.Tensor], scale: torch.Tensor,
                   adaptive: bool = False) -> None:
    """:func:`perturb_` on every entry of the lists (one device and dtype): one launch for the masked
    entries and one for the dense ones, over a table of the tensors' addresses and tiles."""
    _check_offsets_on_cpu(W, mask, offsets)
    _perturb_multi_(W, G, mask, offsets, backup, scale, bool(adaptive))


def restore_multi_(W: list[torch.Tensor], mask: list[torch.Tensor | None], offsets: list[torch.Tensor | None],
                   backup: list[torch.Tensor]) -> None:
    """:func:`restore_` on every entry of the lists (one device and dtype), as :func:`perturb_multi_`."""
    _check_offsets_on_cpu(W, mask, offsets)
    _restore_multi_(W, mask, offsets, backup)


def perturb_(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, scale: torch.Tensor, adaptive: bool = False) -> None:
    """For every set bit ``i`` (every ``i`` when ``mask`` is None): ``backup[rank(i)] = W[i]``; then, if
    the float32 0-d device tensor ``scale`` is finite and non-zero, ``W[i] = W[i] + scale·g_i``
    (``adaptive``: ``+ scale·w_i²·g_i``) with one fp32 fused multiply-add (float64 W: in float64).
    ``scale`` is read in the kernel (no host synchronisation). Bounds as in the module doc."""
    perturb_multi_([W], [G], [mask], [offsets], [backup], scale, adaptive)


def restore_(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor) -> None:
    """``W[i] = backup[rank(i)]`` for every set bit ``i`` (every ``i`` when ``mask`` is None); bit-exact."""
    restore_multi_([W], [mask], [offsets], [backup])


def _check_offsets_on_cpu(W: list[torch.Tensor], mask: list[torch.Tensor | None],
                          offsets: list[torch.Tensor | None]) -> None:
    """Offsets that do not match the mask raise on CPU tensors, as on every backend (free there), for
    every entry before anything is written; the error names the entry (``offsets[j]``) of a list."""
    for j, (w, m, o) in enumerate(zip(W, mask, offsets, strict=True)):
        if m is not None and o is not None and w.device.type == "cpu":
            check_offsets(m, o, w.numel(), name=f"offsets[{j}]" if len(W) > 1 else "offsets")
