"""Train a model with SGD, SAM, ASAM, SSAM-F or SSAM-D and write a results JSON.

Datasets: ``mnist1d`` (default: generated locally, no network), ``digits`` (scikit-learn's bundled 8x8
digits), ``cifar10`` / ``cifar100`` (read from ``--data-dir`` in the python-pickle format, trained with the
paper's recipe: random crop 32 pad 4 + horizontal flip + cutout 16, batch 128, SGD momentum 0.9, weight
decay 5e-4, cosine learning rate). Every optimizer uses SGD (momentum 0.9, weight decay 5e-4) as its base.

    python python/train.py                                          # SSAM-F, s=0.5, MNIST-1D, 1-D CNN
    python python/train.py --optimizer ssam-d --sparsity 0.9 --epochs 30 --seed 1
    python python/train.py --dataset cifar10 --data-dir ~/data/cifar-10-batches-py --model resnet18 \\
        --epochs 200 --rho 0.1 --lr 0.05
    python python/train.py --optimizer ssam-d --schedule looksam --schedule-k 5   # 1 step in 5 takes 2 passes

``--schedule`` (SAM, ASAM, SSAM) picks the steps that are sharpness-aware (ssam_kernels.schedules); the
other steps take one forward/backward, as SGD. The run's JSON records the fraction that were.

The run's JSON (config, per-epoch history, final accuracies, seconds per epoch) goes to ``--out``
(default ``runs/<dataset>-<model>-<optimizer>[-s<sparsity>][-<schedule>]-seed<seed>.json``).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cli
import torch
from data import DATASETS, Dataset, FreshBatches, load_dataset
from models import MODELS, build_model
from torch import nn
from tqdm import tqdm

import ssam_kernels as sk

OPTIMIZERS = ("sgd", "sam", "asam", "ssam-f", "ssam-d")
SCHEDULES = ("every-step", "every-k", "looksam", "aesam")
SMALL_MODELS = ("mlp", "cnn1d")
DEFAULT_MODEL = {"mnist1d": "cnn1d", "digits": "mlp", "cifar10": "resnet18", "cifar100": "resnet18"}
loss_fn = nn.functional.cross_entropy


def build_optimizer(args: argparse.Namespace, model: nn.Module, dataset: Dataset, total_steps: int,
                    steps_per_epoch: int) -> torch.optim.Optimizer:
    """The optimizer named by ``args.optimizer``, over SGD(momentum 0.9, weight decay ``args.wd``).

    SSAM masks are refreshed once per epoch: SSAM-F from the Fisher of ``args.fisher_samples`` fresh
    training samples, SSAM-D by dropping/growing ``floor(dr(t) · K)`` entries with the cosine-decayed
    drop rate ``dr(t) = 0.5 · (1 + cos(π t / T)) / 2`` over the whole run. ``args.schedule`` picks the
    sharpness-aware steps (:func:`build_schedule`).
    """
    base = {"lr": args.lr, "momentum": 0.9, "weight_decay": args.wd}
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    schedule = build_schedule(args, total_steps)
    if args.optimizer in ("sam", "asam"):
        return sk.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, adaptive=args.optimizer == "asam",
                      backend=args.backend, schedule=schedule, **base)
    if args.optimizer == "ssam-f":
        fisher_data = FreshBatches(dataset, args.batch_size, seed=args.seed + 1)
        mask: sk.MaskPolicy = sk.FisherMask(model, loss_fn, fisher_data, num_samples=args.fisher_samples,
                                            interval=steps_per_epoch)
    else:
        mask = sk.DynamicMask(interval=steps_per_epoch, drop_rate=0.5, total_steps=total_steps,
                              seed=args.seed)
    return sk.SSAM(model.parameters(), torch.optim.SGD, rho=args.rho, sparsity=args.sparsity, mask=mask,
                   backend=args.backend, schedule=schedule, **base)


def build_schedule(args: argparse.Namespace, total_steps: int) -> sk.Schedule:
    """``args.schedule``: every step (SAM and SSAM as published), every ``k``-th step, LookSAM (every
    ``k``-th step, the others reuse its direction with ``alpha``) or AE-SAM (adaptive, over the run's
    ``total_steps`` optimizer steps)."""
    if args.schedule == "every-k":
        return sk.EveryK(args.schedule_k)
    if args.schedule == "looksam":
        return sk.LookSAM(args.schedule_k, args.looksam_alpha)
    if args.schedule == "aesam":
        return sk.AESAM(total_steps)
    return sk.EveryStep()


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
               ) -> tuple[torch.Tensor, bool]:
    """One step; returns the (detached) loss at ``w`` and whether the step was sharpness-aware. SAM-type
    optimizers take their second forward/backward only on the steps their schedule makes sharpness-aware;
    the others are one pass, as SGD's."""
    loss = loss_fn(model(x), y)
    loss.backward()
    if not isinstance(optimizer, sk.SSAM):
        optimizer.step()
        optimizer.zero_grad()
        return loss.detach(), False
    sharp = optimizer.first_step(zero_grad=True)
    if sharp:
        with sk.frozen_bn_stats(model):  # running statistics move once per step, at w
            loss_fn(model(x), y).backward()
    optimizer.second_step(zero_grad=True)
    return loss.detach(), sharp


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` (eval mode) over ``batches``."""
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    for x, y in batches:
        logits = model(x)
        total_loss += loss_fn(logits, y, reduction="sum").item()
        correct += (logits.argmax(1) == y).sum().item()
        count += len(y)
    return total_loss / count, correct / count


@dataclass
class Run:
    """A finished run: the trained model, its data and the JSON-ready result."""

    model: nn.Module
    dataset: Dataset
    result: dict


def train(args: argparse.Namespace, dataset: Dataset | None = None) -> Run:
    """Train as ``args`` says (``dataset``: an already loaded one, to skip loading it again)."""
    torch.manual_seed(args.seed)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if dataset is None:
        dataset = load_dataset(args.dataset, device, args.data_dir)
    model = build_model(args.model, dataset.input_shape, dataset.classes, args.width).to(device)
    generator = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = -(-len(dataset.x_train) // args.batch_size)
    total_steps = args.epochs * steps_per_epoch
    optimizer = build_optimizer(args, model, dataset, total_steps, steps_per_epoch)
    # Cosine decay per step (not per epoch), so short runs anneal smoothly too. SSAM's second_step calls
    # the base optimizer's step, so the scheduler watches that one (they share param_groups).
    base = optimizer.base_optimizer if isinstance(optimizer, sk.SSAM) else optimizer
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(base, T_max=total_steps)
    history, sharp_steps = [], 0
    with tqdm(total=total_steps, desc=run_name(args), disable=args.quiet, unit="step") as bar:
        for epoch in range(args.epochs):
            model.train()
            started, losses = time.perf_counter(), []
            for x, y in dataset.train_batches(args.batch_size, generator):
                loss, sharp = train_step(model, optimizer, x, y)
                losses.append(loss)
                sharp_steps += sharp
                scheduler.step()
                bar.update()
            train_loss = torch.stack(losses).mean().item()  # one host sync per epoch
            seconds = time.perf_counter() - started
            test_loss, test_accuracy = evaluate(model, dataset.eval_batches(args.eval_batch_size))
            history.append({"epoch": epoch + 1, "train_loss": train_loss, "test_loss": test_loss,
                            "test_accuracy": test_accuracy, "seconds": seconds})
            bar.set_postfix(epoch=epoch + 1, loss=f"{train_loss:.4f}", test_acc=f"{test_accuracy:.4f}")
    train_loss, train_accuracy = evaluate(model, dataset.eval_batches(args.eval_batch_size, "train"))
    result = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "final_test_accuracy": history[-1]["test_accuracy"], "final_test_loss": history[-1]["test_loss"],
        "final_train_accuracy": train_accuracy, "final_train_loss": train_loss,
        "seconds_per_epoch": sum(h["seconds"] for h in history) / len(history),
        "total_steps": total_steps, "sharpness_aware_steps": sharp_steps,
        "sam_fraction": sharp_steps / total_steps,  # the steps that took the second pass
        "parameters": sum(p.numel() for p in model.parameters()), "history": history,
        "environment": {"torch": torch.__version__, "device": str(device),
                        "backend": backend_name(args, device),
                        "backends": sk.available_backends(), "threads": torch.get_num_threads()},
    }
    return Run(model, dataset, result)


def backend_name(args: argparse.Namespace, device: torch.device) -> str | None:
    """The ssam_kernels backend the run's optimizer uses (``--backend`` resolved); None for SGD."""
    if args.optimizer == "sgd":
        return None
    return sk.ops.resolve_backend(args.backend, device).__name__.rsplit(".", 1)[-1]


def run_name(args: argparse.Namespace) -> str:
    sparse = f"-s{args.sparsity:g}" if args.optimizer.startswith("ssam") else ""
    schedule = {"every-step": "", "every-k": f"-every{args.schedule_k}", "aesam": "-aesam",
                "looksam": f"-looksam{args.schedule_k}-a{args.looksam_alpha:g}"}[args.schedule]
    return f"{args.dataset}-{args.model}-{args.optimizer}{sparse}{schedule}-seed{args.seed}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = cli.parser(__doc__)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="ssam-f", help="base: SGD for all")
    parser.add_argument("--sparsity", type=cli.fraction, default=0.5,
                        help="SSAM: fraction of entries not perturbed")
    parser.add_argument("--rho", type=cli.non_negative, default=0.05, help="perturbation radius")
    parser.add_argument("--schedule", choices=SCHEDULES, default="every-step",
                        help="SAM, ASAM, SSAM: which steps are sharpness-aware (two passes); every-k and "
                             "looksam: every --schedule-k-th, aesam: adaptive (AE-SAM)")
    parser.add_argument("--schedule-k", type=cli.positive_int, default=None,
                        help="every-k and looksam: the period k; None: 5")
    parser.add_argument("--looksam-alpha", type=cli.non_negative, default=None,
                        help="looksam: the weight of the reused direction; None: 0.7")
    parser.add_argument("--dataset", choices=DATASETS, default="mnist1d",
                        help="mnist1d and digits need no files")
    parser.add_argument("--data-dir", type=Path, default=None, help="CIFAR: the folder of the pickle files")
    parser.add_argument("--model", choices=MODELS, default=None,
                        help="None: cnn1d (mnist1d), mlp (digits), resnet18 (cifar)")
    parser.add_argument("--width", type=cli.positive, default=1.0, help="multiplies every channel count")
    parser.add_argument("--epochs", type=cli.positive_int, default=30, help="passes over the training set")
    parser.add_argument("--batch-size", type=cli.positive_int, default=128, help="training batch")
    parser.add_argument("--eval-batch-size", type=cli.positive_int, default=1000, help="evaluation batch")
    parser.add_argument("--lr", type=cli.non_negative, default=0.05,
                        help="initial learning rate (cosine decay to 0)")
    parser.add_argument("--wd", type=cli.non_negative, default=5e-4, help="weight decay")
    parser.add_argument("--fisher-samples", type=cli.positive_int, default=128,
                        help="SSAM-F: samples per Fisher estimate")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0,
                        help="initial weights, batch order and random masks")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device")
    parser.add_argument("--threads", type=cli.positive_int, default=None,
                        help=f"CPU threads; None: 1 for the small models ({', '.join(SMALL_MODELS)}), "
                             "whose ops are too small to gain from more, else torch's default")
    parser.add_argument("--backend", default=None, choices=("auto", *sk.ops.BACKENDS),
                        help=f"None: ${sk.ops.ENV_VAR} or auto")
    parser.add_argument("--out", type=Path, default=None, help="results JSON (None: runs/<run name>.json)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    args.model = args.model or DEFAULT_MODEL[args.dataset]
    if args.optimizer == "sgd" and args.schedule != "every-step":
        parser.error(f"--schedule {args.schedule}: applies to sam, asam, ssam-f and ssam-d (sgd takes one "
                     "pass on every step)")
    if args.schedule_k is not None and args.schedule not in ("every-k", "looksam"):
        parser.error(f"--schedule-k: applies to --schedule every-k and looksam, not {args.schedule}")
    if args.looksam_alpha is not None and args.schedule != "looksam":
        parser.error(f"--looksam-alpha: applies to --schedule looksam, not {args.schedule}")
    args.schedule_k = 5 if args.schedule_k is None else args.schedule_k
    args.looksam_alpha = 0.7 if args.looksam_alpha is None else args.looksam_alpha
    if args.dataset.startswith("cifar") and args.data_dir is None:
        parser.error(f"--data-dir: required for {args.dataset} (the folder of the python-pickle files)")
    try:
        torch.device(args.device)
    except RuntimeError as exc:
        parser.error(f"--device: {exc}")
    if args.threads is None and args.model in SMALL_MODELS and torch.device(args.device).type == "cpu":
        args.threads = 1
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = train(args).result
    out = args.out or Path("runs") / f"{run_name(args)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{run_name(args)}: test accuracy {result['final_test_accuracy']:.4f} "
          f"({result['seconds_per_epoch']:.2f} s/epoch) -> {out}")
    return result


if __name__ == "__main__":
    main()
