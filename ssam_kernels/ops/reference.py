"""The pure-PyTorch backend: the oracle every fast backend is tested against (chosen only by name;
``auto`` falls back to :mod:`.vectorized`).

Each function here is a *backend primitive*: inputs were validated by :mod:`ssam_kernels.ops`, and the
selection ops (``select_topk``, ``dynamic_update``) are composed from :func:`radix_histogram` and
:func:`threshold_mask` by the backend-independent driver in :mod:`ssam_kernels.ops.select`. A fast
backend implements the same functions with the same meaning.

Large inputs are processed in blocks of ``tuning.reference_block`` entries (:class:`.tuning.Tuning`, the
keyword every primitive takes) so temporaries stay bounded and counts that cross 2^31 are carried in
int64. The element-wise ops synchronise with the host on CUDA (boolean
indexing); the reference is the oracle there, not the fast path.
"""

from __future__ import annotations

import torch

from . import _arith, bitmask
from .contract import KEY_MASK, KEY_SIGN_BIT, NAN_KEY, hash_key, mix32
from .tuning import DEFAULT, Tuning

# ----------------------------------------------------------------------------------------------------
# Element-wise ops
# ----------------------------------------------------------------------------------------------------

def grad_sq_norm(G: torch.Tensor, W: torch.Tensor | None = None, *, tuning: Tuning = DEFAULT) -> torch.Tensor:
    """``Σ g_i²`` (or ``Σ (g_i · |w_i|)²`` with ``W``), accumulated in float64 in the fixed order of
    :func:`._arith.sq_norm` (its own fixed blocks: the order is the result); a float64 0-d tensor."""
    del tuning
    return _arith.sq_norm(G, W)


def _touched(mask: torch.Tensor, offsets: torch.Tensor | None, n: int, capacity: int, tuning: Tuning
             ) -> torch.Tensor:
    """The entries ``perturb_``/``restore_`` touch, as a bool tensor: set bits below ``n`` (bits past
    ``n`` are ignored) whose rank is below ``capacity`` (the backup's length). ``offsets``, when given,
    must match the mask (checked: the reference synchronises with the host anyway)."""
    if offsets is not None:
        bitmask.check_offsets(mask, offsets, n)
    selected = bitmask.unpack(mask, n, tuning.mask_block_words)
    if int(selected.sum()) > capacity:  # a short backup: entries ranked past its end are left alone
        selected &= torch.cumsum(selected, dim=0, dtype=torch.int64) <= capacity
    return selected


def perturb_(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, scale: torch.Tensor, adaptive: bool = False, *, tuning: Tuning = DEFAULT
             ) -> None:
    """For every set bit ``i`` with ``rank(i) < len(backup)``: ``backup[rank(i)] = W[i]``; then, if
    ``scale`` (rounded to fp32 unless ``W`` is float64) is finite and non-zero, ``W[i] = W[i] + scale·g_i``
    (adaptive: ``+ scale·w_i²·g_i``) with one fp32 fused multiply-add, or float64 operations for float64
    ``W`` (:func:`._arith.perturbed`)."""
    scale = _arith.perturb_scale(scale, W.dtype)
    active = _arith.scale_active(scale)
    if mask is None:
        backup.copy_(W)
        W.copy_(torch.where(active, _arith.perturbed(W, G, scale, adaptive), W))
        return
    selected = _touched(mask, offsets, W.numel(), backup.numel(), tuning)
    w = W[selected]
    backup[: w.numel()].copy_(w)
    W[selected] = torch.where(active, _arith.perturbed(w, G[selected], scale, adaptive), w)


def restore_(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, *, tuning: Tuning = DEFAULT) -> None:
    """``W[i] = backup[rank(i)]`` for every set bit ``i`` with ``rank(i) < len(backup)`` (bit-exact)."""
    if mask is None:
        W.copy_(backup)
        return
    selected = _touched(mask, offsets, W.numel(), backup.numel(), tuning)
    W[selected] = backup[: int(selected.sum())]


def fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float = 1.0, *, tuning: Tuning = DEFAULT
                       ) -> None:
    """``F += alpha · G²`` with ``F`` float32: ``fma(g, rn(alpha·g), f)`` in fp32 (``g`` and ``alpha``
    rounded to fp32 first, :func:`._arith.fisher_updated`)."""
    block = tuning.reference_block
    for start in range(0, F.numel(), block):
        f = F[start: start + block]
        f.copy_(_arith.fisher_updated(f, G[start: start + block], alpha))


def axpby_(X: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, b: torch.Tensor, *, tuning: Tuning = DEFAULT
           ) -> None:
    """``X = a·X + b·Y`` element-wise: ``fma(b, y, rn(a·x))`` in fp32 with ``a``, ``b`` rounded to fp32
    (float64 ``X``: ``rn(rn(a·x) + rn(b·y))`` in float64; :func:`._arith.axpby`)."""
    a, b = _arith.axpby_scales(a, b, X.dtype)
    block = tuning.reference_block
    for start in range(0, X.numel(), block):
        x = X[start: start + block]
        x.copy_(_arith.axpby(x, Y[start: start + block], a, b))


# ----------------------------------------------------------------------------------------------------
# Selection primitives
# ----------------------------------------------------------------------------------------------------

