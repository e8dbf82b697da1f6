"""Kernel benchmarks: every op of the contract, per backend, against the baselines, over sizes.

For each size ``N`` (entries of one flat segment, ``K = int(N · (1 − sparsity))`` live) and each op,
every implementation is timed with :func:`benchmarks.harness.measure`:

- each available backend (``reference`` — vectorised torch on the flat buffer — ``triton``, ``native``)
  through the public op, on one flat segment;
- ``foreach``: ``torch._foreach_*`` over the same entries split into ``--tensors`` per-parameter tensors;
- ``refcode``: the reference-code style (Python loop, dense fp32 masks and ``e_w``, ``torch.topk`` over a
  concatenation), on the same split;
- ``torch.topk`` / ``torch.kthvalue`` on the flat scores for the selection.

GB/s counts the bytes of the op's *meaning* (:func:`op_bytes`), the same for every implementation of
the op, so GB/s ratios are time ratios. ``copy_fraction`` divides by the bandwidth of a
``torch.Tensor.copy_`` moving the same number of bytes, measured in the same run.

Run from the repository root: ``python -m benchmarks.kernels --device cpu --sizes 16:24:2``.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ssam_kernels import ops
from ssam_kernels.ops import bitmask

from . import baselines, harness

SELECT_PASSES = 3
"""Passes over the scores of one exact-k selection on the bucket path (``ssam_kernels.ops.select``; the
GPU backends): two radix histogram passes plus the mask pass, which also writes the chunk counts. A
bucket past the capacity (degenerate scores) adds the third histogram pass and a tie-count pass; the
backends without ``bucket_mask_multi`` (CPU) always run those, 4-5 passes."""

BYTES_PER_ENTRY_ESTIMATE = 56
"""Peak bytes per entry of one size's inputs plus the largest case's temporaries (fp32: W, G, F, |G|,
the dense fp32 masks and ``e_w`` of refcode, the foreach backups, topk's values and indices); sizes
whose estimate exceeds 80 % of the free memory are skipped."""


def op_bytes(op: str, n: int, k: int, elem: int, masked: bool = True) -> int:
    """Bytes op ``op`` must move over ``n`` entries with ``k`` live, ``elem`` bytes per W/G element.

    With ``M = 4·⌈N/32⌉`` (mask words), ``O = 8·(⌈N/1024⌉ + 1)`` (offsets; ``M = O = 0`` when not
    ``masked``: the dense ``mask=None`` form of perturb_/restore_, with ``k = n``), ``e = elem``, and
    ``P = SELECT_PASSES`` (3: two radix-histogram passes and the mask-writing pass):

    ======================  ==============================================  ===================
    op                      reads                                           writes
    ======================  ==============================================  ===================
    grad_sq_norm            ``N·e`` (G)                                     –
    perturb_                ``2·N·e`` (W, G) + ``M + O``                    ``2·K·e`` (backup, W)
    restore_                ``K·e`` (backup) + ``M + O``                    ``K·e`` (W)
    fisher_accumulate_      ``4·N`` (F, fp32) + ``N·e`` (G)                 ``4·N`` (F)
    axpby_                  ``2·N·e`` (X, Y)                                ``N·e`` (X)
    select_topk             ``P·4·N`` (fp32 Fisher scores)                  ``M + O``
    dynamic_update          ``P·(N·e + M)`` drop side (``|g|``, live mask)   ``M + O``
                            + ``P·M`` grow side (dead mask; the hash is
                            computed, not read)
    hash_scores             –                                               ``4·N``
    ======================  ==============================================  ===================

    These are the bytes of the op's meaning (DESIGN.md, "The op contract"), not what a given
    implementation moves: a dense baseline that reads more is charged the same, so every
    implementation of an op is compared at equal work.
    """
    mask = 4 * bitmask.num_words(n) if masked else 0
    offs = 8 * (bitmask.num_chunks(n) + 1) if masked else 0
    table = {
        "grad_sq_norm": n * elem,
        "perturb_": 2 * n * elem + mask + offs + 2 * k * elem,
        "restore_": k * elem + mask + offs + k * elem,
        "fisher_accumulate_": 4 * n + n * elem + 4 * n,
        "axpby_": 3 * n * elem,
        "select_topk": SELECT_PASSES * 4 * n + mask + offs,
        "dynamic_update": SELECT_PASSES * (n * elem + mask) + SELECT_PASSES * mask + mask + offs,
        "hash_scores": 4 * n,
    }
    return table[op]


def tensor_sizes(n: int, count: int) -> list[int]:
    """Split ``n`` entries into ``count`` parameter-like tensors: every second one a small "vector"
    (bias/norm-like, ``⌊n / (64·count)⌋`` entries, at least 1), the others "matrices" sharing the rest
    with weights 1, 2, 4, 8 repeating (the last takes the remainder). Deterministic."""
    count = max(1, min(count, n // 2 if n >= 2 else 1))
    vectors = count // 2
    vector = max(1, n // (64 * count)) if vectors else 0
    matrices = count - vectors
    rest = n - vectors * vector
    weights = [1 << (i % 4) for i in range(matrices)]
    sizes = [rest * w // sum(weights) for w in weights]
    sizes[-1] += rest - sum(sizes)
    out = []
    for i in range(matrices):
        out.append(sizes[i])
        if i < vectors:
            out.append(vector)
    return out


@dataclass
class Inputs:
    """One size's inputs: a flat segment, its per-tensor split and a random mask with exactly ``k`` bits."""

    n: int
    k: int
    dtype: torch.dtype
    device: torch.device
    count: int
    sparsity: float

    def __post_init__(self) -> None:
        gen = torch.Generator(self.device).manual_seed(0)
        self.W = torch.randn(self.n, generator=gen, device=self.device).to(self.dtype)
        self.G = torch.randn(self.n, generator=gen, device=self.device).to(self.dtype)
        self.F = torch.rand(self.n, generator=gen, device=self.device)
        self.drop = self.G.abs()
        (self.mask, self.offsets), = ops.select_topk(
            [ops.hash_scores(self.n, 1, 0, device=self.device)], self.k, backend="reference")
        self.backup = torch.empty(self.k, dtype=self.dtype, device=self.device)
        self.scale = torch.tensor(1e-3, dtype=torch.float32, device=self.device)
        self.decay = torch.tensor(0.9, dtype=torch.float32, device=self.device)  # axpby_'s a (b: scale)
        self.sizes = tensor_sizes(self.n, self.count)
        self.Ws, self.Gs, self.Fs, self.drops = (list(t.split(self.sizes)) for t in (self.W, self.G, self.F,
                                                                                    self.drop))

    @functools.cached_property
    def dense_mask(self) -> torch.Tensor:
        return bitmask.unpack(self.mask, self.n)

    def masks(self, dtype: torch.dtype) -> list[torch.Tensor]:
        """Per-tensor dense masks (1 live, 0 dead) in ``dtype``."""
        return list(self.dense_mask.to(dtype).split(self.sizes))


Builder = Callable[[Inputs, str | None], Callable[[], object]]


def _refcode_restore(x: Inputs, _: str | None) -> Callable[[], object]:
    e_ws = baselines.loop_perturb(x.Ws, x.Gs, x.masks(torch.float32), x.scale)
    return functools.partial(baselines.loop_restore, x.Ws, e_ws)


def _foreach_perturb(x: Inputs, _: str | None) -> Callable[[], object]:
    backups = [torch.empty_like(w) for w in x.Ws]
    return functools.partial(baselines.foreach_perturb, x.Ws, x.Gs, x.masks(x.dtype), backups, x.scale)


def _foreach_restore(x: Inputs, _: str | None) -> Callable[[], object]:
    return functools.partial(baselines.foreach_restore, x.Ws, [w.clone() for w in x.Ws])


def _kthvalue_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Entries at or above the k-th largest score (ties may select more than ``k``)."""
    return scores >= torch.kthvalue(scores, scores.numel() - k + 1).values


IMPLS: dict[str, dict[str, Builder]] = {
    "grad_sq_norm": {
        "ours": lambda x, b: functools.partial(ops.grad_sq_norm, x.G, backend=b),
        "foreach": lambda x, _: functools.partial(baselines.foreach_grad_sq_norm, x.Gs),
        "refcode": lambda x, _: functools.partial(baselines.loop_grad_norm, x.Gs),
    },
    "perturb_": {
        "ours": lambda x, b: functools.partial(ops.perturb_, x.W, x.G, x.mask, x.offsets, x.backup, x.scale,
                                               backend=b),
        "foreach": _foreach_perturb,
        "refcode": lambda x, _: functools.partial(baselines.loop_perturb, x.Ws, x.Gs, x.masks(torch.float32),
                                                  x.scale),
    },
    "restore_": {
        "ours": lambda x, b: functools.partial(ops.restore_, x.W, x.mask, x.offsets, x.backup, backend=b),
        "foreach": _foreach_restore,
        "refcode": _refcode_restore,
    },
    "fisher_accumulate_": {
        "ours": lambda x, b: functools.partial(ops.fisher_accumulate_, x.F, x.G, backend=b),
        "foreach": lambda x, _: functools.partial(baselines.foreach_fisher_accumulate, x.Fs, x.Gs),
        "refcode": lambda x, _: functools.partial(baselines.loop_fisher_accumulate, x.Fs, x.Gs),
    },
    "axpby_": {
        "ours": lambda x, b: functools.partial(ops.axpby_, x.W, x.G, x.decay, x.scale, backend=b),
        "foreach": lambda x, _: functools.partial(baselines.foreach_axpby, x.Ws, x.Gs, x.decay, x.scale),
    },
    "select_topk": {
        "ours": lambda x, b: functools.partial(ops.select_topk, [x.F], x.k, backend=b),
        "refcode": lambda x, _: functools.partial(baselines.topk_masks, x.Fs, x.k),
        "torch.topk": lambda x, _: functools.partial(torch.topk, x.F, x.k, sorted=False),
        "torch.kthvalue": lambda x, _: functools.partial(_kthvalue_mask, x.F, x.k),
    },
    "dynamic_update": {
        "ours": lambda x, b: functools.partial(ops.dynamic_update, [x.mask], [x.drop], _n_drop(x), "random",
                                               0, 1, backend=b),
        "refcode": lambda x, _: functools.partial(baselines.topk_dynamic_masks, x.masks(torch.float32),
                                                  x.drops, _n_drop(x)),
    },
    "hash_scores": {
        "ours": lambda x, b: functools.partial(ops.hash_scores, x.n, 0, 1, device=x.device, backend=b),
    },
}
"""Per op, the implementations: ``"ours"`` expands to one entry per benchmarked backend."""


def _n_drop(x: Inputs) -> int:
    """SSAM-D's drop count at drop rate 0.5, bounded by the live and dead counts."""
    return min(math.floor(0.5 * x.k), x.k, x.n - x.k)


def _cases(backends: list[str]) -> list[tuple[str, str, Builder, str | None]]:
    """``(op, implementation label, builder, backend)`` for every benchmarked combination."""
    cases = []
    for op, impls in IMPLS.items():
        for label, builder in impls.items():
            if label == "ours":
                cases += [(op, backend, builder, backend) for backend in backends]
            else:
                cases.append((op, label, builder, None))
    return cases


def _copy_gbps(nbytes: int, device: torch.device, runs: int, warmup: int) -> float:
    """GB/s of ``dst.copy_(src)`` moving ``nbytes`` (``nbytes / 2`` read, ``nbytes / 2`` written)."""
    half = max(1, nbytes // 2)
    src = torch.ones(half, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    timing = harness.measure(functools.partial(dst.copy_, src), device, runs, warmup)
    return 2 * half / timing.median_s / 1e9


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Benchmark every case over every size; returns the JSON payload (and writes all outputs)."""
    started = time.perf_counter()
    device, dtype = harness.parse_device(args.device, args.threads), getattr(torch, args.dtype)
    out = harness.output_dir(args.out, device)
    log = harness.Log(out / "kernels.log", args.quiet)
    backends = harness.backends_for(device, args.backends, log)
    sizes = harness.parse_sizes(args.sizes)
    meta = harness.environment(device, args.note) | {
        "dtype": args.dtype, "sizes": sizes, "runs": args.runs, "warmup": args.warmup,
        "sparsity": args.sparsity, "tensors": args.tensors, "budget_s": args.budget,
        "time_limit_s": args.time_limit,
        "benchmarked_backends": backends, "timer": "cuda events" if device.type == "cuda" else "perf_counter",
    }
    log.write(f"kernels: {meta['device_name']} ({device}), torch {meta['torch']}, "
              f"commit {meta['commit'][:10]}, backends {backends}, dtype {args.dtype}, sizes {sizes}")
    elem = torch.empty((), dtype=dtype).element_size()
    cases = _cases(backends)
    results: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    too_slow: set[tuple[str, str]] = set()
    bar = log.progress(len(sizes) * len(cases), "kernels")
    late = f"not started: past --time-limit {args.time_limit} s"
    for n in sizes:
        k = int(n * (1 - args.sparsity))
        if harness.out_of_time(started, args.time_limit):
            skipped.append({"n": n, "reason": late})
            log.write(f"N={n}: skipped, {late}")
            bar.update(len(cases))
            continue
        need = BYTES_PER_ENTRY_ESTIMATE * n * elem // 4
        if need > 0.8 * harness.free_bytes(device):
            reason = f"needs ~{need / 2**30:.1f} GiB, more than 80 % of the free memory"
            skipped.append({"n": n, "reason": reason})
            log.write(f"N={n}: skipped, {skipped[-1]['reason']}")
            bar.update(len(cases))
            continue
        inputs = Inputs(n, k, dtype, device, args.tensors, args.sparsity)
        copy_cache: dict[int, float] = {}
        for op, label, builder, backend in cases:
            bar.set_postfix_str(f"N=2^{math.log2(n):.0f} {op} {label}")
            bar.update()
            if (op, label) in too_slow:
                skipped.append({"op": op, "impl": label, "n": n, "reason": "too slow at a smaller size"})
                continue
            if harness.out_of_time(started, args.time_limit):
                skipped.append({"op": op, "impl": label, "n": n, "reason": late})
                continue
            count = 1 if backend is not None or label.startswith("torch.") else len(inputs.sizes)
            try:
                fn = builder(inputs, backend)
                timing = harness.measure(fn, device, args.runs, args.warmup, args.budget)
            except harness.TooSlow as exc:
                too_slow.add((op, label))
                skipped.append({"op": op, "impl": label, "n": n, "reason": str(exc),
                                "first_call_s": exc.first_call_s})
                log.write(f"N={n} {op} {label}: skipped, {exc}")
                continue
            except Exception as exc:
                if not harness.is_oom(exc):
                    raise
                skipped.append({"op": op, "impl": label, "n": n, "reason": f"out of memory: {exc}"})
                log.write(f"N={n} {op} {label}: out of memory, skipped")
                continue
            nbytes = op_bytes(op, n, k, elem)
            if nbytes not in copy_cache:
                copy_cache[nbytes] = _copy_gbps(nbytes, device, args.runs, args.warmup)
            gbps = nbytes / timing.median_s / 1e9
            results.append({"op": op, "impl": label, "backend": backend, "n": n, "k": k, "tensors": count,
                            "bytes": nbytes, **vars(timing), "gbps": gbps, "copy_gbps": copy_cache[nbytes],
                            "copy_fraction": gbps / copy_cache[nbytes]})
            log.write(f"N={n:>11} {op:<19} {label:<15} median {timing.median_s * 1e3:10.4f} ms "
                      f"[{timing.p20_s * 1e3:.4f}, {timing.p80_s * 1e3:.4f}]  {gbps:8.2f} GB/s  "
                      f"{100 * gbps / copy_cache[nbytes]:6.1f} % of copy")
        del inputs
    bar.close()
    _add_ratios(results)
    harness.finish_meta(meta, started)
    payload = {"meta": meta, "byte_model": inspect.cleandoc(op_bytes.__doc__ or ""), "results": results,
               "skipped": skipped}
    harness.write_json(out / "kernels.json", payload)
    (out / "kernels.md").write_text(markdown(payload))
    if not args.no_plots:
        plot(payload, out / "kernels.png")
    log.write(f"wrote {out}/kernels.{{json,md,log}}{'' if args.no_plots else ' and kernels.png'} "
              f"in {meta['wall_s']} s")
    log.close()
    return payload


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """``x_vs_refcode``: the refcode median over this row's median, same op and size, same run."""
    refcode = {(r["op"], r["n"]): r["median_s"] for r in results if r["impl"] == "refcode"}
    for r in results:
        base = refcode.get((r["op"], r["n"]))
        r["x_vs_refcode"] = base / r["median_s"] if base is not None else None


def markdown(payload: dict[str, Any]) -> str:
    """The Markdown report: provenance, byte model, then one table per op."""
    meta = payload["meta"]
    parts = [f"# Kernel benchmarks: {meta['device_name']}", "", harness.markdown_meta(meta),
             f"- **dtype** {meta['dtype']}, **sparsity** {meta['sparsity']}, **tensors** (foreach/refcode) "
             f"{meta['tensors']}, **runs** {meta['runs']} timed after {meta['warmup']} warm-up, "
             f"timer {meta['timer']}, wall {meta['wall_s']} s", "",
             "Times: median [p20, p80] per call. GB/s counts the bytes of the op's meaning (below), equal "
             "for every implementation; *of copy*: fraction of the bandwidth of a `copy_` of as many bytes, "
             "measured in the same run; *x refcode*: refcode median / this median (same run).", ""]
    for op in IMPLS:
        rows = [r for r in payload["results"] if r["op"] == op]
        if not rows:
            continue
        parts += [f"## {op}", "", harness.markdown_table(
            ["N", "impl", "tensors", "bytes", "median ms", "p20-p80 ms", "GB/s", "of copy", "x refcode"],
            [(f"2^{math.log2(r['n']):.4g}", r["impl"], r["tensors"], r["bytes"],
              harness.fmt(r["median_s"], 1e3),
              f"{harness.fmt(r['p20_s'], 1e3)}-{harness.fmt(r['p80_s'], 1e3)}", harness.fmt(r["gbps"]),
              f"{100 * r['copy_fraction']:.1f} %", harness.fmt(r["x_vs_refcode"]))
             for r in sorted(rows, key=lambda r: (r["n"], r["impl"]))]), ""]
    if payload["skipped"]:
        parts += ["## Skipped", "", harness.markdown_table(
            ["op", "impl", "N", "reason"],
            [(s.get("op", "all"), s.get("impl", "all"), s["n"], s["reason"]) for s in payload["skipped"]]),
            ""]
    parts += ["## Byte model (`benchmarks.kernels.op_bytes`)", "", "```", payload["byte_model"], "```", ""]
    return "\n".join(parts)


def plot(payload: dict[str, Any], path: Path) -> None:
    """GB/s against N per implementation, one panel per op, with the copy bandwidth dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops_present = [op for op in IMPLS if any(r["op"] == op for r in payload["results"])]
    cols = 4
    fig, axes = plt.subplots(math.ceil(len(ops_present) / cols), cols, figsize=(4.2 * cols, 3.4 * 2),
                             squeeze=False)
    impls = list(dict.fromkeys(r["impl"] for r in payload["results"]))
    colors = {impl: f"C{i}" for i, impl in enumerate(impls)}
    for ax, op in zip(axes.flat, ops_present, strict=False):
        rows = [r for r in payload["results"] if r["op"] == op]
        for impl in dict.fromkeys(r["impl"] for r in rows):
            mine = sorted((r for r in rows if r["impl"] == impl), key=lambda r: r["n"])
            ax.plot([r["n"] for r in mine], [r["gbps"] for r in mine], marker="o", ms=3, label=impl,
                    color=colors[impl])
        copy = sorted({(r["n"], r["copy_gbps"]) for r in rows})
        ax.plot([c[0] for c in copy], [c[1] for c in copy], "k--", lw=1, label="copy_ (same bytes)")
        ax.set_xscale("log", base=2)
        ax.set(yscale="log", title=op, xlabel="N (entries)", ylabel="GB/s (bytes of the op's meaning)")
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(ops_present):]:
        ax.axis("off")
    meta = payload["meta"]
    fig.suptitle(f"{meta['device_name']} · torch {meta['torch']} · {meta['dtype']} · sparsity "
                 f"{meta['sparsity']} · commit {meta['commit'][:10]} · {meta['date_utc']} UTC", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    harness.add_common_arguments(p)
    p.add_argument("--sizes", default=None, help="LO:HI[:STEP] exponents of 2, or a comma list "
                   "(default 16:24:2 on CPU, 16:30:2 on GPU); sizes that do not fit are skipped")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--tensors", type=int, default=200, help="per-parameter tensors of foreach/refcode")
    p.add_argument("--budget", type=float, default=None, help="seconds per (op, impl, size); slower cases "
                   "are skipped, with their first-call time (default 30 on CPU, 60 on GPU)")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    on_cpu = torch.device(args.device).type == "cpu"
    args.sizes = args.sizes or ("16:24:2" if on_cpu else "16:30:2")
    args.budget = args.budget if args.budget is not None else (30.0 if on_cpu else 60.0)
    return run(args)


if __name__ == "__main__":
    main()
