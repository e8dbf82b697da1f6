"""Every fast backend against the reference oracle, through the public ops: bit for bit.

Backends: ``vectorized``, ``native`` (CPU) and ``cuda_sim`` (the native CUDA kernels run on CPU tensors,
``ssam_kernels.ops.cuda_sim``) under two launch shapes: an H100's, and a small GPU (1 SM, 2 blocks, grids
of at most 3 blocks) whose grid-stride loops, warps and multi-block reductions all run at these sizes.
cuda_sim is built only when ``SSAM_HIP_CPU_DIR`` names HIP-CPU at build time; without it its cases skip,
saying so.

Inputs are fresh random draws with NaN, infinities and both zeros among them; every tensor lives in its
own storage at an offset of 0, 1 or 3 elements (1 and 3 put 16-byte packs off their alignment) with
poisoned elements on both sides, which must come out unchanged (cuda_sim also refuses any access
outside the tensors). Sizes end mid-word, mid-chunk and mid-pack; masks are dense, all-zero, all-one
and random. The contract (docs/DESIGN.md): masks, counts, backups, restores and perturbed values are
bit-identical to the reference, except that a NaN may carry any payload where the reference has a NaN;
norms are deterministic and equal the reference's float64 sum up to its rounding.
"""

from __future__ import annotations

import contextlib
import zlib

import pytest
import torch

from ssam_kernels import ops
from ssam_kernels.ops import bitmask, reference, select
from ssam_kernels.ops.select import PASSES
from tests.helpers import ALL_DTYPES, assert_same_values, selection_scores

SIZES = [0, 1, 31, 32, 33, 1023, 1025, 4097]
LARGE = (1 << 20) + 3
DTYPES = ALL_DTYPES
OFFSETS = [0, 1, 3]
MASKS = ["dense", "zeros", "ones", "random"]
SMALL_GPU = (1, 2, 3)  # SMs, resident blocks per SM, grid cap
H100 = (132, 6, 1 << 16)


def _unavailable(name: str) -> str | None:
    return ops._unavailable(name, "cpu")


def _backend_param(name: str, shape: tuple[int, int, int] | None = None, id: str | None = None):
    why = _unavailable(name)
    if name == "cuda_sim" and why is not None:
        why += (". Build it: SSAM_HIP_CPU_DIR=../shared/third_party/hip-cpu "
                "pip install --no-build-isolation -e .")
    return pytest.param((name, shape), id=id or name,
                        marks=pytest.mark.skipif(why is not None, reason=f"{name} unavailable: {why}"))


BACKENDS = [
    _backend_param("vectorized"),
    _backend_param("native"),
    _backend_param("cuda_sim", H100, "cuda_sim-h100"),
    _backend_param("cuda_sim", SMALL_GPU, "cuda_sim-small"),
]


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The backend's name, with cuda_sim's launch shape in force for the test."""
    name, shape = request.param
    with contextlib.ExitStack() as stack:
        if shape is not None:
            from ssam_kernels.ops import cuda_sim
            stack.enter_context(cuda_sim.simulated(*shape))
        yield name


@pytest.fixture
def large_backend(backend: str) -> str:
    """The backends that take the 2^20 + 3 cases (Triton's interpreter is left to its own tests)."""
    if backend == "triton":
        pytest.skip("Triton's interpreter: large sizes run in tests/test_triton.py on a GPU")
    return backend


def _gen(*params: object) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh draws per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _values(n: int, dtype: torch.dtype, gen: torch.Generator, specials: bool = True) -> torch.Tensor:
    """Normal draws, with NaN, ±inf, ±0 and a huge value at a few random entries."""
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if specials and n:
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38],
                               dtype=torch.float64)
        x[torch.randint(0, n, (min(n, 6),), generator=gen)] = special[: min(n, 6)]
    return x.to(dtype)


class Placed:
    """A tensor in its own storage at ``offset`` elements, between poisoned elements that no op may touch."""

    PAD = 5

    def __init__(self, values: torch.Tensor, offset: int) -> None:
        n = values.numel()
        self.storage = torch.full((offset + n + self.PAD,), 77, dtype=values.dtype)
        self.tensor = self.storage[offset: offset + n]
        self.tensor.copy_(values)
        self.offset, self.n = offset, n
        self.guard = self._guard().clone()

    def _guard(self) -> torch.Tensor:
        return torch.cat([self.storage[: self.offset], self.storage[self.offset + self.n:]])

    def check_untouched(self) -> None:
        assert torch.equal(self._guard(), self.guard), "an op wrote outside its tensor"


