"""perturb_ + restore_ on CPU: the compiled extension (native) against the reference backend.

One SSAM step touches the weights twice: ``perturb_`` (backup the masked entries, move them) and
``restore_`` (write them back). This times the pair for both backends side by side in one run, at
``N = 2^24`` fp32 entries and sparsity 0.5 by default: median of ``--repeats`` timed runs after warm-up,
the ratio reference / native, and the bandwidth of each against a plain ``torch`` copy of N entries
measured in the same run.

Bytes counted per pair (the data an ideal kernel must move): perturb_ reads W, G at the K live entries
and the mask (N/8 bytes) and offsets, writes W and backup at K entries; restore_ reads the mask, offsets
and backup, writes W at K entries. For fp32: ``24·K + N/4 + offsets`` bytes.

    python benchmarks/native_cpu.py [--log2n 24] [--sparsity 0.5] [--repeats 20] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from types import ModuleType

import torch

from ssam_kernels.ops import bitmask, native, reference


def median_seconds(fn: Callable[[], None], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed runs (CPU: synchronous)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log2n", type=int, default=24)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()
    if native.unavailable_reason("cpu") is not None:
        raise SystemExit(f"native backend unavailable: {native.unavailable_reason('cpu')}")

    torch.manual_seed(0)
    n = 1 << args.log2n
    W, G = torch.randn(n), torch.randn(n)
    live = torch.zeros(n, dtype=torch.bool)
    k = int(n * (1 - args.sparsity))
    live[torch.randperm(n)[:k]] = True
    mask, offsets = bitmask.from_bool(live)
    backup = torch.empty(k)
    scale = torch.tensor(1e-3)
    nbytes = 24 * k + 2 * (mask.numel() * 4 + offsets.numel() * 8)

    def pair(backend: ModuleType) -> Callable[[], None]:
        def run() -> None:
            backend.perturb_(W, G, mask, offsets, backup, scale, False)
            backend.restore_(W, mask, offsets, backup)
        return run

    copy_dst = torch.empty(n)
    copy_s = median_seconds(lambda: copy_dst.copy_(W), args.repeats)
    copy_gbps = 8 * n / copy_s / 1e9  # read + write N fp32
    results = {}
    for name, backend in (("reference", reference), ("native", native)):
        s = median_seconds(pair(backend), args.repeats)
        gbps = nbytes / s / 1e9
        results[name] = {"median_ms": s * 1e3, "GB/s": gbps, "fraction_of_copy": gbps / copy_gbps}
    ratio = results["reference"]["median_ms"] / results["native"]["median_ms"]

    record = {
        "benchmark": "perturb_+restore_ CPU", "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "torch": torch.__version__, "commit": commit(), "N": n, "dtype": "float32", "sparsity": args.sparsity,
        "K": k, "repeats": args.repeats, "bytes_per_pair": nbytes, "copy_GB/s": copy_gbps, "results": results,
        "speedup_native_vs_reference": ratio,
    }
    print(f"{record['cpu']} | {record['threads']} threads | torch {record['torch']} | "
          f"commit {record['commit']}")
    print(f"N = 2^{args.log2n} fp32, sparsity {args.sparsity}, K = {k}, median of {args.repeats} runs; "
          f"torch copy: {copy_gbps:.1f} GB/s")
    print("| backend | perturb_+restore_ (ms) | GB/s | fraction of copy |")
    print("|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_ms']:.2f} | {r['GB/s']:.2f} | {r['fraction_of_copy']:.2f} |")
    print(f"native is {ratio:.1f}x faster than reference")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    main()
