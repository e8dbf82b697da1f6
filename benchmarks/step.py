"""Optimizer-step benchmarks: time and memory per step on real model shapes, per method.

Methods (the SAM family uses SGD with momentum 0.9 as the base optimizer):

- ``SGD``, ``AdamW`` alone (one forward/backward per step);
- ``loop SAM``: dense SAM in the common per-parameter style (``p.grad.norm()`` per parameter, ``e_w`` per
  parameter, ``p.add_`` / ``p.sub_``) — :class:`benchmarks.baselines.LoopSSAM` without a mask;
- ``refcode SSAM-F`` / ``SSAM-D``: the reference-code style (dense fp32 masks, dense ``e_w``, ``torch.topk``
  over a concatenation) — :class:`benchmarks.baselines.LoopSSAM`;
- ours: ``sk.SAM`` and ``sk.SSAM`` with a Fisher mask (SSAM-F) or ``sk.DynamicMask`` (SSAM-D), at
  sparsity 0.5 and 0.9, for each benchmarked backend.

Timed per method (:func:`benchmarks.harness.measure`, median of ``--runs`` calls):

- ``perturb_restore``: ``first_step()`` + the restore (ours: ``unperturb()``): what SAM adds around the
  second forward/backward, without the base step;
- ``overhead``: ``first_step()`` + ``second_step()`` (plain optimizers: ``step()``): the whole step except
  the forward/backward passes, with no mask update;
- ``update``: the mask update alone, as the difference of the medians of ``overhead`` with a mask update
  at every step and without one. SSAM-F's update is the top-k selection on a fixed Fisher diagonal: the
  Fisher estimation itself (forward/backward passes over ``N_F`` samples) is model compute, excluded;
- ``full``: the whole step with its forward/backward passes (two for the SAM family).

Memory: ``state_bytes`` is the bytes of the distinct tensor storages the optimizer object holds between
steps (:func:`benchmarks.harness.owned_bytes`: reachable from it, parameters, gradients and the fixed
Fisher diagonal excluded), measured after the timed steps; ``extra_bytes`` subtracts what the base
optimizer alone holds (its momentum): the persistent memory SAM/SSAM add. Both are also given per
parameter. On CUDA, ``peak_step_bytes`` is ``torch.cuda.max_memory_allocated`` during the ``overhead``
steps minus the memory allocated before them (transient memory of the step).

The reference point is the published SSAM code's per-parameter loop (``refcode``, written here from the
paper's algorithm: :class:`benchmarks.baselines.LoopSSAM`): every row of ours carries ``x_vs_loop``, the
refcode median of the same model, policy, sparsity and thread count over ours (> 1: ours is faster), and
the Markdown opens with those ratios for the overhead and the SSAM-D mask refresh, per backend. On CPU
``--threads 1,2`` runs every method once per thread count, side by side in one run.

Run from the repository root: ``python -m benchmarks.step --device cpu --threads 1,2``.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import ssam_kernels as sk
from ssam_kernels import ops

from . import baselines, harness
from .models import MODELS, loss_fn

LR, RHO, MOMENTUM = 1e-4, 0.05, 0.9
NEVER = 1 << 30  # an update interval no benchmark reaches
SPARSITIES = (0.5, 0.9)


class FixedFisherMask(sk.MaskPolicy):
    """SSAM-F's selection (``ops.select_topk``, as ``sk.FisherMask`` does after estimating the Fisher
    diagonal) on a given Fisher diagonal, one tensor per parameter: the update without the estimation."""

    def __init__(self, fisher: dict[int, torch.Tensor], interval: int) -> None:
        self.fisher, self.interval = fisher, interval

    def initial(self, ctx: sk.masks.MaskContext, k: int) -> list[sk.masks.Mask]:
        scores = [torch.cat([self.fisher[id(p)].reshape(-1) for p in s.params]) for s in ctx.segments]
        return ops.select_topk(scores, k, backend=ctx.backend, comm=ctx.comm)

    def refresh(self, ctx: sk.masks.MaskContext, k: int, step: int) -> list[sk.masks.Mask]:
        return self.initial(ctx, k)


@dataclass(frozen=True)
class Method:
    """One optimizer configuration: ``family`` is ``plain`` (``name`` SGD/AdamW), ``loop`` (the
    baselines of :mod:`benchmarks.baselines`) or ``ours``; ``policy`` None (dense SAM), ``"fisher"`` or
    ``"dynamic"``."""

    family: str
    name: str
    policy: str | None = None
    sparsity: float = 0.0
    backend: str | None = None

    @property
    def label(self) -> str:
        policy = {"fisher": "-F", "dynamic": "-D"}.get(self.policy or "", "")
        sparsity = f" s={self.sparsity:g}" if self.policy else ""
        backend = f"[{self.backend}]" if self.backend else ""
        return f"{self.name}{policy}{backend}{sparsity}"

    @property
    def key(self) -> tuple[str | None, float]:
        """What ours and the loop baseline are matched on for the speed-up ratios."""
        return self.policy, self.sparsity


def methods(backends: Sequence[str]) -> list[Method]:
    masked = [(policy, s) for policy in ("fisher", "dynamic") for s in SPARSITIES]
    out = [Method("plain", "SGD"), Method("plain", "AdamW"), Method("loop", "loop SAM")]
    out += [Method("loop", "refcode SSAM", p, s) for p, s in masked]
    for backend in backends:
        out.append(Method("ours", "sk.SAM", backend=backend))
        out += [Method("ours", "sk.SSAM", p, s, backend) for p, s in masked]
    return out


def build_optimizer(method: Method, params: list[torch.nn.Parameter], fisher: list[torch.Tensor],
                    update: bool, layout: str = "auto") -> Any:
    """The optimizer of ``method`` over ``params``; ``update``: refresh the mask at every step;
    ``layout``: ours' layout."""
    interval = 1 if update else NEVER
    if method.family == "plain":
        if method.name == "SGD":
            return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        return torch.optim.AdamW(params, lr=LR)
    if method.family == "loop":
        base = torch.optim.SGD(params, lr=LR, momentum=MOMENTUM)
        return baselines.LoopSSAM(params, base, RHO, method.sparsity, method.policy, fisher, interval)
    if method.policy is None:
        return sk.SAM(params, torch.optim.SGD, rho=RHO, backend=method.backend, layout=layout, lr=LR,
                      momentum=MOMENTUM)
    policy = (FixedFisherMask(dict(zip(map(id, params), fisher, strict=True)), interval)
              if method.policy == "fisher" else sk.DynamicMask(interval, drop_rate=0.5))
    return sk.SSAM(params, torch.optim.SGD, rho=RHO, sparsity=method.sparsity, mask=policy,
                   backend=method.backend, layout=layout, lr=LR, momentum=MOMENTUM)


