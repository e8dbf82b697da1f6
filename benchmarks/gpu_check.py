"""GPU validation in one command: build, tests, numerics at scale, benchmarks, one summary.

``python -m benchmarks.gpu_check --out DIR [--quick] [--device cuda|cpu] [--part 1|2] [--budget S]``

Stages, each in its own subprocess under a wall-clock limit (a crash, a hang or a poisoned CUDA context in
one stage is recorded and the next stage still runs):

1. ``build``: ``python setup.py build_ext --inplace`` for the local GPU only (``TORCH_CUDA_ARCH_LIST`` = its
   compute capability, ``MAX_JOBS`` = the CPU count, ninja when installed), then a fresh process reports
   whether the native CUDA kernels load. A failed build is recorded; the later stages still run the
   reference and Triton backends.
2. ``tests``: pytest, one subprocess per test file, never stopping at a failure, JUnit XML merged into
   ``junit.xml``. Each test is bounded by pytest-timeout's ``--timeout`` when it is installed, and each
   file by the stage's wall-clock budget in any case (a file cut short appears as an error case).
3. ``numerics``: :mod:`benchmarks.gpu_numerics` (``select_topk`` past 2^31 entries, ``grad_sq_norm`` at
   2^30 in bf16 against float64, perturb/restore bit-exactness at 2^30), guarded by free memory.
4. ``kernels``: :mod:`benchmarks.kernels` at 2^20, 2^24 and 2^28 entries (fp32; the full run adds bf16),
   every op as a fraction of the copy bandwidth measured in the same run, ours beside the baselines.
5. ``step``: :mod:`benchmarks.step` on GPT-2-medium (355 M parameters in 292 tensors).
6. ``layouts``: :mod:`benchmarks.layouts` ``--model gpt2_medium``: the whole training step in the tensors
   layout (the default), the flat layout and the published code's loop, side by side.

``--quick`` runs all six in one 10-minute command on an H100 (the test stage runs the CUDA test files
without the ``slow`` tests; the numerics cover the large sizes). Without it the run is two commands:
``--part 1`` (build, the whole test suite, numerics) and ``--part 2`` (build, kernels in fp32 and bf16,
step, layouts). ``--device cpu`` is a smoke test at CPU-sized scales (numerics at 2^20, one test file, tiny
benchmarks).

Budget: ``--budget`` seconds for the whole command (default 540: a 600 s command with room to start
Python and copy files back). Each stage gets a share of what is left (weights :data:`WEIGHTS`; time a
stage does not use goes to the later ones) and is skipped, with the reason recorded, when less than its
minimum is left. The benchmark scripts get a soft ``--time-limit`` inside that share, so they stop
starting cases and still write their results.

Outputs in ``--out`` (and nothing else, at most 4 files, rewritten after every stage so a command cut
short still leaves its results): ``summary.md``, ``results.json``, ``junit.xml`` and ``logs.tar.gz``
(every raw log: build, pytest per file, numerics, kernels, step and layouts JSON/Markdown/logs); with
``--part N`` each name ends in ``-partN``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from . import harness, kernels, layouts

REPO = harness.REPO

WEIGHTS = {"build": 0.3, "tests": 0.25, "numerics": 0.1, "kernels": 0.175, "step": 0.125, "layouts": 0.05}
"""Shares of the remaining budget per stage (renormalised over the stages still to run)."""
MIN_SECONDS = {"cuda": {"build": 30, "tests": 30, "numerics": 20, "kernels": 30, "step": 30, "layouts": 30},
               "cpu": {"build": 5, "tests": 5, "numerics": 5, "kernels": 5, "step": 5, "layouts": 5}}
"""A stage starts only with at least this many seconds left for it."""
RESERVE_S = {"cuda": 15.0, "cpu": 3.0}
"""Seconds kept for the summary and the packing at the end."""
MIN_FILE_S = {"cuda": 20.0, "cpu": 5.0}
"""Seconds kept for each test file still to run when a file's wall-clock limit is set."""
SIZES = (1 << 20, 1 << 24, 1 << 28)
STREAMING_OPS = ("grad_sq_norm", "perturb_", "restore_", "fisher_accumulate_", "axpby_")
MIN_STEP_PARAMS = 100_000_000
"""The step targets hold at >= 100 M parameters (issue "GPU validation")."""
FUSED = ("triton", "native")
"""The backends the speed targets are for (the reference backend is the oracle, not a fast path)."""
CUDA_TEST_FILES = ("tests/test_parity.py", "tests/test_native.py", "tests/test_triton.py",
                   "tests/test_ops.py")
"""The test files that run CUDA tensors (or check backend choice), in the order they run."""
CUDA_CASES = {"tests/test_parity.py": ("-k", "native-cuda or triton")}
"""Of a file that runs every backend, the cases on CUDA tensors (on a GPU Triton runs there), which a CUDA
run selects: its CPU backends' cases run in CI."""
CPU_TEST_FILES_FIRST = ("tests/test_optim.py", "tests/test_layout.py", "tests/test_fisher.py")
"""In the full run, the CPU-only test files of the optimizer itself, before the examples and studies."""
SELF_TEST = "tests/test_gpu_check.py"
"""Never run by the harness: it runs the harness."""


# ----------------------------------------------------------------------------------------------------
# The plan of a run
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plan:
    """What one invocation runs: stages, test selection and the benchmark scripts' arguments."""

    device: str
    stages: tuple[str, ...]
    budget_s: float
    test_files: tuple[str, ...]
    pytest_args: tuple[str, ...]
    per_test_timeout_s: int
    numerics_args: tuple[str, ...]
    kernel_dtypes: tuple[str, ...]
    kernel_args: tuple[str, ...]
    step_args: tuple[str, ...]
    suffix: str = ""
    notes: tuple[str, ...] = ()
    layouts_args: tuple[str, ...] = ()


