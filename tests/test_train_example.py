"""The training example (python/train.py) runs end to end for every optimizer, dataset and model kind,
and writes its JSON. CIFAR runs on tiny files in the python-pickle format made here."""

from __future__ import annotations

import json
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("tqdm")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))  # the example scripts' modules

import data
import train


@pytest.mark.parametrize("optimizer", ["sgd", "sam", "asam", "ssam-f", "ssam-d"])
def test_train_script_runs_and_learns(optimizer, tmp_path):
    out = tmp_path / "result.json"
    result = train.main(["--optimizer", optimizer, "--dataset", "digits", "--epochs", "2", "--quiet",
                         "--device", "cpu", "--fisher-samples", "32", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["config"]["optimizer"] == optimizer and len(saved["history"]) == 2
    assert saved["config"]["model"] == "mlp"
    assert result["final_test_accuracy"] > 0.5  # 10 classes: chance is 0.1


@pytest.mark.parametrize(("optimizer", "schedule", "sam_steps"), [
    ("sgd", [], 0), ("sam", [], 48), ("ssam-d", ["--schedule", "every-k", "--schedule-k", "3"], 16),
    ("ssam-d", ["--schedule", "looksam"], 10), ("asam", ["--schedule", "aesam"], None),
])
def test_schedules_skip_the_second_pass(optimizer, schedule, sam_steps, tmp_path, monkeypatch):
    """digits: 1437 training samples, 12 steps of 128 per epoch. The plain steps take one forward (no
    SSAM-F here: its Fisher passes are forwards too)."""
    forwards = []
    build = train.build_model

    def counting_model(*args, **kwargs):
        model = build(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, output: forwards.append(module.training))
        return model

    monkeypatch.setattr(train, "build_model", counting_model)
    result = train.main(["--optimizer", optimizer, *schedule, "--dataset", "digits", "--epochs", "4",
                         "--quiet", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert result["total_steps"] == 4 * 12 and result["final_test_accuracy"] > 0.5
    steps = result["sharpness_aware_steps"]
    if sam_steps is None:  # AE-SAM: decided by the gradient norms (all its first steps, from its zero start)
        assert 0 < steps < result["total_steps"]
    else:
        assert steps == sam_steps
    assert result["sam_fraction"] == steps / result["total_steps"]
    assert sum(forwards) == result["total_steps"] + steps  # training-mode forwards: one per pass
    assert (result["environment"]["backend"] is None) == (optimizer == "sgd")


def test_mnist1d_is_generated_locally_and_learns(tmp_path):
    pytest.importorskip("mnist1d")
    result = train.main(["--optimizer", "ssam-d", "--sparsity", "0.9", "--epochs", "3", "--lr", "0.1",
                         "--quiet", "--threads", "1", "--device", "cpu", "--out", str(tmp_path / "r.json")])
    assert result["config"]["dataset"] == "mnist1d" and result["config"]["model"] == "cnn1d"
    assert result["final_test_accuracy"] > 0.25  # chance is 0.1; 3 epochs are far from converged


def write_cifar(folder: Path, classes: int, n_train: int = 40, n_test: int = 20) -> None:
    """Random images in the CIFAR python-pickle layout (uint8 rows of 3·32·32, channel-major)."""
    rng = np.random.default_rng(0)

    def part(n: int) -> dict:
        labels = rng.integers(0, classes, n).tolist()
        key = b"labels" if classes == 10 else b"fine_labels"
        return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels}

    folder.mkdir()
    names = ([f"data_batch_{i}" for i in range(1, 6)], "test_batch") if classes == 10 else (["train"], "test")
    for name in names[0]:
        (folder / name).write_bytes(pickle.dumps(part(n_train // len(names[0]))))
    (folder / names[1]).write_bytes(pickle.dumps(part(n_test)))


@pytest.mark.parametrize(("dataset", "model", "optimizer"),
                         [("cifar10", "resnet18", "ssam-f"), ("cifar100", "wrn28-10", "sam")])
def test_cifar_from_pickle_files(dataset, model, optimizer, tmp_path):
    classes = 10 if dataset == "cifar10" else 100
    write_cifar(tmp_path / "data", classes)
    out = tmp_path / "r.json"
    result = train.main(["--dataset", dataset, "--data-dir", str(tmp_path / "data"), "--model", model,
                         "--width", "0.125", "--optimizer", optimizer, "--epochs", "1", "--batch-size", "16",
                         "--fisher-samples", "8", "--quiet", "--threads", "1", "--device", "cpu",
                         "--out", str(out)])
    saved = json.loads(out.read_text())
    assert len(saved["history"]) == 1 and 0.0 <= result["final_test_accuracy"] <= 1.0
    assert torch.isfinite(torch.tensor(result["final_train_loss"]))


def test_augmentation_crops_flips_and_cuts_out():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32) + 1  # no zeros: padding shows
    out = data.augment(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    for b in range(2):
        kept = out[b] != 0
        # Every surviving pixel comes from the same image, and at least the 16x16 hole minus borders is gone.
        assert set(out[b][kept].tolist()) <= set(x[b].flatten().tolist())
        assert (~kept[0]).sum() >= 8 * 8
    # Without the random parts (pad 0, no cutout) each image is itself or its mirror image.
    plain = data.augment(x, torch.Generator().manual_seed(1), pad=0, cutout=0)
    for b in range(2):
        assert torch.equal(plain[b], x[b]) or torch.equal(plain[b], x[b].flip(2))


@pytest.mark.parametrize("script", ["train", "study"])
def test_help_shows_defaults_and_plain_text(script, capsys):
    module = {"train": train, "study": pytest.importorskip("study")}[script]
    with pytest.raises(SystemExit) as exit_:
        module.parse_args(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    assert "``" not in shown and "(default: 0.05)" in shown  # --rho's default, as the user sees it


@pytest.mark.parametrize("argv, named", [
    (["--sparsity", "2"], "--sparsity"), (["--sparsity", "half"], "--sparsity"),
    (["--rho", "-1"], "--rho"), (["--rho", "nan"], "--rho"), (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1.5"], "--batch-size"), (["--threads", "0"], "--threads"),
    (["--dataset", "cifar10"], "--data-dir"), (["--backend", "cuda"], "--backend"),
    (["--optimizer", "sgd", "--schedule", "every-k"], "--schedule"), (["--schedule", "often"], "--schedule"),
    (["--schedule", "aesam", "--schedule-k", "3"], "--schedule-k"), (["--schedule-k", "0"], "--schedule-k"),
    (["--schedule", "every-k", "--looksam-alpha", "0.5"], "--looksam-alpha"),
    (["--schedule", "looksam", "--looksam-alpha", "-1"], "--looksam-alpha"),
])
def test_bad_arguments_are_argparse_errors(argv, named, capsys):
    with pytest.raises(SystemExit) as exit_:
        train.parse_args(argv)
    assert exit_.value.code == 2  # argparse's usage error, not a traceback from deep inside training
    assert named in capsys.readouterr().err


def test_small_models_default_to_one_thread():
    assert train.parse_args(["--device", "cpu"]).threads == 1  # cnn1d: more threads only add overhead
    assert train.parse_args(["--device", "cpu", "--threads", "2"]).threads == 2