def _base_of(opt: Any) -> torch.optim.Optimizer:
    return opt.base_optimizer if isinstance(opt, sk.SSAM) else getattr(opt, "base", opt)


def _timed_steps(method: Method, opt: Any, closure: Callable[[], torch.Tensor]
                 ) -> dict[str, Callable[[], object]]:
    """The callables timed for ``method``: name → one call."""
    if method.family == "plain":
        def full() -> None:
            closure()
            opt.step()
        return {"overhead": opt.step, "full": full}

    def perturb_restore() -> None:
        opt.first_step()
        opt.unperturb()

    def overhead() -> None:
        opt.first_step()
        opt.second_step()

    return {"perturb_restore": perturb_restore, "overhead": overhead, "full": lambda: opt.step(closure)}


def bench_method(method: Method, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor],
                 fisher: list[torch.Tensor], args: argparse.Namespace, device: torch.device
                 ) -> dict[str, Any]:
    """Time and memory of one method on one model; a phase that does not fit the budget is None."""
    params = [p for p in model.parameters() if p.requires_grad]
    row: dict[str, Any] = {"method": method.label, **vars(method), "skipped": {}}
    for update in (False, True) if method.policy else (False,):
        opt = build_optimizer(method, params, fisher, update, args.layout)

        def closure(opt: Any = opt) -> torch.Tensor:
            opt.zero_grad()
            loss = loss_fn(model(batch[0]), batch[1])
            loss.backward()
            return loss

        closure()  # gradients for the steps timed without forward/backward
        if method.family != "plain":  # the initial mask is built at the first first_step: not a step cost
            opt.first_step()
            opt.unperturb()
        steps = _timed_steps(method, opt, closure)
        names = ["overhead"] if update else list(steps)
        for name in names:
            phase = "overhead_with_update" if update else name
            if device.type == "cuda" and phase == "overhead":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            try:
                timing = harness.measure(steps[name], device, args.runs, args.warmup, args.budget)
            except harness.TooSlow as exc:
                row[phase], row["skipped"][phase] = None, str(exc)
                continue
            row[phase] = vars(timing)
            if device.type == "cuda" and phase == "overhead":
                row["peak_step_bytes"] = torch.cuda.max_memory_allocated(device) - before
        if not update:
            exclude = [*params, *(p.grad for p in params if p.grad is not None), *fisher]
            row["state_bytes"] = harness.owned_bytes(opt, exclude)
            row["extra_bytes"] = (row["state_bytes"] - harness.owned_bytes(_base_of(opt), exclude)
                                  if method.family != "plain" else None)
        del opt, steps, closure
        gc.collect()
    with_update, without = row.get("overhead_with_update"), row.get("overhead")
    row["update_s"] = with_update["median_s"] - without["median_s"] if with_update and without else None
    return row