def all_test_files() -> tuple[str, ...]:
    """Every test file but this harness's own: the CUDA ones first, then the optimizer's, then the rest
    (examples, studies, distributed runs), so a run cut short loses the least GPU evidence."""
    first = (*CUDA_TEST_FILES, *CPU_TEST_FILES_FIRST)
    rest = sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py"))
    return (*first, *(f for f in rest if f not in first and f != SELF_TEST))


def make_plan(device: str, quick: bool, part: int | None, budget_s: float | None) -> Plan:
    """The plan for ``device`` (``cuda``/``cpu``), ``--quick`` and ``--part`` (see the module doc)."""
    if device not in ("cuda", "cpu"):
        raise ValueError(f"device: expected 'cuda' or 'cpu', got {device!r}")
    if part not in (None, 1, 2):
        raise ValueError(f"part: expected 1 or 2, got {part!r}")
    if quick and part is not None:
        raise ValueError("part: --quick runs everything in one command; --part splits the full run")
    stages = {None: tuple(WEIGHTS), 1: ("build", "tests", "numerics"),
              2: ("build", "kernels", "step", "layouts")}[part]
    default_budget = 540.0 if quick or part is not None else 1080.0
    budget = budget_s if budget_s is not None else default_budget
    suffix = f"-part{part}" if part is not None else ""
    sizes = ",".join(str(n) for n in SIZES)
    if device == "cpu":  # a smoke test: CPU-sized scales, one test file, tiny benchmarks
        return Plan(device, stages, budget_s if budget_s is not None else 300.0, ("tests/test_ops.py",),
                    ("-m", "not slow"), 60, ("--threads", "1"), ("float32",),
                    ("--sizes", "1024,4096", "--runs", "2", "--warmup", "1", "--tensors", "7",
                     "--threads", "1"),
                    ("--models", "resnet18", "--scale", "0.02", "--batch", "2", "--runs", "2",
                     "--warmup", "1", "--threads", "1"), suffix,
                    ("--device cpu: a smoke test at CPU-sized scales; no build, one test file",),
                    ("--model", "resnet18", "--scale", "0.02", "--batch", "2", "--rounds", "1", "--runs", "2",
                     "--warmup", "1", "--threads", "1", "--backend", "auto"))
    # The reference backend is the oracle, not a fast path: on the 355 M-parameter step it would take most
    # of the budget, and the quick kernel run keeps its time for the fused backends and the baselines.
    # The quick step uses batch 2: the forward/backward passes (the "full" column) take most of its time,
    # and first_step + restore, the overhead and the update do not depend on the batch.
    if quick:
        return Plan(device, stages, budget, CUDA_TEST_FILES, ("-m", "not slow"), 120, (), ("float32",),
                    ("--sizes", sizes, "--runs", "10", "--warmup", "2", "--backends", "triton,native"),
                    ("--models", "gpt2_medium", "--runs", "5", "--warmup", "1", "--batch", "2",
                     "--backends", "triton,native"), suffix,
                    layouts_args=("--model", "gpt2_medium", "--batch", "2", "--rounds", "3", "--runs", "5",
                                  "--warmup", "1", "--backend", "auto"))
    return Plan(device, stages, budget, all_test_files(), (), 300, (), ("float32", "bfloat16"),
                ("--sizes", sizes, "--runs", "20", "--warmup", "2"),
                ("--models", "gpt2_medium", "--runs", "10", "--warmup", "2", "--backends", "triton,native"),
                suffix, layouts_args=("--model", "gpt2_medium", "--rounds", "5", "--runs", "10", "--warmup",
                                      "2", "--backend", "auto"))


def allowance(stage: str, remaining_s: float, todo: Sequence[str], device: str) -> float | None:
    """Seconds for ``stage`` out of ``remaining_s``: its weighted share among the stages ``todo`` (itself
    first), at least its minimum; None when not even the minimum is left."""
    minimum = MIN_SECONDS[device][stage]
    if remaining_s < minimum:
        return None
    share = remaining_s * WEIGHTS[stage] / sum(WEIGHTS[s] for s in todo)
    return min(remaining_s, max(share, minimum))


# ----------------------------------------------------------------------------------------------------
# Running subprocesses under a wall-clock limit
# ----------------------------------------------------------------------------------------------------

def _own_group_interruptible() -> None:
    """In the child before exec: its own process group (process_group=0 needs Python 3.11), and SIGINT
    at its default. A shell without job control (a script, a CI step) starts its ``&`` jobs with SIGINT
    ignored, an ignored signal stays ignored across exec, and a Python started so never raises
    KeyboardInterrupt: pytest would then not stop and write its JUnit XML at the limit."""
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_logged(cmd: Sequence[str], log_path: Path, limit_s: float, env: dict[str, str] | None = None
               ) -> tuple[int | None, float]:
    """Run ``cmd`` in the repository root with stdout and stderr appended to ``log_path``; after
    ``limit_s`` seconds interrupt its process group (SIGINT: pytest still writes its JUnit XML), and kill
    it 15 s later. Returns the exit status (None when it was stopped) and the seconds it ran.

    The command gets its own process group (to stop it with whatever it started) but stays in this
    session, so whatever ends this session's processes ends it too; if this process is interrupted,
    the group is killed before the interruption goes on."""
    started = time.perf_counter()
    with open(log_path, "ab") as log:
        log.write(f"$ {shlex.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(list(cmd), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env,
                                preexec_fn=_own_group_interruptible)
        try:
            rc: int | None = proc.wait(timeout=max(1.0, limit_s))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            rc = None
            log.write(f"\n[gpu_check] stopped at its wall-clock limit of {limit_s:.0f} s\n".encode())
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    return rc, time.perf_counter() - started


