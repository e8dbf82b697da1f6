"""Datasets for the training examples, held in memory as tensors, and the CIFAR augmentation in plain torch.

- ``mnist1d``: MNIST-1D (Greydanus, 2020), generated locally by the ``mnist1d`` package from its ten
  1-D templates (no download): 4000 train / 1000 test signals of length 40, 10 classes.
- ``digits``: scikit-learn's bundled 1797 8x8 digit images (64 features), split 80/20.
- ``cifar10`` / ``cifar100``: the standard python-pickle release read from a local folder
  (``data_batch_1..5`` + ``test_batch``, or ``train`` + ``test`` with ``fine_labels``). Images stay uint8
  in memory; :meth:`Dataset.prepare` normalises each batch and, for training, applies the paper's
  augmentation: random crop 32 with zero padding 4, horizontal flip, cutout 16.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATASETS = ("mnist1d", "digits", "cifar10", "cifar100")

# Per-channel statistics of the CIFAR training sets (on [0, 1] pixels), the usual normalisation.
CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


@dataclass
class Dataset:
    """Train and test tensors on one device, and the per-batch transform.

    ``prepare(x, generator, train)`` maps a batch of stored inputs to model inputs (identity for the
    vector datasets; normalisation and, when ``train``, augmentation for CIFAR).
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: int
    prepare: Callable[[torch.Tensor, torch.Generator | None, bool], torch.Tensor]

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def train_batches(self, batch_size: int, generator: torch.Generator, augment: bool = True
                      ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """One epoch of prepared training batches in a fresh random order drawn from ``generator``."""
        order = torch.randperm(len(self.x_train), generator=generator).to(self.x_train.device)
        for index in order.split(batch_size):
            yield self.prepare(self.x_train[index], generator, augment), self.y_train[index]

    def eval_batches(self, batch_size: int, split: str = "test"
                     ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The ``"test"`` or ``"train"`` split in order, prepared without augmentation."""
        x, y = (self.x_test, self.y_test) if split == "test" else (self.x_train, self.y_train)
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            yield self.prepare(xb, None, False), yb


class FreshBatches:
    """An iterable that yields a new random epoch of training batches each time it is iterated, so that
    SSAM-F's Fisher refreshes score the mask on fresh samples (without augmentation: the Fisher is that
    of the training distribution the loss is measured on)."""

    def __init__(self, dataset: Dataset, batch_size: int, seed: int) -> None:
        self.dataset, self.batch_size = dataset, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.dataset.train_batches(self.batch_size, self.generator, augment=False)


def _identity(x: torch.Tensor, generator: torch.Generator | None, train: bool) -> torch.Tensor:
    return x


def _split(x: torch.Tensor, y: torch.Tensor, seed: int, train_fraction: float = 0.8
           ) -> tuple[torch.Tensor, ...]:
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(train_fraction * len(x))
    return x[order[:split]], y[order[:split]], x[order[split:]], y[order[split:]]


def load_mnist1d(device: torch.device) -> Dataset:
    """MNIST-1D with the package's default arguments (5000 signals, generator seed 42): the same data for
    every training seed, so seed-to-seed spread measures training randomness only."""
    from mnist1d.data import get_dataset_args, make_dataset

    # make_dataset draws from numpy's global generator; keep the caller's stream untouched.
    state = np.random.get_state()
    try:
        raw = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
    x_train, x_test = (torch.tensor(raw[k], dtype=torch.float32, device=device) for k in ("x", "x_test"))
    y_train, y_test = (torch.tensor(raw[k], dtype=torch.int64, device=device) for k in ("y", "y_test"))
    return Dataset("mnist1d", x_train, y_train, x_test, y_test, 10, _identity)


def load_digits(device: torch.device) -> Dataset:
    """scikit-learn's digits, standardised per feature, split 80/20 with a fixed permutation (seed 0)."""
    from sklearn.datasets import load_digits as sklearn_digits

    raw = sklearn_digits()
    x = torch.tensor(raw.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(raw.target, dtype=torch.int64)
    x_train, y_train, x_test, y_test = (t.to(device) for t in _split(x, y, seed=0))
    return Dataset("digits", x_train, y_train, x_test, y_test, 10, _identity)


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"--data-dir: expected the CIFAR python-pickle file {path}")
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def _cifar_arrays(parts: list[dict], label_key: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    x = np.concatenate([np.asarray(p[b"data"], dtype=np.uint8) for p in parts]).reshape(-1, 3, 32, 32)
    y = np.concatenate([np.asarray(p[label_key], dtype=np.int64) for p in parts])
    return torch.from_numpy(x), torch.from_numpy(y)


def load_cifar(name: str, data_dir: Path, device: torch.device) -> Dataset:
    """CIFAR-10/100 from ``data_dir`` (the extracted ``cifar-10-batches-py`` / ``cifar-100-python``)."""
    if name == "cifar10":
        train = [_unpickle(data_dir / f"data_batch_{i}") for i in range(1, 6)]
        test, key, classes = [_unpickle(data_dir / "test_batch")], b"labels", 10
    else:
        train, test, key, classes = [_unpickle(data_dir / "train")], [_unpickle(data_dir / "test")], \
            b"fine_labels", 100
    x_train, y_train = _cifar_arrays(train, key)
    x_test, y_test = _cifar_arrays(test, key)
    mean, std = (torch.tensor(v, device=device).view(1, 3, 1, 1) for v in CIFAR_STATS[name])

    def prepare(x: torch.Tensor, generator: torch.Generator | None, train: bool) -> torch.Tensor:
        x = (x.float() / 255 - mean) / std
        return augment(x, generator) if train else x

    return Dataset(name, x_train.to(device), y_train.to(device), x_test.to(device), y_test.to(device),
                   classes, prepare)


def augment(x: torch.Tensor, generator: torch.Generator | None, pad: int = 4, cutout: int = 16
            ) -> torch.Tensor:
    """The paper's CIFAR augmentation of a normalised batch ``x`` (B, C, H, W), per sample:

    - random crop: zero-pad by ``pad`` and take the H x W window at offset ``(dy, dx)``, uniform in
      ``[0, 2·pad]²`` (zero padding after normalisation pads with the mean colour);
    - horizontal flip with probability 1/2;
    - cutout: zero the ``cutout`` x ``cutout`` square centred at a uniform pixel ``(cy, cx)``, clipped at
      the border (rows ``cy − cutout/2 ≤ i < cy + cutout/2``, the same for columns).

    Random numbers come from ``generator`` (CPU), so a seeded run is reproducible on every device.
    """
    B, _, H, W = x.shape

    def draw(high: int) -> torch.Tensor:
        return torch.randint(high, (B,), generator=generator).to(x.device)

    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    rows = draw(2 * pad + 1)[:, None] + torch.arange(H, device=x.device)  # (B, H)
    cols = draw(2 * pad + 1)[:, None] + torch.arange(W, device=x.device)  # (B, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    # Advanced indexing moves the indexed dims first: (B, H, W, C) -> back to (B, C, H, W).
    x = padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    flip = draw(2).bool().view(B, 1, 1, 1)
    x = torch.where(flip, x.flip(3), x)
    cy, cx = draw(H).view(B, 1, 1), draw(W).view(B, 1, 1)
    i = torch.arange(H, device=x.device).view(1, H, 1)
    j = torch.arange(W, device=x.device).view(1, 1, W)
    half = cutout // 2
    hole = (i >= cy - half) & (i < cy + half) & (j >= cx - half) & (j < cx + half)  # (B, H, W)
    return x.masked_fill(hole[:, None], 0.0)


def load_dataset(name: str, device: torch.device, data_dir: Path | None = None) -> Dataset:
    """The dataset ``name`` (one of :data:`DATASETS`) on ``device``."""
    if name == "mnist1d":
        return load_mnist1d(device)
    if name == "digits":
        return load_digits(device)
    if name in CIFAR_STATS:
        if data_dir is None:
            raise ValueError(f"--data-dir: {name} is read from a local folder in the python-pickle format")
        return load_cifar(name, Path(data_dir), device)
    raise ValueError(f"dataset: expected one of {DATASETS}, got {name!r}")
