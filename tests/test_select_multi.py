"""The list forms of the selection primitives: ``radix_histogram_multi`` and
``threshold_mask_multi`` of every backend that has them, against the reference's single-segment
primitives applied segment by segment (the oracle); ``select_topk`` / ``dynamic_update`` over lists of
segments (mixed dtypes, ties, filters) against the reference backend; and calls / launches per mask
refresh that do not grow with the number of segments.
"""

from __future__ import annotations

import sys

import pytest
import torch

import ssam_kernels as sk
from ssam_kernels import ops
from ssam_kernels.ops import Tuning, bitmask, reference, vectorized
from ssam_kernels.ops.select import PASSES, select
from tests.helpers import SCORE_DTYPES, cpu_backend, native_op_counts, selection_scores, triton_launch_log
from tests.helpers import SEGMENT_SIZES as SIZES

select_module = sys.modules["ssam_kernels.ops.select"]

LIST_BACKENDS = [b for b in ("vectorized", "native", "triton") if ops._unavailable(b, "cpu") is None]




def _case(sizes: list[int], dtype: torch.dtype, seed: int, ties: bool, filtered: bool):
    gen = torch.Generator().manual_seed(seed)
    scores = [selection_scores(n, dtype, gen, ties) for n in sizes]
    filters = ([bitmask.from_bool(torch.rand(n, generator=gen) < 0.5)[0] for n in sizes] if filtered
               else [None] * len(sizes))
    return scores, filters


