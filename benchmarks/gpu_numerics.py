"""Numerics at scale, a stage of the GPU validation (``python -m benchmarks.gpu_check``).

Three checks through the public ops (``ssam_kernels.ops``) on every backend available for the device
(:func:`benchmarks.harness.backends_for`), each skipped with the reason when its estimated memory does not
fit in 90 % of the free memory (``torch.cuda.mem_get_info`` on GPU), or when the run is past
``--time-limit``:

- ``select_topk``: ``N = 2^a + 4099`` fp16 scores drawn as random 16-bit patterns (65536 distinct values,
  NaN and ±inf among them, so the threshold value is shared by tens of thousands of entries), the last
  three set to +inf, ``K = N // 3``. Passes when the mask has exactly ``K`` set bits and
  ``offsets[-1] == K``; every selected key ``≥`` every unselected key (the order of
  ``reference.score_keys``: NaN lowest, ``-0 == +0``); among the entries equal to the threshold, the
  selected ones all precede the unselected ones (ties in index order); the last three are selected; and
  mask and offsets are bit-identical to the first backend's.
- ``grad_sq_norm``: ``N = 2^b`` bf16 gradients, ``Σ g²`` and ASAM's ``Σ (g·|w|)²`` (bf16 weights), against
  the float64 sum of the exactly widened values (blocks of ``BLOCK``): passes when
  ``|got − ref| ≤ NORM_RTOL · ref`` and two calls return the same bits.
- ``perturb_restore``: ``N = 2^c`` entries, fp32 and bf16, a random mask of sparsity 0.5, ``scale = 0.01``:
  after ``perturb_`` the backup holds the selected entries' old values bit for bit, unselected entries are
  unchanged bit for bit and selected ones equal the reference backend's, run on the same block, bit for
  bit (the op contract's single fp32 FMA; the distance in ulps is recorded); after ``restore_`` W equals
  its original bit for bit.

Before them, three checks of the device code paths themselves (one record per backend):

- ``selfcheck``: the first-use check of each compiled backend (:mod:`ssam_kernels.ops.selfcheck`), run by
  ``ops.resolve_backend`` in this fresh process for float32, bfloat16, float16, float64 and int32 scores;
  passes when the backend passes it, and records its one-time cost in seconds per dtype;
- ``select_sync``: ``select_topk`` over two segments (a bucket path selection) with
  ``torch.cuda.set_sync_debug_mode("warn")``: passes when it synchronises with the host at most once, the
  documented read of the bucket's size (CUDA only);
- ``graph_capture``: a list op inside ``torch.cuda.graph``: passes when it refuses with the error that says
  why (its launch table comes from host memory at every call), instead of capturing a stale table (CUDA
  only).

The fused backends run first, the reference backend (slow at 2^31) in a second pass over the same
inputs. Writes ``numerics.json`` (``{"meta": ..., "records": [...]}``, one record per check × variant ×
backend, rewritten after every record) and ``numerics.log`` to ``--out``.
Run from the repository root: ``python -m benchmarks.gpu_numerics --device cpu --out /tmp/numerics``.
"""

from __future__ import annotations

import argparse
import contextlib
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ssam_kernels import ops
from ssam_kernels.ops import bitmask, reference

from . import harness

