"""The op contract on the reference backend, against float64 / pure-Python re-computations."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from ssam_kernels import ops
from ssam_kernels.ops import Tuning, bitmask, reference
from tests.helpers import ALL_DTYPES, DTYPES, assert_same_values
from tests.oracles import (
    axpby_exact,
    dynamic_update_positions,
    fisher_exact,
    growth_hash,
    perturb_exact,
    top_k_positions,
)

SIZES = [0, 1, 31, 33, 1023, 1025, 3 * 1024 + 7]
SPARSITIES = [0.0, 0.5, 0.9, 0.999, 1.0]


def random_mask(n: int, sparsity: float) -> torch.Tensor:
    """A bool mask with exactly int(n * (1 - sparsity)) live entries at random places."""
    live = torch.zeros(n, dtype=torch.bool)
    live[torch.randperm(n)[: int(n * (1 - sparsity))]] = True
    return live


def positions(words_and_offsets: list[tuple[torch.Tensor, torch.Tensor]], sizes: list[int]) -> set[int]:
    bits = torch.cat([bitmask.unpack(w, n) for (w, _), n in zip(words_and_offsets, sizes, strict=True)])
    return set(bits.nonzero().flatten().tolist())


# ------------------------------------------------------------------------------------------------
# Mask format
# ------------------------------------------------------------------------------------------------

@given(st.lists(st.booleans(), max_size=3000))
def test_pack_unpack_offsets_roundtrip(bits):
    live = torch.tensor(bits, dtype=torch.bool)
    words, offsets = bitmask.from_bool(live)
    assert words.dtype == torch.int32 and words.numel() == math.ceil(len(bits) / 32)
    assert torch.equal(bitmask.unpack(words, len(bits)), live)
    # element i is bit i % 32 of word i // 32
    for i, b in enumerate(bits):
        assert ((int(words[i // 32]) & 0xFFFFFFFF) >> (i % 32)) & 1 == b
    # offsets[c] = live entries before chunk c; the last entry is K
    expected = [sum(bits[: c * 1024]) for c in range(math.ceil(len(bits) / 1024))] + [sum(bits)]
    assert offsets.tolist() == expected
    assert int(bitmask.count(words)) == sum(bits)


def test_popcount_of_extreme_words():
    words = torch.tensor([0, -1, 1, -(2**31), 0x7FFFFFFF, 0x55555555], dtype=torch.int32)
    assert bitmask.popcount(words).tolist() == [0, 32, 1, 1, 31, 16]


def test_helpers_work_in_blocks():
    live = torch.rand(5000) < 0.3
    words = bitmask.pack(live, block_words=3)
    assert torch.equal(words, bitmask.pack(live))
    assert torch.equal(bitmask.unpack(words, 5000, block_words=3), live)
    assert torch.equal(bitmask.from_bool(live)[1], bitmask.offsets(words, 5000))
    assert bitmask.offsets(words, 5000)[-1] == live.sum()


# ------------------------------------------------------------------------------------------------
# Element-wise ops
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("adaptive", [False, True])
def test_grad_sq_norm(dtype, n, adaptive):
    G, W = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    total = ops.grad_sq_norm(G, W if adaptive else None)
    g = G.double() * (W.double().abs() if adaptive else 1)
    assert total.dtype == torch.float64 and total.dim() == 0
    assert total.item() == pytest.approx((g * g).sum().item(), rel=1e-12, abs=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("sparsity", [*SPARSITIES, None])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_and_restore(dtype, n, sparsity, adaptive):
    W, G = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    original = W.clone()
    live = torch.ones(n, dtype=torch.bool) if sparsity is None else random_mask(n, sparsity)
    mask, offsets = (None, None) if sparsity is None else bitmask.from_bool(live)
    backup = torch.full((int(live.sum()),), float("nan"), dtype=dtype)  # poisoned
    scale = torch.tensor(0.37)
    ops.perturb_(W, G, mask, offsets, backup, scale, adaptive)

    assert torch.equal(backup, original[live])  # compact backup, in rank order
    assert torch.equal(W[~live], original[~live])  # dead entries untouched
    # The contract, exactly: one correctly rounded fp32 fused multiply-add, then W's dtype.
    want = perturb_exact(original[live].tolist(), G[live].tolist(), scale.item(), adaptive, dtype)
    assert torch.equal(W[live], torch.tensor(want, dtype=torch.float64).to(dtype))

    ops.restore_(W, mask, offsets, backup)
    assert torch.equal(W, original)  # bit-exact


@pytest.mark.parametrize("bad_scale", [0.0, float("inf"), float("nan")])
def test_perturb_skips_on_zero_or_nonfinite_scale_but_restores(bad_scale):
    W, G = torch.randn(100), torch.randn(100)
    original = W.clone()
    mask, offsets = bitmask.from_bool(random_mask(100, 0.5))
    backup = torch.full((50,), float("nan"))
    ops.perturb_(W, G, mask, offsets, backup, torch.tensor(bad_scale))
    assert torch.equal(W, original)
    ops.restore_(W, mask, offsets, backup)
    assert torch.equal(W, original)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
def test_fisher_accumulate(dtype, n):
    F, G = torch.rand(n), torch.randn(n).to(dtype)
    expected = torch.tensor(fisher_exact(F.tolist(), G.tolist(), 0.37), dtype=torch.float32)
    ops.fisher_accumulate_(F, G, alpha=0.37)
    assert torch.equal(F, expected)


# (a, b) of axpby_, each a value and its tensor's dtype (None: float64 for float64 X, else float32).
AXPBY_SCALES = [((1.0, None), (0.37, None)), ((-0.61, None), (1.0, None)), ((0.0, None), (1.0, None)),
                ((-1.7, None), (-0.3, None)), ((0.1, torch.float64), (3.3, torch.float32))]


def _axpby_scale(value: float, dtype: torch.dtype | None, x_dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(value, dtype=dtype or (torch.float64 if x_dtype == torch.float64 else torch.float32))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("backend", ["reference", "vectorized"])
def test_axpby(dtype, backend):
    """axpby_ against its definition in exact rational arithmetic (fp32 data) or Python's float64: random
    values, half of the entries built to cancel (``b·y`` close to ``-a·x``, where an unfused evaluation is
    off), non-finite values among them, every (a, b) of ``AXPBY_SCALES``."""
    n = 1500
    gen = torch.Generator().manual_seed(27)
    X0 = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    Y = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
    X0[:4] = torch.tensor([float("inf"), float("nan"), -0.0, 3e38], dtype=torch.float64).to(dtype)
    for (a_value, a_dtype), (b_value, b_dtype) in AXPBY_SCALES:
        a, b = _axpby_scale(a_value, a_dtype, dtype), _axpby_scale(b_value, b_dtype, dtype)
        Yc = Y.clone()
        if b_value != 0:  # entries 4.. of every other pair: y ≈ -a·x / b, so a·x + b·y nearly cancels
            near = (-(a.double() * X0.double()) / b.double()).to(dtype)
            Yc[4::2] = near[4::2]
        X = X0.clone()
        ops.axpby_(X, Yc, a, b, backend=backend)
        want = axpby_exact(X0.double().tolist(), Yc.double().tolist(), a.item(), b.item(), dtype)
        assert_same_values(X, torch.tensor(want, dtype=torch.float64).to(dtype))


def test_axpby_lists_and_blocks():
    """The list form is the single op on every entry; the reference's blocks add up to the whole."""
    gen = torch.Generator().manual_seed(5)
    Xs = [torch.randn(n, generator=gen).to(dtype) for n, dtype in zip(SIZES, [*ALL_DTYPES] * 2, strict=False)]
    Ys = [torch.randn(x.numel(), generator=gen).to(x.dtype) for x in Xs]
    a, b = torch.tensor(0.3), torch.tensor(-1.25, dtype=torch.float64)
    singles = [x.clone() for x in Xs]
    for x, y in zip(singles, Ys, strict=True):
        ops.axpby_(x, y, a, b, backend="reference")
    for backend in ("reference", "vectorized"):
        got = [x.clone() for x in Xs]
        ops.axpby_(got, Ys, a, b, backend=backend, tuning=Tuning(reference_block=96, chunk_entries=1024))
        for g, want in zip(got, singles, strict=True):
            assert_same_values(g, want)
    ops.axpby_([], [], a, b)  # an empty list does nothing


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------