def _python(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def _env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **extra}
    env.pop("SSAM_KERNELS_NO_EXT", None)
    return env


_PROBE = """
import json, platform, sys, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError as exc:
    info["triton"] = None
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info |= {"device_name": p.name, "capability": [p.major, p.minor], "memory_bytes": p.total_memory,
             "multiprocessors": p.multi_processor_count}
if "--backends" in sys.argv:
    import ssam_kernels as sk
    from ssam_kernels.ops import native
    info |= {"available_backends": sk.available_backends(),
             "native_cuda": native.unavailable_reason("cuda"), "native_cpu": native.unavailable_reason("cpu")}
print(json.dumps(info))
"""


def probe(backends: bool = False) -> dict[str, Any]:
    """Versions and the device, read in a fresh process (this one never initialises CUDA); with
    ``backends``, what ``ssam_kernels`` can run (after a build: the new extension is loaded)."""
    done = subprocess.run([sys.executable, "-c", _PROBE, *(["--backends"] if backends else [])], cwd=REPO,
                          capture_output=True, text=True, env=_env(), timeout=300, check=False)
    if done.returncode != 0:
        return {"probe_error": done.stderr[-2000:]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _command_output(cmd: Sequence[str]) -> str | None:
    try:
        done = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _proc_driver_version() -> str | None:
    """The NVIDIA kernel module's version from ``/proc/driver/nvidia/version`` (when nvidia-smi is absent)."""
    try:
        text = Path("/proc/driver/nvidia/version").read_text()
    except OSError:
        return None
    match = re.search(r"Kernel Module\s+(?:for \S+\s+)?([\d.]+)", text)
    return match.group(1) if match else None


def source_digest() -> str:
    """SHA-256 over the paths and contents of the package, the C++/CUDA sources, benchmarks, tests and
    setup.py: identifies the code measured where the copy sent to the GPU machine has no ``.git``."""
    digest = hashlib.sha256()
    suffixes = (".py", ".cu", ".cpp", ".h", ".cuh", ".txt")
    paths = [REPO / "setup.py", *(p for d in ("ssam_kernels", "csrc", "benchmarks", "tests")
                                  for p in (REPO / d).rglob("*") if p.is_file() and p.suffix in suffixes)]
    for path in sorted(paths):
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def environment(info: dict[str, Any], plan: Plan, argv: list[str]) -> dict[str, Any]:
    """Device, versions (torch, Triton, CUDA, driver, nvcc), commit and the optional tools present;
    ``info`` is :func:`probe`'s."""
    smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                           "--format=csv,noheader"])
    nvcc = _command_output(["nvcc", "--version"])
    name = info.get("device_name") if plan.device == "cuda" else harness.device_name(torch.device("cpu"))
    return {
        **info,
        "device": plan.device,
        "device_tag": harness.device_tag_for(name or "unknown", plan.device),
        "driver": smi.splitlines()[0].split(",")[1].strip() if smi else _proc_driver_version(),
        "nvidia_smi": smi,
        "nvcc": nvcc.splitlines()[-1] if nvcc else None,
        "commit": harness._git("rev-parse", "HEAD") or None,
        "worktree_dirty": bool(harness._git("status", "--porcelain", "--untracked-files=no")),
        "source_digest": source_digest(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "host_python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "optional": {name: importlib.util.find_spec(name) is not None
                     for name in ("pytest_timeout", "tqdm", "matplotlib", "rich", "numpy")}
                    | {"ninja": shutil.which("ninja") is not None},
        "argv": argv,
        "plan": asdict(plan),
    }


# ----------------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------------

@dataclass
class Run:
    """The state of one invocation: where things go, what happened so far."""

    plan: Plan
    out: Path
    raw: Path
    results: dict[str, Any]
    say: Callable[[str], None]
    started: float

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def remaining(self) -> float:
        return self.plan.budget_s - self.elapsed() - RESERVE_S[self.plan.device]


