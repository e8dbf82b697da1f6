"""What every benchmark here shares: the one timing harness, the run's provenance, backend choice,
memory checks, the raw log and the JSON / Markdown writers.

Timing (:func:`measure`): one warm-up call that also estimates the cost, further warm-up calls, then
``runs`` timed calls, each timed on its own: with ``time.perf_counter`` around the call on CPU, with a
pair of CUDA events on GPU (the L2 cache is flushed by writing a 256 MiB buffer before every call, so
each call starts cold as it would in training). Reported: median, 20th and 80th percentiles (numpy's
linear interpolation) of the per-call times.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import time
import types
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import ssam_kernels as sk

try:  # progress bars are optional: the GPU machine may lack tqdm (benchmarks.gpu_check runs there)
    from tqdm import tqdm
except ImportError:
    tqdm = None

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
_L2_FLUSH_BYTES = 256 << 20


@dataclass
class Timing:
    """Seconds per call over ``runs`` timed calls."""

    median_s: float
    p20_s: float
    p80_s: float
    runs: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Timing:
        p20, median, p80 = np.percentile(np.asarray(samples, dtype=np.float64), [20, 50, 80])
        return cls(float(median), float(p20), float(p80), len(samples))


class TooSlow(Exception):  # noqa: N818 (a skip reason, not an error)
    """The first call took so long that ``warmup + runs`` calls would exceed the case's time budget."""

    def __init__(self, first_call_s: float, budget_s: float) -> None:
        super().__init__(f"too slow for the budget: first call {first_call_s:.3g} s, "
                         f"budget {budget_s:.3g} s per case")
        self.first_call_s = first_call_s


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_flush_buffers: dict[torch.device, torch.Tensor] = {}


def _flush_l2(device: torch.device) -> None:
    buffer = _flush_buffers.get(device)
    if buffer is None:
        buffer = _flush_buffers[device] = torch.empty(_L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
    buffer.zero_()


def measure(fn: Callable[[], object], device: torch.device, runs: int = 20, warmup: int = 2,
            budget_s: float = math.inf) -> Timing:
    """Time ``fn()`` (see the module docstring). Raises :class:`TooSlow` when the first warm-up call
    shows that ``warmup + runs`` calls would take longer than ``budget_s``."""
    if runs < 1 or warmup < 1:
        raise ValueError(f"runs and warmup: expected >= 1, got {runs} and {warmup}")
    start = time.perf_counter()
    fn()
    synchronize(device)
    first = time.perf_counter() - start
    if first * (warmup - 1 + runs) > budget_s:
        raise TooSlow(first, budget_s)
    for _ in range(warmup - 1):
        fn()
    synchronize(device)
    samples = []
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(runs)]
        for begin, end in events:
            _flush_l2(device)
            begin.record()
            fn()
            end.record()
        synchronize(device)
        samples = [begin.elapsed_time(end) / 1e3 for begin, end in events]
    else:
        for _ in range(runs):
            start = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - start)
    return Timing.of(samples)


# ----------------------------------------------------------------------------------------------------
# Provenance
# ----------------------------------------------------------------------------------------------------

def _git(*args: str) -> str:
    try:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return ""
    return done.stdout.strip()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model from ``/proc/cpuinfo`` (else ``platform.processor()``)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_tag(device: torch.device) -> str:
    """A directory name for the device: ``cpu-<model>-<n>c`` or ``cuda-<model>``, lower case."""
    return device_tag_for(device_name(device), device.type)


def device_tag_for(name: str, device_type: str) -> str:
    """:func:`device_tag` of a device called ``name`` (e.g. ``"NVIDIA H100 80GB HBM3"``)."""
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@.*$|\bprocessor\b", " ", name, flags=re.I)
    slug = "-".join(re.findall(r"[a-z0-9]+", name.lower())) or "unknown"
    if device_type == "cuda":
        return f"cuda-{slug.removeprefix('nvidia-')}"
    return f"cpu-{slug}-{os.cpu_count()}c"


def environment(device: torch.device, note: str = "") -> dict[str, Any]:
    """What produced the figures: device, versions, commit, threads, load, date."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "ssam_kernels": sk.__version__,
        "available_backends": sk.available_backends(),
        "commit": _git("rev-parse", "HEAD"),
        "worktree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ("SSAM_KERNELS_BACKEND", "TRITON_INTERPRET", "OMP_NUM_THREADS")
                if k in os.environ},
        "note": note,
    }


def backends_for(device: torch.device, requested: str, log: Log) -> list[str]:
    """The backends to benchmark on ``device``: those of ``requested`` (comma-separated or ``all``) that
    :func:`ssam_kernels.available_backends` reports for the device type. Triton on CPU tensors only
    runs in its interpreter and cuda_sim is a simulator: neither is ever benchmarked."""
    available = sk.available_backends()
    names = list(sk.ops.BACKENDS) if requested == "all" else [n.strip() for n in requested.split(",") if n]
    chosen = []
    for name in names:
        if name not in sk.ops.BACKENDS:
            raise SystemExit(f"--backends: unknown backend {name!r}; expected 'all' or some of "
                             f"{sk.ops.BACKENDS}")
        if device.type not in available.get(name, []):
            log.write(f"backend {name}: not available for {device.type} tensors here, skipped")
        elif name == "triton" and device.type == "cpu":
            log.write("backend triton: CPU tensors run only in the Triton interpreter, never benchmarked")
        elif name == "cuda_sim":
            log.write("backend cuda_sim: the CUDA kernels in a CPU simulator, for tests, never benchmarked")
        else:
            chosen.append(name)
    return chosen


def free_bytes(device: torch.device) -> int:
    """Memory that new tensors on ``device`` can use now: free GPU memory, or ``MemAvailable``."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def is_oom(exc: BaseException) -> bool:
    """Whether ``exc`` reports an allocation failure."""
    return isinstance(exc, torch.OutOfMemoryError) or (
        isinstance(exc, RuntimeError) and re.search(r"out of memory|can't allocate|not enough memory",
                                                    str(exc), re.I) is not None)


