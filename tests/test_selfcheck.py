"""The first-use check of the compiled backends (``ssam_kernels.ops.selfcheck``): a kernel that is wrong
by one bit in any op never reaches the weights. On CPU, with deliberately broken primitives of the
native backend (and of cuda_sim, where it is built): ``auto`` warns once, naming the device, backend, op
and dtype, and moves on to ``vectorized``; a backend asked for by name raises; an optimizer built on it
refuses to start or falls back; ``SSAM_KERNELS_SELFCHECK=0`` turns the check off."""

from __future__ import annotations

import warnings

import pytest
import torch

from ssam_kernels import SSAM, DynamicMask, ops
from ssam_kernels.ops import native, selfcheck, vectorized
from tests.helpers import assert_same

CPU = torch.device("cpu")
pytestmark = pytest.mark.skipif(native.unavailable_reason("cpu") is not None, reason="extension not built")


@pytest.fixture(autouse=True)
def fresh_verdicts(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts with no backend checked, no fallback warned, and the check on."""
    monkeypatch.setattr(selfcheck, "_verdicts", {})
    monkeypatch.setattr(ops, "_WARNED_FALLBACK", set())
    monkeypatch.delenv(selfcheck.ENV_VAR, raising=False)


def _flip_last_bit(t: torch.Tensor) -> None:
    """Flips the lowest bit of the last entry of ``t``, in place (one ulp of a float)."""
    if t.numel():
        bits = {8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()]
        t.view(bits)[-1] ^= 1


def _wrong(primitive: str, real):
    """``primitive`` of a backend, wrong by one bit in one output entry."""
    def wrong(*args, **kwargs):
        out = real(*args, **kwargs)
        if primitive in ("perturb_", "restore_", "fisher_accumulate_", "axpby_"):
            _flip_last_bit(args[0])
        elif primitive in ("perturb_multi_", "restore_multi_", "fisher_accumulate_multi_", "axpby_multi_"):
            _flip_last_bit(args[0][-1])
        elif primitive in ("grad_sq_norm", "grad_sq_norm_multi", "radix_histogram_multi", "hash_scores"):
            out = out.clone()
            _flip_last_bit(out.view(-1))
        elif primitive == "threshold_mask_multi":
            _flip_last_bit(out[0][-1])  # the words of the last segment
        elif primitive == "bucket_mask_multi":
            _flip_last_bit(args[6][-1])  # the words of the last segment
        return out
    return wrong


CPU_PRIMITIVES = ["grad_sq_norm", "grad_sq_norm_multi", "perturb_", "perturb_multi_", "restore_",
                  "restore_multi_", "fisher_accumulate_", "fisher_accumulate_multi_", "radix_histogram_multi",
                  "threshold_mask_multi", "hash_scores", "axpby_", "axpby_multi_"]


def _break(monkeypatch: pytest.MonkeyPatch, module, primitive: str) -> None:
    monkeypatch.setattr(module, primitive, _wrong(primitive, getattr(module, primitive)))


@pytest.mark.parametrize("primitive", CPU_PRIMITIVES)
def test_every_broken_primitive_is_caught(monkeypatch, primitive):
    _break(monkeypatch, native, primitive)
    dtype = torch.int32 if primitive == "hash_scores" else torch.bfloat16
    expected = r"backend 'native' on cpu gives wrong results for .*(bfloat16|int32)"
    with pytest.warns(RuntimeWarning, match=expected):
        assert ops.resolve_backend("auto", CPU, dtype) is vectorized
    with pytest.raises(RuntimeError, match="self-check: backend 'native'"):
        ops.resolve_backend("native", CPU, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the verdict is kept: no second warning, no second check
        assert ops.resolve_backend("auto", CPU, dtype) is vectorized


def test_the_verdict_is_per_dtype(monkeypatch):
    """A kernel wrong for one dtype: the other dtypes still run on it."""
    real = native.perturb_multi_

    def wrong_for_half(W, *args):
        real(W, *args)
        if W[0].dtype == torch.float16:
            _flip_last_bit(W[-1])
    monkeypatch.setattr(native, "perturb_multi_", wrong_for_half)
    with pytest.warns(RuntimeWarning, match="perturb_ \\(list\\) \\(torch.float16\\)"):
        assert ops.resolve_backend("auto", CPU, torch.float16) is vectorized
    assert ops.resolve_backend("auto", CPU, torch.float32) is native
    assert ops.resolve_backend("native", CPU, torch.bfloat16) is native


def test_a_raising_kernel_counts_as_wrong(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(native, "restore_", broken)
    with pytest.warns(RuntimeWarning, match="restore_ \\(it raised RuntimeError: illegal memory access\\)"):
        assert ops.resolve_backend("auto", CPU, torch.float32) is vectorized


def test_off_switch(monkeypatch):
    _break(monkeypatch, native, "perturb_")
    monkeypatch.setenv(selfcheck.ENV_VAR, "0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.resolve_backend("native", CPU, torch.float32) is native


def _train(backend: str | None) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    opt = SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5,
               mask=DynamicMask(interval=2, seed=1), lr=0.1, backend=backend)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=gen), torch.randint(0, 3, (8,), generator=gen)

        def closure(x=x, y=y):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def test_the_optimizer_never_steps_with_a_wrong_kernel(monkeypatch):
    torch.manual_seed(0)
    expected = _train("vectorized")
    _break(monkeypatch, native, "perturb_multi_")
    with pytest.raises(RuntimeError, match="self-check"):
        SSAM(torch.nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1, backend="native")
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="runs the pure-PyTorch 'vectorized' backend.*self-check"):
        got = _train(None)  # auto: native failed its check, vectorized runs the step
    assert_same(got, expected)


@pytest.mark.skipif(ops._unavailable("cuda_sim", "cpu") is not None, reason="cuda_sim not built")
def test_cuda_sim_bucket_pass_is_checked(monkeypatch):
    from ssam_kernels.ops import cuda_sim

    _break(monkeypatch, cuda_sim, "bucket_mask_multi")
    with pytest.raises(RuntimeError, match="backend 'cuda_sim' on cpu gives wrong results for select_topk"):
        ops.resolve_backend("cuda_sim", CPU, torch.float32)
