"""The two layouts side by side, in one run, alternating in rounds so that load changes on a shared
machine hit every case alike. Reported: the median over rounds of each case's per-round median.

- Synthetic (default): ``first_step()`` + ``second_step()`` (no forward/backward, no mask update) of
  :class:`ssam_kernels.SSAM` over many small tensors, ``layout="flat"`` against ``layout="tensors"``, both
  over copies of the same parameters with the same gradients; prints the medians and their ratio.
- ``--model NAME`` (a model of :mod:`benchmarks.models`): the whole training step, ``step(closure)`` with
  both forward/backward passes, of SSAM-D at sparsity 0.5 (no mask refresh in the timed steps) in the
  tensors layout (the default), the flat layout and the published code's per-parameter loop
  (:class:`benchmarks.baselines.LoopSSAM`), each on its own copy of the model with the same weights and
  batch; also the step without its forward/backward passes (``overhead``) and the memory each holds
  between steps. Writes ``layouts.json``, ``layouts.md`` and the raw ``layouts.log`` to ``--out``.

Run from the repository root: ``python -m benchmarks.layouts --tensors 600 --backend native`` or
``python -m benchmarks.layouts --model gpt2_medium --scale 0.0625 --threads 1 --out DIR``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import ssam_kernels as sk

from . import baselines, harness
from .models import MODELS, loss_fn

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


NEVER = 1 << 30  # a mask refresh interval no benchmark reaches
MODEL_CASES = ("tensors", "flat", "refcode")
"""The whole-step cases: ours in each layout, and the published code's per-parameter loop."""


def build(layout: str, params: list[torch.nn.Parameter], sparsity: float, backend: str,
          foreach: bool | None = None) -> sk.SSAM:
    mask: Any = sk.DynamicMask(interval=NEVER) if sparsity > 0 else None
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


def check_clock(clock: str, device: torch.device) -> None:
    if clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise ValueError("--clock thread: CPU with --threads 1 only (other threads' work would not count)")


def median_s(fn: Callable[[], object], device: torch.device, clock: str, runs: int, warmup: int) -> float:
    """Median seconds of ``runs`` calls after ``warmup``: wall clock (:func:`benchmarks.harness.measure`)
    or this thread's CPU time (:func:`thread_time_median`)."""
    if clock == "thread":
        return thread_time_median(fn, runs, warmup)
    return harness.measure(fn, device, runs=runs, warmup=warmup).median_s


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = harness.parse_device(args.device, args.threads)
    dtype = getattr(torch, args.dtype)
    results: dict[str, Any] = {"tensors": args.tensors, "max_entries": args.max_entries,
                               "shapes": args.shapes, "dtype": args.dtype, "backend": args.backend,
                               "threads": torch.get_num_threads(), "base": args.base,
                               "sparsity": args.sparsity, "rounds": args.rounds, "runs": args.runs,
                               "clock": args.clock}
    check_clock(args.clock, device)
    foreach = True if args.base == "sgd-foreach" else None
    opts = {layout: build(layout, make_params(args.tensors, 0, dtype, device, args.shapes, args.max_entries),
                          args.sparsity, args.backend, foreach) for layout in ("flat", "tensors")}
    medians: dict[str, list[float]] = {layout: [] for layout in opts}
    for _ in range(args.rounds):
        for layout, opt in opts.items():
            medians[layout].append(median_s(step_fn(opt), device, args.clock, args.runs, 3))
    for layout, values in medians.items():
        results[f"{layout}_ms"] = statistics.median(values) * 1e3
    results["ratio"] = results["tensors_ms"] / results["flat_ms"]
    return results


def build_case(case: str, model: torch.nn.Module, sparsity: float, backend: str) -> Any:
    """The optimizer of a whole-step case over ``model``'s parameters: SSAM-D (no refresh) in the
    ``tensors`` or ``flat`` layout, or the published code's loop (``refcode``)."""
    params = list(model.parameters())
    if case == "refcode":
        base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        return baselines.LoopSSAM(params, base, RHO, sparsity, "dynamic", interval=NEVER)
    return build(case, params, sparsity, backend)


def held_bytes(model: torch.nn.Module, opt: Any) -> int:
    """Bytes of the distinct storages of the parameters, their gradients and the optimizer's state,
    after ``opt.zero_grad()``: what a training loop keeps between steps (the flat layout keeps its
    gradient buffer, PyTorch frees the gradients)."""
    opt.zero_grad()
    params = list(model.parameters())
    return harness.owned_bytes([params, [p.grad for p in params if p.grad is not None], opt])


