"""The bucket path of the selection driver: two histogram passes, then one mask
pass (``bucket_mask_multi``) that writes every entry decided by the 22-bit key prefix, counts them per
1024-entry chunk and collects the undecided ones as candidates, whose first ``need`` in selection order
(key descending, then entry order) are added on the candidates only. Checked against the reference
backend (masks and offsets bit-identical) and the primitive against an oracle built from
``reference.score_keys``; the fallback to the third histogram pass when the bucket is too large is
forced by shrinking the capacity.
"""

from __future__ import annotations

import functools
import sys

import pytest
import torch

from ssam_kernels import ops
from ssam_kernels.ops import TritonLaunch, Tuning, bitmask, reference
from ssam_kernels.ops.select import BUCKET_SHIFT, chunk_offsets, select_with_offsets
from tests.helpers import SCORE_DTYPES, cpu_backend, selection_scores
from tests.helpers import SEGMENT_SIZES as SIZES

_scores = functools.partial(selection_scores, specials=True)  # specials whether or not tied

select_module = sys.modules["ssam_kernels.ops.select"]

def _has_bucket_pass(name: str) -> bool:
    module = ops.resolve_backend(name, torch.device("cpu"))
    return "cpu" in getattr(module, "BUCKET_MASK_DEVICES", ())


BUCKET_BACKENDS = [b for b in ("triton", "native", "vectorized")
                   if ops._unavailable(b, "cpu") is None and _has_bucket_pass(b)]
pytestmark = pytest.mark.skipif(not BUCKET_BACKENDS, reason="no backend with bucket_mask_multi on CPU")





class _Paths:
    """Counts which mask pass each selection took (the bucket pass or the third histogram pass)."""

    def __init__(self, monkeypatch) -> None:
        self.bucket = 0
        original = select_module._bucket_pass

        def counted(*args, **kwargs):
            self.bucket += 1
            return original(*args, **kwargs)
        monkeypatch.setattr(select_module, "_bucket_pass", counted)


def _oracle(scores, prefix: int, largest: bool, filters, filter_value: bool, starts):
    """What ``bucket_mask_multi`` must write: words, per-chunk counts and the sorted candidates."""
    words, counts, candidates = [], [], []
    low_mask = (1 << BUCKET_SHIFT) - 1
    for s, f, start in zip(scores, filters, starts, strict=True):
        keys = reference.score_keys(s, largest)
        eligible = bitmask.unpack(f, s.numel()) == filter_value if f is not None else torch.ones_like(keys,
                                                                                                     dtype=bool)
        decided = eligible & ((keys >> BUCKET_SHIFT) > (prefix >> BUCKET_SHIFT))
        words.append(bitmask.pack(decided))
        counts.append(torch.diff(bitmask.offsets(words[-1], s.numel())).to(torch.int32))
        undecided = torch.nonzero(eligible & ((keys >> BUCKET_SHIFT) == (prefix >> BUCKET_SHIFT)))[:, 0]
        candidates.append(((low_mask - (keys[undecided] & low_mask)) << 53) | (start + undecided))
    return words, counts, torch.sort(torch.cat(candidates)).values


@pytest.mark.parametrize("backend", BUCKET_BACKENDS)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("ties,filtered,largest", [(False, False, True), (True, False, True),
                                                   (True, True, False), (False, True, True)])
