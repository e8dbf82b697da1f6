"""Time of the selection ops of one mask refresh over many small segments (the selection passes
as list ops): ``select_topk`` (an SSAM-F / random-mask refresh) and ``dynamic_update`` (an SSAM-D
refresh: drop by ``|g|``, grow at random) over ``--segments`` float32 segments of 1 to 4095 entries (the
per-tensor layout of a model with that many small parameters), ``k`` = half the entries.

``--histogram N``: instead, one ``native.radix_histogram`` pass over ``N`` float32 scores, the first digit
(every entry counted) and the second (behind a prefix), as ``pass1_ms`` / ``pass2_ms``.

Self-contained (only the public ops and the backend primitives), so the same script times another
checkout of the package: ``PYTHONPATH=/path/to/other/checkout python benchmarks/selection.py`` (this
one: ``python -m benchmarks.selection``). Prints
one JSON line: the median over ``--runs`` timed calls (after ``--warmup``) of each op, in milliseconds,
and the torch threads.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ssam_kernels import ops
from ssam_kernels.ops import bitmask


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--segments", type=int, default=600)
    parser.add_argument("--backend", default="native")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--histogram", type=int, default=0, metavar="N")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.histogram:
        print(json.dumps(histogram_passes(args.histogram, args.runs, args.warmup)))
        return
    gen = torch.Generator().manual_seed(0)
    sizes = torch.randint(1, 4096, (args.segments,), generator=gen).tolist()
    scores = [torch.randn(n, generator=gen) for n in sizes]
    masks = [bitmask.from_bool(torch.rand(n, generator=gen) < 0.5)[0] for n in sizes]
    total = sum(sizes)
    live = sum(int(bitmask.count(m)) for m in masks)
    cases = {
        "select_topk": lambda: ops.select_topk(scores, total // 2, backend=args.backend),
        "dynamic_update": lambda: ops.dynamic_update(masks, [s.abs() for s in scores], live // 4, "random",
                                                     1, 7, backend=args.backend),
    }
    result: dict[str, float | int] = {"segments": args.segments, "entries": total,
                                      "threads": torch.get_num_threads()}
    for name, fn in cases.items():
        for _ in range(args.warmup):
            fn()
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = round(1e3 * statistics.median(times), 3)
    print(json.dumps(result))


def histogram_passes(n: int, runs: int, warmup: int) -> dict[str, float]:
    """Median ms of the native histogram's first and second digit passes over ``n`` fp32 scores."""
    from ssam_kernels.ops import native

    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    result = {}
    for name, shift, prefix in (("pass1", 21, 0), ("pass2", 10, 0xBF800000 >> 21 << 21)):
        p = torch.tensor(prefix, dtype=torch.int64)
        for _ in range(warmup):
            native.radix_histogram(x, p, shift, 11, True, None, True)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            native.radix_histogram(x, p, shift, 11, True, None, True)
            times.append(time.perf_counter() - start)
        result[f"{name}_ms"] = round(1e3 * statistics.median(times), 2)
    return result


if __name__ == "__main__":
    main()