def thread_counts(spec: str | None) -> list[int | None]:
    """``--threads``: a comma list of CPU thread counts (None: torch's choice, one pass)."""
    if spec is None:
        return [None]
    try:
        counts = [int(part) for part in spec.split(",")]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise SystemExit(f"--threads: expected a comma list of positive ints, got {spec!r}")
    return counts


def run(args: argparse.Namespace) -> dict[str, Any]:
    started = time.perf_counter()
    device = harness.parse_device(args.device)
    counts = thread_counts(args.threads)
    out = harness.output_dir(args.out, device)
    log = harness.Log(out / "step.log", args.quiet)
    backends = harness.backends_for(device, args.backends, log)
    names = [m.strip() for m in args.models.split(",")]
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"--models: unknown model {name!r}; expected some of {sorted(MODELS)}")
    meta = harness.environment(device, args.note) | {
        "models": names, "scale": args.scale, "runs": args.runs, "warmup": args.warmup,
        "budget_s": args.budget, "time_limit_s": args.time_limit, "thread_counts": counts,
        "benchmarked_backends": backends, "layout": args.layout, "lr": LR, "rho": RHO, "momentum": MOMENTUM,
        "timer": "cuda events" if device.type == "cuda" else "perf_counter",
    }
    log.write(f"step: {meta['device_name']} ({device}), torch {meta['torch']}, commit {meta['commit'][:10]}, "
              f"backends {backends}, models {names} at scale {args.scale}")
    todo = methods(backends)
    rows: list[dict[str, Any]] = []
    models_meta: dict[str, Any] = {}
    bar = log.progress(len(names) * len(todo) * len(counts), "step")
    for name in names:
        spec = MODELS[name]
        dtype = getattr(torch, args.dtype) if args.dtype else spec.dtype
        on_gpu = device.type == "cuda"
        batch_size = args.batch or (spec.gpu_batch if on_gpu else 2)
        seq = args.seq or (spec.gpu_seq if on_gpu else 32)
        torch.manual_seed(0)
        with torch.device(device):
            model = spec.build(args.scale).to(dtype)
        params = list(model.parameters())
        n = sum(p.numel() for p in params)
        fisher = [torch.rand(p.shape, device=device) for p in params]
        batch = spec.batch(batch_size, seq, device, dtype)
        models_meta[name] = {"params": n, "tensors": len(params), "dtype": str(dtype).removeprefix("torch."),
                             "batch": batch_size, "seq": seq if spec.gpu_seq else None,
                             "element_bytes": params[0].element_size()}
        log.write(f"{name}: {n / 1e6:.2f} M parameters in {len(params)} tensors, {dtype}, batch {batch_size}")
        initial = [p.detach().clone() for p in params]
        for threads, method in ((t, m) for t in counts for m in todo):
            if threads is not None:
                torch.set_num_threads(threads)
            bar.set_postfix_str(f"{name} {method.label} threads {torch.get_num_threads()}")
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), initial, strict=True):
                    p.copy_(p0)  # every method starts from the same weights
            try:
                if harness.out_of_time(started, args.time_limit):
                    row = {"method": method.label, **vars(method),
                           "skipped": {"all": f"not started: past --time-limit {args.time_limit} s"}}
                else:
                    row = bench_method(method, model, batch, fisher, args, device)
            except Exception as exc:
                if not harness.is_oom(exc):
                    raise
                row = {"method": method.label, **vars(method), "skipped": {"all": f"out of memory: {exc}"}}
            row |= {"model": name, "params": n, "threads": torch.get_num_threads()}
            for key in ("state_bytes", "extra_bytes"):
                if row.get(key) is not None:
                    row[key.replace("bytes", "bytes_per_param")] = row[key] / n
            rows.append(row)
            log.write(_line(row))
            bar.update()
            for p in model.parameters():
                p.grad = None
        del model, params, fisher, batch, initial
        gc.collect()
    bar.close()
    _add_ratios(rows)
    harness.finish_meta(meta, started)
    meta["model_shapes"] = models_meta
    payload = {"meta": meta, "results": rows}
    harness.write_json(out / "step.json", payload)
    (out / "step.md").write_text(markdown(payload))
    if not args.no_plots:
        plot(payload, out)
    log.write(f"wrote {out}/step.{{json,md,log}} in {meta['wall_s']} s")
    log.close()
    return payload


