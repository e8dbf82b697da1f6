"""The step of the two layouts side by side: ``first_step()`` + ``second_step()`` (no forward/backward,
no mask update) of :class:`ssam_kernels.SSAM` over many small tensors, ``layout="flat"`` against
``layout="tensors"``, and the ratio of their medians (issue 15: one launch per op for any number of
tensors makes the per-tensor layout as fast as the flat one).

Both optimizers are built over copies of the same parameters with the same gradients; the timings
alternate between them (flat, tensors, flat, ...) in rounds so that load changes on a shared machine
hit both alike. Reported: the median over rounds of each layout's per-round median.

Run from the repository root: ``python -m benchmarks.layouts --tensors 600 --backend native``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

import ssam_kernels as sk

from . import harness

LR, RHO, MOMENTUM = 1e-3, 0.05, 0.9


def make_params(count: int, seed: int, dtype: torch.dtype, device: torch.device, shapes: str = "1d",
                max_entries: int = 4095) -> list[torch.nn.Parameter]:
    """``count`` parameters of varied sizes, 1 to ``max_entries`` entries each (the default: small ones,
    like biases, norms and small weights), each with a gradient. ``shapes="mixed"``: every second one is
    2-D, ``(1, n)`` (the per-tensor layout then flattens its gradient at each step, as for a weight
    matrix)."""
    if max_entries < 1:
        raise ValueError(f"max_entries: expected >= 1, got {max_entries}")
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_entries + 1, (count,), generator=gen).tolist()
    params = []
    for i, n in enumerate(sizes):
        shape = (1, n) if shapes == "mixed" and i % 2 else (n,)
        p = torch.nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype))
        p.grad = torch.randn(shape, generator=gen).to(device, dtype)
        params.append(p)
    return params


def build(layout: str, params: list[torch.nn.Parameter], sparsity: float, backend: str,
          foreach: bool | None = None) -> sk.SSAM:
    mask: Any = sk.DynamicMask(interval=1 << 30) if sparsity > 0 else None
    return sk.SSAM(params, torch.optim.SGD, rho=RHO, sparsity=sparsity, mask=mask, backend=backend,
                   layout=layout, lr=LR, momentum=MOMENTUM, foreach=foreach)


def step_fn(opt: sk.SSAM) -> Any:
    def step() -> None:
        opt.first_step()
        opt.second_step()
    return step


def thread_time_median(fn: Any, runs: int, warmup: int) -> float:
    """Median seconds of ``runs`` calls of ``fn`` in this thread's CPU time (``time.thread_time``): on a
    loaded shared machine it leaves out the time the process waits for a core, which wall-clock times
    include (CPU only, 1 torch thread: the work runs in this thread)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(runs):
        start = time.thread_time()
        fn()
        samples.append(time.thread_time() - start)
    return harness.Timing.of(samples).median_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = harness.parse_device(args.device, args.threads)
    dtype = getattr(torch, args.dtype)
    results: dict[str, Any] = {"tensors": args.tensors, "max_entries": args.max_entries,
                               "shapes": args.shapes, "dtype": args.dtype, "backend": args.backend,
                               "threads": torch.get_num_threads(), "base": args.base,
                               "sparsity": args.sparsity, "rounds": args.rounds, "runs": args.runs,
                               "clock": args.clock}
    if args.clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("--clock thread: CPU with --threads 1 only (other threads' work would not count)")
    foreach = True if args.base == "sgd-foreach" else None
    opts = {layout: build(layout, make_params(args.tensors, 0, dtype, device, args.shapes, args.max_entries),
                          args.sparsity, args.backend, foreach) for layout in ("flat", "tensors")}
    medians: dict[str, list[float]] = {layout: [] for layout in opts}
    for _ in range(args.rounds):
        for layout, opt in opts.items():
            medians[layout].append(
                thread_time_median(step_fn(opt), args.runs, 3) if args.clock == "thread"
                else harness.measure(step_fn(opt), device, runs=args.runs, warmup=3).median_s)
    for layout, values in medians.items():
        results[f"{layout}_ms"] = statistics.median(values) * 1e3
    results["ratio"] = results["tensors_ms"] / results["flat_ms"]
    return results


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--backend", default="native")
    p.add_argument("--tensors", type=int, default=600)
    p.add_argument("--max-entries", type=int, default=4095,
                   help="largest parameter (entries); sizes are uniform in 1..max (issue 15's GPU case, "
                        "~100 M entries in 300 tensors: --tensors 300 --max-entries 670000)")
    p.add_argument("--shapes", choices=("1d", "mixed"), default="1d",
                   help="1d: every parameter 1-D; mixed: every second one 2-D (1, n)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--base", choices=("sgd", "sgd-foreach"), default="sgd",
                   help="base optimizer: SGD(momentum) as torch picks it on the device, or with foreach=True")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall: benchmarks.harness (perf_counter); thread: this thread's CPU time")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    results = run(p.parse_args(argv))
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