SPECIAL = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 1.0, -1.0, 2.5, 1e-30]


@st.composite
def segmented_scores(draw):
    """Several score tensors (mixed dtypes) with many ties, NaN, signed zeros and infinities."""
    sizes = draw(st.lists(st.integers(0, 80), min_size=1, max_size=4))
    palette = draw(st.lists(st.sampled_from(SPECIAL) | st.floats(-4, 4, width=16), min_size=1, max_size=6))
    tensors = []
    for n in sizes:
        values = draw(st.lists(st.sampled_from(palette), min_size=n, max_size=n))
        tensors.append(torch.tensor(values, dtype=torch.float64).to(draw(st.sampled_from(DTYPES))))
    return tensors


@given(segmented_scores(), st.data())
def test_select_topk_exact_k_and_tie_order(scores, data):
    values = torch.cat([s.double() for s in scores]).tolist()
    k = data.draw(st.integers(0, len(values)))
    result = ops.select_topk(scores, k)
    assert positions(result, [s.numel() for s in scores]) == top_k_positions(values, k)
    for (words, offsets), s in zip(result, scores, strict=True):
        assert torch.equal(offsets, bitmask.offsets(words, s.numel()))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1025, 5000])
def test_select_topk_k_zero_and_all(dtype, n):
    scores = [torch.randn(n).to(dtype)]
    assert positions(ops.select_topk(scores, 0), [n]) == set()
    assert positions(ops.select_topk(scores, n), [n]) == set(range(n))


