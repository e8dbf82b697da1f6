"""The direct eager CPU calls of the native list ops (``_C.perturb_multi_cpu`` / ``_C.restore_multi_cpu``):
the same results as the registered ops, nothing done (False) where they do not apply, the offsets
checked before any write, and the version bump of an in-place op."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ssam_kernels.ops import bitmask, native

pytestmark = pytest.mark.skipif(native.unavailable_reason("cpu") is not None, reason="extension not built")

_C = native._C
SIZES = [1, 31, 33, 1024, 1025, 3000, 0, 70]


def _lists(dtype: torch.dtype, seed: int = 0):
    """W, G, mask, offsets, backup lists: every third entry dense, the others random masks."""
    gen = torch.Generator().manual_seed(seed)
    Ws, Gs, masks, offs, backups = [], [], [], [], []
    for j, n in enumerate(SIZES):
        Ws.append(torch.randn(n, generator=gen).to(dtype))
        Gs.append(torch.randn(n, generator=gen).to(dtype))
        if j % 3 == 0:
            masks.append(None)
            offs.append(None)
            backups.append(torch.zeros(n, dtype=dtype))
        else:
            words, o = bitmask.from_bool(torch.rand(n, generator=gen) < 0.4)
            masks.append(words)
            offs.append(o)
            backups.append(torch.zeros(int(o[-1]), dtype=dtype))
    return Ws, Gs, masks, offs, backups


def _clone(ts):
    return [None if t is None else t.clone() for t in ts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("adaptive", [False, True])
def test_direct_equals_registered_op(dtype: torch.dtype, adaptive: bool) -> None:
    Ws, Gs, masks, offs, backups = _lists(dtype)
    W2, B2 = _clone(Ws), _clone(backups)
    scale = torch.tensor(0.37, dtype=torch.float64)
    assert _C.perturb_multi_cpu(Ws, Gs, masks, offs, backups, scale, adaptive) is True
    torch.ops.ssam_kernels.perturb_multi_(W2, Gs, masks, offs, B2, scale, adaptive)
    for a, b in zip(Ws + backups, W2 + B2, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(Ws[3], _lists(dtype)[0][3])
    assert _C.restore_multi_cpu(Ws, masks, offs, backups) is True
    torch.ops.ssam_kernels.restore_multi_(W2, masks, offs, B2)
    for a, b, orig in zip(Ws, W2, _lists(dtype)[0], strict=True):
        assert torch.equal(a, b) and torch.equal(a, orig)


def _unchanged_false(call, Ws, backups) -> None:
    before = _clone(Ws) + _clone(backups)
    assert call() is False
    for a, b in zip(Ws + backups, before, strict=True):
        assert torch.equal(a, b)


def test_not_applicable_returns_false_and_writes_nothing() -> None:
    Ws, Gs, masks, offs, backups = _lists(torch.float32)
    scale = torch.tensor(0.5)
    mixed = list(Ws)
    mixed[-1] = mixed[-1].double()
    _unchanged_false(lambda: _C.perturb_multi_cpu(mixed, Gs, masks, offs, backups, scale, False), Ws, backups)
    short = list(backups)
    short[0] = short[0][:-1]  # a dense entry's backup must have N slots
    _unchanged_false(lambda: _C.perturb_multi_cpu(Ws, Gs, masks, offs, short, scale, False), Ws, backups)
    no_offsets = list(offs)
    no_offsets[1] = None
    _unchanged_false(lambda: _C.restore_multi_cpu(Ws, masks, no_offsets, backups), Ws, backups)
    _unchanged_false(lambda: _C.perturb_multi_cpu(tuple(Ws), Gs, masks, offs, backups, scale, False),
                     Ws, backups)
    _unchanged_false(lambda: _C.perturb_multi_cpu(Ws, Gs, masks, offs, backups, torch.tensor([0.5]), False),
                     Ws, backups)

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        _unchanged_false(lambda: _C.perturb_multi_cpu(Ws, Gs, masks, offs, backups, scale, False),
                         Ws, backups)


def test_fake_tensors_take_the_registered_op() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode()
    Ws, Gs, masks, offs, backups = ([None if t is None else mode.from_tensor(t) for t in ts]
                                    for ts in _lists(torch.float32))
    scale = mode.from_tensor(torch.tensor(0.5))
    assert _C.perturb_multi_cpu(Ws, Gs, masks, offs, backups, scale, False) is False  # fake: not plain CPU
    with mode:
        native.perturb_multi_(Ws, Gs, masks, offs, backups, scale, False)
        native.restore_multi_(Ws, masks, offs, backups)


def test_wrong_offsets_raise_before_any_write() -> None:
    Ws, Gs, masks, offs, backups = _lists(torch.float32)
    bad = _clone(offs)
    bad[2][1] += 1  # entry 2 (1025 entries, 2 chunks): chunk 0's count is wrong
    before = _clone(Ws) + _clone(backups)
    with pytest.raises(ValueError, match=r"offsets\[2\]: do not match the mask.*chunk 0"):
        _C.perturb_multi_cpu(Ws, Gs, masks, bad, backups, torch.tensor(0.5), False)
    bad = _clone(offs)
    bad[4][0] = 1
    with pytest.raises(ValueError, match=r"offsets\[4\]: expected offsets\[4\]\[0\] = 0"):
        _C.restore_multi_cpu(Ws, masks, bad, backups)
    for a, b in zip(Ws + backups, before, strict=True):
        assert torch.equal(a, b)


def test_version_bump_and_profiler_name() -> None:
    Ws, Gs, masks, offs, backups = _lists(torch.float32)
    versions = [w._version for w in Ws]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        native.perturb_multi_(Ws, Gs, masks, offs, backups, torch.tensor(0.5), False)
        native.restore_multi_(Ws, masks, offs, backups)
    assert all(w._version > v for w, v in zip(Ws, versions, strict=True))
    names = [e.name for e in prof.events()]
    assert names.count("ssam_kernels::perturb_multi_") == 1
    assert names.count("ssam_kernels::restore_multi_") == 1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_direct_norm_equals_registered_op(dtype: torch.dtype) -> None:
    Ws, Gs, *_ = _lists(dtype, seed=1)
    asam = [w if j % 2 else None for j, w in enumerate(Ws)]
    for W in (None, asam):
        total = _C.grad_sq_norm_multi_cpu(Gs, W)
        expected = torch.ops.ssam_kernels.grad_sq_norm_multi(Gs, W if W is not None else [None] * len(Gs))
        assert total.dtype == torch.float64 and torch.equal(total, expected)
    assert _C.grad_sq_norm_multi_cpu(Gs, asam[:-1]) is None  # lengths differ: the registered op reports it
    other = torch.float32 if dtype == torch.float64 else torch.float64
    assert _C.grad_sq_norm_multi_cpu([Gs[0], Gs[1].to(other)], None) is None  # mixed dtypes


def test_same_kind() -> None:
    a, b = torch.zeros(3), torch.zeros(5)
    assert _C.same_kind([a, b]) and _C.same_kind([a])
    assert not _C.same_kind([a, b.double()]) and not _C.same_kind([a, None]) and not _C.same_kind([])
    assert not _C.same_kind((a, b))  # not a list: the caller's general path