_NOT_STATE = (torch.nn.Module, str, bytes, int, float, type, types.ModuleType, types.FunctionType,
              types.BuiltinFunctionType, types.MethodType)


def owned_bytes(root: object, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct tensor storages reachable from ``root`` through attributes, dicts, lists,
    tuples and sets, except the storages of ``exclude`` (parameters, their gradients, inputs).
    Modules, functions and ``nn.Module`` objects are not entered (a model's buffers are not the
    optimizer's state)."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen_storages: set[int] = set()
    seen_objects: set[int] = set()
    total = 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, _NOT_STATE):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in excluded and storage.data_ptr() not in seen_storages:
                seen_storages.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)):
            stack.extend(obj)
        elif hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return total


# ----------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------

class _NoBar:
    """What :meth:`Log.progress` returns without tqdm: a bar that shows nothing."""

    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class Log:
    """Progress lines on the console (through tqdm when installed, so bars stay intact) and in the raw
    log file."""

    def __init__(self, path: Path | None, quiet: bool = False) -> None:
        self.quiet = quiet
        self.file = open(path, "w") if path is not None else None  # noqa: SIM115 (closed in close())

    def write(self, line: str) -> None:
        if not self.quiet:
            if tqdm is not None:
                tqdm.write(line)
            else:
                print(line, flush=True)
        if self.file is not None:
            self.file.write(line + "\n")
            self.file.flush()

    def progress(self, total: int, desc: str) -> Any:
        if tqdm is None or self.quiet:
            return _NoBar()
        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def parse_sizes(spec: str) -> list[int]:
    """``"16:24"`` → 2^16 … 2^24; ``"16:24:2"`` → every second exponent; ``"1000,4096"`` → those sizes."""
    if ":" in spec:
        parts = [int(p) for p in spec.split(":")]
        if len(parts) not in (2, 3) or parts[0] > parts[1] or (len(parts) == 3 and parts[2] < 1):
            raise SystemExit(f"--sizes: expected LO:HI[:STEP] exponents of 2, got {spec!r}")
        return [1 << e for e in range(parts[0], parts[1] + 1, parts[2] if len(parts) == 3 else 1)]
    return [int(p) for p in spec.split(",")]


def add_common_arguments(p: argparse.ArgumentParser) -> None:
    """The options every benchmark script takes."""
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--backends", default="all", help="comma list of backends, or all (those available here)")
    p.add_argument("--runs", type=int, default=20, help="timed calls per case (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice; "
                   "on a shared machine 1 avoids waiting on busy cores at every parallel region)")
    p.add_argument("--note", default="", help="recorded with the results (e.g. machine load)")
    p.add_argument("--out", default=None, help="output directory (default benchmarks/results/<device>)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--time-limit", type=float, default=None, help="seconds for the whole run: cases not "
                   "started by then are skipped and listed (outputs are still written)")


def parse_device(name: str, threads: int | None = None) -> torch.device:
    """The benchmark device; sets the torch CPU thread count when ``threads`` is given."""
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda is not available here")
    return device


def output_dir(out: str | None, device: torch.device) -> Path:
    path = Path(out) if out else RESULTS / device_tag(device)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_json(path: Path, payload: dict[str, Any]) -> None:
    def default(obj: object) -> object:
        if hasattr(obj, "__dataclass_fields__"):
            return asdict(obj)  # type: ignore[arg-type]
        return str(obj)

    path.write_text(json.dumps(payload, indent=1, default=default) + "\n")


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_meta(meta: dict[str, Any]) -> str:
    """The provenance block that heads every Markdown result."""
    keys = ("device_name", "device", "torch", "triton", "cuda", "commit", "worktree_dirty", "date_utc",
            "cpu_count", "torch_threads", "load_average_start", "load_average_end", "available_backends",
            "note")
    return "\n".join(f"- **{k}**: {meta[k]}" for k in keys if k in meta and meta[k] not in (None, ""))


def fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    """``value · scale`` with ``digits`` significant digits; ``-`` for a missing value."""
    if value is None or math.isnan(value):
        return "-"
    return f"{value * scale:.{digits}g}"


def out_of_time(started: float, limit: float | None) -> bool:
    """Whether a run that began at ``started`` (``time.perf_counter()``) is past ``limit`` seconds."""
    return limit is not None and time.perf_counter() - started > limit


def finish_meta(meta: dict[str, Any], started: float) -> None:
    meta["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    meta["wall_s"] = round(time.perf_counter() - started, 1)