def _mask(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    if kind == "dense":
        return None, None, n
    live = {"zeros": torch.zeros(n, dtype=torch.bool), "ones": torch.ones(n, dtype=torch.bool),
            "random": torch.rand(n, generator=gen) < 0.5}[kind]
    words, offsets = bitmask.from_bool(live)
    return words, offsets, int(live.sum())


def _live(words: torch.Tensor | None, n: int) -> torch.Tensor:
    return bitmask.unpack(words, n) if words is not None else torch.ones(n, dtype=torch.bool)


def _perturb_restore(backend: str, dtype: torch.dtype, n: int, offset: int, mask_kind: str, adaptive: bool,
                     gen: torch.Generator) -> None:
    W0, G = _values(n, dtype, gen), _values(n, dtype, gen)
    words, offsets, k = _mask(mask_kind, n, gen)
    scale = torch.tensor(0.37, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    w_ref, b_ref = W0.clone(), torch.empty(k, dtype=dtype)
    ops.perturb_(w_ref, G, words, offsets, b_ref, scale, adaptive, backend="reference")
    placed = [Placed(t, offset) for t in (W0, G, torch.full((k,), 5.0, dtype=dtype))]
    w, g, b = (p.tensor for p in placed)
    placed += [Placed(t, offset) for t in (words, offsets) if t is not None]
    m, o = (placed[3].tensor, placed[4].tensor) if words is not None else (None, None)
    ops.perturb_(w, g, m, o, b, scale, adaptive, backend=backend)
    assert_same_values(w, w_ref)
    assert_same_values(b, b_ref)
    w[_live(words, n)] = 0  # restore_ must write every perturbed entry back
    ops.restore_(w, m, o, b, backend=backend)
    assert_same_values(w, W0)
    for p in placed:
        p.check_untouched()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_perturb_restore(backend, dtype, n, offset, mask_kind):
    for adaptive in (False, True):
        gen = _gen(dtype, n, offset, mask_kind, adaptive)
        _perturb_restore(backend, dtype, n, offset, mask_kind, adaptive, gen)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_restore_large(large_backend, dtype):
    _perturb_restore(large_backend, dtype, LARGE, 1, "random", False, _gen(dtype, LARGE))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_perturb_restore_lists(backend, dtype, offset):
    """One list op over tensors of every size and mask kind (one launch over a table on CUDA)."""
    gen = _gen(dtype, offset)
    cases = [(n, kind) for n in SIZES for kind in MASKS]
    W0 = [_values(n, dtype, gen) for n, _ in cases]
    G = [_values(n, dtype, gen) for n, _ in cases]
    masks = [_mask(kind, n, gen) for n, kind in cases]
    scale = torch.tensor(-0.61)
    for adaptive in (False, True):
        w_ref = [w.clone() for w in W0]
        b_ref = [torch.empty(k, dtype=dtype) for _, _, k in masks]
        ops.perturb_(w_ref, G, [m for m, _, _ in masks], [o for _, o, _ in masks], b_ref, scale, adaptive,
                     backend="reference")
        w = [Placed(t, offset) for t in W0]
        g = [Placed(t, offset) for t in G]
        b = [Placed(torch.full((k,), 5.0, dtype=dtype), offset) for _, _, k in masks]
        m = [Placed(t, offset) if t is not None else None for t, _, _ in masks]
        o = [Placed(t, offset) if t is not None else None for _, t, _ in masks]
        tensors = [[p.tensor if p is not None else None for p in ps] for ps in (w, g, m, o, b)]
        ops.perturb_(*tensors, scale, adaptive, backend=backend)
        for got, want in zip(tensors[0] + tensors[4], w_ref + b_ref, strict=True):
            assert_same_values(got, want)
        for got, orig, (words, _, _) in zip(tensors[0], W0, masks, strict=True):
            got[_live(words, orig.numel())] = 0  # restore_ must write every perturbed entry back
        ops.restore_(tensors[0], tensors[2], tensors[3], tensors[4], backend=backend)
        for got, orig in zip(tensors[0], W0, strict=True):
            assert_same_values(got, orig)
        for p in (*w, *g, *b, *(p for p in (*m, *o) if p is not None)):
            p.check_untouched()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [*SIZES, 70001])
@pytest.mark.parametrize("offset", [0, 3])
def test_grad_sq_norm(backend, dtype, n, offset):
    gen = _gen(dtype, n, offset)
    G, W = _values(n, dtype, gen, specials=False), _values(n, dtype, gen, specials=False)
    for w in (None, W):
        g_p, w_p = Placed(G, offset), Placed(W, offset) if w is not None else None
        got = ops.grad_sq_norm(g_p.tensor, w_p.tensor if w_p else None, backend=backend)
        expected = ops.grad_sq_norm(G, w, backend="reference")
        assert got.dtype == torch.float64 and got.dim() == 0
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
        assert torch.equal(ops.grad_sq_norm(g_p.tensor, w_p.tensor if w_p else None, backend=backend), got)
        g_p.check_untouched()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_grad_sq_norm_lists(backend, dtype, offset):
    gen = _gen(dtype, offset)
    G = [_values(n, dtype, gen, specials=False) for n in SIZES]
    W = [_values(n, dtype, gen, specials=False) if i % 2 else None for i, n in enumerate(SIZES)]
    g_p = [Placed(t, offset) for t in G]
    w_p = [Placed(t, offset) if t is not None else None for t in W]
    got = ops.grad_sq_norm([p.tensor for p in g_p], [p.tensor if p else None for p in w_p], backend=backend)
    torch.testing.assert_close(got, ops.grad_sq_norm(G, W, backend="reference"), rtol=1e-12, atol=0)
    # Non-finite squares: the sum is inf or NaN exactly where the reference's is.
    G[2][3] = float("inf")
    assert torch.equal(ops.grad_sq_norm(G, W, backend=backend).isinf(), torch.tensor(True))


def test_grad_sq_norm_large(large_backend):
    G = _values(LARGE, torch.float32, _gen(LARGE), specials=False)
    torch.testing.assert_close(ops.grad_sq_norm(G, backend=large_backend),
                               ops.grad_sq_norm(G, backend="reference"), rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [*SIZES, LARGE])
@pytest.mark.parametrize("offset", [0, 1])
def test_fisher_accumulate(backend, dtype, n, offset):
    if n == LARGE and backend == "triton":
        pytest.skip("Triton's interpreter: large sizes run in tests/test_triton.py on a GPU")
    gen = _gen(dtype, n, offset)
    F0, G = torch.rand(n, generator=gen) + 0.5, _values(n, dtype, gen)
    for alpha in (1.0, 0.37):
        f_ref = F0.clone()
        ops.fisher_accumulate_(f_ref, G, alpha, backend="reference")
        f, g = Placed(F0, offset), Placed(G, offset)
        ops.fisher_accumulate_(f.tensor, g.tensor, alpha, backend=backend)
        assert_same_values(f.tensor, f_ref)
        f.check_untouched()
    # The list form over every size.
    Fs = [torch.rand(m, generator=gen) for m in SIZES]
    Gs = [_values(m, dtype, gen) for m in SIZES]
    f_ref = [f.clone() for f in Fs]
    ops.fisher_accumulate_(f_ref, Gs, 0.5, backend="reference")
    ops.fisher_accumulate_(Fs, Gs, 0.5, backend=backend)
    for got, want in zip(Fs, f_ref, strict=True):
        assert_same_values(got, want)


@pytest.mark.parametrize("n", [0, 1, 33, 4097, LARGE])
@pytest.mark.parametrize("base", [0, 2**32 - 100])
def test_hash_scores(backend, n, base):
    if n == LARGE and backend == "triton":
        pytest.skip("Triton's interpreter: large sizes run in tests/test_triton.py on a GPU")
    assert torch.equal(ops.hash_scores(n, 0xDEADBEEF, 17, base, backend=backend),
                       ops.hash_scores(n, 0xDEADBEEF, 17, base, backend="reference"))


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------

SCORE_DTYPES = [*DTYPES, torch.int32]


def _backend_module(name: str):
    return ops.resolve_backend(name, torch.device("cpu"))


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_selection_primitives(backend, dtype, ties):
    """radix_histogram(_multi) and threshold_mask(_multi) of each backend against the reference's,
    with and without eligibility filters, at prefixes and thresholds taken from the entries."""
    gen = _gen(dtype, ties)
    module, oracle = _backend_module(backend), _backend_module("reference")
    scores = [selection_scores(n, dtype, gen, ties) for n in SIZES]
    filters = [bitmask.from_bool(torch.rand(n, generator=gen) < 0.5)[0] for n in SIZES]
    keys = reference.score_keys(torch.cat(scores), True)
    for largest in (True, False):
        for filt, value in ((None, True), (filters, True), (filters, False)):
            fl = filt if filt is not None else [None] * len(scores)
            prefix_key = int(keys[keys.numel() // 2])
            for shift, bits in PASSES:
                prefix = torch.tensor(prefix_key & ~((1 << (shift + bits)) - 1) & 0xFFFFFFFF)
                got = select._histogram(module, scores, prefix, shift, bits, largest, fl, value)
                want = select._histogram(oracle, scores, prefix, shift, bits, largest, fl, value)
                assert torch.equal(got, want)
            key = reference.score_keys(torch.cat(scores), largest)
            for threshold in {int(key[0]), int(key[key.numel() // 3]), int(key.max())}:
                ties_count = int((key == threshold).sum())
                for quota in (0, ties_count // 2, ties_count + 1):
                    t, q = torch.tensor(threshold), torch.tensor(quota)
                    got_words, got_left = select._threshold(module, scores, t, q, largest, fl, value)
                    want_words, want_left = select._threshold(oracle, scores, t, q, largest, fl, value)
                    assert torch.equal(got_left, want_left)
                    for a, b in zip(got_words, want_words, strict=True):
                        assert torch.equal(a, b)


def _select_both(backend: str, scores: list[torch.Tensor], k: int) -> None:
    got = ops.select_topk(scores, k, backend=backend)
    want = ops.select_topk(scores, k, backend="reference")
    for (m, o), (m_ref, o_ref) in zip(got, want, strict=True):
        assert torch.equal(m, m_ref) and torch.equal(o, o_ref)
    assert sum(int(bitmask.count(m)) for m, _ in got) == k


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 1.0])
def test_select_topk(backend, dtype, fraction):
    """Exact-k selection over segments of every size (the bucket path where the backend has one)."""
    gen = _gen(dtype, fraction)
    scores = [selection_scores(n, dtype, gen, ties=i % 2 == 1) for i, n in enumerate(SIZES)]
    _select_both(backend, scores, int(sum(s.numel() for s in scores) * fraction))


def test_select_topk_paths(backend, monkeypatch):
    """The bucket path (a bucket within capacity) and its fallback (one bucket of more than
    ``select.MIN_CAPACITY`` equal keys: the third histogram pass and threshold_mask), each counted."""
    module = _backend_module(backend)
    calls = {"bucket_mask_multi": 0, "threshold_mask_multi": 0}
    for name in calls:
        primitive = getattr(module, name, None)
        if primitive is not None:
            def counted(*args, _name=name, _primitive=primitive, **kwargs):
                calls[_name] += 1
                return _primitive(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    has_bucket = getattr(module, "bucket_mask_multi", None) is not None and \
        "cpu" in getattr(module, "BUCKET_MASK_DEVICES", ())
    gen = _gen("paths")
    _select_both(backend, [torch.randn(5000, generator=gen), torch.randn(3001, generator=gen)], 2500)
    assert calls["bucket_mask_multi"] == (1 if has_bucket else 0)
    ties = torch.full((select.MIN_CAPACITY + 103,), 0.25)
    ties[:100] = 1.0  # then more than MIN_CAPACITY entries in the threshold's bucket
    _select_both(backend, [ties, torch.randn(33, generator=gen)], select.MIN_CAPACITY // 2)
    assert calls["bucket_mask_multi"] == (1 if has_bucket else 0)  # the fallback took over


def test_select_topk_large(large_backend):
    gen = _gen(LARGE)
    scores = [selection_scores(LARGE, torch.float32, gen, ties=False),
              selection_scores(4097, torch.bfloat16, gen, ties=True)]
    _select_both(large_backend, scores, LARGE // 3)


@pytest.mark.parametrize("grow", ["random", "scores"])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.1, 0.5])
def test_dynamic_update(backend, grow, drop_fraction):
    gen = _gen(grow, drop_fraction)
    drop_scores = [selection_scores(n, torch.float32, gen, ties=i % 2 == 1) for i, n in enumerate(SIZES)]
    masks = [bitmask.from_bool(torch.rand(n, generator=gen) < 0.4)[0] for n in SIZES]
    live = sum(int(bitmask.count(m)) for m in masks)
    n_drop = int(min(live, sum(SIZES) - live) * drop_fraction)
    grow_arg = "random" if grow == "random" else [selection_scores(n, torch.float16, gen, ties=True)
                                                  for n in SIZES]
    got = ops.dynamic_update(masks, drop_scores, n_drop, grow_arg, seed=7, step=3, backend=backend)
    want = ops.dynamic_update(masks, drop_scores, n_drop, grow_arg, seed=7, step=3, backend="reference")
    for (m, o), (m_ref, o_ref) in zip(got, want, strict=True):
        assert torch.equal(m, m_ref) and torch.equal(o, o_ref)
    assert sum(int(bitmask.count(m)) for m, _ in got) == live
