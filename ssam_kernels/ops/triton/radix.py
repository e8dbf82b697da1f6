"""The selection primitives of the radix-select driver (:mod:`ssam_kernels.ops.select`).

Keys are ``reference.score_keys`` computed in unsigned 32-bit arithmetic: for a float score ``x`` (as
fp32, float64 rounded to nearest; ``-0.0`` made ``+0.0``) with bit pattern ``b``, ``key = ~b`` when the
sign bit is set, else ``b | 2^31``; NaN gets key 0; int32 scores are their unsigned value;
``largest=False`` complements the key. Eligibility: no filter, or the entry's filter bit equals
``filter_value``.

* ``radix_histogram``: a persistent (grid-stride) kernel; each program keeps a local ``2^bits``-bin
  histogram (``tl.histogram``) over its tiles and writes it to its own row of an int32 buffer, which
  ``torch.sum`` adds in int64. Integer sums, so the result is exact and deterministic.
* ``threshold_mask``: pass A counts the eligible entries equal to the threshold per tile; an int64
  exclusive ``torch.cumsum`` over tiles gives the ties before each tile; pass B assigns every tie its
  rank in index order, keeps ``key > threshold`` and ties with rank ``< tie_quota``, and packs 32 bits
  per word. Entries at or past ``N`` are never selected, so bits past ``N`` are 0.

These run during a mask update, which synchronises with the host anyway (the driver reads counts), so
they are plain functions rather than registered ops.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..bitmask import num_words
from . import _config
from ._config import CONFIG, cdiv, launch_options, persistent_programs
from ._convert import to_float32


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
        key = tl.where(b >= 0x80000000, ~b, b | 0x80000000)
        key = tl.where(x != x, tl.zeros_like(key), key)  # NaN below every number
    if not LARGEST:
        key = ~key
    if HAS_FILTER:
        word = tl.load(filter_ptr + index // 32, mask=eligible, other=0)
        # Arithmetic shift of an int32 word; `& 1` keeps only the entry's bit.
        bit = (word >> (index % 32).to(tl.int32)) & 1
        eligible = eligible & ((bit != 0) == FILTER_VALUE)
    return key, eligible


@triton.jit
def _histogram_kernel(scores_ptr, filter_ptr, prefix_ptr, partial_ptr, N, ITERS, PROGRAMS,
                      SHIFT: tl.constexpr, BITS: tl.constexpr, LARGEST: tl.constexpr,
                      INT_SCORES: tl.constexpr, HAS_FILTER: tl.constexpr, FILTER_VALUE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """``partial[p, d]`` = eligible entries of program ``p``'s tiles whose key has digit ``d`` at
    ``SHIFT`` and agrees with ``prefix`` on the bits above ``SHIFT + BITS``."""
    BINS: tl.constexpr = 1 << BITS
    HIGH: tl.constexpr = SHIFT + BITS
    pid = tl.program_id(0).to(tl.int64)
    prefix = tl.load(prefix_ptr).to(tl.uint32)
    hist = tl.zeros([BINS], dtype=tl.int32)
    for it in range(ITERS):
        index = (pid + it * PROGRAMS) * BLOCK + tl.arange(0, BLOCK)
        key, counted = _score_keys(scores_ptr, filter_ptr, index, N, LARGEST, INT_SCORES, HAS_FILTER,
                                   FILTER_VALUE)
        if HIGH < 32:  # a shift by 32 would be undefined; nothing lies above the top digit anyway
            counted = counted & ((key >> HIGH) == (prefix >> HIGH))
        digit = ((key >> SHIFT) & (BINS - 1)).to(tl.int32)
        hist += tl.histogram(digit, BINS, mask=counted)
    tl.store(partial_ptr + pid * BINS + tl.arange(0, BINS), hist)


@triton.jit
def _tie_count_kernel(scores_ptr, filter_ptr, threshold_ptr, count_ptr, N, LARGEST: tl.constexpr,
                      INT_SCORES: tl.constexpr, HAS_FILTER: tl.constexpr, FILTER_VALUE: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Pass A: ``count[t]`` = eligible entries of tile ``t`` whose key equals the threshold."""
    pid = tl.program_id(0).to(tl.int64)
    index = pid * BLOCK + tl.arange(0, BLOCK)
    key, eligible = _score_keys(scores_ptr, filter_ptr, index, N, LARGEST, INT_SCORES, HAS_FILTER,
                                FILTER_VALUE)
    equal = eligible & (key == tl.load(threshold_ptr).to(tl.uint32))
    tl.store(count_ptr + pid, tl.sum(equal.to(tl.int32), axis=0))