def model_steps(model: torch.nn.Module, opt: Any, batch: tuple[torch.Tensor, torch.Tensor]
                ) -> dict[str, Callable[[], object]]:
    """The timed calls of a whole-step case: ``full`` (both passes) and ``overhead`` (none)."""
    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = loss_fn(model(batch[0]), batch[1])
        loss.backward()
        return loss

    def overhead() -> None:
        opt.first_step()
        opt.second_step()

    return {"full": lambda: opt.step(closure), "overhead": overhead}


def run_model(args: argparse.Namespace) -> dict[str, Any]:
    """The whole-step comparison on a real model (see the module docstring)."""
    started = time.perf_counter()
    device = harness.parse_device(args.device, args.threads)
    if args.model not in MODELS:
        raise SystemExit(f"--model: unknown model {args.model!r}; expected one of {sorted(MODELS)}")
    check_clock(args.clock, device)
    spec, on_gpu = MODELS[args.model], device.type == "cuda"
    dtype = getattr(torch, args.dtype) if args.dtype else spec.dtype
    scale = args.scale if args.scale is not None else (1.0 if on_gpu else 0.0625)
    batch_size = args.batch or (spec.gpu_batch if on_gpu else 8)
    seq = args.seq or (spec.gpu_seq if on_gpu else 64)
    out = harness.output_dir(args.out, device)
    log = harness.Log(out / "layouts.log", args.quiet)
    torch.manual_seed(0)
    with torch.device(device):
        model = spec.build(scale).to(dtype)
    batch = spec.batch(batch_size, seq, device, dtype)
    n, tensors = sum(p.numel() for p in model.parameters()), len(list(model.parameters()))
    meta = harness.environment(device, args.note) | {
        "model": args.model, "scale": scale, "params": n, "tensors": tensors,
        "dtype": str(dtype).removeprefix("torch."), "batch": batch_size, "seq": seq if spec.gpu_seq else None,
        "sparsity": args.sparsity, "backend": args.backend, "rounds": args.rounds, "runs": args.runs,
        "warmup": args.warmup, "lr": LR, "rho": RHO, "momentum": MOMENTUM, "time_limit_s": args.time_limit,
        "timer": "cuda events" if on_gpu else ("thread_time (CPU time of the timing thread)"
                                               if args.clock == "thread" else "perf_counter")}
    log.write(f"layouts: {meta['device_name']} ({device}), torch {meta['torch']}, "
              f"commit {meta['commit'][:10]}, {args.model} x{scale}: {n / 1e6:.2f} M parameters in "
              f"{tensors} tensors, {meta['dtype']}, "
              f"batch {batch_size}, backend {args.backend}, {torch.get_num_threads()} thread(s)")
    cases: dict[str, Any] = {}
    for case in MODEL_CASES:  # each case trains its own copy, from the same weights
        copy_of_model = copy.deepcopy(model)
        cases[case] = (copy_of_model, build_case(case, copy_of_model, args.sparsity, args.backend))
    del model
    gc.collect()
    rows: dict[str, dict[str, Any]] = {}
    for case, (case_model, opt) in cases.items():
        first = time.perf_counter()
        model_steps(case_model, opt, batch)["full"]()  # the initial mask, the base state: not timed
        harness.synchronize(device)
        rows[case] = {"case": case, "first_step_s": time.perf_counter() - first, "full_ms": [],
                      "overhead_ms": [], "held_bytes": held_bytes(case_model, opt)}
        if isinstance(opt, sk.SSAM):
            rows[case]["layout"], rows[case]["repr"] = opt.layout.kind, repr(opt).partition("\n")[0]
    for round_index in range(args.rounds):
        if harness.out_of_time(started, args.time_limit):
            log.write(f"round {round_index + 1}: not started, past --time-limit {args.time_limit} s")
            break
        for case, (case_model, opt) in cases.items():
            for phase, fn in model_steps(case_model, opt, batch).items():
                seconds = median_s(fn, device, args.clock, args.runs, args.warmup)
                rows[case][f"{phase}_ms"].append(seconds * 1e3)
            if on_gpu:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                model_steps(case_model, opt, batch)["full"]()
                rows[case]["peak_step_bytes"] = torch.cuda.max_memory_allocated(device) - before
        log.write(f"round {round_index + 1}: " + "  ".join(
            f"{case} full {rows[case]['full_ms'][-1]:.4g} ms overhead {rows[case]['overhead_ms'][-1]:.4g} ms"
            for case in cases))
    for row in rows.values():
        row["rounds_done"] = len(row["full_ms"])
        for phase in ("full", "overhead"):
            row[f"{phase}_median_ms"] = statistics.median(row[f"{phase}_ms"]) if row[f"{phase}_ms"] else None
    tensors_row = rows["tensors"]
    for row in rows.values():
        for phase in ("full", "overhead"):
            mine, ref = row[f"{phase}_median_ms"], tensors_row[f"{phase}_median_ms"]
            row[f"{phase}_vs_tensors"] = mine / ref if mine and ref else None
    harness.finish_meta(meta, started)
    payload = {"meta": meta, "results": list(rows.values())}
    harness.write_json(out / "layouts.json", payload)
    (out / "layouts.md").write_text(model_markdown(payload))
    log.write(f"wrote {out}/layouts.{{json,md,log}} in {meta['wall_s']} s")
    log.close()
    return payload