PHASES = ("perturb_restore", "overhead", "full")


def _median(row: dict[str, Any], phase: str) -> float | None:
    return row[phase]["median_s"] if row.get(phase) else None


def _line(row: dict[str, Any]) -> str:
    times = "  ".join(f"{p} {harness.fmt(_median(row, p), 1e3)} ms" for p in PHASES)
    return (f"{row['model']:<12} {row['method']:<28} {row['threads']}t  {times}  "
            f"update {harness.fmt(row.get('update_s'), 1e3)} ms  "
            f"state {harness.fmt(row.get('state_bytes_per_param'))} B/param  "
            f"extra {harness.fmt(row.get('extra_bytes_per_param'))} B/param"
            + (f"  skipped {row['skipped']}" if row["skipped"] else ""))


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """``x_vs_loop``: per phase, the loop baseline's median (same model, policy, sparsity and thread count)
    over ours: the published code's time over ours."""
    loop = {(r["model"], r["policy"], r["sparsity"], r["threads"]): r for r in rows if r["family"] == "loop"}
    for r in rows:
        key = (r["model"], r["policy"], r["sparsity"], r["threads"])
        base = loop.get(key) if r["family"] == "ours" else None
        ratios = {}
        for phase in (*PHASES, "update"):
            mine = r.get("update_s") if phase == "update" else _median(r, phase)
            theirs = (base.get("update_s") if phase == "update" else _median(base, phase)) if base else None
            ratios[phase] = theirs / mine if mine and theirs and mine > 0 else None
        r["x_vs_loop"] = ratios


def _threads(payload: dict[str, Any]) -> list[int]:
    return sorted({r["threads"] for r in payload["results"]})


