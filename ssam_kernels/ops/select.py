"""Exact-k selection over several segments (and ranks), composed from two backend primitives.

Every score maps to an order-preserving unsigned 32-bit key (``reference.score_keys``). The k-th
largest key ``t`` is found digit by digit, most significant first, in up to ``len(PASSES)`` passes: each pass
histograms the next digit of the keys that agree with the digits found so far (``radix_histogram``),
adds the histograms of all segments (and, through ``comm``, of all ranks), and picks the digit where the
count from the top reaches the number still to select. After the last pass ``t`` is known, ``need`` is
how many entries equal to ``t`` must still be taken, and the last pass's bucket of ``t`` holds this
rank's entries equal to ``t``. Ties are handed out in entry order (ranks, segments, index) by the pass
that writes the masks (``threshold_mask``), which takes the first ``quota`` ties of its segments and
says how much of the quota is left for the segments after them. No sort of the scores, no index arrays;
counts are int64 device tensors, and sizes past 2^31 are fine.

The bucket path (one rank, one device, backends with ``bucket_mask_multi``: Triton, native
CUDA) stops after two passes: the 22-bit prefix then decides every entry but its own bucket, so one mask
pass writes the decided entries and each chunk's count of them and collects the bucket's entries as
int64 candidates ``(low key bits complemented) << 53 | position``; sorting the candidates puts them in
selection order, the first ``need`` are added (:func:`_resolve`), and the offsets are a scan of the
chunk counts. Fp32 scores are read three times instead of four or five. The bucket's size, read once
on the host, picks the path and sizes the candidate buffer; a bucket above :func:`_capacity` takes the
third pass.

Lists: a backend may offer the list forms ``radix_histogram_multi`` and
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
from .lists import list_primitive
from .tuning import DEFAULT, Tuning

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
                              largest: bool, filters: Filters, filter_value: bool, *, tuning: Tuning = DEFAULT
                              ) -> torch.Tensor:
        """The sum over the list of ``radix_histogram`` of each segment: int64, ``2^bits`` counts."""

    def threshold_mask_multi(self, scores: list[torch.Tensor], threshold: torch.Tensor,
                             tie_quota: torch.Tensor, largest: bool, filters: Filters, filter_value: bool, *,
                             tuning: Tuning = DEFAULT) -> tuple[list[torch.Tensor], torch.Tensor]:
        """``threshold_mask`` of the list as one sequence in list order: the mask words of each segment,
        selecting the eligible entries with key > ``threshold`` and the first ``tie_quota`` eligible
        ties of the whole list (segments in order, then index); and ``max(tie_quota - ties, 0)`` with
        ``ties`` the list's eligible entries equal to ``threshold`` (int64 0-d): the quota left for the
        segments after the list."""


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


BUCKET_SHIFT = PASSES[1][0]
"""Key bits below the two-pass prefix: the bucket path resolves them on the candidates (10 bits, so a
candidate's ``low << 53 | position`` fits an int64 for positions below ``2^53``)."""

MAX_CAPACITY = 1 << 30
"""The bucket path runs when the prefix's bucket holds at most
``min(max(tuning.bucket_min_capacity, N >> tuning.bucket_capacity_shift), MAX_CAPACITY)`` entries (``N``
all entries of the selection; by default ``2^16`` and ``8``): its candidate buffer (8 B per candidate)
and their sort stay below ~0.1 byte per entry, and the kernels' int32 slot cursor cannot overflow. A
larger bucket (degenerate scores: all equal, all-zero Fisher) takes the third histogram pass and
``threshold_mask`` instead."""


def _capacity(total: int, tuning: Tuning) -> int:
    return min(max(tuning.bucket_min_capacity, total >> tuning.bucket_capacity_shift), MAX_CAPACITY)


def _bucket_ready(scores: Sequence[torch.Tensor], backends: Sequence[ModuleType],
                  comm: Communicator | None) -> bool:
    """Whether the bucket path serves: one rank, one device, and every backend's ``bucket_mask_multi``
    runs on it (:class:`BucketBackend`)."""
    if comm is not None or any(s.device != scores[0].device for s in scores):
        return False
    return all(getattr(b, "bucket_mask_multi", None) is not None
               and scores[0].device.type in getattr(b, "BUCKET_MASK_DEVICES", ()) for b in set(backends))


class BucketBackend(Protocol):
    """The mask pass of the bucket path (optional; a backend without it serves through the third
    histogram pass and ``threshold_mask``)."""

    BUCKET_MASK_DEVICES: tuple[str, ...]

    def bucket_mask_multi(self, scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, largest: bool,
                          filters: Filters, filter_value: bool, words: list[torch.Tensor],
                          counts: list[torch.Tensor], starts: list[int], candidates: torch.Tensor,
                          cursor: torch.Tensor, *, tuning: Tuning = DEFAULT) -> None:
        """Writes ``words[s]`` (eligible entries with ``key >> shift > prefix >> shift``), adds their
        count per 1024-entry chunk to ``counts[s]`` (int32) and appends each eligible entry with
        ``key >> shift == prefix >> shift`` to ``candidates`` (int64) at ``cursor`` (int32, one entry;
        slots at or past ``candidates.numel()`` counted, not written) as
        ``(2^shift - 1 - (key & (2^shift - 1))) << 53 | (starts[s] + index)``, in any order."""


class _Layout:
    """Where each segment's words, chunks and entries start in the concatenation of a list's masks."""

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = list(sizes)
        self.n_words = [bitmask.num_words(n) for n in sizes]
        self.n_chunks = [bitmask.num_chunks(n) for n in sizes]
        self.word_start = _starts(self.n_words)
        self.chunk_start = _starts(self.n_chunks)
        self.entry_start = _starts(self.sizes)


def device_ints(device: torch.device, *lists: Sequence[int]) -> list[torch.Tensor]:
    """Each list of host ints as an int64 tensor on ``device``, from one host buffer in one copy: pinned
    and asynchronous on CUDA, so the caller does not wait for the GPU (``torch.tensor(list, device=...)``
    copies from pageable memory and synchronises)."""
    host = torch.tensor([v for values in lists for v in values], dtype=torch.int64)
    if device.type == "cuda":
        host = host.pin_memory().to(device, non_blocking=True)
    elif host.device != device:
        host = host.to(device)
    return list(host.split([len(values) for values in lists]))


def _starts(counts: Sequence[int]) -> list[int]:
    out = [0]
    for c in counts:
        out.append(out[-1] + c)
    return out


def _resolve(candidates: torch.Tensor, need: torch.Tensor, layout: _Layout, words: torch.Tensor,
             counts: torch.Tensor) -> None:
    """ORs the first ``need`` candidates in selection order (ascending values: key descending, then
    entry position) into ``words`` (all masks' words concatenated) and adds them to ``counts`` (all
    chunks). Every op is over the candidates only."""
    device = candidates.device
    ordered = torch.sort(candidates).values
    take = torch.arange(ordered.numel(), device=device) < need
    position = ordered & ((1 << 53) - 1)
    entry_start, word_start, chunk_start = device_ints(
        device, layout.entry_start[:-1], layout.word_start[:-1], layout.chunk_start[:-1])
    segment = torch.searchsorted(entry_start, position, right=True) - 1  # empty segments own no position
    index = position - entry_start[segment]
    word = word_start[segment] + index // 32
    chunk = chunk_start[segment] + index // bitmask.CHUNK
    # Each candidate's bit is 0 in its word and distinct from the others': adding them is OR-ing them,
    # and no int32 sum overflows.
    bits = bitmask.to_int32(torch.where(take, torch.ones_like(index) << (index % 32), 0))
    words.index_add_(0, word, bits)
    counts.index_add_(0, chunk, take.to(torch.int32))


def select_counted(scores: Sequence[torch.Tensor], k: int, largest: bool, backends: Sequence[ModuleType],
                   filters: Filters | None = None, filter_value: bool = True,
                   comm: Communicator | None = None, tuning: Tuning = DEFAULT
                   ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """:func:`select`'s words, and the selected count of every 1024-entry chunk of the list (int32,
    chunks concatenated in list order) when the mask pass wrote them (the bucket path, or ``k = 0`` on
    one device), else None."""
    if k == 0:
        words = [torch.zeros(bitmask.num_words(s.numel()), dtype=torch.int32, device=s.device)
                 for s in scores]
        if any(s.device != scores[0].device for s in scores):
            return words, None
        chunks = sum(bitmask.num_chunks(s.numel()) for s in scores)
        return words, torch.zeros(chunks, dtype=torch.int32, device=scores[0].device)
    home = scores[0].device
    filters = list(filters) if filters is not None else [None] * len(scores)
    groups, runs = _partition(scores, backends)
    sizes = [s.numel() for s in scores]
    bucket_path = _bucket_ready(scores, backends, comm)

    def pick(items: Sequence, index: list[int]) -> list:
        return list(items) if len(index) == len(items) else [items[i] for i in index]

    prefix = torch.zeros((), dtype=torch.int64, device=home)
    need = torch.full((), k, dtype=torch.int64, device=home)
    for number, (shift, bits) in enumerate(PASSES):
        local = None
        for backend, index in groups:
            device = scores[index[0]].device
            histogram = list_primitive(backend, "radix_histogram")
            hist = histogram(pick(scores, index), prefix.to(device), shift, bits, largest,
                             pick(filters, index), filter_value, tuning=tuning).to(home)
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
        if number == 1 and bucket_path:
            # The one host read of the selection: the bucket's size decides the path and sizes the
            # candidate buffer exactly (this rank's bucket: the bucket path runs on one rank only).
            bucket = int(local.gather(0, digit.view(1))[0])
            if bucket <= _capacity(sum(sizes), tuning):
                return _bucket_pass(scores, prefix, need, bucket, largest, runs, pick, filters, filter_value,
                                    tuning)
    # `need` ties over all ranks in rank order: this rank's quota starts after the earlier ranks' ties
    # (its own are the last pass's bucket of the threshold's digit).
    quota = need
    if comm is not None:
        quota = (need - comm.exclusive_prefix(local.gather(0, digit.view(1)))[0]).clamp(min=0)
    words: list[torch.Tensor | None] = [None] * len(scores)
    for backend, index in runs:
        device = scores[index[0]].device
        threshold_mask = list_primitive(backend, "threshold_mask")
        run_words, quota = threshold_mask(pick(scores, index), prefix.to(device), quota.to(device), largest,
                                          pick(filters, index), filter_value, tuning=tuning)
        for i, w in zip(index, run_words, strict=True):
            words[i] = w
    return words, None


def _bucket_pass(scores: Sequence[torch.Tensor], prefix: torch.Tensor, need: torch.Tensor, bucket: int,
                 largest: bool, runs: list[tuple[ModuleType, list[int]]], pick, filters: list,
                 filter_value: bool, tuning: Tuning) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The mask pass of the bucket path: every entry decided by the key bits at and above
    :data:`BUCKET_SHIFT` written, the ``bucket`` undecided ones collected as candidates, and the first
    ``need`` of them in selection order added (:func:`_resolve`)."""
    device = scores[0].device
    layout = _Layout([s.numel() for s in scores])
    words = torch.empty(layout.word_start[-1], dtype=torch.int32, device=device)
    counts = torch.zeros(layout.chunk_start[-1], dtype=torch.int32, device=device)
    word_views, count_views = words.split(layout.n_words), counts.split(layout.n_chunks)
    candidates = torch.empty(bucket, dtype=torch.int64, device=device)
    cursor = torch.zeros(1, dtype=torch.int32, device=device)
    for backend, index in runs:
        backend.bucket_mask_multi(pick(scores, index), prefix, BUCKET_SHIFT, largest, pick(filters, index),
                                  filter_value, pick(word_views, index), pick(count_views, index),
                                  pick(layout.entry_start, index), candidates, cursor, tuning=tuning)
    _resolve(candidates, need, layout, words, counts)
    return list(word_views), counts


def select(scores: Sequence[torch.Tensor], k: int, largest: bool, backends: Sequence[ModuleType],
           filters: Filters | None = None, filter_value: bool = True,
           comm: Communicator | None = None, tuning: Tuning = DEFAULT) -> list[torch.Tensor]:
    """Mask words, one per segment, with exactly ``k`` eligible entries set in total (over all ranks).

    Selected: every eligible entry whose key is above the k-th largest eligible key ``t``, then
    eligible entries equal to ``t`` in entry order until ``k``. ``largest=False`` selects the
    smallest scores instead (ties still earliest first). Eligible: ``filters`` is None, or the
    entry's bit in ``filters[s]`` equals ``filter_value``. The caller checks ``0 <= k <= eligible``.
    """
    return select_counted(scores, k, largest, backends, filters, filter_value, comm, tuning)[0]


def select_with_offsets(scores: Sequence[torch.Tensor], k: int, largest: bool, backends: Sequence[ModuleType],
                        comm: Communicator | None = None, tuning: Tuning = DEFAULT
                        ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """:func:`select` without filters, with each mask's offsets: from the chunk counts of the mask pass
    when the bucket path ran (one scan), else by :func:`list_offsets`."""
    words, counts = select_counted(scores, k, largest, backends, None, True, comm, tuning)
    sizes = [s.numel() for s in scores]
    if counts is None:
        return list(zip(words, list_offsets(words, sizes, tuning), strict=True))
    return list(zip(words, chunk_offsets(counts, [bitmask.num_chunks(n) for n in sizes]), strict=True))


def chunk_offsets(per_chunk: torch.Tensor, n_chunks: Sequence[int]) -> list[torch.Tensor]:
    """The offsets of every mask of a list from the set-bit count of each chunk (``per_chunk``: all
    masks' chunks concatenated, ``n_chunks[s]`` for mask ``s``): a 0, then the mask's running sum; int64,
    each a view of one buffer. A fixed number of ops over the chunks."""
    device = per_chunk.device
    total = per_chunk.numel()
    counts, starts = device_ints(device, n_chunks, _starts(n_chunks)[:-1])
    scan = torch.cumsum(per_chunk, 0, dtype=torch.int64)
    first = torch.repeat_interleave(starts, counts, output_size=total)
    within = scan - (scan - per_chunk).gather(0, first)
    # Mask s's offsets are entries chunk_start[s] + s ... of the output: a 0, then its scan.
    owner = torch.repeat_interleave(torch.arange(len(n_chunks), device=device), counts, output_size=total)
    out = torch.zeros(total + len(n_chunks), dtype=torch.int64, device=device)
    out[torch.arange(total, device=device) + owner + 1] = within
    return list(out.split([c + 1 for c in n_chunks]))


class MaskList:
    """A list of masks (``sizes[s]`` entries each, all on one device) handled in a fixed number of tensor
    ops, not a few per mask: the words of all masks concatenated, with each word's bits below its mask's
    ``N`` (``valid``) and its 1024-entry chunk in the list. No host synchronisation."""

    def __init__(self, sizes: Sequence[int], device: torch.device) -> None:
        self.sizes, self.device = list(sizes), device
        layout = _Layout(sizes)
        self.n_words, self.n_chunks = layout.n_words, layout.n_chunks
        words = layout.word_start[-1]
        word_counts, word_start, entries, chunk_start = device_ints(
            device, self.n_words, layout.word_start[:-1], self.sizes, layout.chunk_start[:-1])
        self.total_chunks = layout.chunk_start[-1]

        def per_word(values: torch.Tensor) -> torch.Tensor:  # each mask's value, repeated for its words
            return torch.repeat_interleave(values, word_counts, output_size=words)

        local = torch.arange(words, device=device) - per_word(word_start)
        # Bits of each word below its mask's N: all 32, except in a mask's last word.
        bits = (per_word(entries) - 32 * local).clamp(max=32)
        self.valid = (1 << bits) - 1
        self.chunk = per_word(chunk_start) + local // bitmask.WORDS_PER_CHUNK

    @staticmethod
    def of(words: Sequence[torch.Tensor], sizes: Sequence[int], max_words: int) -> MaskList | None:
        """The list of ``words`` (checked against ``sizes``), or None when they are not several masks on
        one device of at most ``max_words`` words in all (``Tuning.mask_list_words``; then the per-mask
        functions of :mod:`.bitmask` serve, whose cost is small next to such a list's size)."""
        for w, n in zip(words, sizes, strict=True):
            if w.numel() != bitmask.num_words(n):
                raise ValueError(f"mask: expected {bitmask.num_words(n)} words for {n} entries, "
                                 f"got {w.numel()}")
        if (len(words) <= 1 or sum(w.numel() for w in words) > max_words
                or any(w.device != words[0].device for w in words)):
            return None
        return MaskList(sizes, words[0].device)

    def trimmed(self, words: Sequence[torch.Tensor]) -> torch.Tensor:
        """All words concatenated, as unsigned values (int64) with the bits past each mask's N cleared."""
        return bitmask.to_uint(torch.cat(list(words))) & self.valid

    def split(self, trimmed: torch.Tensor) -> list[torch.Tensor]:
        """The int32 words of each mask from :meth:`trimmed`-style values (views of one buffer)."""
        return list(bitmask.to_int32(trimmed).split(self.n_words))

    def per_chunk(self, words: Sequence[torch.Tensor]) -> torch.Tensor:
        """Set bits below N of every 1024-entry chunk of the list (int64, chunks in list order)."""
        bits = bitmask.popcount(bitmask.to_int32(self.trimmed(words))).to(torch.int64)
        per_chunk = torch.zeros(self.total_chunks, dtype=torch.int64, device=self.device)
        return per_chunk.index_add_(0, self.chunk, bits)

    def offsets(self, words: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """``bitmask.offsets`` of every mask: :func:`chunk_offsets` of the per-chunk popcounts."""
        return chunk_offsets(self.per_chunk(words), self.n_chunks)


def list_offsets(words: Sequence[torch.Tensor], sizes: Sequence[int], tuning: Tuning = DEFAULT
                 ) -> list[torch.Tensor]:
    """``bitmask.offsets(words[s], sizes[s])`` of every mask of a list (:class:`MaskList`: a fixed number
    of tensor ops when the masks share a device, not a popcount per mask); int64."""
    masks = MaskList.of(words, sizes, tuning.mask_list_words)
    if masks is None:
        return [bitmask.offsets(w, n) for w, n in zip(words, sizes, strict=True)]
    return masks.offsets(words)
