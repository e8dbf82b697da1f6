"""The selection primitives of the radix-select driver (:mod:`ssam_kernels.ops.select`).

Keys are ``reference.score_keys`` computed in unsigned 32-bit arithmetic: for a float score ``x`` (as
fp32, float64 rounded to nearest; ``-0.0`` made ``+0.0``) with bit pattern ``b``, ``key = ~b`` when the
sign bit is set, else ``b | 2^31``; NaN gets key 0; int32 scores are their unsigned value;
``largest=False`` complements the key. Eligibility: no filter, or the entry's filter bit equals
``filter_value``.

Lists: every kernel runs over the launch table of a list of segments
(:func:`._config.launch_table`: one ``(segment, tile)`` row per ``block``-entry tile, then each
segment's addresses and size), so one launch covers any number of segments; the single-segment ops are
lists of one.

* ``radix_histogram_multi``: a persistent kernel over tiles of ``histogram_tiles · block``
  entries (one ``tl.histogram`` per tile); program ``p`` takes the table rows ``p``,
  ``p + programs``, ..., keeps a local ``2^bits``-bin histogram over their tiles and
  writes it to its own row of an int32 buffer, which ``torch.sum`` adds in int64. Integer sums, so the
  result is exact and deterministic.
* ``threshold_mask_multi``: pass A counts the eligible entries equal to the threshold per tile; an int64
  ``torch.cumsum`` over the tiles in list order gives the ties before each tile; pass B assigns every tie
  its rank in list order, keeps ``key > threshold`` and ties with rank ``< tie_quota``, and packs 32 bits
  per word. Entries at or past ``N`` are never selected, so bits past ``N`` are 0.
* ``bucket_mask_multi`` (the driver's bucket path): one launch over the tiles; per tile the words decided
  by the key bits at and above ``shift``, an atomic add of their count per 1024-entry chunk, and the
  tile's undecided entries appended to the candidate buffer at one atomic cursor add per tile (slots by
  an in-tile scan).

These run during a mask update, which synchronises with the host anyway (the driver reads counts), so
they are plain functions rather than registered ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..bitmask import num_words
from ..contract import CHUNK, KEY_SIGN_BIT, NAN_KEY
from ..tuning import DEFAULT, Tuning
from . import _config
from ._config import cdiv, launch_config, launch_table, persistent_programs
from ._convert import to_float32

_CHUNK = tl.constexpr(CHUNK)
_KEY_SIGN_BIT = tl.constexpr(KEY_SIGN_BIT)
_NAN_KEY = tl.constexpr(NAN_KEY)


@triton.jit
def _score_keys(scores_ptr, filter_ptr, index, N, LARGEST: tl.constexpr, INT_SCORES: tl.constexpr,
                HAS_FILTER: tl.constexpr, FILTER_VALUE: tl.constexpr):
    """``(key, eligible)`` of the entries at ``index`` (any shape): uint32 keys, and whether each entry
    is inside ``[0, N)`` and passes the filter."""
    eligible = index < N
    if INT_SCORES:
        key = tl.load(scores_ptr + index, mask=eligible, other=0).to(tl.uint32, bitcast=True)
    else:
        x = to_float32(tl.load(scores_ptr + index, mask=eligible, other=0.0))
        x = tl.where(x == 0.0, 0.0, x)  # -0.0 == +0.0: one key for both
        b = x.to(tl.uint32, bitcast=True)
        key = tl.where(b >= _KEY_SIGN_BIT, ~b, b | _KEY_SIGN_BIT)
        key = tl.where(x != x, tl.full(key.shape, _NAN_KEY, tl.uint32), key)  # NaN below every number
    if not LARGEST:
        key = ~key
    if HAS_FILTER:
        word = tl.load(filter_ptr + index // 32, mask=eligible, other=0)
        # Arithmetic shift of an int32 word; `& 1` keeps only the entry's bit.
        bit = (word >> (index % 32).to(tl.int32)) & 1
        eligible = eligible & ((bit != 0) == FILTER_VALUE)
    return key, eligible


COLUMNS = 6
"""Launch-table columns per segment: scores, filter, words and counts addresses, N, entry position."""
_COLUMNS = tl.constexpr(COLUMNS)


@triton.jit
def _table_segment(table_ptr, ENTRIES_AT, row, scores_like):
    """``(scores_ptr, filter_ptr, words_ptr, N, tile, counts_ptr, start)`` of launch-table row ``row``
    (:func:`._config.launch_table`; per segment the :data:`COLUMNS`: scores, filter, words and chunk
    counts addresses, N, and the segment's first entry position in the selection)."""
    entry = tl.load(table_ptr + 2 * row)
    tile = tl.load(table_ptr + 2 * row + 1)
    columns = table_ptr + ENTRIES_AT + entry * _COLUMNS
    scores_ptr = tl.load(columns).to(tl.pointer_type(scores_like.dtype.element_ty))
    filter_ptr = tl.load(columns + 1).to(tl.pointer_type(tl.int32))
    words_ptr = tl.load(columns + 2).to(tl.pointer_type(tl.int32))
    counts_ptr = tl.load(columns + 3).to(tl.pointer_type(tl.int32))
    return scores_ptr, filter_ptr, words_ptr, tl.load(columns + 4), tile, counts_ptr, tl.load(columns + 5)


@triton.jit
def _histogram_kernel(table_ptr, ENTRIES_AT, ROWS, ITERS, PROGRAMS, scores_like, prefix_ptr, partial_ptr,
                      SHIFT: tl.constexpr, BITS: tl.constexpr, LARGEST: tl.constexpr,
                      INT_SCORES: tl.constexpr, HAS_FILTER: tl.constexpr, FILTER_VALUE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """``partial[p, d]`` = eligible entries of program ``p``'s tiles (table rows ``p``, ``p + PROGRAMS``,
    ...: any segments of the list) whose key has digit ``d`` at ``SHIFT`` and agrees with ``prefix`` on
    the bits above ``SHIFT + BITS``."""
    BINS: tl.constexpr = 1 << BITS
    HIGH: tl.constexpr = SHIFT + BITS
    pid = tl.program_id(0).to(tl.int64)
    prefix = tl.load(prefix_ptr).to(tl.uint32)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for it in range(ITERS):
        row = pid + it * PROGRAMS
        scores_ptr, filter_ptr, _, n, tile, _, _ = _table_segment(table_ptr, ENTRIES_AT,
                                                                 tl.minimum(row, ROWS - 1), scores_like)
        n = tl.where(row < ROWS, n, 0)  # a program past the last row counts nothing
        index = tile * BLOCK + tl.arange(0, BLOCK)
        key, counted = _score_keys(scores_ptr, filter_ptr, index, n, LARGEST, INT_SCORES, HAS_FILTER,
                                   FILTER_VALUE)
        if HIGH < 32:  # a shift by 32 would be undefined; nothing lies above the top digit anyway
            counted = counted & ((key >> HIGH) == (prefix >> HIGH))
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        hist += tl.histogram(digit, BINS, mask=counted)
    tl.store(partial_ptr + pid * BINS + tl.arange(0, BINS), hist)


@triton.jit
def _tie_count_kernel(table_ptr, ENTRIES_AT, scores_like, threshold_ptr, count_ptr, LARGEST: tl.constexpr,
                      INT_SCORES: tl.constexpr, HAS_FILTER: tl.constexpr, FILTER_VALUE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Pass A: ``count[r]`` = eligible entries of the tile of table row ``r`` whose key equals the
    threshold."""
    pid = tl.program_id(0).to(tl.int64)
    scores_ptr, filter_ptr, _, n, tile, _, _ = _table_segment(table_ptr, ENTRIES_AT, pid, scores_like)
    index = tile * BLOCK + tl.arange(0, BLOCK)
    key, eligible = _score_keys(scores_ptr, filter_ptr, index, n, LARGEST, INT_SCORES, HAS_FILTER,
                                FILTER_VALUE)
    equal = eligible & (key == tl.load(threshold_ptr).to(tl.uint32))
    tl.store(count_ptr + pid, tl.sum(equal.to(tl.int32), axis=0))


@triton.jit
def _threshold_mask_kernel(table_ptr, ENTRIES_AT, scores_like, threshold_ptr, quota_ptr, ties_before_ptr,
                           LARGEST: tl.constexpr, INT_SCORES: tl.constexpr, HAS_FILTER: tl.constexpr,
                           FILTER_VALUE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass B: the mask words of the tile of table row ``r``, viewed as ``[BLOCK/32 words, 32 bits]``:
    entries with ``key > threshold``, and ties whose list-order rank (``ties_before[r]`` + ties earlier
    in the tile) is below ``tie_quota``."""
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0).to(tl.int64)
    scores_ptr, filter_ptr, words_ptr, n, tile, _, _ = _table_segment(table_ptr, ENTRIES_AT, pid, scores_like)
    word = tile * ROWS + tl.arange(0, ROWS)
    bit = tl.arange(0, 32)
    index = word[:, None] * 32 + bit[None, :]
    key, eligible = _score_keys(scores_ptr, filter_ptr, index, n, LARGEST, INT_SCORES, HAS_FILTER,
                                FILTER_VALUE)
    threshold = tl.load(threshold_ptr).to(tl.uint32)
    equal = (eligible & (key == threshold)).to(tl.int32)
    per_word = tl.sum(equal, axis=1)
    earlier = (tl.cumsum(per_word, axis=0) - per_word)[:, None] + tl.cumsum(equal, axis=1) - equal
    tie_rank = tl.load(ties_before_ptr + pid) + earlier.to(tl.int64)
    selected = eligible & ((key > threshold) | ((equal != 0) & (tie_rank < tl.load(quota_ptr))))
    # Distinct powers of two: their sum is their bitwise OR (no carries).
    packed = tl.sum(selected.to(tl.uint32) << bit[None, :].to(tl.uint32), axis=1)
    tl.store(words_ptr + word, packed.to(tl.int32, bitcast=True), mask=word * 32 < n)


@triton.jit
def _bucket_mask_kernel(table_ptr, ENTRIES_AT, scores_like, prefix_ptr, candidates_ptr, CAPACITY, cursor_ptr,
                        SHIFT: tl.constexpr, LARGEST: tl.constexpr, INT_SCORES: tl.constexpr,
                        HAS_FILTER: tl.constexpr, FILTER_VALUE: tl.constexpr, BLOCK: tl.constexpr,
                        PART: tl.constexpr):
    """The mask words of the tile of table row ``r`` decided by the key bits at and above ``SHIFT``
    (eligible, ``key >> SHIFT > prefix >> SHIFT``), their count added to each 1024-entry chunk's
    ``counts`` (``PART = min(BLOCK, 1024)`` entries per add), and the undecided eligible entries
    (``key >> SHIFT == prefix >> SHIFT``) appended to ``candidates`` at ``cursor`` (an atomic slot count
    per tile; slots past ``CAPACITY`` are counted, not written) as ``(low << 53) | position``: ``low`` the
    complement of the key's bits below ``SHIFT`` and ``position`` = the segment's ``start`` + index, so
    ascending candidates are in selection order (key descending, then entry order)."""
    ROWS: tl.constexpr = BLOCK // 32
    LOW: tl.constexpr = (1 << SHIFT) - 1
    pid = tl.program_id(0).to(tl.int64)
    scores_ptr, filter_ptr, words_ptr, n, tile, counts_ptr, start = _table_segment(table_ptr, ENTRIES_AT, pid,
                                                                                   scores_like)
    word = tile * ROWS + tl.arange(0, ROWS)
    bit = tl.arange(0, 32)
    index = word[:, None] * 32 + bit[None, :]
    key, eligible = _score_keys(scores_ptr, filter_ptr, index, n, LARGEST, INT_SCORES, HAS_FILTER,
                                FILTER_VALUE)
    high = key >> SHIFT
    bucket = tl.load(prefix_ptr).to(tl.uint32) >> SHIFT
    selected = eligible & (high > bucket)
    packed = tl.sum(selected.to(tl.uint32) << bit[None, :].to(tl.uint32), axis=1)
    tl.store(words_ptr + word, packed.to(tl.int32, bitcast=True), mask=word * 32 < n)
    per_part = tl.sum(tl.reshape(tl.sum(selected.to(tl.int32), axis=1), (BLOCK // PART, PART // 32)), axis=1)
    part_start = tile * BLOCK + tl.arange(0, BLOCK // PART) * PART
    tl.atomic_add(counts_ptr + part_start // _CHUNK, per_part, mask=part_start < n)
    undecided = (eligible & (high == bucket)).to(tl.int32)
    found = tl.sum(tl.sum(undecided, axis=1), axis=0)
    if found > 0:
        first = tl.atomic_add(cursor_ptr, found).to(tl.int64)
        per_word = tl.sum(undecided, axis=1)
        earlier = (tl.cumsum(per_word, axis=0) - per_word)[:, None] + tl.cumsum(undecided, axis=1) - undecided
        slot = first + earlier.to(tl.int64)
        value = ((LOW - (key & LOW)).to(tl.int64) << 53) | (start + index)
        tl.store(candidates_ptr + slot, value, mask=(undecided != 0) & (slot < CAPACITY))


def _key_flags(scores: torch.Tensor, largest: bool, filters: list[torch.Tensor | None],
               filter_value: bool) -> dict[str, bool]:
    return {"LARGEST": bool(largest), "INT_SCORES": scores.dtype == torch.int32,
            "HAS_FILTER": filters[0] is not None, "FILTER_VALUE": bool(filter_value)}


def _table(scores: list[torch.Tensor], filters: list[torch.Tensor | None], tile: int,
           words: list[torch.Tensor] | None = None, counts: list[torch.Tensor] | None = None,
           starts: list[int] | None = None) -> tuple[torch.Tensor, int, int]:
    """The launch table of a selection list: one row per ``tile``-entry tile of every segment, then per
    segment its :data:`COLUMNS` (absent addresses and positions 0)."""
    def address(ts: list[torch.Tensor | None] | None, j: int) -> int:
        return ts[j].data_ptr() if ts is not None and ts[j] is not None else 0
    columns = [(s.data_ptr(), address(filters, j), address(words, j), address(counts, j), s.numel(),
                starts[j] if starts is not None else 0) for j, s in enumerate(scores)]
    return launch_table(columns, [s.numel() for s in scores], tile, scores[0].device)


def radix_histogram_multi(scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, bits: int,
                          largest: bool, filters: list[torch.Tensor | None], filter_value: bool = True, *,
                          tuning: Tuning = DEFAULT) -> torch.Tensor:
    """The sum over the list (one device and dtype; ``filters`` all None or all tensors) of
    :func:`radix_histogram`: one launch of a persistent kernel over the tiles of every segment."""
    device, config = scores[0].device, launch_config(tuning)
    block = config.block * config.histogram_tiles
    table, rows, entries_at = _table(scores, filters, block)
    if rows == 0:
        return torch.zeros(1 << bits, dtype=torch.int64, device=device)
    programs = min(rows, persistent_programs(device, config))
    partial = torch.empty(programs, 1 << bits, dtype=torch.int32, device=device)
    with _config.on_device(scores[0]):
        _config.launch(_histogram_kernel, (programs,), config, table, entries_at, rows, cdiv(rows, programs),
                       programs, scores[0], prefix, partial, SHIFT=shift, BITS=bits, BLOCK=block,
                       **_key_flags(scores[0], largest, filters, filter_value))
    return partial.sum(dim=0, dtype=torch.int64)


def radix_histogram(scores: torch.Tensor, prefix: torch.Tensor, shift: int, bits: int, largest: bool,
                    filter_words: torch.Tensor | None = None, filter_value: bool = True, *,
                    tuning: Tuning = DEFAULT) -> torch.Tensor:
    """Counts of the eligible entries whose key agrees with ``prefix`` above bit ``shift + bits``, by
    the key's digit ``(key >> shift) & (2^bits - 1)``: an int64 tensor of ``2^bits`` counts.

    ``prefix`` is an int64 0-d tensor on ``scores``' device, read in the kernel.
    """
    return radix_histogram_multi([scores], prefix, shift, bits, largest, [filter_words], filter_value,
                                 tuning=tuning)


def threshold_mask_multi(scores: list[torch.Tensor], threshold: torch.Tensor, tie_quota: torch.Tensor,
                         largest: bool, filters: list[torch.Tensor | None], filter_value: bool = True, *,
                         tuning: Tuning = DEFAULT) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The mask words of each segment (eligible keys > ``threshold``, then the first ``tie_quota`` eligible
    ties of the list in list order) and the quota left, ``max(tie_quota - ties, 0)``: two launches (tie
    counts per tile, then the words) over the tiles of every segment, with an int64 scan between."""
    device = scores[0].device
    words = [torch.empty(num_words(s.numel()), dtype=torch.int32, device=device) for s in scores]
    config = launch_config(tuning)
    table, rows, entries_at = _table(scores, filters, config.block, words)
    if rows == 0:
        return words, tie_quota.clamp(min=0)
    flags = _key_flags(scores[0], largest, filters, filter_value)
    counts = torch.empty(rows, dtype=torch.int32, device=device)
    with _config.on_device(scores[0]):
        _config.launch(_tie_count_kernel, (rows,), config, table, entries_at, scores[0], threshold, counts,
                       BLOCK=config.block, **flags)
        ties_end = torch.cumsum(counts, dim=0, dtype=torch.int64)
        _config.launch(_threshold_mask_kernel, (rows,), config, table, entries_at, scores[0], threshold,
                       tie_quota, ties_end - counts, BLOCK=config.block, **flags)
    return words, (tie_quota - ties_end[-1]).clamp(min=0)


def threshold_mask(scores: torch.Tensor, threshold: torch.Tensor, tie_quota: torch.Tensor, largest: bool,
                   filter_words: torch.Tensor | None = None, filter_value: bool = True, *,
                   tuning: Tuning = DEFAULT) -> torch.Tensor:
    """Mask words selecting the eligible entries with key > ``threshold``, plus the first ``tie_quota``
    eligible entries (in index order) with key == ``threshold``.

    ``threshold`` and ``tie_quota`` are int64 0-d tensors on ``scores``' device, read in the kernels.
    """
    return threshold_mask_multi([scores], threshold, tie_quota, largest, [filter_words], filter_value,
                                tuning=tuning)[0][0]


BUCKET_MASK_DEVICES = ("cpu", "cuda")
"""Device types :func:`bucket_mask_multi` runs on (CPU tensors: in the interpreter)."""


def bucket_mask_multi(scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, largest: bool,
                      filters: list[torch.Tensor | None], filter_value: bool, words: list[torch.Tensor],
                      counts: list[torch.Tensor], starts: list[int], candidates: torch.Tensor,
                      cursor: torch.Tensor, *, tuning: Tuning = DEFAULT) -> None:
    """The mask pass of a selection whose threshold is known above bit ``shift`` (``prefix``, int64 0-d):
    writes ``words[s]`` (the eligible entries with ``key >> shift > prefix >> shift``), adds their count
    per 1024-entry chunk to ``counts[s]`` (int32, zeroed by the caller) and appends the undecided
    eligible entries (``key >> shift == prefix >> shift``) to ``candidates`` (int64) at ``cursor`` (int32,
    one entry, counts every one; only slots below ``candidates.numel()`` are written) as
    ``(2^shift - 1 - (key & (2^shift - 1))) << 53 | (starts[s] + index)``. One launch over every tile."""
    config = launch_config(tuning)
    table, rows, entries_at = _table(scores, filters, config.block, words, counts, starts)
    if rows == 0:
        return
    with _config.on_device(scores[0]):
        _config.launch(_bucket_mask_kernel, (rows,), config, table, entries_at, scores[0], prefix, candidates,
                       candidates.numel(), cursor, SHIFT=shift, BLOCK=config.block,
                       PART=min(config.block, CHUNK), **_key_flags(scores[0], largest, filters, filter_value))
