"""Train a small model with SGD, SAM, ASAM, SSAM-F or SSAM-D on an embedded dataset (no network).

The default is SSAM-F at sparsity 0.5 on scikit-learn's bundled 8x8 digits, a few seconds on a CPU:

    python python/train.py
    python python/train.py --optimizer ssam-d --sparsity 0.9 --epochs 30 --out results.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

import ssam_kernels as sk

OPTIMIZERS = ("sgd", "sam", "asam", "ssam-f", "ssam-d")


def digits(seed: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """scikit-learn's 1797 8x8 digit images, standardised, split 80/20 with a seeded permutation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    split = int(0.8 * len(x))
    train, test = order[:split], order[split:]
    return x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device)


def mlp(in_features: int, classes: int, hidden: int = 128) -> nn.Module:
    return nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def build_optimizer(args: argparse.Namespace, model: nn.Module, batches: list[tuple[torch.Tensor, ...]],
                    steps_per_epoch: int) -> torch.optim.Optimizer:
    base = {"lr": args.lr, "momentum": 0.9, "weight_decay": 5e-4}
    if args.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **base)
    if args.optimizer in ("sam", "asam"):
        return sk.SAM(model.parameters(), torch.optim.SGD, rho=args.rho, adaptive=args.optimizer == "asam",
                      backend=args.backend, **base)
    if args.optimizer == "ssam-f":
        mask = sk.FisherMask(model, nn.functional.cross_entropy, batches, num_samples=args.fisher_samples,
                             interval=steps_per_epoch)
    else:
        mask = sk.DynamicMask(interval=steps_per_epoch, drop_rate=0.5,
                              total_steps=args.epochs * steps_per_epoch, seed=args.seed)
    return sk.SSAM(model.parameters(), torch.optim.SGD, rho=args.rho, sparsity=args.sparsity, mask=mask,
                   backend=args.backend, **base)


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x_train, y_train, x_test, y_test = digits(args.seed, device)
    model = mlp(x_train.shape[1], 10).to(device)
    loss_fn = nn.functional.cross_entropy
    generator = torch.Generator().manual_seed(args.seed)

    def epoch_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(x_train), generator=generator).to(device)
        return [(x_train[i], y_train[i]) for i in order.split(args.batch_size)]

    batches = epoch_batches()
    optimizer = build_optimizer(args, model, batches, len(batches))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=args.epochs)
    history = []
    for epoch in (bar := tqdm(range(args.epochs), desc=args.optimizer, disable=args.quiet)):
        model.train()
        started, total_loss = time.perf_counter(), 0.0
        for x, y in batches:
            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss
            if args.optimizer == "sgd":
                optimizer.zero_grad()
                loss = closure()
                optimizer.step()
            else:
                loss = optimizer.step(closure)
            total_loss += loss.item()
        scheduler.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
        history.append({"epoch": epoch + 1, "train_loss": total_loss / len(batches),
                        "test_accuracy": accuracy, "seconds": time.perf_counter() - started})
        bar.set_postfix(loss=f"{history[-1]['train_loss']:.4f}", test_acc=f"{accuracy:.4f}")
        batches = epoch_batches()
    return {"config": vars(args), "final_test_accuracy": history[-1]["test_accuracy"], "history": history,
            "backends": sk.available_backends()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="ssam-f")
    parser.add_argument("--sparsity", type=float, default=0.5, help="fraction of entries not perturbed")
    parser.add_argument("--rho", type=float, default=0.05)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--fisher-samples", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default=None, help="auto | reference | triton | native")
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    result = train(args)
    print(f"{args.optimizer}: final test accuracy {result['final_test_accuracy']:.4f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2, default=str))
    return result


if __name__ == "__main__":
    main()
