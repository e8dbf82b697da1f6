"""The plain-PyTorch recipes, executed from docs/recipes.md: gradient accumulation, clipping and
GradScaler; BatchNorm statistics once per step (sk.frozen_bn_stats); torch.compile of a whole step."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as tf
from torch import nn

import ssam_kernels as sk
from tests.helpers import doc_block

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))  # the examples' modules
import compiled_step  # noqa: E402


def recipe(heading: str) -> str:
    return doc_block("docs/recipes.md", heading)


def mlp(seed: int = 0, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16) if norm else nn.Identity(), nn.ReLU(),
                         nn.Linear(16, 4))


def ssam(model: nn.Module, layout: str = "auto") -> sk.SSAM:
    return sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.1, sparsity=0.5, lr=0.1, momentum=0.9,
                   mask=sk.DynamicMask(interval=1), backend="reference", layout=layout)


def batches(steps: int, micro: int, size: int = 4, seed: int = 1) -> list[list[tuple[torch.Tensor, ...]]]:
    g = torch.Generator().manual_seed(seed)
    return [[(torch.randn(size, 6, generator=g), torch.randint(0, 4, (size,), generator=g))
             for _ in range(micro)] for _ in range(steps)]


def samples(steps: int) -> list[tuple[torch.Tensor, ...]]:
    """One batch per step."""
    return [step[0] for step in batches(steps, micro=1)]


# ----------------------------------------------------------------------------------------------------
# Gradient accumulation, clipping, GradScaler
# ----------------------------------------------------------------------------------------------------

def run_recipe(model: nn.Module, opt: sk.SSAM, steps: list, scaler: torch.amp.GradScaler,
               max_norm: float, autocast: bool = True) -> None:
    code = recipe("Gradient accumulation")
    if not autocast:
        code = code.replace("enabled=scaler.is_enabled()", "enabled=False")
    for micro_batches in steps:
        exec(code, {"torch": torch, "sk": sk, "model": model, "opt": opt, "loss_fn": tf.cross_entropy,
                    "micro_batches": micro_batches, "scaler": scaler, "device": "cpu", "max_norm": max_norm})


def full_batch_steps(model: nn.Module, opt: sk.SSAM, steps: list, max_norm: float) -> None:
    """The same steps on the whole batch at once: what accumulation must reproduce."""
    for micro_batches in steps:
        x = torch.cat([x for x, _ in micro_batches])
        y = torch.cat([y for _, y in micro_batches])
        tf.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        tf.cross_entropy(model(x), y).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.second_step(zero_grad=True)


@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("max_norm", [0.05, 100.0])
@pytest.mark.parametrize("layout", ["tensors", "flat"])  # clipping and the scaler read .grad
def test_accumulation_recipe_equals_the_full_batch(scaled: bool, max_norm: float, layout: str) -> None:
    steps = batches(3, micro=3)
    model, reference = mlp(), mlp()
    opt, ref_opt = ssam(model, layout), ssam(reference, layout)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, enabled=scaled)
    if scaled:  # the scaler without fp16 autocast: powers of two scale and unscale exactly
        run_recipe(model, opt, steps, scaler, max_norm, autocast=False)
        assert scaler.get_scale() == 2.0**12
    else:
        run_recipe(model, opt, steps, scaler, max_norm)
    full_batch_steps(reference, ref_opt, steps, max_norm)
    assert opt.steps == 3
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for a, b in zip(opt.get_mask(), ref_opt.get_mask(), strict=True):
        assert torch.equal(a, b)


def test_accumulation_recipe_fp16_autocast_on_cpu() -> None:
    steps = batches(3, micro=2)
    model, reference = mlp(), mlp()
    run_recipe(model, ssam(model), steps, torch.amp.GradScaler("cpu", init_scale=2.0**8), max_norm=1.0)
    full_batch_steps(reference, ssam(reference), steps, max_norm=1.0)
    moved = [(p - q).abs().max() for p, q in zip(model.parameters(), mlp().parameters(), strict=True)]
    assert max(moved) > 1e-3  # it trained
    for p, q in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=2e-2, atol=2e-3)  # fp16 forwards


def test_skipped_step_leaves_w_unperturbed_and_training_goes_on() -> None:
    model = mlp()
    opt = ssam(model)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    calls = []

    def overflow_in_second_pass(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor:
        calls.append(1)
        return output * float("inf") if len(calls) in (3, 4) else output  # pass 2 of the first step

    hook = model.register_forward_hook(overflow_in_second_pass)
    before = copy.deepcopy(model.state_dict())
    run_recipe(model, opt, batches(1, micro=2), scaler, max_norm=1.0)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k  # skipped: w exactly, never w + e
    assert opt.steps == 0 and scaler.get_scale() == 2.0**7
    run_recipe(model, opt, batches(1, micro=2, seed=2), scaler, max_norm=1.0)
    hook.remove()
    assert opt.steps == 1


def test_unscale_twice_per_update_is_refused() -> None:
    """Why the recipe unscales only the second pass: PyTorch's rule, one unscale_ per update()."""
    model = mlp()
    opt = ssam(model)
    scaler = torch.amp.GradScaler("cpu")
    x, y = samples(1)[0]
    scaler.scale(tf.cross_entropy(model(x), y)).backward()
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True)
    scaler.scale(tf.cross_entropy(model(x), y)).backward()
    with pytest.raises(RuntimeError, match="unscale_"):
        scaler.unscale_(opt)