@triton.jit
def _threshold_mask_kernel(scores_ptr, filter_ptr, threshold_ptr, quota_ptr, ties_before_ptr, words_ptr, N,
                           LARGEST: tl.constexpr, INT_SCORES: tl.constexpr, HAS_FILTER: tl.constexpr,
                           FILTER_VALUE: tl.constexpr, BLOCK: tl.constexpr):
    """Pass B: the mask words of tile ``t``, viewed as ``[BLOCK/32 words, 32 bits]``: entries with
    ``key > threshold``, and ties whose index-order rank (``ties_before[t]`` + ties earlier in the tile)
    is below ``tie_quota``."""
    ROWS: tl.constexpr = BLOCK // 32
    pid = tl.program_id(0).to(tl.int64)
    word = pid * ROWS + tl.arange(0, ROWS)
    bit = tl.arange(0, 32)
    index = word[:, None] * 32 + bit[None, :]
    key, eligible = _score_keys(scores_ptr, filter_ptr, index, N, LARGEST, INT_SCORES, HAS_FILTER,
                                FILTER_VALUE)
    threshold = tl.load(threshold_ptr).to(tl.uint32)
    equal = (eligible & (key == threshold)).to(tl.int32)
    per_word = tl.sum(equal, axis=1)
    earlier = (tl.cumsum(per_word, axis=0) - per_word)[:, None] + tl.cumsum(equal, axis=1) - equal
    tie_rank = tl.load(ties_before_ptr + pid) + earlier.to(tl.int64)
    selected = eligible & ((key > threshold) | ((equal != 0) & (tie_rank < tl.load(quota_ptr))))
    # Distinct powers of two: their sum is their bitwise OR (no carries).
    packed = tl.sum(selected.to(tl.uint32) << bit[None, :].to(tl.uint32), axis=1)
    tl.store(words_ptr + word, packed.to(tl.int32, bitcast=True), mask=word * 32 < N)


def _key_flags(scores: torch.Tensor, largest: bool, filter_words: torch.Tensor | None,
               filter_value: bool) -> dict[str, bool]:
    return {"LARGEST": bool(largest), "INT_SCORES": scores.dtype == torch.int32,
            "HAS_FILTER": filter_words is not None, "FILTER_VALUE": bool(filter_value)}


def radix_histogram(scores: torch.Tensor, prefix: torch.Tensor, shift: int, bits: int, largest: bool,
                    filter_words: torch.Tensor | None = None, filter_value: bool = True) -> torch.Tensor:
    """Counts of the eligible entries whose key agrees with ``prefix`` above bit ``shift + bits``, by
    the key's digit ``(key >> shift) & (2^bits - 1)``: an int64 tensor of ``2^bits`` counts.

    ``prefix`` is an int64 0-d tensor on ``scores``' device, read in the kernel.
    """
    n = scores.numel()
    if n == 0:
        return torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    tiles = cdiv(n, CONFIG.block)
    programs = min(tiles, persistent_programs(scores.device))
    partial = torch.empty(programs, 1 << bits, dtype=torch.int32, device=scores.device)
    with _config.on_device(scores):
        _histogram_kernel[(programs,)](scores, filter_words, prefix, partial, n, cdiv(tiles, programs),
                                       programs, SHIFT=shift, BITS=bits, BLOCK=CONFIG.block,
                                       **launch_options(), **_key_flags(scores, largest, filter_words,
                                                                        filter_value))
    return partial.sum(dim=0, dtype=torch.int64)


def threshold_mask(scores: torch.Tensor, threshold: torch.Tensor, tie_quota: torch.Tensor, largest: bool,
                   filter_words: torch.Tensor | None = None, filter_value: bool = True) -> torch.Tensor:
    """Mask words selecting the eligible entries with key > ``threshold``, plus the first ``tie_quota``
    eligible entries (in index order) with key == ``threshold``.

    ``threshold`` and ``tie_quota`` are int64 0-d tensors on ``scores``' device, read in the kernels.
    """
    n = scores.numel()
    words = torch.empty(num_words(n), dtype=torch.int32, device=scores.device)
    if n == 0:
        return words
    flags = _key_flags(scores, largest, filter_words, filter_value)
    tiles = cdiv(n, CONFIG.block)
    counts = torch.empty(tiles, dtype=torch.int32, device=scores.device)
    with _config.on_device(scores):
        _tie_count_kernel[(tiles,)](scores, filter_words, threshold, counts, n, BLOCK=CONFIG.block,
                                    **launch_options(), **flags)
        ties_before = torch.cumsum(counts, dim=0, dtype=torch.int64) - counts
        _threshold_mask_kernel[(tiles,)](scores, filter_words, threshold, tie_quota, ties_before, words, n,
                                         BLOCK=CONFIG.block, **launch_options(), **flags)
    return words
