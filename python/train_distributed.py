"""Train with SSAM under DistributedDataParallel or FSDP2, launched by torchrun.

    torchrun --nproc-per-node 2 python/train_distributed.py --mode ddp
    torchrun --nproc-per-node 2 python/train_distributed.py --mode fsdp --optimizer ssam-d
    torchrun --nproc-per-node 2 python/train_distributed.py --mode ddp --no-sync-perturbation

Every rank reads the same embedded dataset (MNIST-1D by default) and trains on its slice of each global
batch, so the run takes the steps one process would take on the whole batch. On CPU the process group is
gloo, on GPUs nccl (one GPU per rank). SSAM detects the mode: replicated for DDP (masks identical on every
rank), sharded for FSDP2 (norm and mask selection across the shards). See docs/distributed.md.
"""

from __future__ import annotations

import argparse
import gc
import os

import cli
import torch
import torch.distributed as dist
from data import load_dataset
from models import MODELS, build_model
from torch import nn
from train import evaluate

import ssam_kernels as sk


def wrap(model: nn.Module, mode: str, device: torch.device) -> nn.Module:
    """DDP: one replica per rank. FSDP2: each child module with parameters and the root sharded."""
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(p.requires_grad for p in child.parameters()):
            fully_shard(child)
    return fully_shard(model)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser(__doc__)
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp", help="DDP or FSDP2")
    parser.add_argument("--optimizer", choices=("sam", "ssam-f", "ssam-d"), default="ssam-f",
                        help="base: SGD")
    parser.add_argument("--sparsity", type=cli.fraction, default=0.5, help="SSAM: fraction not perturbed")
    parser.add_argument("--rho", type=cli.non_negative, default=0.05, help="perturbation radius")
    parser.add_argument("--dataset", choices=("mnist1d", "digits"), default="mnist1d", help="embedded data")
    parser.add_argument("--model", choices=MODELS, default="cnn1d", help="python/models.py")
    parser.add_argument("--epochs", type=cli.positive_int, default=5, help="passes over the data")
    parser.add_argument("--batch-size", type=cli.positive_int, default=128,
                        help="global batch (split over the ranks)")
    parser.add_argument("--lr", type=cli.non_negative, default=0.05, help="initial learning rate")
    parser.add_argument("--seed", type=cli.non_negative_int, default=0, help="weights, batches, masks")
    parser.add_argument("--no-sync-perturbation", action="store_true",
                        help="DDP: perturb each rank along its own gradient (m-sharpness)")
    args = parser.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    run_rank(args, device)
    # The model and the optimizer (freed when run_rank returns; FSDP2's hold reference cycles) keep the
    # process group's work alive: collected here, not at interpreter exit, where gloo's threads freeing
    # their last work items abort the process (seen in about 1 run in 10 on a loaded CPU).
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


def run_rank(args: argparse.Namespace, device: torch.device) -> None:
    """The training run of one rank (the process group initialised)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    dataset = load_dataset(args.dataset, device)
    inner = build_model(args.model, dataset.input_shape, dataset.classes).to(device)
    model = wrap(inner, args.mode, device)

    loss_fn = nn.functional.cross_entropy
    generator = torch.Generator().manual_seed(args.seed)  # the same batch order on every rank
    steps_per_epoch = -(-len(dataset.x_train) // args.batch_size)
    if args.optimizer == "sam":
        mask, sparsity = None, 0.0
    elif args.optimizer == "ssam-f":
        # DDP: each rank scores its own samples and the Fisher is summed over the ranks; FSDP2: every
        # rank must score the same samples (the reduce-scatter averages per-sample gradients).
        fisher_data = [(x.chunk(world)[rank], y.chunk(world)[rank]) if args.mode == "ddp" else (x, y)
                       for x, y in dataset.train_batches(args.batch_size, torch.Generator().manual_seed(1))]
        num_samples = 128 // world if args.mode == "ddp" else 128
        mask = sk.FisherMask(inner if args.mode == "ddp" else model, loss_fn, fisher_data,
                             num_samples=num_samples, interval=steps_per_epoch)
        sparsity = args.sparsity
    else:
        mask = sk.DynamicMask(interval=steps_per_epoch, total_steps=args.epochs * steps_per_epoch,
                              seed=args.seed)
        sparsity = args.sparsity
    opt = sk.SSAM(model.parameters(), torch.optim.SGD, rho=args.rho, sparsity=sparsity, mask=mask,
                  sync_perturbation=not args.no_sync_perturbation,
                  ddp_model=model if args.mode == "ddp" else None, lr=args.lr, momentum=0.9,
                  weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    numel = sum(p.numel() for p in model.parameters() if p.requires_grad)  # N (DTensor: the full size)

    for epoch in range(args.epochs):
        model.train()
        for x, y in dataset.train_batches(args.batch_size, generator):
            x, y = x.chunk(world)[rank], y.chunk(world)[rank]

            def closure(x: torch.Tensor = x, y: torch.Tensor = y) -> torch.Tensor:
                loss = loss_fn(model(x), y)
                loss.backward()
                return loss

            loss = opt.step(closure)
        scheduler.step()
        _, accuracy = evaluate(model, dataset.eval_batches(1000))
        live = torch.tensor([sum(int(m.sum()) for m in opt.get_mask())], device=device)
        if args.mode == "fsdp":
            dist.all_reduce(live)  # the mask's shards add up to exactly K live entries
        if rank == 0:
            print(f"epoch {epoch + 1}: loss {loss.item():.4f}, test accuracy {accuracy:.4f}, "
                  f"live entries {int(live)} of {numel} (K = {opt.live_count} at sparsity {sparsity:g}; "
                  f"{opt.distributed}, {world} ranks)", flush=True)


if __name__ == "__main__":
    main()