# ----------------------------------------------------------------------------------------------------
# BatchNorm running statistics once per step
# ----------------------------------------------------------------------------------------------------

def bn_stats(model: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for name, b in model.named_buffers() if name.split(".")[-1] in
            ("running_mean", "running_var", "num_batches_tracked")]


@pytest.mark.parametrize("momentum", [0.1, None])  # exponential and cumulative averages
def test_frozen_bn_stats_one_update_per_step(momentum: float | None) -> None:
    model = mlp(norm=True)
    model[1].momentum = momentum
    opt = ssam(model)
    for x, y in samples(3):
        once = copy.deepcopy(model)
        once(x)  # one forward in train mode at w
        tf.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        with sk.frozen_bn_stats(model):
            tf.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
        for a, b in zip(bn_stats(model), bn_stats(once), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert model[1].track_running_stats and model[1].momentum == momentum
    assert int(model[1].num_batches_tracked) == 3


def test_frozen_bn_stats_without_it_two_updates_per_step() -> None:
    model = mlp(norm=True)
    x, _ = samples(1)[0]
    model(x)
    model(x)
    assert int(model[1].num_batches_tracked) == 2


def test_frozen_bn_stats_same_outputs_and_gradients() -> None:
    model = mlp(norm=True)
    x, y = samples(1)[0]
    plain = copy.deepcopy(model)
    with sk.frozen_bn_stats(model):
        loss = tf.cross_entropy(model(x), y)
    loss.backward()
    expected = tf.cross_entropy(plain(x), y)
    expected.backward()
    assert torch.equal(loss, expected)
    for p, q in zip(model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


def test_frozen_bn_stats_restores_on_error_nests_and_skips_eval_layers() -> None:
    model = nn.Sequential(nn.BatchNorm1d(3), nn.BatchNorm2d(3, track_running_stats=False), nn.BatchNorm1d(3))
    model[2].eval()
    with pytest.raises(KeyError), sk.frozen_bn_stats(model):
        assert not model[0].track_running_stats
        with sk.frozen_bn_stats(model) as inner:
            assert inner is model
        assert not model[0].track_running_stats  # the outer block still holds
        raise KeyError
    assert [m.track_running_stats for m in model] == [True, False, True]
    with pytest.raises(TypeError, match="model"), sk.frozen_bn_stats(torch.zeros(3)):  # type: ignore[arg-type]
        pass


# ----------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_compile_recipe_default_backend_matches_eager() -> None:
    model, eager_model = mlp(), mlp()
    opt, eager_opt = ssam(model), ssam(eager_model)
    namespace = {"torch": torch, "model": model, "opt": opt, "loss_fn": tf.cross_entropy}
    exec(recipe("`torch.compile`"), namespace)  # compiles with the default backend (Inductor)
    eager = compiled_step.eager_train_step(eager_model, eager_opt)
    for x, y in samples(4):
        torch.testing.assert_close(namespace["train_step"](x, y), eager(x, y), rtol=1e-5, atol=1e-6)
    assert opt.steps == 4
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    for a, b in zip(opt.get_mask(), eager_opt.get_mask(), strict=True):  # refreshed every step
        assert torch.equal(a, b)


def test_compiled_step_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    result = compiled_step.main(["--backend", "eager", "--steps", "3"])
    assert result["masks_equal"] and result["max_weight_gap"] == 0.0
    assert "masks equal: True" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        compiled_step.main(["--steps", "0"])
