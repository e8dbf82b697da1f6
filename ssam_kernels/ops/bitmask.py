"""The bit-packed mask format shared by every backend (DESIGN.md, "Mask format").

A mask over ``N`` entries is an ``int32`` tensor of ``ceil(N / 32)`` words: entry ``i`` is bit
``i % 32`` of word ``i // 32`` (little-endian bits); bits at or past ``N`` are 0 in every mask the
library makes, and every op ignores them in a mask it is given (:func:`trim`).

``offsets`` has ``ceil(N / CHUNK) + 1`` entries: ``offsets[c]`` is the number of set bits in entries
``[0, c * CHUNK)``; the last one is the live count ``K``. A kernel program that owns chunk ``c`` finds
``rank(i)`` (the number of set bits before ``i``) as ``offsets[c]`` plus a popcount inside the chunk.
Offsets that do not match the mask are refused on CPU (:func:`check_offsets`); on CUDA, where checking
would synchronise, the kernels bound every access instead (see :func:`ssam_kernels.ops.perturb_`).

These helpers are written with vectorised torch ops and serve every backend; they work in blocks so
their temporaries stay bounded for masks of billions of entries.
"""

from __future__ import annotations

import torch

from .contract import CHUNK, WORDS_PER_CHUNK, num_chunks, num_offsets, num_words  # noqa: F401 (the format's sizes)

BLOCK_WORDS = 1 << 20
"""Words per block of :func:`pack` and :func:`unpack` by default (32 Mi entries)."""
_BIT_WEIGHTS_CACHE: dict[torch.device, torch.Tensor] = {}


def _bit_weights(device: torch.device) -> torch.Tensor:
    weights = _BIT_WEIGHTS_CACHE.get(device)
    if weights is None:
        weights = torch.bitwise_left_shift(torch.ones(32, dtype=torch.int64, device=device),
                                           torch.arange(32, device=device))
        _BIT_WEIGHTS_CACHE[device] = weights
    return weights


def to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in an int64 tensor as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def to_uint(words: torch.Tensor) -> torch.Tensor:
    """The unsigned value of int32 words, as int64."""
    return words.to(torch.int64) & 0xFFFFFFFF


def pack(bits: torch.Tensor, block_words: int = BLOCK_WORDS) -> torch.Tensor:
    """Pack a 1-D bool tensor of ``N`` entries into ``ceil(N / 32)`` int32 words, ``block_words`` at a
    time."""
    n = bits.numel()
    words = torch.empty(num_words(n), dtype=torch.int32, device=bits.device)
    weights = _bit_weights(bits.device)
    for start in range(0, words.numel(), block_words):
        stop = min(start + block_words, words.numel())
        block = bits[start * 32: stop * 32]
        pad = (stop - start) * 32 - block.numel()
        if pad:
            block = torch.cat([block, block.new_zeros(pad)])
        packed = (block.view(-1, 32).to(torch.int64) * weights).sum(dim=1)
        words[start:stop] = to_int32(packed)
    return words


def unpack(words: torch.Tensor, n: int, block_words: int = BLOCK_WORDS) -> torch.Tensor:
    """Unpack int32 words into a 1-D bool tensor of ``n`` entries, ``block_words`` at a time."""
    if words.numel() != num_words(n):
        raise ValueError(f"mask: expected {num_words(n)} words for {n} entries, got {words.numel()}")
    weights = _bit_weights(words.device)
    out = torch.empty(n, dtype=torch.bool, device=words.device)
    for start in range(0, words.numel(), block_words):
        stop = min(start + block_words, words.numel())
        block = (to_uint(words[start:stop]).unsqueeze(1) & weights) != 0
        out[start * 32: stop * 32] = block.view(-1)[: min(n, stop * 32) - start * 32]
    return out


def popcount(words: torch.Tensor) -> torch.Tensor:
    """Number of set bits of each int32 word, as int32 (SWAR bit counting)."""
    v = to_uint(words)
    v = v - ((v >> 1) & 0x55555555)
    v = (v & 0x33333333) + ((v >> 2) & 0x33333333)
    v = (v + (v >> 4)) & 0x0F0F0F0F
    return (((v * 0x01010101) >> 24) & 0xFF).to(torch.int32)


def trim(words: torch.Tensor, n: int) -> torch.Tensor:
    """``words`` with the bits of entries ``>= n`` (the unused top of the last word) cleared, which every
    op ignores: ``words`` itself when ``n`` fills the last word, else a copy (no host synchronisation)."""
    tail = n % 32
    if tail == 0 or words.numel() == 0:
        return words
    return torch.cat([words[:-1], words[-1:] & ((1 << tail) - 1)])


def offsets(words: torch.Tensor, n: int) -> torch.Tensor:
    """Per-chunk exclusive prefix counts of set bits below ``n``: int64, ``num_chunks(n) + 1`` entries."""
    if words.numel() != num_words(n):
        raise ValueError(f"mask: expected {num_words(n)} words for {n} entries, got {words.numel()}")
    chunks = num_chunks(n)
    counts = popcount(words).to(torch.int64)
    if n % 32:  # bits past n are not entries: the last word counts only its low n % 32 bits
        counts[-1:] = popcount(words[-1:] & ((1 << n % 32) - 1))
    pad = chunks * WORDS_PER_CHUNK - counts.numel()
    if pad:
        counts = torch.cat([counts, counts.new_zeros(pad)])
    per_chunk = counts.view(chunks, WORDS_PER_CHUNK).sum(dim=1)
    out = torch.zeros(chunks + 1, dtype=torch.int64, device=words.device)
    torch.cumsum(per_chunk, dim=0, out=out[1:])
    return out


def check_offsets(words: torch.Tensor, offs: torch.Tensor, n: int, name: str = "offsets") -> None:
    """Raise ``ValueError`` naming ``name`` unless ``offs`` equals :func:`offsets` of the mask. Reads the
    contents: on a CUDA tensor this synchronises with the host."""
    if not torch.equal(offs.to(torch.int64), offsets(words, n)):
        raise ValueError(f"{name}: do not match the mask (expected the exclusive prefix counts of its set "
                         f"bits below N = {n}, bitmask.offsets(mask, N))")


def count(words: torch.Tensor) -> torch.Tensor:
    """Total number of set bits, as an int64 0-d tensor (no host synchronisation); :func:`trim` the
    words first to count only the entries below ``n``."""
    return popcount(words).sum(dtype=torch.int64)


def from_bool(bits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(words, offsets)`` of a 1-D bool tensor."""
    words = pack(bits)
    return words, offsets(words, bits.numel())