def vs_published(payload: dict[str, Any]) -> list[str]:
    """Markdown lines: per model, backend and masked configuration, the published code's (refcode)
    overhead and SSAM-D mask refresh over ours, one column per thread count (> 1: ours is faster)."""
    threads = _threads(payload)
    header = ["model", "method", *(f"overhead x, {t}t" for t in threads),
              *(f"SSAM-D refresh x, {t}t" for t in threads)]
    table = []
    ours = [r for r in payload["results"] if r["family"] == "ours"]
    for model, label in dict.fromkeys((r["model"], r["method"]) for r in ours):
        by_threads = {r["threads"]: r for r in ours if r["model"] == model and r["method"] == label}
        cells = [harness.fmt(by_threads[t]["x_vs_loop"].get("overhead")) if t in by_threads else "-"
                 for t in threads]
        dynamic = next(iter(by_threads.values()))["policy"] == "dynamic"
        cells += [harness.fmt(by_threads[t]["x_vs_loop"].get("update")) if t in by_threads and dynamic
                  else "-" for t in threads]
        table.append([model, label, *cells])
    return ["## Against the published code", "",
            "The published SSAM code's per-parameter loop (`refcode`: dense fp32 masks and `e_w`, "
            "`torch.topk` over a concatenation) is the reference point: each cell is its median over ours, "
            "same model, policy, sparsity and thread count (> 1: ours is faster). *overhead*: the step "
            "without its forward/backward passes; *SSAM-D refresh*: the mask update alone (SSAM-D rows "
            "only).", "",
            harness.markdown_table(header, table), ""]


def markdown(payload: dict[str, Any]) -> str:
    """Provenance, then one table per model."""
    meta = payload["meta"]
    parts = [f"# Optimizer-step benchmarks: {meta['device_name']}", "", harness.markdown_meta(meta),
             f"- **scale** {meta['scale']}, **runs** {meta['runs']} timed after {meta['warmup']} warm-up, "
             f"timer {meta['timer']}, base optimizer of the SAM family SGD(momentum={meta['momentum']}), rho "
             f"{meta['rho']}, layout of ours {meta['layout']}, "
             f"wall {meta['wall_s']} s", "",
             "Median ms per call. *perturb+restore*: first_step + restore; *overhead*: the step without its "
             "forward/backward passes, no mask update; *update*: the mask update alone (difference of "
             "overhead medians with and without an update at every step; SSAM-F: selection on a fixed "
             "Fisher diagonal); *full*: with the forward/backward passes. *x loop*: the loop baseline of the "
             "same policy and sparsity over ours, same run. Memory: bytes per parameter held by the "
             "optimizer between steps (*state*), and *extra* over its base optimizer (what SAM/SSAM add).",
             ""]
    parts += vs_published(payload)
    for (name, shape), threads in ((m, t) for m in meta["model_shapes"].items() for t in _threads(payload)):
        rows = [r for r in payload["results"] if r["model"] == name and r["threads"] == threads]
        tokens = f" x {shape['seq']} tokens" if shape["seq"] else ""
        parts += [f"## {name}: {shape['params'] / 1e6:.2f} M parameters, {shape['tensors']} tensors, "
                  f"{shape['dtype']}, batch {shape['batch']}{tokens}, {threads} thread(s)", ""]
        header = ["method", "perturb+restore ms", "overhead ms", "update ms", "full ms", "state B/param",
                  "extra B/param", "x loop (p+r / overhead / update)"]
        if any("peak_step_bytes" in r for r in rows):
            header.append("peak step MiB")
        table = []
        for r in rows:
            ratios = r.get("x_vs_loop", {})
            cells = [r["method"], *(harness.fmt(_median(r, p), 1e3) for p in PHASES[:2]),
                     harness.fmt(r.get("update_s"), 1e3), harness.fmt(_median(r, "full"), 1e3),
                     harness.fmt(r.get("state_bytes_per_param")), harness.fmt(r.get("extra_bytes_per_param")),
                     " / ".join(harness.fmt(ratios.get(p)) for p in (*PHASES[:2], "update"))]
            if "peak step MiB" in header:
                cells.append(harness.fmt(r.get("peak_step_bytes"), 1 / 2**20))
            table.append(cells)
        parts += [harness.markdown_table(header, table), ""]
        skipped = [(r["method"], phase, why) for r in rows for phase, why in r["skipped"].items()]
        if skipped:
            parts += ["Skipped: " + "; ".join(f"{m} {p} ({w})" for m, p, w in skipped), ""]
    return "\n".join(parts)