def test_bucket_mask_matches_oracle(backend, dtype, ties, filtered, largest):
    module = cpu_backend(backend)
    gen = torch.Generator().manual_seed(11 + ties + 2 * filtered)
    scores = [_scores(n, dtype, gen, ties) for n in SIZES]
    filters = ([bitmask.from_bool(torch.rand(n, generator=gen) < 0.5)[0] for n in SIZES] if filtered
               else [None] * len(SIZES))
    starts = [sum(SIZES[:j]) + 7 for j in range(len(SIZES))]  # any positions, in entry order
    keys = torch.cat([reference.score_keys(s, largest) for s in scores])
    for prefix in (int(keys[3]), int(keys[-2]), int(torch.median(keys)), 0):
        prefix = (prefix >> BUCKET_SHIFT) << BUCKET_SHIFT
        want_words, want_counts, want_candidates = _oracle(scores, prefix, largest, filters, True, starts)
        for capacity in (want_candidates.numel(), max(want_candidates.numel() // 2, 1)):
            words = [torch.full((bitmask.num_words(n),), 12345, dtype=torch.int32) for n in SIZES]
            counts = [torch.zeros(bitmask.num_chunks(n), dtype=torch.int32) for n in SIZES]
            # The candidate buffer is a view: the slots past its end must stay untouched.
            storage = torch.full((capacity + 64,), -1, dtype=torch.int64)
            cursor = torch.zeros(1, dtype=torch.int32)
            module.bucket_mask_multi(scores, torch.tensor(prefix), BUCKET_SHIFT, largest, filters, True,
                                     words, counts, starts, storage[:capacity], cursor)
            for got, want in zip(words, want_words, strict=True):
                assert torch.equal(got, want)
            for got, want in zip(counts, want_counts, strict=True):
                assert torch.equal(got, want)
            assert int(cursor) == want_candidates.numel()
            assert torch.all(storage[capacity:] == -1)
            written = storage[: min(capacity, want_candidates.numel())]
            if capacity >= want_candidates.numel():
                assert torch.equal(torch.sort(written).values, want_candidates)
            else:
                assert torch.isin(written, want_candidates).all()
                assert written.unique().numel() == written.numel()


def _check_topk(backend: str, scores, k: int, tuning: Tuning | None = None) -> None:
    got = ops.select_topk(scores, k, backend=backend, tuning=tuning)
    want = ops.select_topk(scores, k, backend="reference")
    for (w, o), (x, y) in zip(got, want, strict=True):
        assert torch.equal(w, x) and torch.equal(o, y)
    assert sum(int(o[-1]) for _, o in got) == k


@pytest.mark.parametrize("backend", BUCKET_BACKENDS)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_select_topk_bucket_path(monkeypatch, backend, dtype, ties):
    paths = _Paths(monkeypatch)
    gen = torch.Generator().manual_seed(5 + ties)
    scores = [_scores(n, dtype, gen, ties) for n in SIZES]
    total = sum(SIZES)
    for k in (0, 1, 2, total // 3, total - 1, total):
        _check_topk(backend, scores, k)
    assert paths.bucket == 5  # every k > 0 took the bucket path


@pytest.mark.parametrize("backend", BUCKET_BACKENDS)
def test_select_topk_configs(backend):
    """Tiles smaller than a chunk (several programs add to one chunk's count) and the GPU tiles."""
    from ssam_kernels.ops.tuning import TRITON_GPU, TRITON_INTERPRETER
    gen = torch.Generator().manual_seed(2)
    scores = [_scores(n, torch.float32, gen, ties=True) for n in [33, 0, 1023, 1, 2500]]
    small = TritonLaunch(**{**vars(TRITON_INTERPRETER), "block": 64, "histogram_tiles": 1,
                            "interpret_programs": 3})
    for launch in (small, TRITON_GPU):
        for k in (1, 700, 3000):
            _check_topk(backend, scores, k, Tuning(triton=launch))


@pytest.mark.parametrize("backend", BUCKET_BACKENDS)
def test_tie_order_entry_order(backend):
    """Candidates with equal keys are taken in entry order (segments, then index), and higher low key
    bits first: all scores share one 22-bit bucket, so every selected entry is decided on the candidates.
    A resolution that ignored the low bits, or ordered equal keys by anything but position (e.g. the
    order the atomics wrote them), would select other entries."""
    sizes = [300, 0, 1500, 45]
    base = torch.tensor(1.0).view(torch.int32)
    scores = [torch.full((n,), 1.0) for n in sizes]
    # A few entries just above 1.0 in the low 10 key bits: they come first, highest first.
    scores[2][[1400, 3, 700]] = (base + torch.tensor([5, 2, 9], dtype=torch.int32)).view(torch.float32)
    scores[0][250] = (base + 1).view(torch.float32)
    for k in (1, 3, 4, 5, 10, 301, 1000, sum(sizes)):
        got = ops.select_topk(scores, k, backend=backend)
        chosen = torch.cat([bitmask.unpack(w, n) for (w, _), n in zip(got, sizes, strict=True)])
        flat = torch.cat(scores)
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))
        want = torch.zeros(flat.numel(), dtype=torch.bool)
        want[order[:k]] = True
        assert torch.equal(chosen, want)
        _check_topk(backend, scores, k)


@pytest.mark.parametrize("backend", BUCKET_BACKENDS)
def test_overflow_takes_third_pass(monkeypatch, backend):
    """A bucket larger than the capacity (forced small here) takes the third histogram pass and
    ``threshold_mask``; with the capacity between bucket sizes both paths run, both exact."""
    paths = _Paths(monkeypatch)
    tuning = Tuning(bucket_min_capacity=40, bucket_capacity_shift=62)
    gen = torch.Generator().manual_seed(8)
    tied = [torch.randint(0, 3, (n,), generator=gen) / 2 for n in SIZES]  # ~2400 equal keys per bucket
    spread = [_scores(n, torch.float32, gen, ties=False) for n in SIZES]  # buckets of a few keys
    total = sum(SIZES)
    for k in (1, total // 2, total):
        _check_topk(backend, tied, k, tuning)
    assert paths.bucket == 0
    for k in (1, total // 2, total - 3):
        _check_topk(backend, spread, k, tuning)
    assert paths.bucket == 3


@pytest.mark.parametrize("backend", BUCKET_BACKENDS)
@pytest.mark.parametrize("grow", ["random", "scores"])
def test_dynamic_update_bucket_path(monkeypatch, backend, grow):
    """Filters (live entries for the drop, dead ones for the grow) and ``largest=False`` on the bucket
    path, against the reference."""
    paths = _Paths(monkeypatch)
    gen = torch.Generator().manual_seed(4)
    drop = [_scores(n, torch.bfloat16, gen, ties=True).abs() for n in SIZES]
    masks = [bitmask.from_bool(torch.rand(n, generator=gen) < 0.4)[0] for n in SIZES]
    live = sum(int(bitmask.count(m)) for m in masks)
    grow_arg = "random" if grow == "random" else [_scores(n, torch.float16, gen, ties=True) for n in SIZES]
    for n_drop in (1, live // 3, min(live, sum(SIZES) - live)):
        got = ops.dynamic_update(masks, drop, n_drop, grow_arg, 3, 11, backend=backend)
        want = ops.dynamic_update(masks, drop, n_drop, grow_arg, 3, 11, backend="reference")
        for (w, o), (x, y) in zip(got, want, strict=True):
            assert torch.equal(w, x) and torch.equal(o, y)
    assert paths.bucket == 6


def test_chunk_offsets_match_bitmask_offsets():
    gen = torch.Generator().manual_seed(6)
    sizes = [0, 1, 1024, 1025, 5000, 0, 31]
    words = [torch.randint(-2**31, 2**31, (bitmask.num_words(n),), generator=gen, dtype=torch.int64)
             .to(torch.int32) for n in sizes]
    words = [bitmask.trim(w, n) for w, n in zip(words, sizes, strict=True)]
    want = [bitmask.offsets(w, n) for w, n in zip(words, sizes, strict=True)]
    per_chunk = torch.cat([torch.diff(o) for o in want]).to(torch.int32)
    got = chunk_offsets(per_chunk, [bitmask.num_chunks(n) for n in sizes])
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.int64 and torch.equal(g, w)


def test_without_bucket_backend_unchanged():
    """A backend without ``bucket_mask_multi`` (the reference) keeps the three histogram passes and gives
    offsets through ``list_offsets``."""
    assert not hasattr(reference, "bucket_mask_multi")
    gen = torch.Generator().manual_seed(9)
    scores = [_scores(n, torch.float32, gen, ties=True) for n in SIZES]
    got = select_with_offsets(scores, 100, True, [reference] * len(scores))
    for (w, o), n in zip(got, SIZES, strict=True):
        assert torch.equal(o, bitmask.offsets(w, n))
    assert sum(int(o[-1]) for _, o in got) == 100


def test_native_bucket_mask_registered_for_cuda_only():
    """The native ``bucket_mask_multi`` has a CUDA kernel (when built with CUDA) and no CPU one: CPU
    selections keep the third histogram pass (the driver reads ``BUCKET_MASK_DEVICES``)."""
    from ssam_kernels.ops import native
    if native.unavailable_reason("cpu") is not None:
        pytest.skip("native extension not built")
    assert native.BUCKET_MASK_DEVICES == ("cuda",)
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    assert not has("ssam_kernels::bucket_mask_multi", "CPU")
    assert has("ssam_kernels::bucket_mask_multi", "CUDA") == native._C.built_with_cuda()


def test_capacity_bounds():
    """The candidate capacity grows with N (~1/256 of the entries) between a floor and a ceiling that
    keeps the kernels' int32 slot cursor from overflowing."""
    tuning = Tuning()
    assert select_module._capacity(0, tuning) == tuning.bucket_min_capacity
    assert select_module._capacity(1 << 30, tuning) == 1 << 22
    assert select_module._capacity(1 << 45, tuning) == select_module.MAX_CAPACITY < 1 << 31
