"""Exact-k selection over several segments (and ranks), composed from two backend primitives.

Every score maps to an order-preserving unsigned 32-bit key (``reference.score_keys``). The k-th
largest key ``t`` is found digit by digit, most significant first, in ``len(PASSES)`` passes: each pass
histograms the next digit of the keys that agree with the digits found so far (``radix_histogram``),
adds the histograms of all segments (and, through ``comm``, of all ranks), and picks the digit where the
count from the top reaches the number still to select. After the last pass ``t`` is known, ``need`` is
how many entries equal to ``t`` must still be taken, and the last pass's per-segment histograms give how
many entries equal ``t`` in each segment. Ties are then handed out in entry order (ranks, segments,
index) and one pass per segment writes the mask (``threshold_mask``). No sort, no index arrays; counts
are int64 device tensors, so nothing synchronises with the host and sizes past 2^31 are fine.
"""

from __future__ import annotations

from collections.abc import Sequence
from types import ModuleType
from typing import Protocol

import torch

from . import bitmask

PASSES: tuple[tuple[int, int], ...] = ((21, 11), (10, 11), (0, 10))
"""``(shift, bits)`` of the key digit examined in each pass: 11 + 11 + 10 = 32 bits."""


class Communicator(Protocol):
    """How selection composes across ranks: both methods are sums over ranks of small int64 tensors."""

    def all_reduce_(self, tensor: torch.Tensor) -> None:
        """Replace ``tensor`` by its sum over all ranks."""

    def exclusive_prefix(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum of ``tensor`` over the ranks before this one (zeros on rank 0)."""


def select(scores: Sequence[torch.Tensor], k: int, largest: bool, backends: Sequence[ModuleType],
           filters: Sequence[torch.Tensor] | None = None, filter_value: bool = True,
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
    filters = filters if filters is not None else [None] * len(scores)
    prefix = torch.zeros((), dtype=torch.int64, device=home)
    need = torch.full((), k, dtype=torch.int64, device=home)
    for shift, bits in PASSES:
        hists = [backend.radix_histogram(s, prefix.to(s.device), shift, bits, largest, f, filter_value)
                 for s, f, backend in zip(scores, filters, backends, strict=True)]
        total = torch.stack([h.to(home) for h in hists]).sum(dim=0)
        if comm is not None:
            comm.all_reduce_(total)
        at_or_above = total.flip(0).cumsum(0).flip(0)  # at_or_above[d]: count with digit >= d
        digit = (at_or_above >= need).sum() - 1
        above = torch.cat([at_or_above, at_or_above.new_zeros(1)]).gather(0, (digit + 1).view(1))[0]
        need = need - above
        prefix = prefix | (digit << shift)
    # Entries equal to the threshold, per segment: the last pass's bucket of the chosen digit.
    equal = torch.stack([h.to(home).gather(0, digit.view(1))[0] for h in hists])
    equal_before = torch.cumsum(equal, dim=0) - equal
    if comm is not None:
        equal_before = equal_before + comm.exclusive_prefix(equal.sum().view(1))[0]
    quota = torch.minimum((need - equal_before).clamp(min=0), equal)
    return [backend.threshold_mask(s, prefix.to(s.device), quota[i].to(s.device), largest, f, filter_value)
            for i, (s, f, backend) in enumerate(zip(scores, filters, backends, strict=True))]
