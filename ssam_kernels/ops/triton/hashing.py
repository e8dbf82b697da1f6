"""``hash_scores``: the counter-based random-growth hash of ``reference.hash_scores``, bit for bit.

``h(seed, step, j) = mix32(lo32(j) ^ mix32(hi32(j) ^ hash_key(seed, step)))`` with ``mix32`` the
``lowbias32`` finaliser, in uint32 arithmetic (multiplications wrap modulo 2^32). The per-update key is
computed on the host by ``contract.hash_key``; positions ``j`` are int64.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..contract import MIX32_MULTIPLIERS, MIX32_SHIFTS, hash_key
from ..tuning import DEFAULT, Tuning
from . import _config
from ._config import cdiv, launch_config

_S0, _S1, _S2 = (tl.constexpr(s) for s in MIX32_SHIFTS)
_M0, _M1 = (tl.constexpr(m) for m in MIX32_MULTIPLIERS)


@triton.jit
def _mix32(x):
    """``lowbias32`` on uint32 values."""
    x ^= x >> _S0
    x *= _M0
    x ^= x >> _S1
    x *= _M1
    x ^= x >> _S2
    return x


@triton.jit(do_not_specialize=["base", "key"])
def _hash_kernel(out_ptr, N, base, key, BLOCK: tl.constexpr):
    """``out[i] = h(j = base + i)`` as the int32 bit pattern; ``key`` is the uint32 key's int32 pattern."""
    offset = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    j = base + offset
    lo = j.to(tl.uint32)  # int64 -> uint32 keeps the low 32 bits
    hi = (j >> 32).to(tl.uint32)
    h = _mix32(lo ^ _mix32(hi ^ key.to(tl.uint32, bitcast=True)))
    tl.store(out_ptr + offset, h.to(tl.int32, bitcast=True), mask=offset < N)


def hash_scores(n: int, seed: int, step: int, base: int, device: torch.device, *, tuning: Tuning = DEFAULT
                ) -> torch.Tensor:
    """The hash of entry positions ``j = base … base + n - 1`` as int32 bit patterns (see module doc)."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    if n == 0:
        return out
    key = hash_key(seed, step)
    key = key - (1 << 32) if key >= 1 << 31 else key  # the same 32 bits as a signed int32 argument
    config = launch_config(tuning)
    with _config.on_device(out):
        _config.launch(_hash_kernel, (cdiv(n, config.block),), config, out, n, base, key, BLOCK=config.block)
    return out
