"""Training runs shared by the distributed tests: one rank of a gloo group, or a single process.

Each scenario trains the same small model on the same global batches. A rank of ``world`` processes
sees its slice of every batch (DDP and FSDP2 average the gradients, so the step equals one process on
the whole batch with a mean loss). Results (full weights, full masks) are saved per rank for the test.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import ssam_kernels as sk
from ssam_kernels import checkpoint
from tests.helpers import seeded_mlp

STEPS, BATCH, FISHER_SAMPLES = 6, 16, 32
SCENARIOS = ("sam", "ssam-f", "ssam-d", "looksam", "aesam")  # the last two: SSAM-D with that schedule


def make_model() -> nn.Module:
    return seeded_mlp(sizes=(6, 10, 3))


def global_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(BATCH, 6, generator=g), torch.randint(0, 3, (BATCH,), generator=g))
            for _ in range(STEPS)]


def fisher_samples() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(FISHER_SAMPLES, 6, generator=g),
             torch.randint(0, 3, (FISHER_SAMPLES,), generator=g))]


def shard(batch: tuple[torch.Tensor, ...], rank: int, world: int) -> tuple[torch.Tensor, ...]:
    return tuple(t.chunk(world)[rank] for t in batch)


def make_optimizer(scenario: str, model: nn.Module, fisher_model: nn.Module, fisher_data: list,
                   **kwargs) -> sk.SSAM:
    base = {"lr": 0.1, "momentum": 0.9}
    if scenario == "sam":
        return sk.SAM(model.parameters(), torch.optim.SGD, rho=0.05, **base, **kwargs)
    if scenario == "looksam":
        kwargs["schedule"] = sk.LookSAM(k=2, alpha=0.7)
    elif scenario == "aesam":
        # a threshold that gives both kinds of step in 6 steps (the paper's defaults take all 6)
        kwargs["schedule"] = sk.AESAM(total_steps=STEPS, delta=0.5, lambda_start=0.5, lambda_end=0.5)
    if scenario == "ssam-f":
        num_samples = sum(len(y) for _, y in fisher_data)
        mask = sk.FisherMask(fisher_model, nn.functional.cross_entropy, fisher_data, num_samples=num_samples,
                             interval=2)
    else:
        mask = sk.DynamicMask(interval=2, total_steps=STEPS, seed=3)
    return sk.SSAM(model.parameters(), torch.optim.SGD, rho=0.05, sparsity=0.5, mask=mask, **base, **kwargs)


def train(model: nn.Module, opt: sk.SSAM, batches: list) -> list[int]:
    """``opt.step(closure)`` over the given batches (each rank's shards): the closure form that DDP and
    FSDP users run, which the two-call ``tests.helpers.train`` does not exercise. Returns how many times
    each step ran the closure (2: sharpness-aware, 1: plain)."""
    loss_fn = nn.functional.cross_entropy
    calls = []
    for x, y in batches:
        calls.append(0)

        def closure(x=x, y=y):
            calls[-1] += 1
            loss = loss_fn(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return calls


def single_process(scenario: str) -> dict:
    model = make_model()
    opt = make_optimizer(scenario, model, model, fisher_samples(), distributed="none")
    calls = train(model, opt, global_batches())
    return {"weights": [p.detach().clone() for p in model.parameters()], "mask": opt.get_mask(),
            "calls": calls}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _ddp(scenario: str, rank: int, world: int, bucket_view: bool, sync: bool, layout: str = "auto") -> dict:
    from torch.nn.parallel import DistributedDataParallel

    inner = make_model()
    model = DistributedDataParallel(inner, gradient_as_bucket_view=bucket_view)
    fisher_data = [shard(b, rank, world) for b in fisher_samples()]  # each rank its own samples
    opt = make_optimizer(scenario, model, inner, fisher_data, sync_perturbation=sync, ddp_model=model,
                         layout=layout)
    assert opt.distributed == "replicated" and opt.layout.kind == ("flat" if layout == "flat" else "tensors")
    calls = train(model, opt, [shard(b, rank, world) for b in global_batches()])
    return {"weights": [p.detach().clone() for p in inner.parameters()], "mask": opt.get_mask(),
            "calls": calls}


def _fsdp_model() -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    return fully_shard(model)


def _fsdp(scenario: str, rank: int, world: int) -> dict:
    model = _fsdp_model()
    opt = make_optimizer(scenario, model, model, fisher_samples())  # FSDP2: the same samples on every rank
    assert opt.distributed == "sharded" and opt.layout.kind == "tensors"
    calls = train(model, opt, [shard(b, rank, world) for b in global_batches()])
    # uint8 DTensors placed like the parameters (dense: all live)
    masks = checkpoint.encode_masks(opt.layout, list(model.parameters()), opt._run.masks, sharded=True)
    return {"weights": [_full(p.detach()) for p in model.parameters()], "calls": calls,
            "mask": [_full(m).bool() for m in masks], "local_live": sum(int(m.sum()) for m in opt.get_mask())}


def _fsdp_checkpoint(rank: int, world: int, directory: Path, scenario: str = "ssam-d") -> dict:
    """Train 3 steps, save with torch.distributed.checkpoint, train 3 more; a fresh model and optimizer
    loaded from the checkpoint must then train the last 3 steps to the same weights and masks (LookSAM:
    its g_v saved as DTensors placed like the parameters)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    batches = [shard(b, rank, world) for b in global_batches()]

    def build():
        model = _fsdp_model()
        return model, make_optimizer(scenario, model, model, [])

    def state(model, opt):
        return {"model": get_model_state_dict(model),
                "optim": get_optimizer_state_dict(model, opt.base_optimizer), "ssam": opt.ssam_state_dict()}

    model, opt = build()
    train(model, opt, batches[:3])
    dcp.save(state(model, opt), checkpoint_id=str(directory))
    train(model, opt, batches[3:])

    resumed, resumed_opt = build()
    train(resumed, resumed_opt, batches[:1])  # a different state, overwritten by the load
    loaded = state(resumed, resumed_opt)
    dcp.load(loaded, checkpoint_id=str(directory))
    set_model_state_dict(resumed, loaded["model"])
    set_optimizer_state_dict(resumed, resumed_opt.base_optimizer, loaded["optim"])
    resumed_opt.load_ssam_state_dict(loaded["ssam"])
    train(resumed, resumed_opt, batches[3:])
    same_weights = all(torch.equal(a.to_local(), b.to_local())
                       for a, b in zip(model.parameters(), resumed.parameters(), strict=True))
    same_masks = all(torch.equal(a, b) for a, b in zip(opt.get_mask(), resumed_opt.get_mask(), strict=True))
    return {"same_weights": same_weights, "same_masks": same_masks}


def run_rank(rank: int, world: int, port: int, out: str) -> None:
    """Entry point of one spawned rank: every scenario, results saved to ``out/rank{rank}.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {}
        for scenario in SCENARIOS:
            results[("ddp", scenario)] = _ddp(scenario, rank, world, bucket_view=False, sync=True)
            results[("ddp-bucket-view", scenario)] = _ddp(scenario, rank, world, bucket_view=True, sync=True)
            # the flat layout copies DDP's gradients (bucket views included) into its own buffer
            for bucket_view, mode in ((False, "ddp-flat"), (True, "ddp-bucket-view-flat")):
                results[(mode, scenario)] = _ddp(scenario, rank, world, bucket_view, True, layout="flat")
            results[("fsdp", scenario)] = _fsdp(scenario, rank, world)
        for scenario in ("ssam-d", "looksam", "aesam"):
            results[("ddp-no-sync", scenario)] = _ddp(scenario, rank, world, bucket_view=False, sync=False)
        results["checkpoint"] = _fsdp_checkpoint(rank, world, Path(out) / "dcp")
        results["checkpoint-looksam"] = _fsdp_checkpoint(rank, world, Path(out) / "dcp-looksam", "looksam")
        torch.save(results, Path(out) / f"rank{rank}.pt")
        dist.barrier()
    finally:
        gc.collect()  # the scenarios' FSDP2 models, before the group (python/train_distributed.py says why)
        dist.destroy_process_group()