def model_table(payload: dict[str, Any]) -> str:
    """The whole-step cases as a Markdown table (also in :mod:`benchmarks.gpu_check`'s summary)."""
    header = ["case", "full step ms", "x tensors", "overhead ms", "x tensors", "held between steps MiB"]
    if any("peak_step_bytes" in r for r in payload["results"]):
        header.append("peak step MiB")
    table = []
    for r in payload["results"]:
        cells = [r["case"], harness.fmt(r["full_median_ms"], digits=4), harness.fmt(r["full_vs_tensors"]),
                 harness.fmt(r["overhead_median_ms"]), harness.fmt(r["overhead_vs_tensors"]),
                 harness.fmt(r["held_bytes"], 1 / 2**20)]
        if "peak step MiB" in header:
            cells.append(harness.fmt(r.get("peak_step_bytes"), 1 / 2**20))
        table.append(cells)
    return harness.markdown_table(header, table)


def model_markdown(payload: dict[str, Any]) -> str:
    """Provenance, then one row per case."""
    meta = payload["meta"]
    tokens = f" x {meta['seq']} tokens" if meta["seq"] else ""
    rounds = min(r["rounds_done"] for r in payload["results"])
    return "\n".join([
        f"# Layouts, whole step: {meta['device_name']}", "", harness.markdown_meta(meta),
        f"- **model** {meta['model']} at width x{meta['scale']}: {meta['params'] / 1e6:.2f} M parameters in "
        f"{meta['tensors']} tensors, {meta['dtype']}, batch {meta['batch']}{tokens}",
        f"- SSAM-D at sparsity {meta['sparsity']} (no mask refresh in the timed steps), backend "
        f"{meta['backend']}, SGD(momentum={meta['momentum']}), rho {meta['rho']}; {rounds} rounds of "
        f"{meta['runs']} timed calls after {meta['warmup']} warm-up per case and phase, cases alternating "
        f"within each round, timer {meta['timer']}, wall {meta['wall_s']} s", "",
        "Median over rounds of each round's median. *full step*: `step(closure)` with both forward/backward "
        "passes; *overhead*: first_step + second_step without them; *x tensors*: over the tensors layout's "
        "median (> 1: slower). *held between steps*: parameters, gradients and optimizer state after "
        "`zero_grad()` (distinct storages). `refcode`: the published code's per-parameter loop.", "",
        model_table(payload), ""])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 (the synthetic case), the model's own")
    p.add_argument("--backend", default="native", help="backend of ours (auto: what auto picks)")
    p.add_argument("--tensors", type=int, default=600)
    p.add_argument("--max-entries", type=int, default=4095,
                   help="largest parameter (entries); sizes are uniform in 1..max (the GPU case, "
                        "~100 M entries in 300 tensors: --tensors 300 --max-entries 670000)")
    p.add_argument("--shapes", choices=("1d", "mixed"), default="1d",
                   help="1d: every parameter 1-D; mixed: every second one 2-D (1, n)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--base", choices=("sgd", "sgd-foreach"), default="sgd",
                   help="base optimizer: SGD(momentum) as torch picks it on the device, or with foreach=True")
    p.add_argument("--clock", choices=("wall", "thread"), default="wall",
                   help="wall: benchmarks.harness (perf_counter, CUDA events); thread: this thread's CPU "
                   "time (CPU, 1 thread: leaves out the time spent waiting for a core on a shared machine)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--runs", type=int, default=20)
    model = p.add_argument_group("whole step on a real model (--model)")
    model.add_argument("--model", default=None, help=f"one of {sorted(MODELS)}")
    model.add_argument("--scale", type=float, default=None,
                       help="width factor (default 1 on GPU, 0.0625 on CPU)")
    model.add_argument("--batch", type=int, default=None,
                       help="batch size (default: per model on GPU, 8 on CPU)")
    model.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the context on "
                       "GPU, 64 on CPU)")
    model.add_argument("--warmup", type=int, default=2)
    model.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>)")
    model.add_argument("--note", default="", help="recorded with the results (e.g. machine load)")
    model.add_argument("--quiet", action="store_true")
    model.add_argument("--time-limit", type=float, default=None,
                       help="seconds: rounds not started by then are skipped (outputs are still written)")
    args = p.parse_args(argv)
    if args.model is not None:
        return run_model(args)
    args.dtype = args.dtype or "float32"
    results = run(args)
    print(" ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in results.items()))
    return results


if __name__ == "__main__":
    main()
