"""DDP and FSDP2 on CPU with gloo: two spawned ranks against one process on the same global batches."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests import distributed_worker as worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")
WORLD = 2
TIMEOUT_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """Run every scenario once on two ranks (bounded in time) and load what each rank saved."""
    out = tmp_path_factory.mktemp("distributed")
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=worker.run_rank, args=(r, WORLD, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(TIMEOUT_S)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"distributed ranks did not finish within {TIMEOUT_S} s"
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def single() -> dict:
    return {scenario: worker.single_process(scenario) for scenario in worker.SCENARIOS}


def live(mask: list[torch.Tensor]) -> int:
    return sum(int(m.sum()) for m in mask)


@pytest.mark.parametrize("mode", ["ddp", "ddp-bucket-view", "ddp-flat", "ddp-bucket-view-flat", "fsdp"])
@pytest.mark.parametrize("scenario", worker.SCENARIOS)
def test_same_training_as_one_process(ranks, single, mode, scenario):
    reference = single[scenario]
    numel = sum(w.numel() for w in reference["weights"])
    for result in ranks:
        got = result[(mode, scenario)]
        for a, b in zip(got["weights"], reference["weights"], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        expected_live = numel if scenario == "sam" else int(numel * 0.5)
        assert live(got["mask"]) == expected_live  # exact K over all ranks' shards
        if scenario != "ssam-d":  # random growth may place entries differently; Fisher and dense may not
            assert all(torch.equal(a, b) for a, b in zip(got["mask"], reference["mask"], strict=True))
    first, second = (r[(mode, scenario)]["mask"] for r in ranks)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))  # identical on every rank
    # every rank took the one process's decisions (AE-SAM: from the global ‖g‖²)
    assert all(r[(mode, scenario)]["calls"] == reference["calls"] for r in ranks)
    if scenario in ("looksam", "aesam"):
        assert set(reference["calls"]) == {1, 2}  # both kinds of step happened


def test_fsdp_shards_hold_part_of_the_mask(ranks):
    local = [r[("fsdp", "ssam-f")]["local_live"] for r in ranks]
    assert sum(local) == live(ranks[0][("fsdp", "ssam-f")]["mask"]) and all(n > 0 for n in local)


@pytest.mark.parametrize("scenario", ["ssam-d", "looksam", "aesam"])
def test_ddp_per_rank_perturbation_keeps_ranks_in_step(ranks, scenario):
    """m-sharpness (sync_perturbation=False): the first backward is each rank's own, yet the ranks stay in
    step: the second backward is synchronised, a plain step's gradients are averaged, LookSAM's g too,
    AE-SAM decides from the mean of the ranks' ‖g‖²."""
    first, second = (r[("ddp-no-sync", scenario)] for r in ranks)
    for a, b in zip(first["weights"], second["weights"], strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(a, b) for a, b in zip(first["mask"], second["mask"], strict=True))
    assert first["calls"] == second["calls"]
    synced = ranks[0][("ddp", scenario)]["weights"]
    assert any(not torch.allclose(a, b) for a, b in zip(first["weights"], synced, strict=True))


@pytest.mark.parametrize("key", ["checkpoint", "checkpoint-looksam"])
def test_fsdp_checkpoint_resumes_bit_identically(ranks, key):
    for result in ranks:
        assert result[key] == {"same_weights": True, "same_masks": True}


def test_torchrun_example_runs(tmp_path):
    """The torchrun command of docs/distributed.md (python/train_distributed.py) trains under FSDP2 on two
    ranks."""
    root = Path(__file__).resolve().parents[1]
    # --standalone: the rendezvous store binds a port of its own choosing (no race with other tests for a
    # port picked beforehand)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(root / "python" / "train_distributed.py"), "--mode", "fsdp",
               "--optimizer", "ssam-d", "--dataset", "digits", "--model", "mlp", "--epochs", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1",
                               "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])})
    # a rank's own error comes before torchrun's summary: both are shown
    errors = [line for line in done.stderr.splitlines() if re.search(r"Error|error:|terminate|abort", line)]
    assert done.returncode == 0, "\n".join(errors[:20]) + "\n...\n" + done.stderr[-2000:]
    found = re.search(r"live entries (\d+) of (\d+) \(K = (\d+) at sparsity 0.5; sharded, 2 ranks\)",
                      done.stdout)
    assert found, done.stdout[-2000:]
    live, numel, k = map(int, found.groups())
    assert live == k == int(numel * 0.5) and numel > k  # K of N, not K of K