BLOCK = 1 << 26
"""Entries per block of the verification loops (a multiple of ``bitmask.CHUNK``): bounded temporaries."""
NORM_RTOL = 1e-5
"""Relative tolerance of ``grad_sq_norm`` against the float64 sum. Accumulating in float64 gives ~1e-15;
fixed fp32 partial sums combined in float64 (allowed by the contract) stay below ~1e-6 at 2^30."""
SCALE = 0.01
_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _bits(x: torch.Tensor) -> torch.Tensor:
    return x.view(_INT_VIEW[x.dtype])


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable values between same-dtype finite tensors (``+0 == -0``)."""
    if a.numel() == 0:
        return 0

    def ordered(x: torch.Tensor) -> torch.Tensor:
        i = _bits(x).to(torch.int64)
        magnitude = i & ((1 << (x.element_size() * 8 - 1)) - 1)
        return torch.where(i < 0, -magnitude, magnitude)

    return int((ordered(a) - ordered(b)).abs().max())


def _randn(n: int, dtype: torch.dtype, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    """Standard normal draws rounded to ``dtype``, drawn block by block (no fp32 copy of all ``n``)."""
    out = torch.empty(n, dtype=dtype, device=device)
    for start in range(0, n, BLOCK):
        stop = min(start + BLOCK, n)
        out[start:stop] = torch.randn(stop - start, generator=gen, device=device)
    return out


def _blocks(n: int) -> list[tuple[int, int]]:
    return [(start, min(start + BLOCK, n)) for start in range(0, n, BLOCK)]


def _mask_block(words: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """The mask words of entries ``[start, stop)``; ``start`` is a multiple of 32."""
    return words[start // 32: (stop + 31) // 32]


def _chunk_index(stop: int) -> int:
    """The offsets entry that counts the set bits before ``stop`` (a chunk boundary, or the end)."""
    return -(-stop // bitmask.CHUNK)


# ----------------------------------------------------------------------------------------------------
# The checks: each returns (passed, details) for one backend
# ----------------------------------------------------------------------------------------------------

def verify_selection(scores: torch.Tensor, mask: torch.Tensor, offsets: torch.Tensor, k: int
                     ) -> dict[str, Any]:
    """Exact count, order and tie order of a selection of ``k`` largest ``scores`` (see the module doc)."""
    n = scores.numel()
    low, high = 1 << 32, -1  # smallest selected key, largest unselected key
    for start, stop in _blocks(n):
        keys = reference.score_keys(scores[start:stop])
        taken = bitmask.unpack(_mask_block(mask, start, stop), stop - start)
        if bool(taken.any()):
            low = min(low, int(keys[taken].min()))
        if bool((~taken).any()):
            high = max(high, int(keys[~taken].max()))
    last_taken_tie, first_skipped_tie = -1, n
    for start, stop in _blocks(n):
        keys = reference.score_keys(scores[start:stop])
        taken = bitmask.unpack(_mask_block(mask, start, stop), stop - start)
        ties = keys == low
        if bool((ties & taken).any()):
            last_taken_tie = start + int((ties & taken).nonzero()[-1])
        if bool((ties & ~taken).any()):
            first_skipped_tie = min(first_skipped_tie, start + int((ties & ~taken).nonzero()[0]))
    tail_start = max(0, n - 3) // 32 * 32
    tail = bitmask.unpack(_mask_block(mask, tail_start, n), n - tail_start)
    details = {"k": k, "set_bits": int(bitmask.count(mask)), "offsets_last": int(offsets[-1]),
               "min_selected_key": low, "max_unselected_key": high, "last_taken_tie": last_taken_tie,
               "first_skipped_tie": first_skipped_tie, "last_three_selected": bool(tail[-3:].all())}
    details["passed"] = (details["set_bits"] == k == details["offsets_last"] and low >= high
                         and last_taken_tie < first_skipped_tie and details["last_three_selected"])
    return details


def check_select(n: int, device: torch.device, gen: torch.Generator, run: Recorder) -> None:
    scores = torch.randint(-(1 << 15), 1 << 15, (n,), dtype=torch.int16, device=device,
                           generator=gen).view(torch.float16)
    scores[-3:] = float("inf")
    k = n // 3

    def one(backend: str) -> dict[str, Any]:
        (mask, offsets), = ops.select_topk([scores], k, backend=backend)
        details = verify_selection(scores, mask, offsets, k)
        first = run.baselines.get("select_topk")
        if first is not None:
            details["same_as"] = first[0]
            details["identical"] = bool(torch.equal(mask, first[1]) and torch.equal(offsets, first[2]))
            details["passed"] = details["passed"] and details["identical"]
        elif details["passed"]:
            run.baselines["select_topk"] = (backend, mask, offsets)
        return details

    run("select_topk", "float16", n, one)


def check_norm(n: int, device: torch.device, gen: torch.Generator, run: Recorder) -> None:
    G = _randn(n, torch.bfloat16, device, gen)
    W = _randn(n, torch.bfloat16, device, gen)
    for variant, w in (("bfloat16 G", None), ("bfloat16 G,W", W)):
        exact = torch.zeros((), dtype=torch.float64, device=device)
        for start, stop in _blocks(n):
            g = G[start:stop].double()
            if w is not None:
                g = g * w[start:stop].double()
            exact += (g * g).sum()
        ref = float(exact)

        def one(backend: str, w: torch.Tensor | None = w, ref: float = ref) -> dict[str, Any]:
            got, again = ops.grad_sq_norm(G, w, backend=backend), ops.grad_sq_norm(G, w, backend=backend)
            rel = abs(float(got) - ref) / ref
            deterministic = bool(torch.equal(got, again))
            return {"value": float(got), "float64_reference": ref, "relative_error": rel, "rtol": NORM_RTOL,
                    "deterministic": deterministic, "passed": rel <= NORM_RTOL and deterministic}

        run("grad_sq_norm", variant, n, one)


def check_perturb_restore(n: int, dtypes: list[torch.dtype], device: torch.device, gen: torch.Generator,
                          run: Recorder) -> None:
    # Blocks are whole words except the last, so their packed words concatenate into the mask.
    words = torch.cat([bitmask.pack(torch.rand(stop - start, generator=gen, device=device) >= 0.5)
                       for start, stop in _blocks(n)])
    offsets = bitmask.offsets(words, n)
    k = int(offsets[-1])
    scale = torch.tensor(SCALE, dtype=torch.float32, device=device)
    for dtype in dtypes:
        W0 = _randn(n, dtype, device, gen)
        G = _randn(n, dtype, device, gen)

        def one(backend: str, W0: torch.Tensor = W0, G: torch.Tensor = G) -> dict[str, Any]:
            W = W0.clone()
            backup = torch.full((k,), float("nan"), dtype=W0.dtype, device=device)
            ops.perturb_(W, G, words, offsets, backup, scale, backend=backend)
            backup_exact = unselected_exact = True
            ulps = 0
            for start, stop in _blocks(n):
                block_words = _mask_block(words, start, stop)
                taken = bitmask.unpack(block_words, stop - start)
                old, new = W0[start:stop], W[start:stop]
                kept = backup[int(offsets[start // bitmask.CHUNK]): int(offsets[_chunk_index(stop)])]
                backup_exact &= bool(torch.equal(_bits(kept), _bits(old[taken])))
                unselected_exact &= bool(torch.equal(_bits(new[~taken]), _bits(old[~taken])))
                expected = old.clone()
                ops.perturb_(expected, G[start:stop], block_words, bitmask.offsets(block_words, stop - start),
                             torch.empty_like(kept), scale, backend="reference")
                ulps = max(ulps, _ulps(new[taken], expected[taken]))
            ops.restore_(W, words, offsets, backup, backend=backend)
            restored = bool(torch.equal(_bits(W), _bits(W0)))
            return {"k": k, "scale": SCALE, "backup_bit_exact": backup_exact,
                    "unselected_bit_exact": unselected_exact, "max_ulps_vs_reference": ulps,
                    "restore_bit_exact": restored,
                    "passed": backup_exact and unselected_exact and ulps == 0 and restored}

        run("perturb_restore", str(dtype).removeprefix("torch."), n, one)
        del W0, G


SELFCHECK_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int32)


def check_device_paths(device: torch.device, run: Recorder) -> None:
    """``selfcheck``, ``select_sync`` and ``graph_capture`` (module doc) on every backend of the run."""
    def selfcheck(backend: str) -> dict[str, Any]:
        seconds, failures = {}, []
        for dtype in SELFCHECK_DTYPES:
            started = time.perf_counter()
            try:
                ops.resolve_backend(backend, device, dtype)
            except RuntimeError as exc:
                failures.append(str(exc))
            seconds[str(dtype).removeprefix("torch.")] = round(time.perf_counter() - started, 4)
        return {"seconds": seconds, "failures": failures, "passed": not failures}

    run("selfcheck", "first use", 0, selfcheck)
    if device.type != "cuda":
        return
    gen = torch.Generator(device).manual_seed(7)
    scores = [torch.randn(n, device=device, generator=gen) for n in (1 << 20, 4099)]

    def select_sync(backend: str) -> dict[str, Any]:
        ops.select_topk(scores, 1 << 18, backend=backend)  # warm-up: lazy initialisation may synchronise
        torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ops.select_topk(scores, 1 << 18, backend=backend)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        return {"synchronisations": len(syncs), "messages": syncs[:5], "passed": len(syncs) <= 1}

    def graph_capture(backend: str) -> dict[str, Any]:
        W = [torch.randn(1000, device=device), torch.randn(3000, device=device)]
        G, B = [torch.randn_like(w) for w in W], [torch.empty_like(w) for w in W]
        scale = torch.tensor(0.1, device=device)
        ops.perturb_(W, G, None, None, B, scale, backend=backend)  # warm-up outside the capture
        torch.cuda.synchronize()
        try:
            with torch.cuda.graph(torch.cuda.CUDAGraph()):
                ops.perturb_(W, G, None, None, B, scale, backend=backend)
        except RuntimeError as exc:
            refused = "CUDA graph" in str(exc)
            return {"refused": refused, "error": str(exc).splitlines()[0], "passed": refused}
        return {"refused": False, "passed": False}

    run("select_sync", "bucket path", scores[0].numel(), select_sync)
    run("graph_capture", "perturb_ list", 4000, graph_capture)


# ----------------------------------------------------------------------------------------------------
# Running, guarding and recording
# ----------------------------------------------------------------------------------------------------

def estimated_bytes(check: str, n: int) -> int:
    """Peak bytes of one check at ``n`` entries: its inputs, outputs and verification temporaries
    (``BLOCK``-sized int64 keys / float64 values / bool masks, a few at a time)."""
    temporaries = 40 * min(n, BLOCK)
    per_entry = {"select_topk": 2 + 2 / 8 + 0.25,             # fp16 scores, two masks, offsets
                 "grad_sq_norm": 2 + 2,                         # bf16 G and W
                 "perturb_restore": 3 * 4 + 4 / 2 + 1 / 8}[check]  # fp32 W0, G, W, backup of K = N/2
    return int(per_entry * n) + temporaries


class Recorder:
    """Runs one check on each of ``backends``, guarded by memory and time; records and logs each outcome.
    ``baselines`` keeps what later backends are compared with (the first correct selection)."""

    def __init__(self, device: torch.device, backends: list[str], out: Path, log: harness.Log,
                 time_limit: float | None, meta: dict[str, Any]) -> None:
        self.device, self.backends, self.out, self.log = device, backends, out, log
        self.time_limit, self.started = time_limit, time.perf_counter()
        self.payload: dict[str, Any] = {"meta": meta, "records": []}
        self.baselines: dict[str, tuple[str, torch.Tensor, torch.Tensor]] = {}

    def record(self, entry: dict[str, Any]) -> None:
        self.payload["records"].append(entry)
        harness.write_json(self.out / "numerics.json", self.payload)
        extra = entry.get("reason") or {k: v for k, v in entry.get("details", {}).items() if k != "passed"}
        self.log.write(f"{entry['check']:<16} {entry['variant']:<13} N={entry['n']:<11} "
                       f"{entry['backend']:<9} {entry['status'].upper():<5} {entry['seconds']:7.2f} s  "
                       f"{extra}")

    def guard(self, check: str, n: int, memory: bool = True) -> str | None:
        """Why ``check`` at ``n`` cannot start now (``memory``: also whether its inputs and temporaries
        fit), or None."""
        if harness.out_of_time(self.started, self.time_limit):
            return f"not started: past --time-limit {self.time_limit} s"
        if not memory:
            return None
        need, free = estimated_bytes(check, n), harness.free_bytes(self.device)
        if need > 0.9 * free:
            return f"needs ~{need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free"
        return None

    def __call__(self, check: str, variant: str, n: int, one: Callable[[str], dict[str, Any]]) -> None:
        for backend in self.backends:
            entry: dict[str, Any] = {"check": check, "variant": variant, "n": n, "backend": backend}
            started = time.perf_counter()
            why = self.guard(check, n, memory=False)  # the inputs are allocated: memory was checked before
            if why is not None:
                entry |= {"status": "skip", "reason": why}
            else:
                try:
                    details = one(backend)
                    entry |= {"status": "pass" if details["passed"] else "fail", "details": details}
                except Exception as exc:
                    oom = harness.is_oom(exc)
                    entry |= {"status": "skip" if oom else "error",
                              "reason": f"out of memory: {exc}" if oom else traceback.format_exc(limit=8)}
                    if self.device.type == "cuda":
                        torch.cuda.empty_cache()
            with contextlib.suppress(RuntimeError):  # an error the entry already records
                harness.synchronize(self.device)
            entry["seconds"] = round(time.perf_counter() - started, 3)
            self.record(entry)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the three checks (a check whose setup fails is recorded as an error); returns the payload."""
    device = harness.parse_device(args.device, args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = harness.Log(out / "numerics.log", args.quiet)
    backends = harness.backends_for(device, args.backends, log)
    sizes = {"select_topk": (1 << args.select_log2) + 4099, "grad_sq_norm": 1 << args.norm_log2,
             "perturb_restore": 1 << args.perturb_log2}
    meta = harness.environment(device, args.note) | {"backends": backends, "sizes": sizes,
                                                     "block": BLOCK, "norm_rtol": NORM_RTOL,
                                                     "time_limit_s": args.time_limit}
    log.write(f"numerics: {meta['device_name']} ({device}), backends {backends}, sizes {sizes}")
    recorder = Recorder(device, backends, out, log, args.time_limit, meta)
    dtypes = [getattr(torch, d) for d in args.dtypes.split(",")]
    checks = {"select_topk": lambda n, gen: check_select(n, device, gen, recorder),
              "grad_sq_norm": lambda n, gen: check_norm(n, device, gen, recorder),
              "perturb_restore": lambda n, gen: check_perturb_restore(n, dtypes, device, gen, recorder)}
    recorder.backends = [b for b in backends if b in ("native", "triton")]
    try:
        check_device_paths(device, recorder)
    except Exception:
        recorder.record({"check": "device paths", "variant": "setup", "n": 0, "backend": "all",
                         "status": "error", "reason": traceback.format_exc(limit=8), "seconds": 0.0})
    # Two passes, the fused backends then the reference (which can take long at 2^31): a run cut short
    # loses the oracle's checks, not the kernels'. Each check draws its inputs from its own seed, so both
    # passes see the same inputs.
    for group in ([b for b in backends if b != "reference"], [b for b in backends if b == "reference"]):
        if not group:
            continue
        recorder.backends = group
        for i, (check, fn) in enumerate(checks.items()):
            n = sizes[check]
            why = recorder.guard(check, n)
            try:
                if why is not None:  # not even the inputs fit: one record for the pass
                    recorder.record({"check": check, "variant": "all", "n": n, "backend": ",".join(group),
                                     "status": "skip", "reason": why, "seconds": 0.0})
                    continue
                fn(n, torch.Generator(device).manual_seed(args.seed + i))
            except Exception as exc:  # the inputs could not be built: recorded, the next check still runs
                recorder.record({"check": check, "variant": "setup", "n": n, "backend": ",".join(group),
                                 "status": "skip" if harness.is_oom(exc) else "error",
                                 "reason": traceback.format_exc(limit=8), "seconds": 0.0})
            if device.type == "cuda":
                torch.cuda.empty_cache()
    harness.finish_meta(meta, recorder.started)
    harness.write_json(out / "numerics.json", recorder.payload)
    log.close()
    return recorder.payload


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", required=True, help="directory for numerics.json and numerics.log")
    p.add_argument("--backends", default="all", help="comma list of backends, or all (those available here)")
    p.add_argument("--select-log2", type=int, default=None, help="select_topk over 2^a + 4099 entries "
                   "(default 31 on GPU, 20 on CPU)")
    p.add_argument("--norm-log2", type=int, default=None, help="grad_sq_norm over 2^b (default 30 / 20)")
    p.add_argument("--perturb-log2", type=int, default=None,
                   help="perturb/restore over 2^c (default 30 / 20)")
    p.add_argument("--dtypes", default="float32,bfloat16", help="dtypes of the perturb/restore check")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--time-limit", type=float, default=None, help="seconds: checks not started by then "
                   "are skipped and recorded")
    p.add_argument("--note", default="")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parser().parse_args(argv)
    on_gpu = torch.device(args.device).type == "cuda"
    for name, gpu, cpu in (("select_log2", 31, 20), ("norm_log2", 30, 20), ("perturb_log2", 30, 20)):
        if getattr(args, name) is None:
            setattr(args, name, gpu if on_gpu else cpu)
    return run(args)


if __name__ == "__main__":
    main()