def arch_list(capability: Sequence[int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for one device: ``(9, 0)`` → ``"9.0"``."""
    major, minor = capability
    return f"{major}.{minor}"


def stage_build(run: Run, limit_s: float, command: Sequence[str] | None = None) -> dict[str, Any]:
    """Build the extension in place for the local GPU; the record says whether native CUDA loads."""
    capability = run.results["meta"].get("capability")
    if run.plan.device != "cuda":
        return {"status": "skipped", "reason": "--device cpu: nothing is built; the tests and benchmarks use "
                "the extension already in place, if any", **_backends_after()}
    if capability is None:
        return {"status": "failed", "reason": "no CUDA device visible to torch"}
    arch = arch_list(capability)
    cmd = list(command) if command is not None else [sys.executable, "setup.py", "build_ext", "--inplace"]
    env = _env(TORCH_CUDA_ARCH_LIST=arch, MAX_JOBS=str(os.cpu_count() or 4))
    rc, seconds = run_logged(cmd, run.raw / "build.log", limit_s, env)
    after = _backends_after()
    record = {"arch_list": arch, "command": shlex.join(cmd), "rc": rc, "build_seconds": round(seconds, 1),
              "ninja": shutil.which("ninja") is not None, **after}
    if rc is None:
        return record | {"status": "timeout", "reason": f"stopped at its {limit_s:.0f} s limit"}
    if rc != 0 or after.get("native_cuda") is not None:
        why = after.get("native_cuda") or f"exit status {rc}"
        return record | {"status": "failed", "reason": f"native CUDA kernels unavailable: {why} "
                         "(the other stages run the reference and Triton backends)"}
    return record | {"status": "ok"}


def _backends_after() -> dict[str, Any]:
    info = probe(backends=True)
    return {k: info.get(k) for k in ("available_backends", "native_cuda", "native_cpu", "probe_error")
            if k in info}


def _junit_suite(name: str, case: str, kind: str, message: str) -> ET.Element:
    """A one-case ``<testsuite>`` standing for a test file that produced no report (``kind``: ``error``
    or ``skipped``)."""
    suite = ET.Element("testsuite", name=name, tests="1", errors=str(int(kind == "error")),
                       failures="0", skipped=str(int(kind == "skipped")), time="0")
    testcase = ET.SubElement(suite, "testcase", classname=name, name=case, time="0")
    ET.SubElement(testcase, kind, message=message).text = message
    return suite


def merge_junit(reports: Sequence[tuple[str, Path | None, str | None]], path: Path) -> dict[str, int]:
    """Merge per-file JUnit reports into one ``<testsuites>`` at ``path``; returns the counts.

    ``reports``: ``(test file, its JUnit XML or None, problem)``. A file with a problem (stopped at the
    limit, crashed, not run) adds one case: an error, or a skip when it was not run at all, so the counts
    never hide it. A report cut short by the limit keeps the cases it recorded."""
    root = ET.Element("testsuites")
    for name, xml_path, problem in reports:
        if xml_path is not None and xml_path.exists():
            try:
                parsed = ET.parse(xml_path).getroot()
            except ET.ParseError as exc:
                problem = f"{problem + '; ' if problem else ''}unreadable JUnit report ({exc})"
                parsed = None
            for suite in ([] if parsed is None else
                          parsed.findall("testsuite") if parsed.tag == "testsuites" else [parsed]):
                for case in suite.findall("testcase"):
                    if case.get("name") is None:  # the nameless record of a test interrupted at the limit
                        suite.remove(case)
                suite.set("name", name)
                root.append(suite)
        if problem:
            kind = "skipped" if problem.startswith("not run") else "error"
            root.append(_junit_suite(name, "(whole file)", kind, problem))
    ET.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)
    return junit_counts(path)


def junit_counts(path: Path) -> dict[str, int]:
    """Test cases of a JUnit XML by outcome: passed, failed, errors, skipped, total."""
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0, "total": 0}
    for case in ET.parse(path).getroot().iter("testcase"):
        counts["total"] += 1
        if case.find("failure") is not None:
            counts["failed"] += 1
        elif case.find("error") is not None:
            counts["errors"] += 1
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def junit_problems(path: Path, limit: int = 60) -> list[str]:
    """``file::test: message`` of the first ``limit`` failed or errored cases."""
    out = []
    for case in ET.parse(path).getroot().iter("testcase"):
        bad = case.find("failure") if case.find("failure") is not None else case.find("error")
        if bad is not None and len(out) < limit:
            first_line = ((bad.get("message") or "").strip().splitlines() or [""])[0]
            out.append(f"{case.get('classname')}::{case.get('name')}: {first_line[:160]}")
    return out


def stage_tests(run: Run, limit_s: float) -> dict[str, Any]:
    """pytest per file (see the module doc); writes the merged ``junit.xml`` into the raw directory."""
    plan, device = run.plan, run.plan.device
    has_timeout = importlib.util.find_spec("pytest_timeout") is not None
    per_test = ["--timeout", str(plan.per_test_timeout_s)] if has_timeout else []
    bounded = (f"pytest-timeout: {plan.per_test_timeout_s} s per test, and a wall-clock limit per file"
               if has_timeout else "pytest-timeout is not installed: no per-test limit; each file runs in "
               "its own process under a wall-clock limit (a file cut short shows as an error case)")
    run.say(f"tests: {len(plan.test_files)} files, {bounded}")
    stage_end = time.perf_counter() + limit_s
    reports: list[tuple[str, Path | None, str | None]] = []
    files: list[dict[str, Any]] = []
    for i, test_file in enumerate(plan.test_files):
        stem = Path(test_file).stem
        left = stage_end - time.perf_counter()
        file_limit = left - MIN_FILE_S[device] * (len(plan.test_files) - i - 1)
        file_limit = max(file_limit, MIN_FILE_S[device])
        if left < MIN_FILE_S[device]:
            problem = f"not run: the tests stage's {limit_s:.0f} s were used up"
            reports.append((test_file, None, problem))
            files.append({"file": test_file, "status": "not run", "reason": problem})
            continue
        xml_path = run.raw / f"junit-{stem}.xml"
        cases = CUDA_CASES.get(test_file, ()) if device == "cuda" else ()
        cmd = _python("pytest", test_file, "-q", "-p", "no:cacheprovider", "-rfE",
                      f"--junitxml={xml_path}", *plan.pytest_args, *cases, *per_test)
        rc, seconds = run_logged(cmd, run.raw / f"pytest-{stem}.log", min(file_limit, left), _env())
        problem = None
        if rc is None:
            problem = f"stopped at the file's wall-clock limit of {min(file_limit, left):.0f} s"
        elif rc not in (0, 1, 5) or not xml_path.exists():  # 1: some tests failed; 5: none collected
            problem = f"pytest exited with status {rc} (see pytest-{stem}.log)"
        reports.append((test_file, xml_path, problem))
        single = run.raw / f"junit-{stem}-merged.xml"
        counts = merge_junit([(test_file, xml_path, problem)], single)
        single.unlink()
        files.append({"file": test_file, "rc": rc, "seconds": round(seconds, 1), "counts": counts,
                      **({"problem": problem} if problem else {})})
        run.say(f"tests: {test_file}: {_counts_line(counts)} in {seconds:.0f} s"
                + (f" ({problem})" if problem else ""))
    counts = merge_junit(reports, run.raw / "junit.xml")
    failed = [f for f in files if f.get("problem") or f.get("counts", {}).get("failed")
              or f.get("counts", {}).get("errors")]
    return {"status": "ok" if not failed else "failed", "counts": counts, "files": files,
            "bounded_by": bounded, "pytest_args": list(plan.pytest_args),
            "problems": junit_problems(run.raw / "junit.xml"),
            **({"reason": f"{len(failed)} file(s) with failures or errors"} if failed else {})}


OUTCOMES = ("passed", "failed", "errors", "skipped")


def _counts_line(c: dict[str, int]) -> str:
    return f"{c['passed']} passed, {c['failed']} failed, {c['errors']} errors, {c['skipped']} skipped"


def _soft_limit(limit_s: float, device: str) -> float:
    """The ``--time-limit`` given to a script inside a stage's hard limit: room to finish the case in
    flight and write the outputs."""
    margin = max(3.0 if device == "cpu" else 20.0, 0.15 * limit_s)
    return max(1.0, limit_s - margin)


def stage_numerics(run: Run, limit_s: float) -> dict[str, Any]:
    out = run.raw / "numerics"
    cmd = _python("benchmarks.gpu_numerics", "--device", run.plan.device, "--out", str(out), "--quiet",
                  "--time-limit", f"{_soft_limit(limit_s, run.plan.device):.0f}", *run.plan.numerics_args)
    rc, seconds = run_logged(cmd, run.raw / "numerics-stdout.log", limit_s, _env())
    payload = _read_json(out / "numerics.json")
    records = payload.get("records", []) if payload else []
    by_status = {s: sum(r["status"] == s for r in records) for s in ("pass", "fail", "error", "skip")}
    status = ("timeout" if rc is None else "failed" if rc != 0 or by_status["fail"] or by_status["error"]
              else "ok")
    return {"status": status, "rc": rc, "seconds_run": round(seconds, 1), "counts": by_status,
            "records": records, **({"reason": "see numerics-stdout.log"} if rc not in (0, None) else {})}


def stage_kernels(run: Run, limit_s: float) -> dict[str, Any]:
    stage_end = time.perf_counter() + limit_s
    payloads, runs = {}, []
    dtypes = run.plan.kernel_dtypes
    for i, dtype in enumerate(dtypes):
        share = (stage_end - time.perf_counter()) / (len(dtypes) - i)
        out = run.raw / f"kernels-{dtype}"
        cmd = _python("benchmarks.kernels", "--device", run.plan.device, "--dtype", dtype, "--out", str(out),
                      "--no-plots", "--quiet", "--time-limit", f"{_soft_limit(share, run.plan.device):.0f}",
                      *run.plan.kernel_args)
        rc, seconds = run_logged(cmd, run.raw / f"kernels-{dtype}-stdout.log", share, _env())
        runs.append({"dtype": dtype, "rc": rc, "seconds": round(seconds, 1)})
        payload = _read_json(out / "kernels.json")
        if payload is not None:
            payloads[dtype] = payload
    bad = [r for r in runs if r["rc"] != 0]
    return {"status": "ok" if not bad else "failed", "runs": runs, "payloads": payloads,
            **({"reason": f"{len(bad)} run(s) failed or stopped (see kernels-*-stdout.log)"} if bad else {})}


def _benchmark_stage(run: Run, limit_s: float, name: str, args: Sequence[str]) -> dict[str, Any]:
    """``python -m benchmarks.<name>`` with its outputs in ``<raw>/<name>/``; the record holds its JSON."""
    out = run.raw / name
    cmd = _python(f"benchmarks.{name}", "--device", run.plan.device, "--out", str(out), "--quiet",
                  "--time-limit", f"{_soft_limit(limit_s, run.plan.device):.0f}", *args)
    rc, seconds = run_logged(cmd, run.raw / f"{name}-stdout.log", limit_s, _env())
    payload = _read_json(out / f"{name}.json")
    return {"status": "ok" if rc == 0 and payload else "failed", "rc": rc, "seconds_run": round(seconds, 1),
            "payload": payload, **({"reason": f"see {name}-stdout.log"} if rc != 0 else {})}


def stage_step(run: Run, limit_s: float) -> dict[str, Any]:
    return _benchmark_stage(run, limit_s, "step", ("--no-plots", *run.plan.step_args))


def stage_layouts(run: Run, limit_s: float) -> dict[str, Any]:
    return _benchmark_stage(run, limit_s, "layouts", run.plan.layouts_args)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


STAGES: dict[str, Callable[[Run, float], dict[str, Any]]] = {
    "build": stage_build, "tests": stage_tests, "numerics": stage_numerics, "kernels": stage_kernels,
    "step": stage_step, "layouts": stage_layouts,
}


# ----------------------------------------------------------------------------------------------------
# Targets (issue "GPU kernels at the bandwidth limit") and the summary
# ----------------------------------------------------------------------------------------------------

def copy_bandwidth(kernel_payloads: dict[str, Any]) -> float | None:
    """GB/s of the largest ``copy_`` measured by the kernel benchmark (fp32 first): the ceiling the
    step's byte floor is computed with."""
    for dtype in ("float32", *kernel_payloads):
        rows = kernel_payloads.get(dtype, {}).get("results", [])
        if rows:
            return max(rows, key=lambda r: r["bytes"])["copy_gbps"]
    return None


def step_floor_bytes(n: int, k: int, elem: int, masked: bool) -> int:
    """Bytes of ``first_step`` + restore by the byte model: the norm, the perturbation and the restore."""
    return sum(kernels.op_bytes(op, n, k, elem, masked) for op in ("grad_sq_norm", "perturb_", "restore_"))


def _target(target: str, subject: str, value: float | None, threshold: float, higher: bool,
            reason: str = "") -> dict[str, Any]:
    met = None if value is None else (value >= threshold if higher else value <= threshold)
    return {"target": target, "subject": subject, "value": value,
            "threshold": f"{'>=' if higher else '<='} {threshold:g}", "met": met,
            **({"reason": reason} if value is None else {})}


def evaluate_targets(kernel_payloads: dict[str, Any], step_payload: dict[str, Any] | None
                     ) -> list[dict[str, Any]]:
    """Each target checked on what was measured; ``met`` None when the measurement is missing."""
    out = []
    for dtype, payload in kernel_payloads.items():
        rows = payload.get("results", [])
        if not rows:
            continue
        n = max(r["n"] for r in rows)
        at = {(r["op"], r["impl"]): r for r in rows if r["n"] == n}
        for backend in FUSED:
            for op in STREAMING_OPS:
                row = at.get((op, backend))
                out.append(_target(">= 85% of copy bandwidth (streaming op, largest size)",
                                   f"{op} [{backend}] {dtype} N=2^{math.log2(n):g}",
                                   row["copy_fraction"] if row else None, 0.85, True, "not measured"))
            ours, topk = at.get(("select_topk", backend)), at.get(("select_topk", "torch.topk"))
            out.append(_target("exact-K selection >= 5x faster than torch.topk",
                               f"select_topk [{backend}] {dtype} N=2^{math.log2(n):g}",
                               topk["median_s"] / ours["median_s"] if ours and topk else None, 5.0, True,
                               "not measured"))
    copy_gbps = copy_bandwidth(kernel_payloads)
    if step_payload:
        shapes = step_payload["meta"]["model_shapes"]
        for row in step_payload["results"]:
            if row.get("family") != "ours" or row.get("backend") not in FUSED:
                continue
            subject = f"{row['model']} {row['method']}"
            shape = shapes[row["model"]]
            masked = row.get("policy") is not None
            n = shape["params"]
            k = int(n * (1 - row["sparsity"])) if masked else n
            measured = row.get("perturb_restore")
            seconds = measured["median_s"] if measured else None
            floor = step_floor_bytes(n, k, shape["element_bytes"], masked) / (copy_gbps * 1e9) if copy_gbps \
                else None
            ratio = (row.get("x_vs_loop") or {}).get("perturb_restore")
            if n < MIN_STEP_PARAMS:  # the step targets are stated for large models only
                seconds = ratio = None
            why = (f"the target is for >= {MIN_STEP_PARAMS / 1e6:g} M parameters" if n < MIN_STEP_PARAMS
                   else "not measured")
            out.append(_target("first_step + restore <= 1.15x the byte floor", subject,
                               seconds / floor if seconds and floor else None, 1.15, False,
                               "no copy bandwidth from the kernel stage" if seconds else why))
            out.append(_target(">= 10x the published-code style (first_step + restore)", subject, ratio,
                               10.0, True, why))
    return out


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _pow2(n: int) -> str:
    return f"2^{math.log2(n):g}" if n > 0 and n & (n - 1) == 0 else str(n)


def kernel_table(payload: dict[str, Any]) -> str:
    """Per (op, implementation): median and fraction of the copy bandwidth at each size."""
    rows = payload.get("results", [])
    sizes = sorted({r["n"] for r in rows})
    cells: dict[tuple[str, str], dict[int, str]] = {}
    for r in rows:
        cells.setdefault((r["op"], r["impl"]), {})[r["n"]] = \
            f"{r['median_s'] * 1e3:.3g} ms, {100 * r['copy_fraction']:.0f} %"
    body = [(op, impl, *(by_n.get(n, "-") for n in sizes)) for (op, impl), by_n in cells.items()]
    return harness.markdown_table(["op", "impl", *(f"N={_pow2(n)}" for n in sizes)], body)


def step_table(payload: dict[str, Any], targets: list[dict[str, Any]]) -> str:
    floors = {t["subject"]: t["value"] for t in targets if t["target"].startswith("first_step")}
    body = []
    for r in payload.get("results", []):
        ratios = r.get("x_vs_loop") or {}
        med = {p: (r.get(p) or {}).get("median_s") for p in ("perturb_restore", "overhead", "full")}
        body.append((r["model"], r["method"], *(_fmt(v and v * 1e3) for v in med.values()),
                     _fmt(r.get("update_s") and r["update_s"] * 1e3), _fmt(ratios.get("perturb_restore")),
                     _fmt(floors.get(f"{r['model']} {r['method']}")),
                     "; ".join(f"{k}: {v}" for k, v in (r.get("skipped") or {}).items())[:80]))
    return harness.markdown_table(["model", "method", "first_step+restore ms", "overhead ms", "full ms",
                                   "update ms", "x refcode (p+r)", "x byte floor", "skipped"], body)


def summary_markdown(results: dict[str, Any]) -> str:
    meta, stages = results["meta"], results["stages"]
    plan = meta["plan"]
    device = (f"{meta.get('device_name')} (capability {'.'.join(map(str, meta['capability']))}, "
              f"{meta['memory_bytes'] / 2**30:.0f} GiB)" if meta.get("capability") else "CPU")
    lines = [f"# GPU validation: {meta.get('device_name') or 'CPU smoke test'}", "",
             f"- **device**: {plan['device']}: {device}",
             f"- **versions**: torch {meta.get('torch')}, triton {meta.get('triton')}, CUDA (torch) "
             f"{meta.get('cuda')}, driver {meta.get('driver')}, nvcc {meta.get('nvcc')}, "
             f"python {meta.get('python')}",
             f"- **commit**: {meta.get('commit') or 'unknown (no .git here)'}"
             f"{' (dirty)' if meta.get('worktree_dirty') else ''}; "
             f"source digest {meta['source_digest'][:16]}",
             f"- **backends**: {(results.get('build') or {}).get('available_backends')}",
             f"- **commit these files under**: `benchmarks/results/{meta['device_tag']}/`",
             f"- **run**: {' '.join(meta['argv'])}; {meta['date_utc']} UTC; "
             f"wall {results.get('wall_s')} s of "
             f"a {plan['budget_s']:.0f} s budget",
             *(f"- **note**: {n}" for n in plan["notes"]), ""]
    tests = results.get("tests") or {}
    if "counts" in tests:  # the stage ran (it may also have been skipped or have raised)
        lines += [f"**Tests: {_counts_line(tests['counts'])} (of {tests['counts']['total']})**; "
                  f"{tests['bounded_by']}", ""]
    lines += ["## Stages", "", harness.markdown_table(
        ["stage", "status", "seconds", "limit s", "note"],
        [(s["name"], s["status"], s.get("seconds", "-"), s.get("limit_s", "-"), s.get("reason", ""))
         for s in stages]), ""]
    targets = results.get("targets", [])
    if targets:
        copy_gbps = copy_bandwidth(results.get("kernels", {}).get("payloads", {}))
        lines += ["## Missed targets", "",
                  f"Byte floor of the step at the kernel stage's largest copy: {_fmt(copy_gbps)} GB/s.", ""]
        for target in dict.fromkeys(t["target"] for t in targets):
            mine = [t for t in targets if t["target"] == target]
            missed = [f"{t['subject']}: {_fmt(t['value'])}" for t in mine if t["met"] is False]
            unknown = [t["subject"] for t in mine if t["met"] is None]
            lines.append(f"- **{target}** (each {mine[0]['threshold']}): {len(missed)} of {len(mine)} missed"
                         + (f", {len(unknown)} not measured" if unknown else "")
                         + ("" if not missed else ": " + "; ".join(missed)))
        lines.append("")
    if "counts" in tests:
        lines += ["## Tests", "", harness.markdown_table(
            ["file", "passed", "failed", "errors", "skipped", "seconds", "problem"],
            [(f["file"], *(f.get("counts", {}).get(k, "-") for k in OUTCOMES), f.get("seconds", "-"),
              f.get("problem") or f.get("reason", ""))
             for f in tests["files"]]), ""]
        if tests["problems"]:
            lines += ["Failed or errored (first 60):", "", *(f"- `{p}`" for p in tests["problems"]), ""]
    numerics = results.get("numerics") or {}
    if numerics.get("records"):
        lines += ["## Numerics at scale", "", harness.markdown_table(
            ["check", "variant", "N", "backend", "status", "s", "figures"],
            [(r["check"], r["variant"], _pow2(r["n"]), r["backend"], r["status"], r["seconds"],
              _numerics_figures(r)) for r in numerics["records"]]), ""]
    for dtype, payload in results.get("kernels", {}).get("payloads", {}).items():
        lines += [f"## Kernel bandwidth ({dtype}, sparsity {payload['meta']['sparsity']})", "",
                  "Median per call and percentage of a same-byte `copy_` measured in the same run.", "",
                  kernel_table(payload), ""]
        skipped = payload.get("skipped", [])
        if skipped:
            lines += [f"Skipped: {len(skipped)} case(s), e.g. " + "; ".join(
                f"{s.get('op', 'all')} {s.get('impl', '')} N={s['n']}: {s['reason'][:70]}"
                for s in skipped[:4]), ""]
    step = (results.get("step") or {}).get("payload")
    if step:
        lines += ["## Optimizer step", "", step_table(step, results.get("targets", [])), ""]
    layout_payload = (results.get("layouts") or {}).get("payload")
    if layout_payload:
        lines += ["## Layouts: the whole step", "", layouts.model_table(layout_payload), ""]
    if results.get("targets"):
        lines += ["## All targets", "", harness.markdown_table(
            ["target", "subject", "value", "threshold", "met"],
            [(t["target"], t["subject"], _fmt(t["value"]), t["threshold"], t["met"]) for t in targets]), ""]
    lines += [f"Raw logs: `logs{plan['suffix']}.tar.gz` (build, pytest per file, numerics, kernels, step, "
              "layouts).",
              ""]
    return "\n".join(lines)


def _numerics_figures(record: dict[str, Any]) -> str:
    if record["status"] in ("skip", "error"):
        return (record.get("reason") or "").strip().splitlines()[-1][:100]
    d = record.get("details", {})
    keys = ("relative_error", "deterministic", "max_ulps_vs_reference", "restore_bit_exact",
            "backup_bit_exact", "set_bits", "k", "identical")
    return ", ".join(f"{k} {_fmt(d[k]) if isinstance(d[k], float) else d[k]}" for k in keys if k in d)


# ----------------------------------------------------------------------------------------------------
# Writing and packing
# ----------------------------------------------------------------------------------------------------

def output_names(suffix: str) -> dict[str, str]:
    return {"summary": f"summary{suffix}.md", "results": f"results{suffix}.json",
            "junit": f"junit{suffix}.xml", "logs": f"logs{suffix}.tar.gz"}


def write_outputs(run: Run) -> None:
    """(Re)write the at most four files of ``--out`` from the state so far."""
    names = output_names(run.plan.suffix)
    run.results["wall_s"] = round(run.elapsed(), 1)
    run.results["targets"] = evaluate_targets(run.results.get("kernels", {}).get("payloads", {}),
                                              (run.results.get("step") or {}).get("payload"))
    results = copy.deepcopy(run.results)
    harness.write_json(run.out / names["results"], results)
    (run.out / names["summary"]).write_text(summary_markdown(results))
    junit = run.raw / "junit.xml"
    if junit.exists():
        shutil.copyfile(junit, run.out / names["junit"])
    with tarfile.open(run.out / names["logs"], "w:gz") as tar:
        tar.add(run.raw, arcname=f"gpu_check{run.plan.suffix}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the plan's stages and write the outputs (see the module doc); returns ``results.json``'s
    content."""
    started = time.perf_counter()
    args = parser().parse_args(argv)
    info = probe()
    device = args.device or ("cuda" if info.get("cuda_available") else "cpu")
    if device == "cuda" and not info.get("cuda_available"):
        raise SystemExit(f"gpu_check: --device cuda but torch sees no CUDA device ({info})")
    try:
        plan = make_plan(device, args.quick, args.part, args.budget)
    except ValueError as exc:
        raise SystemExit(f"gpu_check: {exc}") from None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = environment(info, plan, sys.argv[1:] if argv is None else argv)
    raw = Path(tempfile.mkdtemp(prefix="gpu_check-"))

    def say(line: str) -> None:
        line = f"[{time.perf_counter() - started:6.1f} s] {line}"
        print(line, flush=True)
        with open(raw / "gpu_check.log", "a") as f:
            f.write(line + "\n")

    results: dict[str, Any] = {"meta": meta, "stages": []}
    run = Run(plan, out, raw, results, say, started)
    say(f"gpu_check: {meta.get('device_name') or 'CPU'}, torch {meta.get('torch')}, triton "
        f"{meta.get('triton')}, stages {list(plan.stages)}, budget {plan.budget_s:.0f} s, out {out}")
    try:
        for i, name in enumerate(plan.stages):
            limit = allowance(name, run.remaining(), plan.stages[i:], device)
            stage_started = time.perf_counter()
            if limit is None:
                left = max(0.0, run.remaining())
                record = {"status": "skipped", "reason": f"budget: {left:.0f} s left, the stage needs at "
                          f"least {MIN_SECONDS[device][name]} s"}
            else:
                say(f"stage {name}: up to {limit:.0f} s")
                try:
                    record = STAGES[name](run, limit)
                except Exception as exc:  # a harness bug must not lose the other stages' results
                    record = {"status": "error", "reason": f"{type(exc).__name__}: {exc}"}
            record |= {"name": name, "seconds": round(time.perf_counter() - stage_started, 1),
                       "limit_s": None if limit is None else round(limit)}
            results["stages"].append({k: v for k, v in record.items()
                                      if k in ("name", "status", "seconds", "limit_s", "reason")})
            results[name] = record
            say(f"stage {name}: {record['status']} in {record['seconds']} s"
                + (f" ({record['reason']})" if record.get("reason") else ""))
            write_outputs(run)
    finally:
        write_outputs(run)
        shutil.rmtree(raw, ignore_errors=True)
    print(summary_digest(results), flush=True)
    return results


def summary_digest(results: dict[str, Any]) -> str:
    """The few lines printed last (the device tool returns the end of the output)."""
    lines = ["", "== gpu_check summary =="]
    lines += [f"{s['name']:<9} {s['status']:<8} {s['seconds']:>7} s  {s.get('reason', '')[:100]}"
              for s in results["stages"]]
    if "counts" in (results.get("tests") or {}):
        lines.append(f"tests: {_counts_line(results['tests']['counts'])}")
    missed = [t for t in results.get("targets", []) if t["met"] is False]
    lines.append(f"targets: {sum(t['met'] is True for t in results.get('targets', []))} met, {len(missed)} "
                 f"missed, {sum(t['met'] is None for t in results.get('targets', []))} not evaluated")
    lines += [f"  missed: {t['subject']}: {_fmt(t['value'])} (target {t['threshold']})" for t in missed[:20]]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="directory for summary.md, results.json, junit.xml, "
                   "logs.tar.gz (with --part N: names ending in -partN)")
    p.add_argument("--quick", action="store_true", help="everything in one 10-minute command")
    p.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="default: cuda when torch sees a GPU; cpu is a smoke test at small scales")
    p.add_argument("--part", type=int, choices=[1, 2], default=None,
                   help="the full run in two commands: 1 = build, all tests, numerics; "
                   "2 = build, kernels, step, layouts")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for the whole command (default 540 with --quick or --part, 1080 for the "
                   "whole full run, 300 on CPU)")
    return p


if __name__ == "__main__":
    main()