@pytest.fixture(params=[1024, 1 << 16], ids=["vchunk1k", "vchunk64k"])
def vchunk(request) -> Tuning:
    """The vectorized backend's pieces: many packs and chunked segments, and the production size (the
    other backends run once)."""
    if request.param != 1 << 16 and request.node.callspec.params.get("backend", "vectorized") != "vectorized":
        pytest.skip("the chunk size is the vectorized backend's")
    return Tuning(chunk_entries=request.param)


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("ties,filtered", [(False, False), (True, False), (True, True)])
@pytest.mark.parametrize("largest", [True, False])
def test_primitives_match_reference(backend, dtype, ties, filtered, largest, vchunk):
    if backend == "triton" and not largest:
        pytest.skip("the interpreter is slow; largest=False is the complemented key, tested in test_triton")
    module = cpu_backend(backend)
    scores, filters = _case(SIZES, dtype, seed=len(SIZES) + ties + 2 * filtered, ties=ties, filtered=filtered)
    keys = torch.cat([reference.score_keys(s, largest) for s in scores])
    for shift, bits in PASSES:
        for prefix in (0, int(keys[5]), int(keys[-3])):
            p = torch.tensor((prefix >> (shift + bits)) << (shift + bits) if shift + bits < 32 else 0)
            for fv in (True, False):
                got = module.radix_histogram_multi(scores, p, shift, bits, largest, filters, fv,
                                                   tuning=vchunk)
                want = sum(reference.radix_histogram(s, p, shift, bits, largest, f, fv)
                           for s, f in zip(scores, filters, strict=True))
                assert got.dtype == torch.int64 and torch.equal(got, want)
    for t in (int(keys[3]), int(keys[-1]), int(torch.median(keys))):
        threshold = torch.tensor(t)
        eligible_ties = [int(((reference.score_keys(s, largest) == t)
                              & (bitmask.unpack(f, s.numel()) if f is not None else True)).sum())
                         for s, f in zip(scores, filters, strict=True)]
        for quota in (0, 1, 2, sum(eligible_ties) // 2, sum(eligible_ties), sum(eligible_ties) + 5):
            words, left = module.threshold_mask_multi(scores, threshold, torch.tensor(quota), largest,
                                                      filters, True, tuning=vchunk)
            want, remaining = [], quota
            for s, f, ties_s in zip(scores, filters, eligible_ties, strict=True):
                want.append(reference.threshold_mask(s, threshold, torch.tensor(remaining), largest, f, True))
                remaining = max(remaining - ties_s, 0)
            assert left.dtype == torch.int64 and int(left) == remaining
            assert len(words) == len(scores)
            for w, x in zip(words, want, strict=True):
                assert w.dtype == torch.int32 and torch.equal(w, x)


def _topk_reference(scores, k):
    return ops.select_topk(scores, k, backend="reference")


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("mixed", [False, True])
def test_select_topk_lists(backend, mixed, vchunk):
    gen = torch.Generator().manual_seed(7)
    dtypes = [SCORE_DTYPES[j % 4] if mixed else torch.float32 for j in range(len(SIZES))]
    scores = [selection_scores(n, d, gen, ties=True) for n, d in zip(SIZES, dtypes, strict=True)]
    total = sum(SIZES)
    for k in (0, 1, total // 3, total - 1, total):
        got = ops.select_topk(scores, k, backend=backend, tuning=vchunk)
        want = _topk_reference(scores, k)
        for (w, o), (x, y) in zip(got, want, strict=True):
            assert torch.equal(w, x) and torch.equal(o, y)
        assert sum(int(o[-1]) for _, o in got) == k


@pytest.mark.parametrize("backend", LIST_BACKENDS)
@pytest.mark.parametrize("grow", ["random", "scores"])
def test_dynamic_update_lists(backend, grow, vchunk):
    gen = torch.Generator().manual_seed(9)
    drop = [selection_scores(n, torch.float32, gen, ties=True).abs() for n in SIZES]
    live = [torch.rand(n, generator=gen) < 0.4 for n in SIZES]
    masks = [bitmask.from_bool(x)[0] for x in live]
    for m, n in zip(masks, SIZES, strict=True):
        if n % 32:  # bits past N: not entries, neither live nor kept
            m[-1] |= -(1 << (n % 32))
    grow_arg = ("random" if grow == "random"
                else [selection_scores(n, torch.bfloat16, gen, ties=True) for n in SIZES])
    n_live = sum(int(x.sum()) for x in live)
    for n_drop in (0, 1, n_live // 2, min(n_live, sum(SIZES) - n_live)):
        got = ops.dynamic_update(masks, drop, n_drop, grow_arg, 3, 11, backend=backend, tuning=vchunk)
        want = ops.dynamic_update(masks, drop, n_drop, grow_arg, 3, 11, backend="reference")
        for (w, o), (x, y), n in zip(got, want, SIZES, strict=True):
            assert torch.equal(w, x) and torch.equal(o, y)
            assert torch.equal(w, bitmask.trim(w, n))


def test_fallback_loop_matches_lists(monkeypatch):
    """A backend without the list primitives (the reference) gives what the list primitives give, also
    with segments of interleaved dtypes (one threshold call per run of one dtype)."""
    assert not hasattr(reference, "radix_histogram_multi") and not hasattr(reference, "threshold_mask_multi")
    gen = torch.Generator().manual_seed(3)
    dtypes = [torch.float32, torch.float32, torch.bfloat16, torch.float32, torch.float64, torch.float64]
    sizes = [40, 0, 1025, 33, 7, 100]
    scores = [selection_scores(n, d, gen, ties=True) for n, d in zip(sizes, dtypes, strict=True)]
    for k in (1, 50, 600, sum(sizes)):
        got = select(scores, k, True, [vectorized] * len(scores))
        want = select(scores, k, True, [reference] * len(scores))
        assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
        assert sum(int(bitmask.count(w)) for w in got) == k


# ----------------------------------------------------------------------------------------------------
# Calls and launches per refresh do not grow with the number of segments
# ----------------------------------------------------------------------------------------------------

def _segments(count: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(int(n), generator=gen) for n in torch.randint(1, 3000, (count,), generator=gen)]


class _Counter:
    """Counts the selection calls of a backend module by wrapping its list primitives."""

    NAMES = ("radix_histogram_multi", "threshold_mask_multi", "radix_histogram", "threshold_mask",
             "bucket_mask_multi")

    def __init__(self, monkeypatch, module) -> None:
        self.calls: dict[str, int] = {}
        for name in self.NAMES:
            fn = getattr(module, name, None)
            if fn is None:
                continue

            def counted(*args, _fn=fn, _name=name, **kwargs):
                self.calls[_name] = self.calls.get(_name, 0) + 1
                return _fn(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)


def _bucket_backend(backend: str) -> bool:
    module = cpu_backend(backend)
    return hasattr(module, "bucket_mask_multi") and "cpu" in module.BUCKET_MASK_DEVICES


def _native_ops(fn) -> dict[str, int]:
    return native_op_counts(fn, exclude="hash")


@pytest.mark.parametrize("backend", LIST_BACKENDS)
def test_selection_calls_independent_of_segment_count(monkeypatch, backend):
    counter = _Counter(monkeypatch, cpu_backend(backend))

    def calls(count: int, op: str) -> dict[str, int]:
        counter.calls.clear()
        scores = _segments(count, count)
        if op == "topk":
            ops.select_topk(scores, sum(s.numel() for s in scores) // 3, backend=backend)
        else:
            masks = [bitmask.from_bool(s > 0.5)[0] for s in scores]
            ops.dynamic_update(masks, [s.abs() for s in scores], 20, "random", 1, 2, backend=backend)
        return dict(counter.calls)
    if _bucket_backend(backend):  # two histogram passes, then the mask pass that collects the candidates
        topk, dynamic = {"radix_histogram_multi": 2, "bucket_mask_multi": 1}, {"radix_histogram_multi": 4,
                                                                               "bucket_mask_multi": 2}
    else:
        topk, dynamic = {"radix_histogram_multi": 3, "threshold_mask_multi": 1}, {"radix_histogram_multi": 6,
                                                                                  "threshold_mask_multi": 2}
    assert calls(10, "topk") == calls(200, "topk") == topk
    assert calls(10, "dynamic") == calls(200, "dynamic") == dynamic


@pytest.mark.skipif("native" not in LIST_BACKENDS, reason="native extension not built")
@pytest.mark.parametrize("policy", ["dynamic", "fisher"])
def test_native_refresh_calls_independent_of_parameter_count(policy):
    """One full mask refresh of the per-tensor layout (SSAM-D: drop + grow; SSAM-F: Fisher + top-k):
    the same native selection calls for 10 and for 200 parameters."""
    def refresh_ops(count: int) -> dict[str, int]:
        torch.manual_seed(count)
        model = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(count // 2)])
        data = [(torch.randn(4, 3), torch.randn(4, 3))]
        if policy == "dynamic":
            mask = sk.DynamicMask(interval=1, seed=1)
        else:
            mask = sk.FisherMask(model, torch.nn.functional.mse_loss, data, num_samples=4, interval=1)
        opt = sk.SSAM(model.parameters(), torch.optim.SGD, sparsity=0.5, mask=mask, backend="native",
                      layout="tensors", lr=0.1)

        def step() -> None:
            x, y = data[0]
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.first_step()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.second_step()
            opt.zero_grad()
        step()
        counts = _native_ops(step)  # the second step refreshes the mask (interval 1)
        return {k: v for k, v in counts.items() if "radix" in k or "threshold" in k}
    few, many = refresh_ops(10), refresh_ops(200)
    assert few == many
    expected = 2 if policy == "dynamic" else 1
    assert few == {"ssam_kernels::radix_histogram_multi": 3 * expected,
                   "ssam_kernels::threshold_mask_multi": expected}


def test_list_offsets_match_bitmask_offsets():
    """The offsets of a list of masks in a fixed number of ops equal ``bitmask.offsets`` of each (random
    words, bits past N set, empty and one-entry masks, chunk boundaries)."""
    gen = torch.Generator().manual_seed(1)
    for trial in range(10):
        count = int(torch.randint(2, 30, (1,), generator=gen))
        sizes = torch.randint(0, 5000, (count,), generator=gen).tolist()
        sizes += [0, 1, 31, 32, 33, 1024, 1025, 2048][trial % 8:]
        words = [torch.randint(-2**31, 2**31, (bitmask.num_words(n),), generator=gen, dtype=torch.int64)
                 .to(torch.int32) for n in sizes]
        for w, n, o in zip(words, sizes, select_module.list_offsets(words, sizes), strict=True):
            want = bitmask.offsets(w, n)
            assert o.dtype == want.dtype and torch.equal(o, want)
    assert select_module.list_offsets([], []) == []
    with pytest.raises(ValueError, match="mask: expected 2 words"):
        select_module.list_offsets([torch.zeros(1, dtype=torch.int32)] * 2, [40, 40])


@pytest.mark.skipif("triton" not in LIST_BACKENDS, reason="triton not available")
def test_triton_launches_per_selection_independent_of_segment_count(monkeypatch):
    launches = triton_launch_log(monkeypatch)

    def per_select(count: int) -> list[str]:
        launches.clear()
        scores = _segments(count, count)
        ops.select_topk(scores, sum(s.numel() for s in scores) // 3, backend="triton")
        return sorted(launches)
    assert per_select(10) == per_select(200) == sorted(2 * ["_histogram_kernel"] + ["_bucket_mask_kernel"])


def test_mask_list_bounded():
    """Past ``Tuning.mask_list_words`` words (bounded temporaries) the masks are handled one by one, same
    results."""
    sizes = [100, 2000, 33]
    words = [bitmask.pack(torch.rand(n) < 0.5) for n in sizes]
    small = Tuning(mask_list_words=10)
    assert select_module.MaskList.of(words, sizes, Tuning().mask_list_words) is not None
    assert select_module.MaskList.of(words, sizes, small.mask_list_words) is None
    for w, n, o in zip(words, sizes, select_module.list_offsets(words, sizes, small), strict=True):
        assert torch.equal(o, bitmask.offsets(w, n))
