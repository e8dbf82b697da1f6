"""The ``vectorized`` backend against the reference backend (the oracle): bit-identical results.

Every primitive on fresh random inputs, odd sizes, every dtype (float64 too), sparsities 0 / 0.5 / 0.9 / 1,
ties and NaN/inf scores; the public ops with ``backend="vectorized"``; the memory-safety semantics (mask
bits past N ignored, a backup shorter than the live count bounds what is touched); ``auto``'s choice; and
whole optimizer trajectories. ``CHUNK_ENTRIES`` is shrunk so that small inputs span many chunks.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssam_kernels import ops
from ssam_kernels.ops import _arith, bitmask, native, reference, vectorized
from ssam_kernels.ops.select import PASSES
from tests.helpers import ALL_DTYPES
from tests.test_optim import assert_same, build, make_model, train, weights

DTYPES = ALL_DTYPES
SIZES = [0, 1, 31, 33, 1023, 1025, 3 * 1024 + 7]
SPARSITIES = [None, 0.0, 0.5, 0.9, 1.0]  # None: dense (mask=None)
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


@pytest.fixture(autouse=True, params=[1024, 1 << 16], ids=["chunk1k", "chunk64k"])
def chunk(request, monkeypatch) -> int:
    """Run every test with many small chunks and with the production chunk size."""
    monkeypatch.setattr(vectorized, "CHUNK_ENTRIES", request.param)
    return request.param


@pytest.fixture(params=["hardware-fma", "emulated-fma"])
def fma_path(request, monkeypatch) -> str:
    """Both ways of computing the fp32 FMA: PyTorch's ``addcmul`` where it is one (the arithmetic then
    runs on every entry of a chunk and is blended in), and the float64 emulation (on the handled
    entries only, gathered and scattered back)."""
    if request.param == "hardware-fma":
        if not _arith.hardware_fma(torch.device("cpu")):
            pytest.skip("this CPU's addcmul is not an FMA")
    else:
        monkeypatch.setattr(_arith, "hardware_fma", lambda device: False)
    return request.param


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    return a.dtype == b.dtype and torch.equal(a.view(_BITS.get(a.dtype, a.dtype)),
                                              b.view(_BITS.get(b.dtype, b.dtype)))


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-for-bit equality, except that any NaN equals any NaN: a computed NaN's payload depends on
    whether PyTorch's conversion kernel took its vector or scalar path (bf16: 0x7FC0 or 0xFFFF)."""
    both_nan = torch.isnan(a) & torch.isnan(b)
    return same_bits(torch.where(both_nan, 0, a), torch.where(both_nan, 0, b))


