"""fisher_information against a float64 per-sample re-computation written here (not the code under test)."""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as tf
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ssam_kernels import fisher
from ssam_kernels.fisher import fisher_information
from tests.helpers import doc_block

# ----------------------------------------------------------------------------------------------------
# Models, data and the oracle
# ----------------------------------------------------------------------------------------------------

def mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


def cnn(seed: int = 0, norm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3) if norm else nn.Identity(), nn.ReLU(),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 4))


def make_data(shape: tuple[int, ...], sizes: list[int], seed: int = 1) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=g), torch.randint(0, 4, (n,), generator=g)) for n in sizes]


def first_samples(data: list[tuple[Tensor, Tensor]], n: int) -> tuple[Tensor, Tensor]:
    return torch.cat([x for x, _ in data])[:n], torch.cat([y for _, y in data])[:n]


def oracle(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
           which: list[int] | None = None) -> list[Tensor]:
    """Σ_i (dL_i/dw)², one sample at a time, on a float64 copy of the model (same train/eval mode)."""
    m = copy.deepcopy(model).double()
    params = [p for p in m.parameters() if p.requires_grad]
    if which is not None:
        params = [params[i] for i in which]
    total = [torch.zeros_like(p) for p in params]
    for i in range(x.shape[0]):
        target = y[i: i + 1].double() if y.is_floating_point() else y[i: i + 1]
        loss = loss_fn(m(x[i: i + 1].double()), target)
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True), strict=True):
            if g is not None:
                t += g * g
    return total


def assert_matches(got: list[Tensor], ref: list[Tensor], model: nn.Module, rtol: float = 1e-4) -> None:
    assert len(got) == len(ref)
    # Absolute slack relative to the largest entry of all tensors: some entries are zero in exact
    # arithmetic (a conv bias in front of batch-norm) and only rounding noise in either computation.
    scale = max(float(r.abs().max()) for r in ref)
    for f, r in zip(got, ref, strict=True):
        assert f.dtype == torch.float32
        assert f.shape == r.shape
        torch.testing.assert_close(f.double(), r, rtol=rtol, atol=1e-6 * scale)