def test_select_topk_all_equal_takes_earliest_across_segments():
    scores = [torch.full((100,), 3.0), torch.full((50,), 3.0, dtype=torch.bfloat16)]
    assert positions(ops.select_topk(scores, 120), [100, 50]) == set(range(120))


def test_select_topk_nan_is_smallest():
    scores = [torch.tensor([float("nan"), -float("inf"), 1.0, float("nan")])]
    assert positions(ops.select_topk(scores, 2), [4]) == {1, 2}
    assert positions(ops.select_topk(scores, 3), [4]) == {0, 1, 2}


def test_select_topk_chunked_path_matches():
    scores = [torch.randn(3000).round(decimals=1), torch.randn(700).round(decimals=1)]
    whole = ops.select_topk(scores, 1234, backend="reference")
    chunked = ops.select_topk(scores, 1234, backend="reference",
                              tuning=Tuning(reference_block=64, mask_block_words=2))
    for (a, _), (b, _) in zip(whole, chunked, strict=True):
        assert torch.equal(a, b)


def test_keys_preserve_order_and_equality():
    ascending = torch.tensor([float("nan"), -float("inf"), -3.0, -1e-30, 0.0, 1e-30, 2.0, float("inf")])
    keys = reference.score_keys(ascending).tolist()
    assert keys[0] == 0 and keys == sorted(set(keys)) and keys[-1] < 2**32
    assert reference.score_keys(torch.tensor([-0.0])).item() == keys[4]
    assert reference.score_keys(ascending, largest=False).tolist() == [2**32 - 1 - k for k in keys]


# ------------------------------------------------------------------------------------------------
# Dynamic update and its hash
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", [0, 2**31 - 5, 2**32 + 17, 3 * 2**40])
def test_hash_matches_documented_formula(base):
    h = reference.hash_scores(40, seed=7, step=123, base=base, device=torch.device("cpu"))
    expected = [growth_hash(7, 123, base + i) for i in range(40)]
    assert (h.to(torch.int64) & 0xFFFFFFFF).tolist() == expected


def test_hash_in_blocks_matches():
    whole = reference.hash_scores(1000, 1, 2, 2**33, torch.device("cpu"))
    blocked = reference.hash_scores(1000, 1, 2, 2**33, torch.device("cpu"), tuning=Tuning(reference_block=64))
    assert torch.equal(blocked, whole)


