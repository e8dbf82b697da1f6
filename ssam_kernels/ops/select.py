"""Exact-k selection over several segments (and ranks), composed from two backend primitives.

Every score maps to an order-preserving unsigned 32-bit key (``reference.score_keys``). The k-th
largest key ``t`` is found digit by digit, most significant first, in ``len(PASSES)`` passes: each pass
histograms the next digit of the keys that agree with the digits found so far (``radix_histogram``),
adds the histograms of all segments (and, through ``comm``, of all ranks), and picks the digit where the
count from the top reaches the number still to select. After the last pass ``t`` is known, ``need`` is
how many entries equal to ``t`` must still be taken, and the last pass's bucket of ``t`` holds this
rank's entries equal to ``t``. Ties are handed out in entry order (ranks, segments, index) by the pass
that writes the masks (``threshold_mask``), which takes the first ``quota`` ties of its segments and
says how much of the quota is left for the segments after them. No sort, no index arrays; counts are
int64 device tensors, so nothing synchronises with the host and sizes past 2^31 are fine.

Lists (issue 15): a backend may offer the list forms ``radix_histogram_multi`` and
``threshold_mask_multi`` (:class:`ListBackend`); then each histogram pass is one call per (device, score
dtype) group of segments, and the mask pass one call per run of consecutive segments of one group (one
call in all when every segment has the same device and dtype), whatever the number of segments. A
backend with only the single-segment primitives runs the same algorithm through a loop here.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Protocol

import torch

from . import bitmask

PASSES: tuple[tuple[int, int], ...] = ((21, 11), (10, 11), (0, 10))
"""``(shift, bits)`` of the key digit examined in each pass: 11 + 11 + 10 = 32 bits."""

Filters = Sequence[torch.Tensor | None]


class Communicator(Protocol):
    """How selection composes across ranks: both methods are sums over ranks of small int64 tensors."""

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its sum over all ranks."""

    def exclusive_prefix(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks before this one (zeros on rank 0)."""


class ListBackend(Protocol):
    """The list forms of the selection primitives (arguments as the single ones, lists of one device and
    score dtype; ``filters`` all None or all tensors)."""

    def radix_histogram_multi(self, scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, bits: int,
                              largest: bool, filters: Filters, filter_value: bool) -> torch.Tensor:
        """The sum over the list of ``radix_histogram`` of each segment: int64, ``2^bits`` counts."""

    def threshold_mask_multi(self, scores: list[torch.Tensor], threshold: torch.Tensor,
                             tie_quota: torch.Tensor, largest: bool, filters: Filters, filter_value: bool
                             ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``threshold_mask`` of the list as one sequence in list order: the mask words of each segment,
        selecting the eligible entries with key > ``threshold`` and the first ``tie_quota`` eligible
        ties of the whole list (segments in order, then index); and ``max(tie_quota - ties, 0)`` with
        ``ties`` the list's eligible entries equal to ``threshold`` (int64 0-d): the quota left for the
        segments after the list."""


def _histogram(backend: ModuleType, scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, bits: int,
               largest: bool, filters: Filters, filter_value: bool) -> torch.Tensor:
    """``radix_histogram_multi`` of the list, or the sum of the single histograms."""
    multi = getattr(backend, "radix_histogram_multi", None)
    if multi is not None:
        return multi(scores, prefix, shift, bits, largest, filters, filter_value)
    return torch.stack([backend.radix_histogram(s, prefix, shift, bits, largest, f, filter_value)
                        for s, f in zip(scores, filters, strict=True)]).sum(dim=0)


def _threshold(backend: ModuleType, scores: list[torch.Tensor], threshold: torch.Tensor,
               tie_quota: torch.Tensor, largest: bool, filters: Filters, filter_value: bool
               ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """``threshold_mask_multi`` of the list, or the single primitive per segment: each segment's ties
    counted by a one-bit histogram at ``threshold`` (``hist[t & 1]`` = keys equal to ``t``)."""
    multi = getattr(backend, "threshold_mask_multi", None)
    if multi is not None:
        return multi(scores, threshold, tie_quota, largest, filters, filter_value)
    words = []
    for s, f in zip(scores, filters, strict=True):
        words.append(backend.threshold_mask(s, threshold, tie_quota, largest, f, filter_value))
        ties = backend.radix_histogram(s, threshold, 0, 1, largest, f, filter_value)
        tie_quota = (tie_quota - ties.gather(0, threshold.view(1) & 1)[0]).clamp(min=0)
    return words, tie_quota


def _partition(scores: Sequence[torch.Tensor], backends: Sequence[ModuleType]
               ) -> tuple[list[tuple[ModuleType, list[int]]], list[tuple[ModuleType, list[int]]]]:
    """The segments by (device, dtype): the groups (in order of first appearance) and the runs of
    consecutive segments of one group (in entry order)."""
    keys = [(s.device, s.dtype) for s in scores]
    groups: dict[tuple[torch.device, torch.dtype], tuple[ModuleType, list[int]]] = {}
    runs: list[tuple[ModuleType, list[int]]] = []
    for i, key in enumerate(keys):
        groups.setdefault(key, (backends[i], []))[1].append(i)
        if i > 0 and key == keys[i - 1]:
            runs[-1][1].append(i)
        else:
            runs.append((backends[i], [i]))
    return list(groups.values()), runs


def select(scores: Sequence[torch.Tensor], k: int, largest: bool, backends: Sequence[ModuleType],
           filters: Filters | None = None, filter_value: bool = True,
           comm: Communicator | None = None) -> list[torch.Tensor]:
    """Mask words, one per segment, with exactly ``k`` eligible entries set in total (over all ranks).

    Selected: every eligible entry whose key is above the k-th largest eligible key ``t``, then
    eligible entries equal to ``t`` in entry order until ``k``. ``largest=False`` selects the
    smallest scores instead (ties still earliest first). Eligible: ``filters`` is None, or the
    entry's bit in ``filters[s]`` equals ``filter_value``. The caller checks ``0 <= k <= eligible``.
    """
    if k == 0:
        return [torch.zeros(bitmask.num_words(s.numel()), dtype=torch.int32, device=s.device)
                for s in scores]
    home = scores[0].device
    filters = list(filters) if filters is not None else [None] * len(scores)
    groups, runs = _partition(scores, backends)

    def pick(items: Sequence, index: list[int]) -> list:
        return list(items) if len(index) == len(items) else [items[i] for i in index]

    prefix = torch.zeros((), dtype=torch.int64, device=home)
    need = torch.full((), k, dtype=torch.int64, device=home)
    for shift, bits in PASSES:
        local = None
        for backend, index in groups:
            device = scores[index[0]].device
            hist = _histogram(backend, pick(scores, index), prefix.to(device), shift, bits, largest,
                              pick(filters, index), filter_value).to(home)
            local = hist if local is None else local + hist
        total = local
        if comm is not None:
            total = local.clone()
            comm.all_reduce_(total)
        at_or_above = total.flip(0).cumsum(0).flip(0)  # at_or_above[d]: count with digit >= d
        digit = (at_or_above >= need).sum() - 1
        above = torch.cat([at_or_above, at_or_above.new_zeros(1)]).gather(0, (digit + 1).view(1))[0]
        need = need - above
        prefix = prefix | (digit << shift)
    # `need` ties over all ranks in rank order: this rank's quota starts after the earlier ranks' ties
    # (its own are the last pass's bucket of the threshold's digit).
    quota = need
    if comm is not None:
        quota = (need - comm.exclusive_prefix(local.gather(0, digit.view(1)))[0]).clamp(min=0)
    words: list[torch.Tensor | None] = [None] * len(scores)
    for backend, index in runs:
        device = scores[index[0]].device
        run_words, quota = _threshold(backend, pick(scores, index), prefix.to(device), quota.to(device),
                                      largest, pick(filters, index), filter_value)
        for i, w in zip(index, run_words, strict=True):
            words[i] = w
    return words


def list_offsets(words: Sequence[torch.Tensor], sizes: Sequence[int]) -> list[torch.Tensor]:
    """``bitmask.offsets(words[s], sizes[s])`` of every mask of a list in a fixed number of tensor ops
    (not a popcount per mask): the popcounts of all words (bits past each mask's ``N`` cleared) are added
    per chunk, scanned over the whole list, and each mask's scan restarted at its first chunk. int64, no
    host synchronisation; the result of each mask is a view of one buffer."""
    device = words[0].device if words else torch.device("cpu")
    if len(words) <= 1 or any(w.device != device for w in words):
        return [bitmask.offsets(w, n) for w, n in zip(words, sizes, strict=True)]
    for w, n in zip(words, sizes, strict=True):
        if w.numel() != bitmask.num_words(n):
            raise ValueError(f"mask: expected {bitmask.num_words(n)} words for {n} entries, got {w.numel()}")

    def per(values: list[int], counts: torch.Tensor, total: int) -> torch.Tensor:
        return torch.repeat_interleave(torch.tensor(values, device=device), counts, output_size=total)
    n_words = [bitmask.num_words(n) for n in sizes]
    n_chunks = [bitmask.num_chunks(n) for n in sizes]
    total_words, total_chunks = sum(n_words), sum(n_chunks)
    word_counts = torch.tensor(n_words, device=device)
    chunk_counts = torch.tensor(n_chunks, device=device)
    word_start = [0]
    chunk_start = [0]
    for w, c in zip(n_words, n_chunks, strict=True):
        word_start.append(word_start[-1] + w)
        chunk_start.append(chunk_start[-1] + c)
    local = torch.arange(total_words, device=device) - per(word_start[:-1], word_counts, total_words)
    # Bits of each word below its mask's N: 32, except in a mask's last word.
    valid = (per(list(sizes), word_counts, total_words) - 32 * local).clamp(max=32)
    kept = bitmask.to_uint(torch.cat(list(words))) & ((1 << valid) - 1)
    bits = bitmask.popcount(bitmask.to_int32(kept)).to(torch.int64)
    chunk = per(chunk_start[:-1], word_counts, total_words) + local // bitmask.WORDS_PER_CHUNK
    per_chunk = torch.zeros(total_chunks, dtype=torch.int64, device=device).index_add_(0, chunk, bits)
    scan = torch.cumsum(per_chunk, 0)
    first = per(chunk_start[:-1], chunk_counts, total_chunks)  # each chunk's mask's first chunk
    within = scan - (scan - per_chunk).gather(0, first)
    # Mask s's offsets are entries chunk_start[s] + s ... of the output: a 0, then its scan.
    owner = torch.repeat_interleave(torch.arange(len(sizes), device=device), chunk_counts,
                                    output_size=total_chunks)
    out = torch.zeros(total_chunks + len(sizes), dtype=torch.int64, device=device)
    out[torch.arange(total_chunks, device=device) + owner + 1] = within
    return list(out.split([c + 1 for c in n_chunks]))

