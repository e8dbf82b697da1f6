"""``ops.Tuning``: its checks, and that the tuning of a call reaches every primitive the call runs, from
the public ops and from the optimizer. That it changes no bits (but those of Triton's norm, whose tile
partials it orders) is tests/test_parity.py's work: every backend under small tunings against the
reference."""

from __future__ import annotations

import dataclasses
import inspect
import re

import pytest
import torch

import ssam_kernels as sk
from ssam_kernels import ops
from ssam_kernels.ops import TritonLaunch, Tuning, reference, vectorized
from ssam_kernels.ops.tuning import TRITON_INTERPRETER
from tests.helpers import batch, loss_fn, seeded_mlp, train


@pytest.mark.parametrize(("fields", "error", "named"), [
    ({"chunk_entries": 1000}, ValueError, "tuning.chunk_entries"),
    ({"chunk_entries": 0}, ValueError, "tuning.chunk_entries"),
    ({"reference_block": 48}, ValueError, "tuning.reference_block"),
    ({"reference_block": 64.0}, TypeError, "tuning.reference_block"),
    ({"mask_block_words": -1}, ValueError, "tuning.mask_block_words"),
    ({"bucket_min_capacity": True}, TypeError, "tuning.bucket_min_capacity"),
    ({"bucket_capacity_shift": 64}, ValueError, "tuning.bucket_capacity_shift"),
    ({"fused_fma": 0}, TypeError, "tuning.fused_fma"),
    ({"host_reads": None}, TypeError, "tuning.host_reads"),
    ({"bincount": "yes"}, TypeError, "tuning.bincount"),
    ({"triton": {"block": 64}}, TypeError, "tuning.triton"),
])
def test_tuning_checks_its_fields(fields, error, named):
    with pytest.raises(error, match="^" + re.escape(named) + ": "):
        Tuning(**fields)


@pytest.mark.parametrize(("field", "value"), [("block", 16), ("block", 96), ("chunks", 3), ("num_warps", 0),
                                              ("interpret_programs", 0)])
def test_triton_launch_checks_its_fields(field, value):
    with pytest.raises(ValueError, match=rf"^tuning\.triton\.{field}: "):
        dataclasses.replace(TRITON_INTERPRETER, **{field: value})


def _op_calls() -> dict[str, tuple]:
    W, G = torch.randn(40), torch.randn(40)
    scale, F = torch.tensor(0.1), torch.zeros(40)
    mask = ops.select_topk([W], 10)[0][0]
    return {
        "grad_sq_norm": (G,),
        "perturb_": (W, G, None, None, torch.empty(40), scale),
        "restore_": (W, None, None, torch.empty(40)),
        "fisher_accumulate_": (F, G),
        "axpby_": (W, G, scale, scale),
        "select_topk": ([W], 3),
        "hash_scores": (8, 1, 2),
        "dynamic_update": ([mask], [W], 2, "random", 1, 2),
    }


@pytest.mark.parametrize("op", list(_op_calls()))
def test_every_op_refuses_a_tuning_that_is_not_one(op):
    assert "tuning" in inspect.signature(getattr(ops, op)).parameters
    with pytest.raises(TypeError, match=r"^tuning: expected an ssam_kernels\.ops\.Tuning or None, got dict"):
        getattr(ops, op)(*_op_calls()[op], tuning={"chunk_entries": 1024})


def test_optimizer_refuses_a_tuning_that_is_not_one():
    with pytest.raises(TypeError, match=r"^tuning: expected"):
        sk.SSAM(seeded_mlp(1).parameters(), torch.optim.SGD, lr=0.1, tuning=1024)


def _record_tunings(monkeypatch: pytest.MonkeyPatch, module: object) -> list[tuple[str, object]]:
    """``(primitive, tuning)`` of every call of ``module``'s primitives (its public functions that take
    ``tuning``) from now on."""
    seen: list[tuple[str, object]] = []
    for name, fn in list(vars(module).items()):
        takes_tuning = inspect.isfunction(fn) and "tuning" in inspect.signature(fn).parameters
        if name.startswith("_") or not takes_tuning:
            continue

        def recorded(*args, _name=name, _fn=fn, **kwargs):
            seen.append((_name, kwargs.get("tuning")))
            return _fn(*args, **kwargs)
        monkeypatch.setattr(module, name, recorded)
    return seen