@given(st.lists(st.integers(0, 300), min_size=1, max_size=3), st.floats(0.05, 0.95), st.data())
def test_dynamic_update_random_growth(sizes, density, data):
    n = sum(sizes)
    live = random_mask(n, 1 - density)
    drop = torch.randn(n).abs().round(decimals=1)  # ties on purpose
    drop[torch.rand(n) < 0.05] = float("nan")
    K = int(live.sum())
    n_drop = data.draw(st.integers(0, min(K, n - K)))
    seed, step = data.draw(st.integers(0, 2**32 - 1)), data.draw(st.integers(0, 10_000))
    masks = [bitmask.pack(part) for part in live.split(sizes)]
    result = ops.dynamic_update(masks, list(drop.split(sizes)), n_drop, "random", seed, step)
    got = positions(result, sizes)
    assert len(got) == K
    live_set = set(live.nonzero().flatten().tolist())
    assert got == dynamic_update_positions(live_set, drop.tolist(), n_drop, None, seed, step)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_update_score_growth(dtype):
    n = 2000
    live = random_mask(n, 0.5)
    drop, grow = torch.randn(n).to(dtype), torch.randn(n).to(dtype).round()
    result = ops.dynamic_update([bitmask.pack(live)], [drop], 300, [grow], 0, 0)
    live_set = set(live.nonzero().flatten().tolist())
    expected = dynamic_update_positions(live_set, drop.double().tolist(), 300, grow.double().tolist(), 0, 0)
    assert positions(result, [n]) == expected


# ------------------------------------------------------------------------------------------------
# Bad inputs name the argument
# ------------------------------------------------------------------------------------------------

def _perturb_args(**overrides):
    n = 64
    mask, offsets = bitmask.from_bool(random_mask(n, 0.5))
    args = {"W": torch.randn(n), "G": torch.randn(n), "mask": mask, "offsets": offsets,
            "backup": torch.empty(32), "scale": torch.tensor(0.1)}
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, name", [
    ({"W": torch.arange(64)}, TypeError, "W"),
    ({"W": torch.randn(128)[::2]}, ValueError, "W"),
    ({"W": torch.randn(8, 8)}, ValueError, "W"),
    ({"G": torch.randn(63)}, ValueError, "G"),
    ({"G": torch.randn(64).half()}, TypeError, "G"),
    ({"G": torch.randn(64, device="meta")}, ValueError, "G"),
    ({"mask": torch.zeros(2, dtype=torch.int64)}, TypeError, "mask"),
    ({"mask": torch.zeros(3, dtype=torch.int32)}, ValueError, "mask"),
    ({"offsets": torch.zeros(5, dtype=torch.int64)}, ValueError, "offsets"),
    ({"offsets": None}, ValueError, "offsets"),
    ({"backup": torch.empty(65)}, ValueError, "backup"),
    ({"backup": torch.empty(32).half()}, TypeError, "backup"),
    ({"scale": 0.1}, TypeError, "scale"),
    ({"scale": torch.tensor(1)}, TypeError, "scale"),
    ({"scale": torch.tensor([0.1])}, TypeError, "scale"),
    ({"W": torch.randn(64, dtype=torch.complex64)}, TypeError, "W"),
])
def test_perturb_rejects_bad_input(overrides, error, name):
    with pytest.raises(error, match=rf"^{name}:"):
        ops.perturb_(**_perturb_args(**overrides))


def _axpby_args(**overrides):
    args = {"X": torch.randn(64), "Y": torch.randn(64), "a": torch.tensor(0.5), "b": torch.tensor(2.0)}
    args.update(overrides)
    return args


