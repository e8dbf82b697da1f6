"""What is specific to the ``vectorized`` backend: its popcount pass, its memory-safety semantics (mask bits
past N ignored, a backup shorter than the live count bounds what is touched), with
``Tuning.chunk_entries`` shrunk so that small inputs span many chunks and with both FMA paths, and
``auto``'s choice. Its parity with the reference oracle, under each of its tunings, is in
tests/test_parity.py.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from ssam_kernels import ops
from ssam_kernels.ops import Tuning, _arith, bitmask, native, reference, vectorized

_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


@pytest.fixture(params=[1024, 1 << 16], ids=["chunk1k", "chunk64k"])
def chunk(request) -> int:
    """Many small chunks, and the production chunk size."""
    return request.param


@pytest.fixture(params=["hardware-fma", "emulated-fma"])
def fused(request) -> bool:
    """Both ways of computing the fp32 FMA: PyTorch's ``addcmul`` where it is one (the arithmetic then
    runs on every entry of a chunk and is blended in), and the float64 emulation (on the handled
    entries only, gathered and scattered back)."""
    if request.param == "hardware-fma" and not _arith.hardware_fma(torch.device("cpu")):
        pytest.skip("this CPU's addcmul is not an FMA")
    return request.param == "hardware-fma"


@pytest.fixture
def tuning(chunk: int, fused: bool) -> Tuning:
    return Tuning(chunk_entries=chunk, fused_fma=fused)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    return a.dtype == b.dtype and torch.equal(a.view(_BITS.get(a.dtype, a.dtype)),
                                              b.view(_BITS.get(b.dtype, b.dtype)))


def random_mask(n: int, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    live = torch.rand(n) >= sparsity
    words, offsets = bitmask.from_bool(live)
    return words, offsets, int(live.sum())


# ------------------------------------------------------------------------------------------------
# Element-wise primitives
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 31, 32, 33, 1023, 1025, 70_000])
def test_block_counts_match_offsets(n):
    """The popcount pass behind the chunk counts and the offsets check: every word pattern (bit 31 set,
    all ones), bits past n ignored."""
    random = torch.randint(-(2**31), 2**31, (bitmask.num_words(n),), dtype=torch.int64).to(torch.int32)
    for words in (random, torch.full_like(random, -1), torch.full_like(random, -(2**31)), random * 0):
        expected = bitmask.offsets(bitmask.trim(words, n), n).diff()
        assert torch.equal(vectorized._block_counts(words, n), expected)


# ------------------------------------------------------------------------------------------------
# Memory safety: bits past N ignored; nothing past backup.numel() read, written or changed
# ------------------------------------------------------------------------------------------------

def _truncated(words: torch.Tensor, n: int, keep: int) -> torch.Tensor:
    """The mask with only its first ``keep`` set bits (entries < n)."""
    live = bitmask.unpack(words, n)
    live &= torch.cumsum(live, 0) <= keep
    return bitmask.pack(live)


@pytest.mark.parametrize("n", [33, 1025, 5000])
@pytest.mark.parametrize("backup_len", ["short", "empty", "long"])
def test_backup_length_bounds_what_is_touched(n, backup_len, tuning):
    W, G = torch.randn(n), torch.randn(n)
    words, offsets, k = random_mask(n, 0.5)
    length = {"short": k // 3, "empty": 0, "long": k + 5}[backup_len]
    scale = torch.tensor(0.25)
    # The oracle: the reference on the mask cut to the first min(k, length) set bits.
    cut = _truncated(words, n, min(k, length))
    w_ref, b_ref = W.clone(), torch.full((min(k, length),), 7.0)
    reference.perturb_(w_ref, G, cut, None, b_ref, scale)
    w, backup = W.clone(), torch.full((length,), 7.0)
    vectorized.perturb_(w, G, words, offsets, backup, scale, tuning=tuning)
    assert same_bits(w, w_ref) and same_bits(backup[: min(k, length)], b_ref)
    assert (backup[min(k, length):] == 7.0).all()  # slots past the live count are not written
    vectorized.restore_(w, words, offsets, backup, tuning=tuning)  # writes back exactly what it changed
    assert same_bits(w, W)


@pytest.mark.parametrize("n", [1, 33, 1000, 1025])
def test_mask_bits_past_n_are_ignored(n, tuning):
    W, G = torch.randn(n), torch.randn(n)
    words, offsets, k = random_mask(n, 0.5)
    dirty = words.clone()
    if n % 32:
        dirty[-1] |= ~((1 << (n % 32)) - 1)  # every bit past n in the last word
    scale = torch.tensor(0.5)
    w_ref, b_ref, w, backup = W.clone(), torch.empty(k), W.clone(), torch.full((k + 40,), 7.0)
    reference.perturb_(w_ref, G, words, offsets, b_ref, scale)
    vectorized.perturb_(w, G, dirty, offsets, backup, scale, tuning=tuning)  # room for the stray bits
    assert same_bits(w, w_ref) and same_bits(backup[:k], b_ref) and (backup[k:] == 7.0).all()
    vectorized.restore_(w, dirty, offsets, backup, tuning=tuning)
    assert same_bits(w, W)


def test_auto_prefers_compiled_then_vectorized(monkeypatch):
    cpu = torch.device("cpu")
    if native.unavailable_reason("cpu") is None:
        assert ops.resolve_backend("auto", cpu) is native
    monkeypatch.setattr(native, "unavailable_reason", lambda device_type: "not built (simulated)")
    monkeypatch.setattr(ops, "_WARNED_FALLBACK", set())
    # a failed or skipped build is silent at pip's normal verbosity: the first fallback says so, once
    with pytest.warns(UserWarning, match=r"not built \(simulated\).*pip install --no-build-isolation"):
        assert ops.resolve_backend("auto", cpu) is vectorized
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("auto", cpu) is vectorized  # once per process and device type
        assert ops.resolve_backend("vectorized", cpu) is vectorized  # chosen by name: no warning
        assert ops.resolve_backend(None, torch.device("mps")) is vectorized  # nothing to build there
    assert ops.resolve_backend("reference", cpu) is reference  # the oracle only when asked by name
    assert vectorized.unavailable_reason("xpu") is None
    with pytest.raises(RuntimeError, match="backend='vectorized'"):
        ops.resolve_backend("native", cpu)
