"""``perturb_`` and ``restore_``: one pass each over the masked entries, with the compact backup.

A program owns ``CHUNKS`` whole 1024-entry chunks: ``CHUNKS·32`` mask words of 32 entries, each word's
entries in 16-byte groups of ``VEC`` (:func:`_tile_entries`; entry ``32·r + b`` is bit ``b`` of word
``r``). The rank of a set bit is
``offsets[first chunk]`` plus the set bits of the earlier words of the tile (an exclusive scan of the
per-word counts) plus the set bits below it in its own word (an exclusive scan along the row): no
global scan, each chunk's ``offsets`` entry suffices. ``mask=None`` (dense SAM) is the same kernel with
``HAS_MASK=False`` and ``rank(i) = i``.

Lists: one launch covers every tensor of a list of one device and dtype, masked or dense,
whose pointers all start on 16-byte boundaries (:func:`_launch`: up to four launches, masked/dense ×
aligned/not). The launch table, an int64 device tensor, holds one ``(tensor, tile)`` row per
program and one row of addresses and sizes per tensor; each program loads its row and runs the tile
code of the single-tensor case, so a tile never spans two tensors and the offsets stay per chunk. The
single-tensor ops are lists of one.

Bounds (``ssam_kernels.ops.perturb_``): bits at or past ``N`` are dropped before ranks are counted, and
an entry is selected only if its rank lies in ``[0, CAPACITY)``, the backup's length, so a short backup
or offsets that do not match the mask never address memory outside ``W`` and the backup. W and G move
in whole 16-byte groups below ``N``: an unselected entry of a group that holds a selected one is read
and written back with its own bits; the partial last group is accessed per entry. Offsets are
checked against the mask on the host for CPU tensors (the interpreter); on a GPU that would synchronise.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..bitmask import check_offsets, num_chunks
from ..contract import WORDS_PER_CHUNK
from ..tuning import DEFAULT, Tuning
from . import _config
from ._config import launch_table
from ._math import load_scale, perturbed

_ALIGN = tl.constexpr(_config.ALIGN)
_WORDS_PER_CHUNK = tl.constexpr(WORDS_PER_CHUNK)


@triton.jit
def _popcount(x):
    """Set bits of each uint32 of ``x`` (int32): the SWAR bit count, a few integer ops per value."""
    x = x - ((x >> 1) & 0x55555555)
    x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
    x = (x + (x >> 4)) & 0x0F0F0F0F
    return ((x * 0x01010101) >> 24).to(tl.int32)


@triton.jit
def _word_bits(mask_ptr, word, N):
    """Mask word(s) ``word`` (int64) as uint32 with the bits of entries at or past ``N`` cleared."""
    entries = N - word * 32  # entries of the tensor from the word's first one on
    raw = tl.load(mask_ptr + word, mask=entries > 0, other=0).to(tl.uint32, bitcast=True)
    below = (tl.full(raw.shape, 1, tl.uint32) << tl.minimum(tl.maximum(entries, 0), 31).to(tl.uint32)) - 1
    return raw & tl.where(entries >= 32, tl.full(raw.shape, 0xFFFFFFFF, tl.uint32), below)


@triton.jit
def _lane_select(bits, lane, base, low, high):
    """``(selected, rank)`` of the entry at bit ``lane`` (uint32) of the word(s) ``bits`` (uint32), whose
    first set bit has tile-local rank ``base`` (int32): rank = base + set bits below the lane; selected =
    its bit set and ``low <= rank < high`` (the backup's bounds, tile-local)."""
    rank = base + _popcount(bits & ((tl.full(lane.shape, 1, tl.uint32) << lane) - 1))
    return (((bits >> lane) & 1) != 0) & (rank >= low) & (rank < high), rank


@triton.jit
def _tile_entries(mask_ptr, offsets_ptr, N, CAPACITY, tile, HAS_MASK: tl.constexpr, CHUNKS: tl.constexpr,
                  VEC: tl.constexpr):
    """The entries of tile ``tile`` (int64) of a tensor as a ``[CHUNKS·32 words, 32 / VEC groups, VEC]``
    tile (entry ``start + 32·row + VEC·group + lane``; a group is 16 bytes of W), restricted to the groups
    that lie wholly below ``N``: ``(start, first, index, rank, selected, touched, full)``, with tile-local
    int32 ``index`` (entry ``start + index``) and ``rank`` (backup slot ``first + rank``). ``selected``: a
    set bit whose slot lies in ``[0, CAPACITY)`` (dense: every entry of those groups); ``touched`` /
    ``full``: some / every entry of the entry's group selected. The two are constant across a group, so
    accesses masked by them are whole-group vector accesses. Last, ``(bits, before, low, high)``, the
    word data :func:`_tail_entries` reuses (dense: unused zeros)."""
    ROWS: tl.constexpr = CHUNKS * _WORDS_PER_CHUNK
    GROUPS: tl.constexpr = 32 // VEC
    start = tile * (ROWS * 32)
    room = tl.minimum(N - start, ROWS * 32).to(tl.int32)  # entries of the tile below N (> 0)
    row = tl.arange(0, ROWS)
    group = tl.arange(0, GROUPS)
    lane = (group[:, None] * VEC + tl.arange(0, VEC)[None, :]).to(tl.uint32)  # bit of the word
    index = row[:, None, None] * 32 + lane[None, :, :].to(tl.int32)
    whole = row[:, None] * 32 + (group[None, :] + 1) * VEC <= room  # [ROWS, GROUPS]
    if HAS_MASK:
        # Per word: its bits (the mask word, loaded once) and the set bits of the tile's earlier words;
        # per lane: the set bits below it in its word. No scan across lanes.
        bits = _word_bits(mask_ptr, tile * ROWS + row, N)
        count = _popcount(bits)
        before = tl.cumsum(count, axis=0) - count
        first = tl.load(offsets_ptr + tile * CHUNKS).to(tl.int64)
        # The backup's bounds as tile-local ranks (a tile has at most ROWS·32 set bits).
        low = tl.minimum(tl.maximum(-first, 0), ROWS * 32).to(tl.int32)
        high = tl.minimum(tl.maximum(CAPACITY - first, 0), ROWS * 32).to(tl.int32)
        selected, rank = _lane_select(bits[:, None, None], lane[None, :, :], before[:, None, None], low, high)
        selected = selected & whole[:, :, None]
        touched = tl.max(selected.to(tl.int32), axis=2) != 0
        full = tl.min(selected.to(tl.int32), axis=2) != 0
    else:
        bits, before, first, low, high = tl.zeros([ROWS], tl.uint32), tl.zeros([ROWS], tl.int32), start, 0, 0
        rank = index
        selected = tl.broadcast_to(whole[:, :, None], index.shape)
        touched = whole
        full = whole
    return start, first, index, rank, selected, touched[:, :, None], full[:, :, None], bits, before, low, high


@triton.jit
def _tail_entries(N, start, bits, before, low, high, HAS_MASK: tl.constexpr, VEC: tl.constexpr):
    """``(index, rank, selected)`` (tile-local, as :func:`_tile_entries`) of the last ``N % VEC`` entries
    of the tensor (a partial group, in one word), given the word data of the tile that holds them; per
    entry: a vector access to the group would pass ``N``."""
    first = (N - N % VEC - start).to(tl.int32)
    index = first + tl.arange(0, VEC)
    if HAS_MASK:
        at = tl.arange(0, bits.shape[0]) == first // 32  # the row of the tail's word
        selected, rank = _lane_select(tl.sum(tl.where(at, bits, 0), axis=0), (index % 32).to(tl.uint32),
                                      tl.sum(tl.where(at, before, 0), axis=0), low, high)
    else:
        rank = index
        selected = index < N - start
    return index, rank, selected


@triton.jit
def _has_tail(N, tile, CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """Whether tile ``tile`` holds the partial last group of its tensor (``N % VEC != 0``)."""
    word = (N - N % VEC) // 32
    return (N % VEC != 0) & (word >= tile * CHUNKS * 32) & (word < (tile + 1) * CHUNKS * 32)


@triton.jit
def _perturb_entries(w_ptr, g_ptr, backup_ptr, index, rank, selected, touched, scale, active,
                     ADAPTIVE: tl.constexpr):
    """``backup[rank] = w`` where ``selected``; if ``active``, ``w = w + scale·g`` (see
    :func:`_perturb_tile`) where ``selected``. W and G are read and W written where ``touched`` (the
    unselected entries of a touched group are written back unchanged, bit for bit)."""
    w = tl.load(w_ptr + index, mask=touched)
    tl.store(backup_ptr + rank, w, mask=selected)
    if active:
        g = tl.load(g_ptr + index, mask=touched)
        tl.store(w_ptr + index, tl.where(selected, perturbed(w, g, scale, ADAPTIVE), w), mask=touched)


@triton.jit
def _perturb_tile(w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, scale_ptr, N, CAPACITY, tile,
                  HAS_MASK: tl.constexpr, ADAPTIVE: tl.constexpr, CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """``backup[rank(i)] = w_i``; if ``scale`` (fp32 or fp64, rounded to fp32 unless W is float64) is
    finite and non-zero, ``w_i = w_i + scale·g_i`` (adaptive: ``w_i + scale·((w_i·w_i)·g_i)``) as
    :func:`._math.perturbed` computes it: one correctly rounded fp32 fused multiply-add (float64 W:
    float64 operations), the reference's result bit for bit, with no float64 arithmetic for consumer
    GPUs to run at 1/64 rate.

    The groups wholly below ``N`` take whole-group (vector) accesses, the partial last group of the
    tensor per-entry ones (:func:`_tail_entries`)."""
    # First: the scale's latency overlaps the mask loads.
    scale, active = load_scale(scale_ptr, w_ptr.dtype.element_ty)
    start, first, index, rank, selected, touched, _, bits, before, low, high = _tile_entries(
        mask_ptr, offsets_ptr, N, CAPACITY, tile, HAS_MASK, CHUNKS, VEC)
    w_ptr, g_ptr, backup_ptr = w_ptr + start, g_ptr + start, backup_ptr + first  # int32 offsets below
    _perturb_entries(w_ptr, g_ptr, backup_ptr, index, rank, selected, touched, scale, active, ADAPTIVE)
    if _has_tail(N, tile, CHUNKS, VEC):
        t_index, t_rank, t_selected = _tail_entries(N, start, bits, before, low, high, HAS_MASK, VEC)
        _perturb_entries(w_ptr, g_ptr, backup_ptr, t_index, t_rank, t_selected, t_selected, scale, active,
                         ADAPTIVE)


@triton.jit
def _restore_entries(w_ptr, backup_ptr, index, rank, selected, touched, partial, HAS_MASK: tl.constexpr):
    """``w = backup[rank]`` where ``selected``, W written where ``touched``; W is read only where
    ``partial`` (a touched group not wholly selected, whose other entries are written back as read)."""
    value = tl.load(backup_ptr + rank, mask=selected)
    if HAS_MASK:
        value = tl.where(selected, value, tl.load(w_ptr + index, mask=partial))
    tl.store(w_ptr + index, value, mask=touched)


@triton.jit
def _restore_tile(w_ptr, mask_ptr, offsets_ptr, backup_ptr, N, CAPACITY, tile, HAS_MASK: tl.constexpr,
                  CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """``w_i = backup[rank(i)]`` for the selected entries (a bit copy); accesses as in
    :func:`_perturb_tile`."""
    start, first, index, rank, selected, touched, full, bits, before, low, high = _tile_entries(
        mask_ptr, offsets_ptr, N, CAPACITY, tile, HAS_MASK, CHUNKS, VEC)
    w_ptr, backup_ptr = w_ptr + start, backup_ptr + first  # int32 offsets below
    _restore_entries(w_ptr, backup_ptr, index, rank, selected, touched, touched & ~full, HAS_MASK)
    if _has_tail(N, tile, CHUNKS, VEC):
        t_index, t_rank, t_selected = _tail_entries(N, start, bits, before, low, high, HAS_MASK, VEC)
        _restore_entries(w_ptr, backup_ptr, t_index, t_rank, t_selected, t_selected, t_selected & ~t_selected,
                         HAS_MASK)


@triton.jit
def _table_entry(table_ptr, ENTRIES_AT, w_like, off_like, ALIGNED: tl.constexpr):
    """The tensor and tile of this program from the launch table (:func:`._config.launch_table`):
    ``(w, g, mask, offsets, backup, N, CAPACITY, tile)``, the pointers typed like ``w_like`` /
    ``off_like``; ``ALIGNED``: W, G and the backup start on 16-byte boundaries (:func:`._config.aligned`
    checked it for every tensor of the table), which lets their accesses be vectors."""
    pid = tl.program_id(0).to(tl.int64)
    entry = tl.load(table_ptr + 2 * pid)
    tile = tl.load(table_ptr + 2 * pid + 1)
    row = table_ptr + ENTRIES_AT + entry * _COLUMNS
    w_ptr = tl.load(row).to(tl.pointer_type(w_like.dtype.element_ty))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(w_like.dtype.element_ty))
    mask_ptr = tl.load(row + 2).to(tl.pointer_type(tl.int32))
    offsets_ptr = tl.load(row + 3).to(tl.pointer_type(off_like.dtype.element_ty))
    backup_ptr = tl.load(row + 4).to(tl.pointer_type(w_like.dtype.element_ty))
    if ALIGNED:
        w_ptr = tl.multiple_of(w_ptr, _ALIGN)
        g_ptr = tl.multiple_of(g_ptr, _ALIGN)
        backup_ptr = tl.multiple_of(backup_ptr, _ALIGN)
    return w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, tl.load(row + 5), tl.load(row + 6), tile


@triton.jit
def _perturb_kernel(table_ptr, ENTRIES_AT, w_like, off_like, scale_ptr, HAS_MASK: tl.constexpr,
                    ADAPTIVE: tl.constexpr, ALIGNED: tl.constexpr, CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """:func:`_perturb_tile` on the tile of every program of the table: all tensors in one launch."""
    w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, n, capacity, tile = _table_entry(
        table_ptr, ENTRIES_AT, w_like, off_like, ALIGNED)
    _perturb_tile(w_ptr, g_ptr, mask_ptr, offsets_ptr, backup_ptr, scale_ptr, n, capacity, tile, HAS_MASK,
                  ADAPTIVE, CHUNKS, VEC)


@triton.jit
def _restore_kernel(table_ptr, ENTRIES_AT, w_like, off_like, HAS_MASK: tl.constexpr, ALIGNED: tl.constexpr,
                    CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """:func:`_restore_tile` on the tile of every program of the table."""
    w_ptr, _, mask_ptr, offsets_ptr, backup_ptr, n, capacity, tile = _table_entry(
        table_ptr, ENTRIES_AT, w_like, off_like, ALIGNED)
    _restore_tile(w_ptr, mask_ptr, offsets_ptr, backup_ptr, n, capacity, tile, HAS_MASK, CHUNKS, VEC)


_COLUMNS = tl.constexpr(7)  # per tensor: w, g, mask, offsets, backup (addresses), N, backup length


def _launch(kernel: triton.JITFunction, W: list[torch.Tensor], G: list[torch.Tensor],
            mask: list[torch.Tensor | None], offsets: list[torch.Tensor | None], backup: list[torch.Tensor],
            launch: list[int], *args: object, **constexprs: object) -> None:
    """One launch per kind of entry (masked, dense) and alignment (:func:`._config.aligned` of W, G and
    the backup: an ``ALIGNED`` launch declares all three 16-byte aligned) over the table of those entries."""
    config = _config.from_ints(launch)

    def kind(j: int) -> tuple[bool, bool]:
        return mask[j] is not None, _config.aligned(W[j], G[j], backup[j])

    for masked, aligned in ((True, True), (True, False), (False, True), (False, False)):
        index = [j for j in range(len(W)) if W[j].numel() > 0 and kind(j) == (masked, aligned)]
        if not index:
            continue
        ws, ms, os_ = [W[j] for j in index], [mask[j] for j in index], [offsets[j] for j in index]
        if masked and len({o.dtype for o in os_}) > 1:  # one offsets dtype per launch
            os_ = [o.to(torch.int64) for o in os_]
        columns = [(W[j].data_ptr(), G[j].data_ptr(), m.data_ptr() if masked else 0,
                    o.data_ptr() if masked else 0, backup[j].data_ptr(), W[j].numel(), backup[j].numel())
                   for j, m, o in zip(index, ms, os_, strict=True)]
        chunks = [num_chunks(w.numel()) for w in ws]
        table, programs, entries_at = launch_table(columns, chunks, config.chunks, ws[0].device)
        with _config.on_device(ws[0]):
            _config.launch(kernel, (programs,), config, table, entries_at, ws[0], os_[0] if masked else table,
                           *args, HAS_MASK=masked, ALIGNED=aligned, CHUNKS=config.chunks,
                           VEC=_config.vector_entries(ws[0]), **constexprs)


@torch.library.custom_op("ssam_kernels::triton_perturb_multi_", mutates_args=("W", "backup"))
def _perturb_multi_(W: list[torch.Tensor], G: list[torch.Tensor], mask: list[torch.Tensor | None],
                    offsets: list[torch.Tensor | None], backup: list[torch.Tensor], scale: torch.Tensor,
                    adaptive: bool, launch: list[int]) -> None:
    _launch(_perturb_kernel, W, G, mask, offsets, backup, launch, scale, ADAPTIVE=adaptive)


@torch.library.custom_op("ssam_kernels::triton_restore_multi_", mutates_args=("W",))
def _restore_multi_(W: list[torch.Tensor], mask: list[torch.Tensor | None],
                    offsets: list[torch.Tensor | None], backup: list[torch.Tensor], launch: list[int]
                    ) -> None:
    _launch(_restore_kernel, W, W, mask, offsets, backup, launch)


def perturb_multi_(W: list[torch.Tensor], G: list[torch.Tensor], mask: list[torch.Tensor | None],
                   offsets: list[torch.Tensor | None], backup: list[torch.Tensor], scale: torch.Tensor,
                   adaptive: bool = False, *, tuning: Tuning = DEFAULT) -> None:
    """:func:`perturb_` on every entry of the lists (one device and dtype): one launch per kind of entry
    (masked, dense) and alignment (:func:`_launch`), over a table of the tensors' addresses and tiles."""
    _check_offsets_on_cpu(W, mask, offsets)
    launch = _config.as_ints(_config.launch_config(tuning))
    _perturb_multi_(W, G, mask, offsets, backup, scale, bool(adaptive), launch)


def restore_multi_(W: list[torch.Tensor], mask: list[torch.Tensor | None], offsets: list[torch.Tensor | None],
                   backup: list[torch.Tensor], *, tuning: Tuning = DEFAULT) -> None:
    """:func:`restore_` on every entry of the lists (one device and dtype), as :func:`perturb_multi_`."""
    _check_offsets_on_cpu(W, mask, offsets)
    _restore_multi_(W, mask, offsets, backup, _config.as_ints(_config.launch_config(tuning)))


def perturb_(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, scale: torch.Tensor, adaptive: bool = False, *, tuning: Tuning = DEFAULT
             ) -> None:
    """For every set bit ``i`` (every ``i`` when ``mask`` is None): ``backup[rank(i)] = W[i]``; then, if
    the 0-d device tensor ``scale`` (float32 or float64; rounded to fp32 unless W is float64) is finite
    and non-zero, ``W[i] = W[i] + scale·g_i``
    (``adaptive``: ``+ scale·w_i²·g_i``) with one fp32 fused multiply-add (float64 W: in float64).
    ``scale`` is read in the kernel (no host synchronisation). Bounds as in the module doc."""
    perturb_multi_([W], [G], [mask], [offsets], [backup], scale, adaptive, tuning=tuning)


def restore_(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, *, tuning: Tuning = DEFAULT) -> None:
    """``W[i] = backup[rank(i)]`` for every set bit ``i`` (every ``i`` when ``mask`` is None); bit-exact."""
    restore_multi_([W], [mask], [offsets], [backup], tuning=tuning)


def _check_offsets_on_cpu(W: list[torch.Tensor], mask: list[torch.Tensor | None],
                          offsets: list[torch.Tensor | None]) -> None:
    """Offsets that do not match the mask raise on CPU tensors, as on every backend (free there), for
    every entry before anything is written; the error names the entry (``offsets[j]``) of a list."""
    for j, (w, m, o) in enumerate(zip(W, mask, offsets, strict=True)):
        if m is not None and o is not None and w.device.type == "cpu":
            check_offsets(m, o, w.numel(), name=f"offsets[{j}]" if len(W) > 1 else "offsets")