@pytest.mark.parametrize("overrides, error, name", [
    ({"X": torch.arange(64)}, TypeError, "X"),
    ({"X": torch.randn(64, dtype=torch.complex64)}, TypeError, "X"),
    ({"X": torch.randn(128)[::2]}, ValueError, "X"),
    ({"X": torch.randn(8, 8)}, ValueError, "X"),
    ({"X": 3.0}, TypeError, "X"),
    ({"Y": torch.randn(63)}, ValueError, "Y"),
    ({"Y": torch.randn(64).half()}, TypeError, "Y"),
    ({"Y": torch.randn(64, device="meta")}, ValueError, "Y"),
    ({"Y": [torch.randn(64)]}, TypeError, "Y"),
    ({"a": 0.5}, TypeError, "a"),
    ({"a": torch.tensor(1)}, TypeError, "a"),
    ({"a": torch.tensor(0.5, device="meta")}, ValueError, "a"),
    ({"b": torch.tensor([0.5])}, TypeError, "b"),
    ({"b": torch.tensor(0.5, dtype=torch.float16)}, TypeError, "b"),
    ({"b": torch.tensor(0.5, device="meta")}, ValueError, "b"),
    # The list form: the entry is named.
    ({"X": [torch.randn(3), torch.arange(3)], "Y": [torch.randn(3)] * 2}, TypeError, r"X\[1\]"),
    ({"X": [torch.randn(3), torch.randn(3)], "Y": [torch.randn(3), torch.randn(4)]}, ValueError, r"Y\[1\]"),
    ({"X": [torch.randn(3), torch.randn(3)], "Y": [torch.randn(3), torch.randn(3).double()]}, TypeError,
     r"Y\[1\]"),
    ({"X": [torch.randn(3), torch.randn(3, device="meta")],
      "Y": [torch.randn(3), torch.randn(3, device="meta")]}, ValueError, r"X\[1\]"),
    ({"X": [torch.randn(3, device="meta")], "Y": [torch.randn(3, device="meta")]}, ValueError, "a"),
    ({"X": [torch.randn(3)], "Y": [torch.randn(3), torch.randn(3)]}, ValueError, "Y"),
    ({"X": [torch.randn(3)], "Y": torch.randn(3)}, TypeError, "Y"),
    ({"X": [torch.randn(3)], "Y": [torch.randn(3)], "b": 2.0}, TypeError, "b"),
])
def test_axpby_rejects_bad_input(overrides, error, name):
    args = _axpby_args(**overrides)
    before = [t.clone() for t in (args["X"] if isinstance(args["X"], list) else [args["X"]])
              if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    with pytest.raises(error, match=rf"^{name}:"):
        ops.axpby_(**args)
    after = [t for t in (args["X"] if isinstance(args["X"], list) else [args["X"]])
             if isinstance(t, torch.Tensor) and t.device.type == "cpu"]
    assert all(torch.equal(x, y) for x, y in zip(before, after, strict=True))  # nothing written


def test_other_ops_reject_bad_input():
    with pytest.raises(ValueError, match=r"^k:"):
        ops.select_topk([torch.randn(10)], -1)
    with pytest.raises(ValueError, match=r"^k:"):
        ops.select_topk([torch.randn(10)], 11)
    with pytest.raises(TypeError, match=r"^k:"):
        ops.select_topk([torch.randn(10)], 2.0)
    with pytest.raises(TypeError, match=r"^scores:"):
        ops.select_topk(torch.randn(10), 2)
    with pytest.raises(TypeError, match=r"^scores\[1\]:"):
        ops.select_topk([torch.randn(10), torch.arange(3)], 2)
    with pytest.raises(TypeError, match=r"^F:"):
        ops.fisher_accumulate_(torch.randn(10).half(), torch.randn(10))
    masks = [bitmask.pack(torch.ones(10, dtype=torch.bool))]
    with pytest.raises(ValueError, match=r"^n_drop:"):
        ops.dynamic_update(masks, [torch.randn(10)], 1, "random", 0, 0)  # nothing dead to grow into
    with pytest.raises(ValueError, match=r"^grow:"):
        ops.dynamic_update(masks, [torch.randn(10)], 0, "uniform", 0, 0)
    with pytest.raises(ValueError, match=r"^seed:"):
        ops.dynamic_update(masks, [torch.randn(10)], 0, "random", -1, 0)


def test_backend_selection(monkeypatch):
    G = torch.randn(10)
    with pytest.raises(ValueError, match=r"^backend:"):
        ops.grad_sq_norm(G, backend="cuda")
    monkeypatch.setenv("SSAM_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match=r"^SSAM_KERNELS_BACKEND:"):
        ops.grad_sq_norm(G)
    monkeypatch.setenv("SSAM_KERNELS_BACKEND", "reference")
    assert ops.resolve_backend(None, G.device) is reference
    load = ops._load
    monkeypatch.setattr(ops, "_load", lambda name: (None, "it could not be imported (simulated)")
                        if name == "triton" else load(name))
    with pytest.raises(RuntimeError, match=r"'triton' is not available .*simulated.*pip install triton"):
        ops.grad_sq_norm(G, backend="triton")
    assert "reference" in ops.available_backends()