@pytest.mark.parametrize("backend", ["reference", "vectorized"])
def test_the_optimizers_tuning_reaches_every_primitive(monkeypatch, backend):
    """SSAM with a dynamic mask (random growth: the hash and both selections), ASAM's weighted norm and
    LookSAM (axpby_): every primitive the steps call gets the optimizer's tuning, the same object."""
    module = {"reference": reference, "vectorized": vectorized}[backend]
    tuning = Tuning(reference_block=64, chunk_entries=1024, mask_block_words=2, bucket_min_capacity=3)
    seen = _record_tunings(monkeypatch, module)
    model = seeded_mlp(4)
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1, adaptive=True,
                  mask=sk.DynamicMask(interval=1, drop_rate=0.5, total_steps=4, seed=3, grow="random"),
                  schedule=sk.LookSAM(k=2, alpha=0.5), backend=backend, tuning=tuning)
    train(model, opt, 4)
    called = {name.replace("_multi", "") for name, _ in seen}  # the list primitive or the single one
    assert {"grad_sq_norm", "perturb_", "restore_", "axpby_", "hash_scores", "radix_histogram",
            "threshold_mask"} <= called
    assert all(t is tuning for _, t in seen), [(name, t) for name, t in seen if t is not tuning][:3]


def test_the_fisher_passes_tuning_reaches_its_accumulation(monkeypatch):
    seen = _record_tunings(monkeypatch, reference)
    tuning = Tuning(reference_block=32)
    sk.fisher_information(seeded_mlp(2), loss_fn, [batch(0, n=4)], num_samples=4, method="loop",
                          backend="reference", tuning=tuning)
    assert seen and all(name == "fisher_accumulate_" and t is tuning for name, t in seen)
    seen.clear()  # SSAM-F: the optimizer's tuning reaches the Fisher pass of its mask
    model = seeded_mlp(3)
    mask = sk.FisherMask(model, loss_fn, [batch(1, n=4)], num_samples=4, method="loop")
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, lr=0.1, mask=mask, backend="reference", tuning=tuning)
    train(model, opt, 1)
    assert "fisher_accumulate_" in {name for name, _ in seen} and all(t is tuning for _, t in seen)


@pytest.mark.skipif(ops._unavailable("triton", "cpu") is not None, reason="Triton's interpreter unavailable")
def test_every_triton_launch_takes_the_calls_shapes(monkeypatch):
    """Every Triton launch of every op runs with the call's ``TritonLaunch`` (and its tiles)."""
    from ssam_kernels.ops.triton import _config

    small = TritonLaunch(chunks=2, block=64, tiles=4, histogram_tiles=2, programs_per_sm=1,
                         interpret_programs=3, num_warps=4)
    launches: list[tuple[str, TritonLaunch, object]] = []
    launch = _config.launch

    def recorded(kernel, grid, config, *args, **kwargs):
        launches.append((kernel.__name__, config, kwargs.get("BLOCK", kwargs.get("CHUNKS"))))
        assert kwargs.get("TILES", small.tiles) == small.tiles, kernel.__name__
        launch(kernel, grid, config, *args, **kwargs)
    monkeypatch.setattr(_config, "launch", recorded)
    tuning = Tuning(triton=small, bucket_min_capacity=1)
    for op, args in _op_calls().items():
        getattr(ops, op)(*args, backend="triton", tuning=tuning)
    ops.select_topk([torch.zeros(300)], 10, backend="triton", tuning=tuning)  # past the bucket's capacity
    kernels = {name for name, _, _ in launches}
    assert {"_sq_norm_kernel", "_perturb_kernel", "_restore_kernel", "_fisher_kernel", "_axpby_kernel",
            "_histogram_kernel", "_bucket_mask_kernel", "_threshold_mask_kernel", "_hash_kernel"} <= kernels
    assert all(config == small for _, config, _ in launches)
    assert all(shape in (small.block, small.chunks, small.block * small.histogram_tiles)
               for _, _, shape in launches)


@pytest.mark.parametrize(("backend", "tuning", "pieces"), [
    ("reference", Tuning(), 1), ("reference", Tuning(reference_block=1024), 5),
    ("vectorized", Tuning(), 1), ("vectorized", Tuning(chunk_entries=1024), 5),
])
def test_the_block_sizes_cut_the_work(monkeypatch, backend, tuning, pieces):
    """The PyTorch backends walk 5000 entries in blocks of the call's size: one Fisher update per block."""
    from ssam_kernels.ops import _arith

    updates = []
    fisher_updated = _arith.fisher_updated
    monkeypatch.setattr(_arith, "fisher_updated", lambda f, *args: updates.append(f.numel())
                        or fisher_updated(f, *args))
    ops.fisher_accumulate_(torch.zeros(5000), torch.randn(5000), backend=backend, tuning=tuning)
    assert len(updates) == pieces and sum(updates) == 5000