def score_keys(scores: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """The order-preserving unsigned 32-bit image of ``scores``, as int64 values in ``[0, 2^32)``.

    Floating scores (fp32/bf16/fp16 compared as their exact fp32 value; float64 rounded to nearest fp32
    first, so float64 scores that round to the same fp32 value are ties): ``-0.0`` is first made
    ``+0.0``; the fp32 bit pattern ``b`` of a non-negative value maps to ``b | 2^31``, of a negative
    value to ``~b``; NaN maps to 0, below every number (``-inf`` maps to ``0x007FFFFF``).
    ``int32`` scores (the random-growth hash) are taken as their unsigned value.
    With ``largest=False`` the key is ``2^32 - 1 - key``, so selecting the largest keys selects the
    smallest scores, NaN first.
    """
    if scores.dtype == torch.int32:
        keys = bitmask.to_uint(scores)
    else:
        x = scores.float()
        x = torch.where(x == 0, torch.zeros_like(x), x)
        bits = bitmask.to_uint(x.view(torch.int32))
        keys = torch.where(bits >= KEY_SIGN_BIT, KEY_MASK - bits, bits | KEY_SIGN_BIT)
        keys = torch.where(torch.isnan(x), torch.full_like(keys, NAN_KEY), keys)
    return keys if largest else KEY_MASK - keys


def _eligible(filter_words: torch.Tensor | None, filter_value: bool, start: int, stop: int, tuning: Tuning
              ) -> torch.Tensor | None:
    if filter_words is None:
        return None
    bits = bitmask.unpack(filter_words[start // 32: (stop + 31) // 32], stop - start, tuning.mask_block_words)
    return bits if filter_value else ~bits


def radix_histogram(scores: torch.Tensor, prefix: torch.Tensor, shift: int, bits: int, largest: bool,
                    filter_words: torch.Tensor | None = None, filter_value: bool = True, *,
                    tuning: Tuning = DEFAULT) -> torch.Tensor:
    """Counts of the eligible entries whose key agrees with ``prefix`` above bit ``shift + bits``,
    by the key's digit ``(key >> shift) & (2^bits - 1)``; an int64 tensor of ``2^bits`` counts.

    An entry is eligible when ``filter_words`` is None or its bit there equals ``filter_value``.
    ``prefix`` is an int64 0-d device tensor (no host synchronisation).
    """
    hist = torch.zeros(1 << bits, dtype=torch.int64, device=scores.device)
    high, block = shift + bits, tuning.reference_block
    for start in range(0, scores.numel(), block):
        stop = min(start + block, scores.numel())
        keys = score_keys(scores[start:stop], largest)
        counted = (keys >> high) == (prefix >> high)
        eligible = _eligible(filter_words, filter_value, start, stop, tuning)
        if eligible is not None:
            counted &= eligible
        hist.scatter_add_(0, (keys >> shift) & ((1 << bits) - 1), counted.to(torch.int64))
    return hist


def threshold_mask(scores: torch.Tensor, threshold: torch.Tensor, tie_quota: torch.Tensor, largest: bool,
                   filter_words: torch.Tensor | None = None, filter_value: bool = True, *,
                   tuning: Tuning = DEFAULT) -> torch.Tensor:
    """Mask words selecting the eligible entries with key > ``threshold``, plus the first ``tie_quota``
    eligible entries (in index order) with key == ``threshold``.

    ``threshold`` and ``tie_quota`` are int64 0-d device tensors.
    """
    n = scores.numel()
    words = torch.empty(bitmask.num_words(n), dtype=torch.int32, device=scores.device)
    ties_before = torch.zeros((), dtype=torch.int64, device=scores.device)
    block = tuning.reference_block
    for start in range(0, n, block):
        stop = min(start + block, n)
        keys = score_keys(scores[start:stop], largest)
        greater, equal = keys > threshold, keys == threshold
        eligible = _eligible(filter_words, filter_value, start, stop, tuning)
        if eligible is not None:
            greater &= eligible
            equal &= eligible
        tie_rank = ties_before + torch.cumsum(equal, dim=0, dtype=torch.int32) - 1
        selected = greater | (equal & (tie_rank < tie_quota))
        ties_before = ties_before + equal.sum(dtype=torch.int64)
        words[start // 32: (stop + 31) // 32] = bitmask.pack(selected, tuning.mask_block_words)
    return words


def hash_scores(n: int, seed: int, step: int, base: int, device: torch.device, *, tuning: Tuning = DEFAULT
                ) -> torch.Tensor:
    """The random-growth hash of entry positions ``j = base … base + n - 1``, as int32 bit patterns.

    ``h(seed, step, j) = mix32(lo32(j) ^ mix32(hi32(j) ^ hash_key(seed, step)))``, with ``mix32`` the
    ``lowbias32`` finaliser: all arithmetic is on unsigned 32-bit integers (multiplications modulo 2^32),
    so every backend computes the same value. For a fixed ``hi32(j)`` it is a bijection of ``lo32(j)``.
    """
    key = hash_key(seed, step)
    out = torch.empty(n, dtype=torch.int32, device=device)
    block = tuning.reference_block
    for start in range(0, n, block):
        stop = min(start + block, n)
        j = torch.arange(base + start, base + stop, dtype=torch.int64, device=device)
        out[start:stop] = bitmask.to_int32(mix32((j & 0xFFFFFFFF) ^ mix32((j >> 32) ^ key)))
    return out
