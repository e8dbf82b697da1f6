"""The ``vectorized`` backend: the op contract in device-agnostic PyTorch tensor ops, written for speed.

It is what runs when no compiled backend can (no C++ build, MPS, XPU, ROCm without Triton...), so it
gives the results of :mod:`.reference` bit for bit (perturbation, Fisher update and the norm's summation
order by the same :mod:`._arith` formulas, masks identical) at a fraction of its cost. What differs from
the reference is only how the work is laid out:

- Every op walks its buffers in chunks of ``tuning.chunk_entries`` entries (a multiple of 1024; the
  :class:`.tuning.Tuning` every primitive takes): temporaries
  stay bounded whatever the size, and no op allocates a buffer-sized temporary. Per-chunk temporaries
  live in workspaces allocated once per call (allocating and freeing chunk-sized blocks in the loop
  cost page faults on CPU).
- Nothing indexes with booleans or ``nonzero`` (slow and host-synchronising): a mask is unpacked into
  integer lanes with two shifts and ranks come from one ``cumsum``. ``perturb_`` scatters each live
  entry's ``W`` bits to its rank (the others to a discarded slot 0), which is the backup slice; where
  the arithmetic is cheap (an fp32 FMA that is one PyTorch op, :func:`._arith.hardware_fma`, or float64
  data) it then computes on the whole chunk and blends the new values in with ``xor``/``and`` on the bit
  patterns; where it is the float64 emulation it scatters chunk positions instead, gathers ``W`` (the
  backup) and ``G`` there, computes on the live entries only and scatters the new values back.
  ``restore_`` expands the backup slice with ``index_select`` by rank and blends it in. Every value (NaN
  payloads, ``-0.0``) is moved bit-exactly.
- The fp32 FMA is :func:`._arith.fma32_fast`: ``torch.addcmul`` where the probe finds it fused, else the
  host-checked double rounding on CPU and the reference's round-to-odd :func:`._arith.fma32` elsewhere;
  an inactive scale skips the arithmetic on CPU (it is blended on the device elsewhere).
- Selection keys are computed once per chunk and pass in int32 (a sign-flipped image of the unsigned key,
  so signed comparisons order them as the unsigned keys), histograms by ``bincount`` on CPU and
  ``index_add_`` elsewhere (``bincount`` synchronises on CUDA to size its output).
- The selection list primitives (``radix_histogram_multi``, ``threshold_mask_multi``) walk a list of
  segments as pieces of at most ``tuning.chunk_entries`` entries: a large segment in chunks of its own,
  runs of small ones concatenated (their filter bits and mask words placed by one index tensor per
  piece), so hundreds of small segments cost a few tensor ops per piece; the single-segment primitives
  are lists of one.

``perturb_`` and ``restore_`` with a mask count each mask's set bits per 1024-entry block in one SWAR
popcount pass, which on CPU also checks ``offsets`` (``ValueError``; their list forms check every entry
before writing any), and read the per-chunk counts on the host once per call (the backup slice of each
chunk starts at the count before it). Memory safety: mask bits past ``N`` are ignored, and an entry whose
rank is at or past ``backup.numel()`` is neither backed up nor changed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import _arith, bitmask
from .contract import KEY_SIGN_BIT, MIX32_MULTIPLIERS, MIX32_SHIFTS, NAN_KEY, hash_key, mix32
from .reference import grad_sq_norm  # noqa: F401  (its fixed order is already written for speed)
from .tuning import DEFAULT, Tuning

_INT_MIN = -(1 << 31)
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
             torch.float16: torch.int16}
_CACHE: dict[tuple[str, torch.device], torch.Tensor] = {}
BINCOUNT_DEVICES = ("cpu",)
"""Device types whose histograms use ``torch.bincount`` (elsewhere, or with ``tuning.bincount`` off,
``index_add_``: on CUDA, ``bincount`` reads its input's maximum on the host to size the output)."""


def unavailable_reason(device: torch.device | str) -> str | None:
    """Always None: plain PyTorch ops run on every device."""
    del device
    return None


def _constant(name: str, device: torch.device, size: int = 0) -> torch.Tensor:
    """Small per-device constant tensors, built once (``"index"``: at least ``size`` entries)."""
    value = _CACHE.get((name, device))
    if value is None or value.numel() < size:
        if name == "lane_shift":  # unpack: bit b of a word moved to the sign bit
            value = 31 - torch.arange(32, dtype=torch.int32, device=device)
        elif name == "index":  # chunk-relative positions
            value = torch.arange(size, device=device)
        elif name == "bit_value":  # pack: value of bits 0..30 (bit 31 is handled apart)
            value = torch.bitwise_left_shift(torch.ones(31, dtype=torch.int32, device=device),
                                             torch.arange(31, dtype=torch.int32, device=device))
        _CACHE[(name, device)] = value
    return value


def _chunks(n: int, chunk: int) -> range:
    return range(0, n, chunk)


def _lanes(words: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Entries ``[start, stop)`` of a mask as int32 lanes: -1 (all ones) for a set bit, else 0.

    ``start`` is a multiple of 32; bits at or past ``stop`` are dropped, so bits past N never count.
    """
    block = words[start // 32: (stop + 31) // 32]
    shift = _constant("lane_shift", words.device)
    return ((block.unsqueeze(1) << shift) >> 31).view(-1)[: stop - start]


def _pack(selected: torch.Tensor) -> torch.Tensor:
    """Bool entries (a multiple of 32 of them, or fewer at the end) packed into int32 mask words."""
    n = selected.numel()
    pad = bitmask.num_words(n) * 32 - n
    bits = selected.to(torch.int32)
    if pad:
        bits = torch.cat([bits, bits.new_zeros(pad)])
    bits = bits.view(-1, 32)
    # Bits 0..30 sum without overflow; bit 31 is the sign, set by multiplying the top bit by INT_MIN.
    low = (bits[:, :31] * _constant("bit_value", selected.device)).sum(dim=1, dtype=torch.int32)
    return low | (bits[:, 31] * _INT_MIN)


def _block_counts(words: torch.Tensor, n: int) -> torch.Tensor:
    """Set bits of each ``bitmask.CHUNK`` block of entries (bits past ``n`` not counted), int64 on the
    device: a SWAR popcount in int32 lanes to per-byte counts, summed per block as bytes."""
    blocks = bitmask.num_chunks(n)
    v = torch.zeros(blocks * bitmask.WORDS_PER_CHUNK, dtype=torch.int32, device=words.device)
    v[: words.numel()] = words
    if n % 32:  # the last word's bits past n are not entries
        v[words.numel() - 1] &= (1 << n % 32) - 1
    sign = (v >> 31) & 1  # bit 31 counted apart: the SWAR steps below then never overflow int32
    v &= 0x7FFFFFFF
    v -= (v >> 1) & 0x55555555  # 2-bit counts
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)  # 4-bit counts
    v = ((v + (v >> 4)) & 0x0F0F0F0F) + sign  # per-byte counts: 0..8, the low byte 0..9
    return v.view(torch.uint8).view(blocks, 4 * bitmask.WORDS_PER_CHUNK).sum(dim=1, dtype=torch.int64)


def _chunk_counts(words: torch.Tensor, n: int, offsets: torch.Tensor | None, tuning: Tuning) -> list[int]:
    """Set bits of each chunk of ``tuning.chunk_entries`` entries (bits past ``n`` not counted), on the
    host.

    On devices whose tensors the host reads for free, ``offsets`` (when given) is checked against the
    mask in the same pass (``ValueError`` naming it, as ``bitmask.check_offsets``), before anything is
    written: the contract refuses wrong offsets on CPU tensors.
    """
    if n == 0:
        return []
    counts = _block_counts(words, n)
    if offsets is not None and _arith.reads_host(words.device, tuning):
        expected = torch.cumsum(counts, 0)
        if offsets.numel() != counts.numel() + 1 or int(offsets[0]) != 0 or not torch.equal(
                offsets[1:].to(torch.int64), expected):
            bitmask.check_offsets(words, offsets, n)  # raises, with the standard message
    per_chunk = tuning.chunk_entries // bitmask.CHUNK
    pad = -counts.numel() % per_chunk
    if pad:
        counts = torch.cat([counts, counts.new_zeros(pad)])
    return counts.view(-1, per_chunk).sum(dim=1).tolist()


# ----------------------------------------------------------------------------------------------------
# Element-wise ops
# ----------------------------------------------------------------------------------------------------

class _Perturbation:
    """``w + scale·g`` (adaptive ``w + scale·w²·g``) by the reference's :func:`._arith.perturbed`, with
    the cheaper :func:`._arith.fma32_fast` (same bits) and a workspace for its temporaries.

    Where the scale is inactive (zero or not finite) ``W`` keeps its values: on a device whose tensors
    the host reads for free (:func:`._arith.reads_host`) that is decided once per call and nothing is
    computed; elsewhere the new bits are blended with the old ones on the device (no synchronisation).
    """

    def __init__(self, W: torch.Tensor, scale: torch.Tensor, adaptive: bool, tuning: Tuning) -> None:
        self.scale, self.adaptive, self.tuning = _arith.perturb_scale(scale, W.dtype), adaptive, tuning
        # Cheaper than a gather and a scatter: float64 arithmetic, or an fp32 FMA in one PyTorch op.
        self.cheap = W.dtype == torch.float64 or _arith.fused_addcmul(W.device, tuning)
        active = _arith.scale_active(self.scale)
        host = _arith.reads_host(W.device, tuning)
        self.skip = host and not bool(active)
        # -1 where the perturbation applies, else 0: the blend of the other devices.
        self.active = None if host else -active.to(_INT_VIEW[W.dtype])
        self.workspace = _workspace(3 * min(tuning.chunk_entries, W.numel()), torch.float64, W.device)

    def bits(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Bit patterns of the perturbed values of ``w`` (gradient ``g``), a tensor valid until the next
        call; ``w``'s own bits where the scale is inactive."""
        def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return _arith.fma32_fast(a, b, c, self.workspace, self.tuning)

        new = _arith.perturbed(w, g, self.scale, self.adaptive, fma).view(_INT_VIEW[w.dtype])
        if self.active is not None:
            old = w.view(_INT_VIEW[w.dtype])
            new = (new ^ old).bitwise_and_(self.active).bitwise_xor_(old)
        return new


def _workspace(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A buffer for one call's per-chunk temporaries: allocated once per call, not per chunk (allocating
    and freeing chunk-sized blocks in a loop costs page faults where the allocator returns them)."""
    return torch.empty(n, dtype=dtype, device=device)


def _masked_chunks(mask: torch.Tensor, counts: list[int], n: int, room: int, chunk: int
                   ) -> Iterator[tuple[int, int, int, int, torch.Tensor, torch.Tensor]]:
    """``(start, stop, rank, count, lanes, slot)`` for each chunk with set bits of rank below ``room``.

    ``rank``: set bits before the chunk; ``count``: those handled in it (``rank + count <= room``);
    ``lanes``: int32, -1 for the entries handled, else 0; ``slot``: int32, for every entry the number of
    set bits up to and including it in the chunk (``1 +`` chunk-local rank for a set bit), in
    ``[0, count]`` for handled entries and at most the chunk's count for the others. Both are views of
    one workspace, overwritten by the next chunk. ``counts``: :func:`_chunk_counts` of the mask.
    """
    size = min(chunk, n)
    work = _workspace(2 * size + 32, torch.int32, mask.device)
    slot, lanes = work[:size], work[size:]
    shift = _constant("lane_shift", mask.device)
    rank = 0
    for count, start in zip(counts, _chunks(n, chunk), strict=True):
        if rank >= room:
            return
        if count == 0:
            continue
        stop = min(start + chunk, n)
        words = mask[start // 32: (stop + 31) // 32]
        chunk_lanes = lanes[: 32 * words.numel()]
        torch.bitwise_left_shift(words.unsqueeze(1), shift, out=chunk_lanes.view(-1, 32))
        chunk_lanes = chunk_lanes.bitwise_right_shift_(31)[: stop - start]
        chunk_slot = torch.cumsum(chunk_lanes, 0, out=slot[: stop - start]).neg_()
        if rank + count > room:  # a short backup: only the first room - rank set bits are handled
            chunk_lanes.bitwise_and_(-(chunk_slot <= room - rank).to(torch.int32))
            count = room - rank
        yield start, stop, rank, count, chunk_lanes, chunk_slot
        rank += count


def perturb_(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, scale: torch.Tensor, adaptive: bool = False, *, tuning: Tuning = DEFAULT
             ) -> None:
    """For every set bit ``i`` of rank below ``backup.numel()`` (every ``i`` when ``mask`` is None):
    ``backup[rank(i)] = W[i]``; then, if ``scale`` is finite and non-zero, ``W[i] = W[i] + scale·g_i``
    (adaptive: ``+ scale·w_i²·g_i``) as :func:`._arith.perturbed` computes it.

    With a mask, a chunk's handled entries are located first, without ``nonzero`` (host-synchronising):
    each scatters its chunk position to its slot (an entry not handled to slot 0, discarded), which
    leaves their positions in order in slots ``1..count``. The backup slice is then the gather of ``W``
    there, the arithmetic runs on those entries only, and the new values are scattered back.
    """
    counts = None if mask is None else _chunk_counts(mask, W.numel(), offsets, tuning)
    _perturb(W, G, mask, counts, backup, scale, adaptive, tuning)


def perturb_multi_(W: list[torch.Tensor], G: list[torch.Tensor], mask: list[torch.Tensor | None],
                   offsets: list[torch.Tensor | None], backup: list[torch.Tensor], scale: torch.Tensor,
                   adaptive: bool = False, *, tuning: Tuning = DEFAULT) -> None:
    """:func:`perturb_` of each entry of the lists (one device and dtype); every entry's offsets are
    checked (CPU) before any tensor is written."""
    counts = _list_counts(W, mask, offsets, tuning)
    for w, g, m, c, b in zip(W, G, mask, counts, backup, strict=True):
        _perturb(w, g, m, c, b, scale, adaptive, tuning)


def _list_counts(W: list[torch.Tensor], mask: list[torch.Tensor | None], offsets: list[torch.Tensor | None],
                 tuning: Tuning) -> list[list[int] | None]:
    counts = []
    for j, (w, m, o) in enumerate(zip(W, mask, offsets, strict=True)):
        try:
            counts.append(None if m is None else _chunk_counts(m, w.numel(), o, tuning))
        except ValueError as exc:  # name the entry, as the ops layer's own check does
            raise ValueError(str(exc).replace("offsets:", f"offsets[{j}]:", 1)) from None
    return counts


def _perturb(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, counts: list[int] | None,
             backup: torch.Tensor, scale: torch.Tensor, adaptive: bool, tuning: Tuning) -> None:
    int_dtype = _INT_VIEW[W.dtype]
    bits_w, bits_b = W.view(int_dtype), backup.view(int_dtype)
    n, chunk = W.numel(), tuning.chunk_entries
    perturbation = _Perturbation(W, scale, adaptive, tuning)
    if mask is None:
        for start in _chunks(n, chunk):
            stop = min(start + chunk, n)
            bits_b[start:stop].copy_(bits_w[start:stop])
            if not perturbation.skip:
                bits_w[start:stop].copy_(perturbation.bits(backup[start:stop], G[start:stop]))
        return
    size = min(chunk, n)
    target = _workspace(size, torch.int64, W.device)  # scatter_ takes int64 indices only
    if perturbation.cheap:
        old = _workspace(size + 1, int_dtype, W.device)  # slot 0: entries not handled (discarded)
    else:
        positions = _workspace(size + 1, torch.int64, W.device)  # slot 0 likewise
        gathered = _workspace(size, G.dtype, G.device)
        index = _constant("index", W.device, size)
    for start, stop, rank, count, lanes, slot in _masked_chunks(mask, counts, n, backup.numel(), chunk):
        w = bits_w[start:stop]
        handled_slot = target[: stop - start].copy_(slot.bitwise_and_(lanes))  # 0 when not handled
        if perturbation.cheap:  # arithmetic on every entry of the chunk, blended in where handled
            old.scatter_(0, handled_slot, w)
            bits_b[rank: rank + count].copy_(old[1: count + 1])
            if not perturbation.skip:
                new = perturbation.bits(W[start:stop], G[start:stop])
                w ^= new.bitwise_xor_(w).bitwise_and_(lanes.to(int_dtype))
            continue
        # Arithmetic on the handled entries only: their chunk positions, in order, in slots 1..count.
        positions.scatter_(0, handled_slot, index[: stop - start])
        live = positions[1: count + 1]
        torch.index_select(w, 0, live, out=bits_b[rank: rank + count])
        if not perturbation.skip:
            g = torch.index_select(G[start:stop], 0, live, out=gathered[:count])
            w.scatter_(0, live, perturbation.bits(backup[rank: rank + count], g))


def restore_(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, *, tuning: Tuning = DEFAULT) -> None:
    """``W[i] = backup[rank(i)]`` for every set bit ``i`` of rank below ``backup.numel()`` (bit-exact):
    per chunk, every entry reads its slot of the chunk's backup slice (``index_select``) and the handled
    ones keep it (``xor``/``and`` blend of the bit patterns)."""
    counts = None if mask is None else _chunk_counts(mask, W.numel(), offsets, tuning)
    _restore(W, mask, counts, backup, tuning)


def restore_multi_(W: list[torch.Tensor], mask: list[torch.Tensor | None], offsets: list[torch.Tensor | None],
                   backup: list[torch.Tensor], *, tuning: Tuning = DEFAULT) -> None:
    """:func:`restore_` of each entry of the lists (one device and dtype); every entry's offsets are
    checked (CPU) before any tensor is written."""
    for w, m, c, b in zip(W, mask, _list_counts(W, mask, offsets, tuning), backup, strict=True):
        _restore(w, m, c, b, tuning)


def _restore(W: torch.Tensor, mask: torch.Tensor | None, counts: list[int] | None, backup: torch.Tensor,
             tuning: Tuning) -> None:
    if mask is None:
        W.copy_(backup)
        return
    int_dtype = _INT_VIEW[W.dtype]
    bits_w, bits_b = W.view(int_dtype), backup.view(int_dtype)
    size = min(tuning.chunk_entries, W.numel())
    slots = _workspace(size + 1, int_dtype, W.device)  # slot 0: entries not handled (blended away)
    expanded = _workspace(size, int_dtype, W.device)
    for start, stop, rank, count, lanes, slot in _masked_chunks(mask, counts, W.numel(), backup.numel(),
                                                                tuning.chunk_entries):
        slots[1: count + 1].copy_(bits_b[rank: rank + count])
        new = torch.index_select(slots, 0, slot, out=expanded[: stop - start])
        w = bits_w[start:stop]
        w ^= new.bitwise_xor_(w).bitwise_and_(lanes.to(int_dtype))


def fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float = 1.0, *, tuning: Tuning = DEFAULT
                       ) -> None:
    """``F += alpha · G²`` with ``F`` float32, as :func:`._arith.fisher_updated` computes it."""
    chunk = tuning.chunk_entries
    workspace = _workspace(3 * min(chunk, F.numel()), torch.float64, F.device)

    def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return _arith.fma32_fast(a, b, c, workspace, tuning)

    for start in _chunks(F.numel(), chunk):
        f = F[start: start + chunk]
        f.copy_(_arith.fisher_updated(f, G[start: start + chunk], alpha, fma))


def axpby_(X: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, tuning: Tuning = DEFAULT
           ) -> None:
    """``X = a·X + b·Y`` element-wise, as :func:`._arith.axpby` computes it (``fma(b, y, rn(a·x))`` in
    fp32; float64 ``X`` in float64 without FMA), chunk by chunk with the cheaper
    :func:`._arith.fma32_fast` (same bits)."""
    n, chunk = X.numel(), tuning.chunk_entries
    a, b = _arith.axpby_scales(a, b, X.dtype)
    if X.dtype == torch.float64:  # two rounded products and a rounded sum, written in place
        product = _workspace(min(chunk, n), torch.float64, X.device)
        for start in _chunks(n, chunk):
            x, y = X[start: start + chunk], Y[start: start + chunk]
            p = torch.mul(y, b, out=product[: x.numel()])
            x.mul_(a).add_(p)
        return
    workspace = _workspace(3 * min(chunk, n), torch.float64, X.device)

    def fma(p: torch.Tensor, q: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        return _arith.fma32_fast(p, q, r, workspace, tuning)

    for start in _chunks(n, chunk):
        x = X[start: start + chunk]
        x.copy_(_arith.axpby(x, Y[start: start + chunk], a, b, fma))


# ----------------------------------------------------------------------------------------------------
# Selection primitives
# ----------------------------------------------------------------------------------------------------

def _signed_keys(scores: torch.Tensor, largest: bool) -> torch.Tensor:
    """``reference.score_keys`` with its top bit flipped, as int32: signed order = unsigned key order.

    For a float (as its fp32 value, ``-0.0`` made ``+0.0``) with bits ``b``: ``b`` when ``b >= 0``,
    ``b ^ 0x7FFFFFFF`` when negative, ``NAN_KEY - 2^31`` for NaN; an int32 score ``x`` gives ``x ^ INT_MIN``.
    ``largest=False`` complements the key.
    """
    if scores.dtype == torch.int32:
        keys = scores ^ _INT_MIN
    else:
        x = scores.to(torch.float32) + 0.0  # -0.0 + 0.0 == +0.0; a new tensor, never the caller's
        bits = x.view(torch.int32)
        keys = bits ^ ((bits >> 31) & (KEY_SIGN_BIT - 1))
        keys.masked_fill_(torch.isnan(x), NAN_KEY - KEY_SIGN_BIT)
    return keys if largest else keys.bitwise_not_()


def _to_signed(key: torch.Tensor) -> torch.Tensor:
    """An int64 0-d unsigned key in ``[0, 2^32)`` as the int32 signed key (on the device)."""
    return (key - KEY_SIGN_BIT).to(torch.int32)


@dataclass
class _Piece:
    """Entries of a selection list processed together: ``x``, the scores of entries ``[start, stop)`` of
    one segment (``start`` a multiple of 32), or of several whole small segments concatenated; ``lanes``,
    int32 lanes -1 where the entry's filter bit is set (None without filters); ``pos``, for a pack of
    several segments, each entry's position in the concatenation of the segments' words' bits (None
    otherwise), and ``word_counts``, the segments' word counts."""

    segments: list[int]
    start: int
    stop: int
    x: torch.Tensor
    lanes: torch.Tensor | None
    pos: torch.Tensor | None
    word_counts: list[int]


def _pieces(scores: list[torch.Tensor], filters: list[torch.Tensor | None], chunk: int) -> Iterator[_Piece]:
    """The list in entry order as pieces of at most ``chunk`` entries: a segment of at least
    that many in chunks of its own, consecutive smaller ones concatenated into packs (so many small
    segments cost a few tensor ops per pack, not per segment)."""
    pack: list[int] = []
    packed = 0
    for i, s in enumerate(scores):
        n = s.numel()
        if pack and (n >= chunk or packed + n > chunk):
            yield _pack_piece(pack, scores, filters)
            pack, packed = [], 0
        if n >= chunk:
            for start in _chunks(n, chunk):
                stop = min(start + chunk, n)
                lanes = _lanes(filters[i], start, stop) if filters[i] is not None else None
                yield _Piece([i], start, stop, s[start:stop], lanes, None, [])
        else:
            pack.append(i)
            packed += n
    if pack:
        yield _pack_piece(pack, scores, filters)


def _pack_piece(pack: list[int], scores: list[torch.Tensor], filters: list[torch.Tensor | None]) -> _Piece:
    sizes = [scores[i].numel() for i in pack]
    word_counts = [bitmask.num_words(n) for n in sizes]
    filtered = filters[pack[0]] is not None
    if len(pack) == 1:
        n = sizes[0]
        return _Piece(pack, 0, n, scores[pack[0]], _lanes(filters[pack[0]], 0, n) if filtered else None, None,
                      word_counts)
    device = scores[pack[0]].device
    # Entry e of segment j sits at bit 32·(words before j) + e of the concatenated words.
    shift, words_before, entries_before = [], 0, 0
    for n, w in zip(sizes, word_counts, strict=True):
        shift.append(32 * words_before - entries_before)
        words_before, entries_before = words_before + w, entries_before + n
    pos = torch.arange(entries_before, device=device) + torch.repeat_interleave(
        torch.tensor(shift, device=device), torch.tensor(sizes, device=device), output_size=entries_before)
    x = torch.cat([scores[i] for i in pack])
    lanes = None
    if filtered:
        lanes = _lanes(torch.cat([filters[i] for i in pack]), 0, 32 * words_before).index_select(0, pos)
    return _Piece(pack, 0, entries_before, x, lanes, pos, word_counts)


def radix_histogram_multi(scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, bits: int,
                          largest: bool, filters: list[torch.Tensor | None], filter_value: bool = True, *,
                          tuning: Tuning = DEFAULT) -> torch.Tensor:
    """The sum over the list of :func:`radix_histogram` (one device and dtype), computed over pieces of
    at most ``tuning.chunk_entries`` entries (small segments packed together)."""
    device = scores[0].device
    bins, high = 1 << bits, shift + bits
    # Ignored entries are counted in bins + their digit (spread out: one shared bin would serialise the
    # counting on its one counter); the second half of the histogram is dropped.
    hist = torch.zeros(2 * bins, dtype=torch.int64, device=device)
    # keys ^ prefix_s is the unsigned key ^ the prefix: 0 above bit `high` exactly when the prefix matches.
    prefix_s = _to_signed((prefix >> high) << high)
    bincount = tuning.bincount and device.type in BINCOUNT_DEVICES
    for piece in _pieces(scores, filters, tuning.chunk_entries):
        digit = (_signed_keys(piece.x, largest) ^ prefix_s) >> shift
        ignored = (digit >> bits).ne_(0) if high < 32 else None  # 0/1 lanes
        digit &= bins - 1
        if piece.lanes is not None:
            lanes = piece.lanes.clone()  # -1 where the filter bit is set
            ineligible = lanes.add_(1) if filter_value else lanes.neg_()
            ignored = ineligible if ignored is None else ignored.bitwise_or_(ineligible)
        if ignored is not None:
            digit |= ignored.bitwise_left_shift_(bits)
        if bincount:
            hist += torch.bincount(digit, minlength=2 * bins)
        else:
            hist.index_add_(0, digit, torch.ones((), dtype=torch.int64, device=device).expand(digit.numel()))
    return hist[:bins]


def radix_histogram(scores: torch.Tensor, prefix: torch.Tensor, shift: int, bits: int, largest: bool,
                    filter_words: torch.Tensor | None = None, filter_value: bool = True, *,
                    tuning: Tuning = DEFAULT) -> torch.Tensor:
    """Counts (int64, ``2^bits``) of the eligible entries whose key agrees with ``prefix`` above bit
    ``shift + bits``, by the digit ``(key >> shift) & (2^bits - 1)`` (keys: ``reference.score_keys``)."""
    return radix_histogram_multi([scores], prefix, shift, bits, largest, [filter_words], filter_value,
                                 tuning=tuning)


def threshold_mask_multi(scores: list[torch.Tensor], threshold: torch.Tensor, tie_quota: torch.Tensor,
                         largest: bool, filters: list[torch.Tensor | None], filter_value: bool = True, *,
                         tuning: Tuning = DEFAULT) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The mask words of each segment: eligible entries with key > ``threshold``, plus the first
    ``tie_quota`` eligible entries of the list (segments in order, then index) with key == ``threshold``;
    and the quota left, ``max(tie_quota - ties, 0)`` (``ops.select.ListBackend``)."""
    device = scores[0].device
    words = [torch.empty(bitmask.num_words(s.numel()), dtype=torch.int32, device=device) for s in scores]
    threshold_s = _to_signed(threshold)
    # Ties still to take before each piece; clamped so the int32 comparison below cannot wrap.
    remaining = tie_quota.clone()
    for piece in _pieces(scores, filters, tuning.chunk_entries):
        keys = _signed_keys(piece.x, largest)
        greater, equal = keys > threshold_s, keys == threshold_s
        if piece.lanes is not None:
            eligible = piece.lanes != 0
            if not filter_value:
                eligible.logical_not_()
            greater &= eligible
            equal &= eligible
        tie_number = torch.cumsum(equal, 0, dtype=torch.int32)  # 1 for the piece's first tie
        greater |= equal & (tie_number <= remaining.clamp(max=(1 << 31) - 1).to(torch.int32))
        remaining -= equal.sum(dtype=torch.int64)
        if piece.pos is None:
            words[piece.segments[0]][piece.start // 32: (piece.stop + 31) // 32] = _pack(greater)
            continue
        padded = torch.zeros(32 * sum(piece.word_counts), dtype=torch.bool, device=device)
        padded[piece.pos] = greater
        for i, w in zip(piece.segments, _pack(padded).split(piece.word_counts), strict=True):
            words[i].copy_(w)
    return words, remaining.clamp(min=0)


def threshold_mask(scores: torch.Tensor, threshold: torch.Tensor, tie_quota: torch.Tensor, largest: bool,
                   filter_words: torch.Tensor | None = None, filter_value: bool = True, *,
                   tuning: Tuning = DEFAULT) -> torch.Tensor:
    """Mask words selecting the eligible entries with key > ``threshold``, plus the first ``tie_quota``
    eligible entries (index order) with key == ``threshold``."""
    return threshold_mask_multi([scores], threshold, tie_quota, largest, [filter_words], filter_value,
                                tuning=tuning)[0][0]


def hash_scores(n: int, seed: int, step: int, base: int, device: torch.device, *, tuning: Tuning = DEFAULT
                ) -> torch.Tensor:
    """``h(seed, step, j)`` for ``j = base … base + n - 1`` as int32 bit patterns
    (``reference.hash_scores``: the same unsigned 32-bit arithmetic, here in int64 lanes)."""
    key = hash_key(seed, step)
    out = torch.empty(n, dtype=torch.int32, device=device)
    u32 = 0xFFFFFFFF
    (s0, s1, s2), (m0, m1) = MIX32_SHIFTS, MIX32_MULTIPLIERS
    for start in _chunks(n, tuning.chunk_entries):
        stop = min(start + tuning.chunk_entries, n)
        first, last = base + start, base + stop - 1
        j = torch.arange(first, last + 1, dtype=torch.int64, device=device)
        if first >> 32 == last >> 32:  # one high word in the chunk: its mix is a host constant
            x = (j & u32) ^ mix32((first >> 32) ^ key)
        else:
            x = (j & u32) ^ mix32((j >> 32) ^ key)
        x ^= x >> s0  # mix32 in place
        x *= m0
        x &= u32
        x ^= x >> s1
        x *= m1
        x &= u32
        x ^= x >> s2
        out[start:stop] = x.to(torch.int32)  # int64 -> int32 keeps the low 32 bits
    return out