def plot(payload: dict[str, Any], out: Path) -> None:
    """``step_time.png`` (overhead and perturb+restore per method) and ``step_memory.png`` (extra bytes
    per parameter per method), one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    meta = payload["meta"]
    title = (f"{meta['device_name']} · torch {meta['torch']} · scale {meta['scale']} · commit "
             f"{meta['commit'][:10]} · {meta['date_utc']} UTC")
    models = list(meta["model_shapes"])
    figures = (("step_time.png", (("overhead", "overhead"), ("perturb_restore", "perturb+restore"))),
               ("step_memory.png", (("extra_bytes_per_param", "extra B/param"),)))
    for filename, series in figures:
        fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4.8), squeeze=False)
        for ax, name in zip(axes[0], models, strict=True):
            rows = [r for r in payload["results"] if r["model"] == name]
            y = range(len(rows))
            for i, (key, label) in enumerate(series):
                values = [(_median(r, key) or math.nan) * 1e3 if key in PHASES else r.get(key) or 0.0
                          for r in rows]
                ax.barh([v + 0.4 * i for v in y], values, height=0.4, label=label)
            labels = [f"{r['method']} {r['threads']}t" for r in rows]
            ax.set_yticks([v + 0.2 * (len(series) - 1) for v in y], labels, fontsize=7)
            ax.invert_yaxis()
            shape = meta["model_shapes"][name]
            ax.set_title(f"{name} ({shape['params'] / 1e6:.1f} M, {shape['dtype']})", fontsize=9)
            if filename == "step_time.png":
                ax.set(xscale="log", xlabel="ms per step (median)")
            else:
                ax.set(xlabel="bytes per parameter held between steps, beyond the base optimizer")
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        fig.savefig(out / filename, dpi=110)
        plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], conflict_handler="resolve",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    harness.add_common_arguments(p)
    p.add_argument("--threads", default=None, help="comma list of CPU thread counts, one pass of every "
                   "method per count, side by side (e.g. 1,2; default: torch's choice)")
    p.add_argument("--models", default=None, help=f"comma list of {sorted(MODELS)} (default: all on GPU, "
                   "all but gpt_1.3b on CPU)")
    p.add_argument("--scale", type=float, default=None, help="width factor (default 1 on GPU, 0.0625 on CPU)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="override the models' dtypes (default: fp32, gpt_1.3b bf16)")
    p.add_argument("--batch", type=int, default=None, help="batch size (default: per model on GPU, 2 on CPU)")
    p.add_argument("--seq", type=int, default=None,
                   help="tokens per sequence (default: the context on GPU, 32 on CPU)")
    p.add_argument("--layout", default="auto", choices=("auto", "tensors", "flat"),
                   help="layout of sk.SAM / sk.SSAM (auto: the tensors layout; benchmarks.layouts compares "
                   "both side by side)")
    p.add_argument("--budget", type=float, default=None, help="seconds per (method, phase); slower ones "
                   "are skipped with their first-call time (default 15 on CPU, 120 on GPU)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    on_cpu = torch.device(args.device).type == "cpu"
    args.models = args.models or ("resnet18,vit_b16,gpt2_medium" if on_cpu else ",".join(MODELS))
    args.scale = args.scale if args.scale is not None else (0.0625 if on_cpu else 1.0)
    args.budget = args.budget if args.budget is not None else (15.0 if on_cpu else 120.0)
    return run(args)


if __name__ == "__main__":
    main()