# ----------------------------------------------------------------------------------------------------
# Agreement with the oracle
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["func", "loop", "auto"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("train", [True, False])
def test_matches_float64_oracle(method: str, kind: str, train: bool) -> None:
    model, shape = (mlp(), (6,)) if kind == "mlp" else (cnn(), (2, 6, 6))
    model.train(train)
    data = make_data(shape, [5, 5, 5])
    got = fisher_information(model, tf.cross_entropy, data, 13, 4, method=method, norm_eval=False)
    assert_matches(got, oracle(model, tf.cross_entropy, *first_samples(data, 13)), model)


def test_func_and_loop_agree_regression_loss() -> None:
    model = mlp(3)
    g = torch.Generator().manual_seed(4)
    data = [(torch.randn(7, 6, generator=g), torch.randn(7, 4, generator=g))]
    a = fisher_information(model, tf.mse_loss, data, 7, 3, method="func")
    b = fisher_information(model, tf.mse_loss, data, 7, method="loop")
    for fa, fb in zip(a, b, strict=True):
        torch.testing.assert_close(fa, fb, rtol=1e-5, atol=1e-7)
    assert_matches(a, oracle(model, tf.mse_loss, *first_samples(data, 7)), model)


@settings(max_examples=15, deadline=None)
@given(sizes=st.lists(st.integers(1, 6), min_size=1, max_size=4),
       cut=st.integers(0, 5), micro=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_func_any_batching(sizes: list[int], cut: int, micro: int, seed: int) -> None:
    total = sum(sizes)
    num_samples = max(1, total - cut)
    model = mlp(seed)
    data = make_data((6,), sizes, seed + 1)
    got = fisher_information(model, tf.cross_entropy, data, num_samples, micro, method="func")
    assert_matches(got, oracle(model, tf.cross_entropy, *first_samples(data, num_samples)), model)


def test_float64_model_both_paths() -> None:
    model = mlp(5).double()
    data = [(x.double(), y) for x, y in make_data((6,), [4, 4])]
    ref = oracle(model, tf.cross_entropy, *first_samples(data, 8))
    for method in ("func", "loop"):
        got = fisher_information(model, tf.cross_entropy, data, 8, method=method)
        assert_matches(got, ref, model, rtol=1e-6)


def test_bfloat16_paths_agree_loosely() -> None:
    model = mlp(6).to(torch.bfloat16)
    data = [(x.to(torch.bfloat16), y) for x, y in make_data((6,), [6])]
    a = fisher_information(model, tf.cross_entropy, data, 6, method="func")
    b = fisher_information(model, tf.cross_entropy, data, 6, method="loop")
    for fa, fb in zip(a, b, strict=True):
        assert fa.dtype == torch.float32
        torch.testing.assert_close(fa, fb, rtol=5e-2, atol=1e-3 * float(fb.abs().max()))


# ----------------------------------------------------------------------------------------------------
# Path selection
# ----------------------------------------------------------------------------------------------------

def _forbid(name: str) -> Callable[..., None]:
    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"{name} should not run")
    return fail


def test_batchnorm_train_mode_uses_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    model = cnn(norm=True).train()
    data = make_data((2, 6, 6), [4, 4, 4])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(fisher, "_func_step", _forbid("the func path"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # picking the loop for batch-norm is not a fallback: no warning
        got = fisher_information(model, tf.cross_entropy, data, 10, 4, norm_eval=False)
    assert_matches(got, oracle(model, tf.cross_entropy, *first_samples(data, 10)), model)
    # Running statistics (and num_batches_tracked) are as they were; mode unchanged.
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training and model[1].training


def test_batchnorm_train_mode_func_raises() -> None:
    model = cnn(norm=True).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError):
        fisher_information(model, tf.cross_entropy, make_data((2, 6, 6), [4]), 4, method="func",
                           norm_eval=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_batchnorm_eval_mode_uses_func(monkeypatch: pytest.MonkeyPatch) -> None:
    model = cnn(norm=True).eval()
    with torch.no_grad():  # non-trivial running statistics
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    data = make_data((2, 6, 6), [6])
    monkeypatch.setattr(fisher, "_loop_step", _forbid("the loop path"))
    got = fisher_information(model, tf.cross_entropy, data, 6)
    assert_matches(got, oracle(model, tf.cross_entropy, *first_samples(data, 6)), model)


class Branchy(nn.Module):
    """Data-dependent control flow: autograd runs it, vmap refuses it."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(6, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.a(x) if x.sum() > 0 else self.b(x).tanh()


def test_auto_falls_back_to_loop_with_warning() -> None:
    model = Branchy()
    data = make_data((6,), [5, 5])
    with pytest.warns(RuntimeWarning, match="torch.func path failed"):
        got = fisher_information(model, tf.cross_entropy, data, 9, 2)
    assert_matches(got, oracle(model, tf.cross_entropy, *first_samples(data, 9)), model)
    with pytest.raises(RuntimeError):
        fisher_information(model, tf.cross_entropy, data, 9, 2, method="func")


def test_auto_raises_errors_the_loop_raises_too() -> None:
    def bad_loss(out: Tensor, y: Tensor) -> Tensor:
        return tf.cross_entropy(out, y, reduction="none").expand(2)  # not one element

    for method in ("auto", "func", "loop"):
        with pytest.raises(ValueError, match="loss_fn"):
            fisher_information(mlp(), bad_loss, make_data((6,), [3]), 3, method=method)


def test_dropout_train_mode_runs_on_func_path(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.Linear(8, 4)).train()
    monkeypatch.setattr(fisher, "_loop_step", _forbid("the loop path"))
    got = fisher_information(model, tf.cross_entropy, make_data((6,), [8]), 8, 4)
    assert all(torch.isfinite(f).all() and (f >= 0).all() for f in got)
    assert float(got[0].sum()) > 0


# ----------------------------------------------------------------------------------------------------
# Sample order, params, model state
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["func", "loop"])
def test_samples_in_order_across_batches_cut_last(method: str) -> None:
    model = mlp(2)
    data = make_data((6,), [4, 4, 4, 4])
    got = fisher_information(model, tf.cross_entropy, data, 10, 3, method=method)
    assert_matches(got, oracle(model, tf.cross_entropy, *first_samples(data, 10)), model)


def test_generator_and_dataloader_consumed_only_as_needed() -> None:
    model = mlp(2)
    data = make_data((6,), [4, 4, 4, 4, 4])
    pulled = []

    def gen():
        for i, batch in enumerate(data):
            pulled.append(i)
            yield batch

    got = fisher_information(model, tf.cross_entropy, gen(), 10)
    assert pulled == [0, 1, 2]
    ref = oracle(model, tf.cross_entropy, *first_samples(data, 10))
    assert_matches(got, ref, model)
    x, y = first_samples(data, 20)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=4)
    assert_matches(fisher_information(model, tf.cross_entropy, loader, 10), ref, model)


def test_params_subset_in_given_order() -> None:
    model = cnn(1)
    data = make_data((2, 6, 6), [5])
    all_params = list(model.parameters())
    order = [3, 0]
    got = fisher_information(model, tf.cross_entropy, data, 5, params=[all_params[i] for i in order])
    assert [f.shape for f in got] == [all_params[i].shape for i in order]
    assert_matches(got, oracle(model, tf.cross_entropy, *first_samples(data, 5), which=order), model)


def test_frozen_params_skipped_by_default() -> None:
    model = mlp(1)
    model[0].weight.requires_grad_(False)
    got = fisher_information(model, tf.cross_entropy, make_data((6,), [3]), 3)
    assert [f.shape for f in got] == [p.shape for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"params\[0\]"):
        fisher_information(model, tf.cross_entropy, make_data((6,), [3]), 3, params=[model[0].weight])


class WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(6, 4)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


def test_unused_parameter_gets_zeros() -> None:
    model = WithUnused()
    for method in ("func", "loop"):
        got = fisher_information(model, tf.cross_entropy, make_data((6,), [3]), 3, method=method)
        assert got[2].abs().sum() == 0 and got[3].abs().sum() == 0 and got[0].abs().sum() > 0


@pytest.mark.parametrize("method", ["func", "loop", "auto"])
def test_grads_and_modes_untouched(method: str) -> None:
    model = cnn(2, norm=True).train()
    model[1].eval()  # mixed modes survive as they are
    params = list(model.parameters())
    marker = torch.full_like(params[0], 3.0)
    params[0].grad = marker
    grads_before = [p.grad for p in params]
    modes_before = [m.training for m in model.modules()]
    with torch.no_grad():  # also works when the caller disabled grad
        got = fisher_information(model, tf.cross_entropy, make_data((2, 6, 6), [4]), 4, method=method)
    assert all(f.abs().sum() > 0 for f in got)
    assert params[0].grad is marker and torch.equal(marker, torch.full_like(marker, 3.0))
    assert [p.grad for p in params] == grads_before
    assert [m.training for m in model.modules()] == modes_before


def test_result_does_not_require_grad_and_backend_reference() -> None:
    got = fisher_information(mlp(), tf.cross_entropy, make_data((6,), [4]), 4, method="loop",
                             backend="reference")
    assert not any(f.requires_grad for f in got)
    got = fisher_information(mlp(), tf.cross_entropy, make_data((6,), [4]), 4, method="func")
    assert not any(f.requires_grad for f in got)


# ----------------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------------

def test_too_few_samples() -> None:
    with pytest.raises(ValueError, match=r"num_samples.*only 12"):
        fisher_information(mlp(), tf.cross_entropy, make_data((6,), [4, 4, 4]), 13)


@pytest.mark.parametrize("value, error", [(0, ValueError), (-3, ValueError), (2.5, TypeError),
                                          ("4", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_num_samples(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="num_samples"):
        fisher_information(mlp(), tf.cross_entropy, make_data((6,), [4]), value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                          (False, TypeError)])
def test_bad_batch_size(value: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="batch_size"):
        fisher_information(mlp(), tf.cross_entropy, make_data((6,), [4]), 4, value)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["vmap", "", None, "FUNC"])
def test_bad_method(value: object) -> None:
    with pytest.raises(ValueError, match="method"):
        fisher_information(mlp(), tf.cross_entropy, make_data((6,), [4]), 4, method=value)  # type: ignore


def test_bad_params_data_backend() -> None:
    data = make_data((6,), [4])
    with pytest.raises(ValueError, match="params"):
        fisher_information(mlp(), tf.cross_entropy, data, 4, params=[nn.Parameter(torch.zeros(2))])
    model = mlp()
    with pytest.raises(ValueError, match="params"):
        fisher_information(model, tf.cross_entropy, data, 4, params=[model[0].bias, model[0].bias])
    with pytest.raises(ValueError, match="params"):
        fisher_information(model, tf.cross_entropy, data, 4, params=[])
    with pytest.raises(TypeError, match="data"):
        fisher_information(model, tf.cross_entropy, [torch.zeros(4, 6)], 4)
    with pytest.raises(ValueError, match="data"):
        fisher_information(model, tf.cross_entropy, [(torch.zeros(4, 6), torch.zeros(3))], 4)
    with pytest.raises(ValueError, match="backend"):
        fisher_information(model, tf.cross_entropy, data, 4, backend="bogus")


# ----------------------------------------------------------------------------------------------------
# Real models: batch norm in eval mode for the per-sample pass, dict batches, models' own losses
# ----------------------------------------------------------------------------------------------------

def resnet18(seed: int = 0) -> nn.Module:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # the examples' models
    from models import resnet18 as build

    torch.manual_seed(seed)
    model = build(10, width=1 / 16)
    with torch.no_grad():  # running statistics that differ from a fresh layer's
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.train()


@pytest.mark.parametrize("size", [32, 8])  # at 8x8 the last stage sees 1x1 maps: one value per channel
def test_resnet18_scores_with_running_statistics(size: int) -> None:
    model = resnet18()
    data = [(torch.randn(3, 3, size, size), torch.randint(0, 10, (3,))) for _ in range(2)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    got = fisher_information(model, tf.cross_entropy, data, 5, 4)
    # The same sum, every sample normalised with the running statistics (a float64 copy in eval mode).
    assert_matches(got, oracle(copy.deepcopy(model).eval(), tf.cross_entropy, *first_samples(data, 5)), model)
    assert [m.training for m in model.modules()] == modes
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    if size == 8:  # what happened before norm_eval: train-mode batch norm on one value per channel
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            fisher_information(model, tf.cross_entropy, data, 5, norm_eval=False)


def test_fisher_mask_on_resnet18_in_ssam() -> None:
    import ssam_kernels as sk

    model = resnet18()
    data = [(torch.randn(4, 3, 8, 8), torch.randint(0, 10, (4,))) for _ in range(2)]
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.9, lr=0.1, backend="reference",
                  mask=sk.FisherMask(model, tf.cross_entropy, data, num_samples=8, interval=1))
    for x, y in data:
        tf.cross_entropy(model(x), y).backward()
        opt.first_step(zero_grad=True)
        tf.cross_entropy(model(x), y).backward()
        opt.second_step(zero_grad=True)
    assert opt.steps == 2 and sum(int(m.sum()) for m in opt.get_mask()) == opt.live_count
    assert all(m.training for m in model.modules())


def tiny_bert(seed: int = 0) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=16,
                                     num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return transformers.BertForSequenceClassification(config)


def dict_batches(sizes: list[int], seed: int = 2) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        mask = torch.ones(n, 8, dtype=torch.long)
        mask[:, 6:] = torch.randint(0, 2, (n, 2), generator=g)  # some padding
        batches.append({"input_ids": torch.randint(0, 64, (n, 8), generator=g), "attention_mask": mask,
                        "labels": torch.randint(0, 3, (n,), generator=g)})
    return batches


def dict_oracle(model: nn.Module, batches: list[dict[str, Tensor]], n: int) -> list[Tensor]:
    """Σ_i (d model(**batch_i).loss / dw)² on a float64 copy, one sample at a time."""
    m = copy.deepcopy(model).double()
    params = [p for p in m.parameters() if p.requires_grad]
    total = [torch.zeros_like(p) for p in params]
    samples = [{k: v[i: i + 1] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]
    for sample in samples[:n]:
        grads = torch.autograd.grad(m(**sample).loss, params, allow_unused=True)
        for t, g in zip(total, grads, strict=True):
            if g is not None:
                t += g * g
    return total


@pytest.mark.parametrize("method", ["loop", "auto"])
def test_hugging_face_model_own_loss_on_dict_batches(method: str) -> None:
    model = tiny_bert()
    data = dict_batches([3, 4])
    with warnings.catch_warnings():
        # "auto" falls back to the loop: transformers' attention-mask code branches on the mask's values
        warnings.simplefilter("ignore", RuntimeWarning)
        got = fisher_information(model, None, data, 6, 4, method=method)
    assert_matches(got, dict_oracle(model, data, 6), model, rtol=1e-3)


def test_loss_forms_agree() -> None:
    model = mlp()
    pairs = make_data((6,), [5, 3])
    as_dicts = [{"x": x, "y": y} for x, y in pairs]
    expected = fisher_information(model, tf.cross_entropy, pairs, 7)

    def by_name(model, batch):  # the form is picked by the parameter's name
        return tf.cross_entropy(model(batch["x"]), batch["y"])

    def by_annotation(net: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return tf.cross_entropy(net(batch["x"]), batch["y"])

    def on_pairs(net, batch):  # the form is given explicitly
        return tf.cross_entropy(net(batch[0]), batch[1])

    for method in ("func", "loop"):
        for loss_fn, data, form in [(by_name, as_dicts, "auto"), (by_annotation, as_dicts, "auto"),
                                    (on_pairs, pairs, "model")]:
            got = fisher_information(model, loss_fn, data, 7, 3, method=method, loss_form=form)
            for a, b in zip(got, expected, strict=True):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert fisher.resolve_loss_form(tf.cross_entropy, "auto") == "outputs"
    assert fisher.resolve_loss_form(nn.CrossEntropyLoss(), "auto") == "outputs"
    assert fisher.resolve_loss_form(by_name, "auto") == "model"
    assert fisher.resolve_loss_form(by_annotation, "outputs") == "outputs"


def test_bad_loss_forms_and_batches() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="loss_form"):
        fisher_information(model, tf.cross_entropy, make_data((6,), [4]), 4, loss_form="inputs")
    with pytest.raises(ValueError, match="loss_fn"):
        fisher_information(model, None, make_data((6,), [4]), 4, loss_form="outputs")
    with pytest.raises(TypeError, match="loss_fn"):
        fisher_information(model, "cross_entropy", make_data((6,), [4]), 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="needs dict batches"):
        fisher_information(model, None, make_data((6,), [4]), 4)
    with pytest.raises(ValueError, match="same batch"):
        fisher_information(model, lambda model, b: model(b["x"]).sum(), [{"x": torch.zeros(4, 6),
                                                                         "y": torch.zeros(3)}], 4)
    with pytest.raises(TypeError, match="norm_eval"):
        fisher_information(model, tf.cross_entropy, make_data((6,), [4]), 4, norm_eval=1)  # type: ignore
    with pytest.raises(ValueError, match="data: is empty"):
        fisher_information(model, tf.cross_entropy, [], 4)
    with pytest.raises(TypeError, match="data"):
        fisher_information(model, tf.cross_entropy, {"x": torch.zeros(4, 6)}, 4)


@pytest.mark.parametrize(("kwargs", "error", "match"), [
    ({"batch_size": 0}, ValueError, "batch_size"),
    ({"batch_size": 2.0}, TypeError, "batch_size"),
    ({"method": "vmap"}, ValueError, "method"),
    ({"loss_form": "x"}, ValueError, "loss_form"),
    ({"norm_eval": "yes"}, TypeError, "norm_eval"),
    ({"data": []}, ValueError, "data"),
    ({"data": torch.zeros(4, 6)}, TypeError, "data"),
    ({"data": 3}, TypeError, "data"),
    ({"data": iter(make_data((6,), [4])), "interval": 5}, ValueError, "re-iterable"),
    ({"loss_fn": 3}, TypeError, "loss_fn"),
])
def test_fisher_mask_checks_every_option_at_construction(kwargs: dict, error: type, match: str) -> None:
    import ssam_kernels as sk

    options = {"loss_fn": tf.cross_entropy, "data": make_data((6,), [4]), "num_samples": 4} | kwargs
    with pytest.raises(error, match=match):
        sk.FisherMask(mlp(), **options)


def test_fisher_mask_hugging_face_in_ssam() -> None:
    import ssam_kernels as sk

    model = tiny_bert()
    data = dict_batches([4, 4])
    mask = sk.FisherMask(model, None, data, num_samples=6, interval=1, method="loop")
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, lr=0.1, mask=mask,
                  backend="reference")
    scores = fisher_information(model, None, data, 6, method="loop")
    expected = sk.topk_mask(scores, 0.5)
    for got, want in zip(opt.get_mask(), expected, strict=True):
        assert torch.equal(got, want)
    model(**data[0]).loss.backward()
    opt.first_step(zero_grad=True)
    model(**data[0]).loss.backward()
    opt.second_step(zero_grad=True)
    assert opt.steps == 1


def test_fisher_mask_recipe() -> None:
    import ssam_kernels as sk

    code = doc_block("docs/recipes.md", "`FisherMask` on real models")
    assert code.count("num_samples=128") == 3
    code = code.replace("num_samples=128", "num_samples=8")  # a small run
    model = tiny_bert()
    loader = dict_batches([4, 4])
    namespace = {"sk": sk, "F": tf, "model": model, "train_loader": loader, "loader": loader,
                 "my_loss": lambda model, batch: model(**batch).loss}
    exec(code, namespace)  # builds the three masks: every option is checked here
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, lr=0.1, mask=namespace["mask"],
                  backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the padded attention mask: the loop fallback
        scores = fisher_information(model, None, loader, 8)
        masks = opt.get_mask()  # the recipe's last form: loss_fn(model, batch), the same loss
    for got, want in zip(masks, sk.topk_mask(scores, 0.5), strict=True):
        assert torch.equal(got, want)