def random_mask(n: int, sparsity: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    live = torch.rand(n) >= sparsity
    words, offsets = bitmask.from_bool(live)
    return words, offsets, int(live.sum())


def special_values(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Random values with ties, both zeros, infinities and NaN."""
    x = (torch.randint(-4, 5, (n,)) / 2).to(dtype)
    specials = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")], dtype=dtype)
    if n:
        x[torch.randint(0, n, (min(n, 25),))] = specials[torch.randint(0, 5, (min(n, 25),))]
    return x


# ------------------------------------------------------------------------------------------------
# Element-wise primitives
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_norm(dtype, n, adaptive):
    G, W = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    got = vectorized.grad_sq_norm(G, W if adaptive else None)
    expected = reference.grad_sq_norm(G, W if adaptive else None)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)  # other blocks: same up to rounding
    assert torch.equal(vectorized.grad_sq_norm(G, W if adaptive else None), got)  # deterministic


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("scale", [0.37, 0.0, float("inf"), float("nan")])
def test_perturb_restore_bit_identical(dtype, n, sparsity, adaptive, scale, fma_path):
    W, G = special_values(n, dtype) if scale == 0.37 and n % 2 else torch.randn(n).to(dtype), \
        torch.randn(n).to(dtype)
    words, offsets, k = (None, None, n) if sparsity is None else random_mask(n, sparsity)
    scale_t = torch.tensor(scale, dtype=torch.float32)
    runs = []
    for backend in (reference, vectorized):
        w, backup = W.clone(), torch.full((k,), 3.0, dtype=dtype)
        backend.perturb_(w, G, words, offsets, backup, scale_t, adaptive)
        perturbed = w.clone()
        backend.restore_(w, words, offsets, backup)
        runs.append((perturbed, backup, w))
    assert same_values(runs[1][0], runs[0][0])
    assert same_bits(runs[1][1], runs[0][1])  # backups and restores are copies: bit-exact
    assert same_bits(runs[1][2], W)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("sparsity", [None, 0.5])
@pytest.mark.parametrize("scale", [0.37, 0.0, float("inf"), float("nan")])
def test_perturb_device_path_bit_identical(dtype, sparsity, scale, fma_path, monkeypatch):
    """The path of devices whose tensors the host does not read for free: the scale's activity blended
    on the device, and ``addcmul`` (where it is an FMA) or ``fma32`` (round to odd) instead of the
    host-checked double rounding."""
    monkeypatch.setattr(_arith, "HOST_READ_DEVICES", ())
    n = 3 * 1024 + 7
    W, G = special_values(n, dtype), torch.randn(n).to(dtype)
    words, offsets, k = (None, None, n) if sparsity is None else random_mask(n, sparsity)
    runs = []
    for backend in (reference, vectorized):
        w, backup = W.clone(), torch.full((k,), 3.0, dtype=dtype)
        backend.perturb_(w, G, words, offsets, backup, torch.tensor(scale), False)
        runs.append((w, backup))
    assert same_values(runs[1][0], runs[0][0]) and same_bits(runs[1][1], runs[0][1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha", [1.0, 0.37])
def test_fisher_accumulate_bit_identical(dtype, n, alpha, fma_path):
    F, G = torch.rand(n) + 0.5, torch.randn(n).to(dtype)
    F_ref = F.clone()
    vectorized.fisher_accumulate_(F, G, alpha)
    reference.fisher_accumulate_(F_ref, G, alpha)
    assert same_bits(F, F_ref)


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
def test_backup_length_bounds_what_is_touched(n, backup_len, fma_path):
    W, G = torch.randn(n), torch.randn(n)
    words, offsets, k = random_mask(n, 0.5)
    length = {"short": k // 3, "empty": 0, "long": k + 5}[backup_len]
    scale = torch.tensor(0.25)
    # The oracle: the reference on the mask cut to the first min(k, length) set bits.
    cut = _truncated(words, n, min(k, length))
    w_ref, b_ref = W.clone(), torch.full((min(k, length),), 7.0)
    reference.perturb_(w_ref, G, cut, None, b_ref, scale)
    w, backup = W.clone(), torch.full((length,), 7.0)
    vectorized.perturb_(w, G, words, offsets, backup, scale)
    assert same_bits(w, w_ref) and same_bits(backup[: min(k, length)], b_ref)
    assert (backup[min(k, length):] == 7.0).all()  # slots past the live count are not written
    vectorized.restore_(w, words, offsets, backup)  # writes back exactly the entries it changed
    assert same_bits(w, W)


@pytest.mark.parametrize("n", [1, 33, 1000, 1025])
def test_mask_bits_past_n_are_ignored(n, fma_path):
    W, G = torch.randn(n), torch.randn(n)
    words, offsets, k = random_mask(n, 0.5)
    dirty = words.clone()
    if n % 32:
        dirty[-1] |= ~((1 << (n % 32)) - 1)  # every bit past n in the last word
    scale = torch.tensor(0.5)
    w_ref, b_ref, w, backup = W.clone(), torch.empty(k), W.clone(), torch.full((k + 40,), 7.0)
    reference.perturb_(w_ref, G, words, offsets, b_ref, scale)
    vectorized.perturb_(w, G, dirty, offsets, backup, scale)  # a backup with room for the stray bits
    assert same_bits(w, w_ref) and same_bits(backup[:k], b_ref) and (backup[k:] == 7.0).all()
    vectorized.restore_(w, dirty, offsets, backup)
    assert same_bits(w, W)


# ------------------------------------------------------------------------------------------------
# Selection primitives
# ------------------------------------------------------------------------------------------------

def _filters(n: int) -> list[tuple[torch.Tensor | None, bool]]:
    words = bitmask.pack(torch.rand(n) < 0.5)
    return [(None, True), (words, True), (words, False)]


def _prefixes(scores: torch.Tensor, largest: bool, shift: int, bits: int) -> list[torch.Tensor]:
    """Prefixes that some entries match (taken from real keys) and one that none may match."""
    keys = reference.score_keys(scores, largest)
    high = shift + bits
    out = [torch.tensor(0x5A5A5A5A)]
    if keys.numel():
        out += [(keys[i] >> high) << high if high < 32 else torch.tensor(0) for i in (0, -1)]
    return out


@pytest.mark.parametrize("dtype", [*DTYPES, torch.int32])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("histogram", ["bincount", "index_add"])
def test_radix_histogram_identical(dtype, n, largest, histogram, monkeypatch):
    if histogram == "index_add":  # the path of devices where bincount would synchronise
        monkeypatch.setattr(vectorized, "BINCOUNT_DEVICES", ())
    scores = (torch.randint(-2**31, 2**31, (n,), dtype=torch.int32) if dtype == torch.int32
              else special_values(n, dtype))
    for shift, bits in PASSES:
        for prefix in _prefixes(scores, largest, shift, bits):
            for words, value in _filters(n):
                got = vectorized.radix_histogram(scores, prefix, shift, bits, largest, words, value)
                expected = reference.radix_histogram(scores, prefix, shift, bits, largest, words, value)
                assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.int32])
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("largest", [True, False])
def test_threshold_mask_identical(dtype, n, largest):
    scores = (torch.randint(-8, 8, (n,), dtype=torch.int32) if dtype == torch.int32
              else special_values(n, dtype))
    keys = reference.score_keys(scores, largest)
    thresholds = [0, 1 << 31, (1 << 32) - 1] + [int(keys[i]) for i in range(min(n, 4))]
    for threshold in thresholds:
        for quota in (0, 1, 7, n):
            for words, value in _filters(n):
                args = (torch.tensor(threshold), torch.tensor(quota), largest, words, value)
                assert torch.equal(vectorized.threshold_mask(scores, *args),
                                   reference.threshold_mask(scores, *args))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("base", [0, 12345, 2**32 - 1500, 2**40 + 3])
def test_hash_scores_identical(n, base):
    cpu = torch.device("cpu")
    got = vectorized.hash_scores(n, 11, 5, base, cpu)
    assert torch.equal(got, reference.hash_scores(n, 11, 5, base, cpu))


# ------------------------------------------------------------------------------------------------
# Public ops and backend choice
# ------------------------------------------------------------------------------------------------

def _segments() -> list[torch.Tensor]:
    sizes, dtypes = [1025, 1, 4999, 33, 0], [torch.float32, torch.bfloat16, torch.float16, torch.float32,
                                             torch.float16]
    return [special_values(n, d) if i % 2 else torch.randn(n).to(d).abs()
            for i, (n, d) in enumerate(zip(sizes, dtypes, strict=True))]


def _same_masks(got, expected) -> None:
    for (m, o), (m_ref, o_ref) in zip(got, expected, strict=True):
        assert torch.equal(m, m_ref) and torch.equal(o, o_ref)


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 0.9, 1.0])
def test_select_topk_matches_reference(fraction):
    scores = _segments()
    k = int(sum(s.numel() for s in scores) * fraction)
    expected = ops.select_topk(scores, k, backend="reference")
    _same_masks(ops.select_topk(scores, k, backend="vectorized"), expected)


@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("nan"), float("inf"), -float("inf")]),
                max_size=200), st.floats(0, 1))
def test_select_topk_ties_and_specials(values, fraction):
    scores = [torch.tensor(values, dtype=torch.float32)]
    k = int(len(values) * fraction)
    expected = ops.select_topk(scores, k, backend="reference")
    _same_masks(ops.select_topk(scores, k, backend="vectorized"), expected)


@pytest.mark.parametrize("grow", ["random", "scores"])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.1, 0.5, 1.0])
def test_dynamic_update_matches_reference(grow, drop_fraction):
    drop_scores = _segments()
    total = sum(s.numel() for s in drop_scores)
    masks = [random_mask(s.numel(), 0.6)[0] for s in drop_scores]
    live = sum(int(bitmask.count(m)) for m in masks)
    n_drop = int(min(live, total - live) * drop_fraction)
    grow_arg = ("random" if grow == "random"
                else [special_values(s.numel(), torch.float32) for s in drop_scores])
    args = (masks, drop_scores, n_drop, grow_arg)
    _same_masks(ops.dynamic_update(*args, seed=7, step=3, backend="vectorized"),
                ops.dynamic_update(*args, seed=7, step=3, backend="reference"))


@pytest.mark.parametrize("sparsity", [None, 0.5])
def test_public_element_wise_ops(sparsity):
    n = 3000
    W, G = torch.randn(n), torch.randn(n)
    words, offsets, k = (None, None, n) if sparsity is None else random_mask(n, sparsity)
    runs = []
    for backend in ("reference", "vectorized"):
        w, backup, F = W.clone(), torch.empty(k), torch.ones(n)
        norm = ops.grad_sq_norm(G, w, backend=backend)
        ops.perturb_(w, G, words, offsets, backup, torch.tensor(0.1), True, backend=backend)
        perturbed = w.clone()
        ops.restore_(w, words, offsets, backup, backend=backend)
        ops.fisher_accumulate_(F, G, 0.5, backend=backend)
        runs.append((norm, perturbed, backup, w, F))
    torch.testing.assert_close(runs[1][0], runs[0][0], rtol=1e-12, atol=0)
    for got, expected in zip(runs[1][1:], runs[0][1:], strict=True):
        assert same_bits(got, expected)


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


@pytest.mark.parametrize("kind", ["sam", "dynamic", "fisher", "dynamic_groups"])
@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_optimizer_trajectory_matches_reference(kind, layout, monkeypatch):
    runs = []
    for backend in ("reference", "vectorized"):
        monkeypatch.setenv(ops.ENV_VAR, backend)
        model = make_model(21)
        opt = build(kind, model, layout)
        train(model, opt, 6)
        runs.append((weights(model), opt.get_mask() if kind != "sam" else []))
    assert_same(runs[1][0], runs[0][0])
    assert_same(runs[1][1], runs[0][1])
