"""Static GPU-kernel report: what the compilers make of every kernel, without a GPU.

``python -m benchmarks.static --out DIR [--archs 80,86,89,90]`` compiles

- every native CUDA kernel: each ``csrc/cuda/*.cu`` once with ``nvcc -c -Xptxas -v`` and one ``-gencode``
  per architecture (the flags of the extension build, as in ``csrc/check_cuda_compile.sh``); the kernels
  are found in the objects' SASS (``cuobjdump -sass``), so every ``__global__`` template instantiation is
  covered without naming it here;
- every Triton kernel, with the specialisation a GPU launch would get: each case of
  :data:`TRITON_CASES` calls the public Triton op on CPU tensors while ``JITFunction.run`` is replaced by
  a recorder, so the launch arguments, ``constexpr`` values and launch options are the ones the op really
  passes (the GPU :data:`~ssam_kernels.ops.tuning.TRITON_GPU`, not the interpreter's), and Triton's
  own binder then derives the signature and the divisibility-by-16 specialisation of pointers and ints.
  Each case runs with an aligned ``N`` (``N % 16 == 0``) and an unaligned one, for every dtype it accepts;

for sm_80, sm_86, sm_89 and sm_90, and writes ``DIR/static.json`` (one record per kernel × arch × dtype ×
variant, see :func:`sass_counts` and :func:`parse_ptxas_log` for the fields), ``DIR/static.md`` (the
table and the list of target violations), ``DIR/static.meta.json`` (tool versions, commit) and
``DIR/static.log`` (the raw compiler output).

Counts are static instruction counts in the SASS (not executed counts): ``global_loads`` /
``global_stores`` map the access width in bits to the number of ``LDG`` / ``STG`` instructions of that
width, ``fp64_instructions`` counts ``DADD``/``DMUL``/``DFMA``/``DMNMX``/``DSETP``/``DSET``. Register and
spill figures are ``ptxas -v``'s; ``shared_bytes`` is the static shared memory for native kernels (plus,
for ``radix_histogram_list_kernel``, a launch-time dynamic ``4 · 2^bits`` bytes) and Triton's ``shared``
metadata (all its shared memory) for Triton kernels. Triton records also carry ``ptx_global_loads`` /
``ptx_global_stores`` (``ld.global``/``st.global`` by width in the PTX, before ptxas unrolls loops: the
SASS of ``grad_sq_norm`` has 8 times the PTX's loads), ``num_warps`` and the ``constexprs`` of the launch.

Adding a kernel: a native ``__global__`` is found by itself (add a line to :data:`KERNEL_CLASSES` only if
its name matches none); a Triton kernel (a ``@triton.jit`` function named ``*_kernel`` in
``ssam_kernels.ops.triton``) needs the one line of :data:`TRITON_CASES` that calls its op: a kernel that no
case launches is reported as an error.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import re
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from . import harness

ARCHS = (80, 86, 89, 90)
CONSUMER_ARCHS = (86, 89)
"""Architectures whose fp64 units run at 1/64 of the fp32 rate (RTX 30xx/40xx, A10, L4, L40)."""
FLOAT = ("fp32", "bf16", "fp16")
SCORES = (*FLOAT, "int32")
BUILD = runpy.run_path(str(harness.REPO / "setup.py"), run_name="ssam_build_spec")
"""setup.py's constants (its sources and flags), without building."""
SOURCES = tuple(harness.REPO / source for source in BUILD["CUDA_SOURCES"])
"""The CUDA sources of the native kernels (one per op family, each compiled on its own)."""


@dataclass(frozen=True)
class KernelClass:
    """What a kernel does, for the targets: the op it implements, whether it streams over the entries
    (the ``>= 64``-bit access and no-fp64 targets apply), and the dtypes its op accepts."""

    pattern: str
    op: str
    streaming: bool
    dtypes: tuple[str, ...]


KERNEL_CLASSES: tuple[KernelClass, ...] = (
    # First match wins; native and Triton names alike (Triton's carry a leading underscore).
    KernelClass(r"sq_norm_final", "grad_sq_norm", False, ("fp64",)),  # adds the fixed partials once
    KernelClass(r"sq_norm", "grad_sq_norm", True, FLOAT),
    # masked_kernel: the native masked perturb_/restore_ before c173209 (classifies older reports)
    KernelClass(r"masked_kernel", "perturb_/restore_", True, FLOAT),
    KernelClass(r"element_(list_)?kernel", "perturb_/restore_", True, FLOAT),  # masked and dense, lists too
    KernelClass(r"perturb", "perturb_", True, FLOAT),
    KernelClass(r"restore", "restore_", True, FLOAT),
    KernelClass(r"fisher", "fisher_accumulate_", True, FLOAT),
    KernelClass(r"axpby", "axpby_", True, FLOAT),
    KernelClass(r"histogram|tie_count|threshold|bucket_mask", "select_topk", False, SCORES),
    KernelClass(r"hash", "hash_scores", False, ("int32",)),
)
UNCLASSIFIED = KernelClass("", "?", False, ())
"""A kernel no pattern matches: reported with all its instantiations and listed under the targets."""


def classify(kernel: str) -> KernelClass:
    """The first :data:`KERNEL_CLASSES` entry whose pattern occurs in ``kernel``."""
    return next((c for c in KERNEL_CLASSES if re.search(c.pattern, kernel)), UNCLASSIFIED)


# ------------------------------------------------------------------------------------------------------
# Parsers of the tools' text output (pure functions, tested on embedded samples)
# ------------------------------------------------------------------------------------------------------

_PTXAS_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)a?'")
_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def parse_ptxas_log(text: str) -> dict[tuple[str, int], dict[str, int]]:
    """``{(function, arch): {registers, spill_bytes, stack_bytes, shared_bytes}}`` from ``ptxas -v``.

    ``spill_bytes`` = spill stores + spill loads; ``shared_bytes`` is the static ``smem`` (0 if absent).
    """
    out: dict[tuple[str, int], dict[str, int]] = {}
    current: dict[str, int] | None = None
    for line in text.splitlines():
        if m := _PTXAS_ENTRY.search(line):
            current = out.setdefault((m.group(1), int(m.group(2))), {"registers": 0, "spill_bytes": 0,
                                                                      "stack_bytes": 0, "shared_bytes": 0})
        elif current is not None and (m := _PTXAS_FRAME.search(line)):
            current["stack_bytes"] = int(m.group(1))
            current["spill_bytes"] = int(m.group(2)) + int(m.group(3))
        elif current is not None and (m := _PTXAS_USED.search(line)):
            current["registers"] = int(m.group(1))
            current["shared_bytes"] = int(m.group(2) or 0)
    return out


_SASS_ARCH = re.compile(r"^\s*(?:arch =|code for) sm_(\d+)")  # cuobjdump prints both
_SASS_FUNCTION = re.compile(r"Function : (\S+)")
# `/*0040*/   @!P0 LDG.E.128 R4, desc[UR4][R2.64] ;` -> "LDG.E.128"; encoding lines `/* 0x... */` never match.
_SASS_INSTRUCTION = re.compile(
    r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
FP64_OPCODES = frozenset({"DADD", "DMUL", "DFMA", "DMNMX", "DSETP", "DSET"})
_WIDTH_SUFFIX = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128, "256": 256}


def access_bits(instruction: str) -> int:
    """Width in bits of an ``LDG``/``STG``/``LDL``/``STL`` (``LDG.E.128`` -> 128; no width suffix -> 32)."""
    widths = [_WIDTH_SUFFIX[p] for p in instruction.split(".")[1:] if p in _WIDTH_SUFFIX]
    return widths[-1] if widths else 32


def sass_counts(instructions: Sequence[str]) -> dict[str, Any]:
    """Static counts over one function's SASS instructions (opcode with modifiers, e.g. ``LDG.E.64``).

    ``global_loads``/``global_stores``: ``{"<bits>": count}`` of ``LDG``/``STG``; ``fp64_instructions``:
    fp64 arithmetic (:data:`FP64_OPCODES`); ``fp64_conversions``: ``F2F``/``I2F``/``F2I`` to or from
    F64; ``nc_loads``: ``LDG`` through the read-only non-coherent path (``.CONSTANT``, PTX
    ``ld.global.nc``: what ``const __restrict__`` lets the compiler choose); ``local_accesses``:
    ``LDL``/``STL`` (spills or stack arrays).
    """
    loads: Counter[str] = Counter()
    stores: Counter[str] = Counter()
    fp64 = conversions = local = nc = 0
    for ins in instructions:
        opcode, *mods = ins.split(".")
        if opcode == "LDG":
            loads[str(access_bits(ins))] += 1
            nc += "CONSTANT" in mods
        elif opcode == "STG":
            stores[str(access_bits(ins))] += 1
        elif opcode in FP64_OPCODES:
            fp64 += 1
        elif opcode in ("F2F", "I2F", "F2I") and "F64" in mods:
            conversions += 1
        elif opcode in ("LDL", "STL"):
            local += 1
    return {"global_loads": _sorted_widths(loads), "global_stores": _sorted_widths(stores),
            "fp64_instructions": fp64, "fp64_conversions": conversions, "nc_loads": nc,
            "local_accesses": local}


def _sorted_widths(counts: Counter[str]) -> dict[str, int]:
    return {k: counts[k] for k in sorted(counts, key=int)}


def parse_sass(text: str) -> dict[tuple[str, int], list[str]]:
    """``{(function, arch): [instruction, ...]}`` from ``cuobjdump -sass`` output (any number of archs)."""
    out: dict[tuple[str, int], list[str]] = {}
    arch = 0
    current: list[str] | None = None
    for line in text.splitlines():
        if m := _SASS_ARCH.match(line):
            arch = int(m.group(1))
            current = None
        elif m := _SASS_FUNCTION.search(line):
            current = out.setdefault((m.group(1), arch), [])
        elif current is not None and (m := _SASS_INSTRUCTION.search(line)):
            current.append(m.group(1))
    return out


_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*?)\.([bfsu])(8|16|32|64)\b")


def ptx_global_accesses(ptx: str) -> dict[str, dict[str, int]]:
    """``{"loads": {"<bits>": n}, "stores": {...}}`` of the PTX ``ld.global``/``st.global`` instructions
    (``ld.global.v4.b32`` is 128 bits)."""
    counts: dict[str, Counter[str]] = {"ld": Counter(), "st": Counter()}
    for m in _PTX_ACCESS.finditer(ptx):
        vector = re.search(r"\.v(\d)", m.group(2))
        counts[m.group(1)][str(int(m.group(4)) * (int(vector.group(1)) if vector else 1))] += 1
    return {"loads": _sorted_widths(counts["ld"]), "stores": _sorted_widths(counts["st"])}


# ------------------------------------------------------------------------------------------------------
# Native CUDA kernels
# ------------------------------------------------------------------------------------------------------

_CXX_DTYPES = {"float": "fp32", "c10::BFloat16": "bf16", "c10::Half": "fp16", "double": "fp64",
               "int": "int32"}


def tool(name: str) -> str | None:
    """Path of a CUDA binary tool: on ``PATH``, else the copy Triton bundles (``cuobjdump``, ``ptxas``)."""
    found = shutil.which(name)
    if found is None:
        with contextlib.suppress(ImportError):
            bundled = Path(__import__("triton").__file__).parent / "backends" / "nvidia" / "bin" / name
            found = str(bundled) if bundled.exists() else None
    return found


def demangled_kernel(symbol: str) -> tuple[str, str, str]:
    """``(kernel name, dtype, variant)`` of a mangled ``__global__`` symbol: the unqualified name, the dtype
    of its first template argument (``"-"`` without one) and the unqualified names of the others (the
    operation tag of ``element_kernel<float, Restore>``: ``"Restore"``; ``"any"`` without)."""
    name = subprocess.run(["c++filt", symbol], capture_output=True, text=True, check=True).stdout.strip()
    head = name.replace("(anonymous namespace)", "").split("(")[0]  # drop the parameter list
    match = re.search(r"(\w+)(?:<(.+)>)?$", head)
    if match is None:
        return symbol, "-", "any"
    if match.group(2) is None:
        return match.group(1), "-", "any"
    first, *rest = (arg.strip() for arg in match.group(2).split(","))
    variant = " ".join(arg.split("::")[-1] for arg in rest) or "any"
    return match.group(1), _CXX_DTYPES.get(first, first), variant


def nvcc_command(source: Path, obj: Path, archs: Sequence[int], generated: Path) -> list[str]:
    """The extension build's nvcc flags (as ``csrc/check_cuda_compile.sh`` derives them from torch),
    ``-Xptxas -v`` and one ``-gencode`` per architecture; ``generated``: the folder of the generated
    ``ssam_contract.h`` (setup.py's ``write_contract_header``)."""
    import inspect

    import torch
    from torch.utils import cpp_extension

    include = Path(torch.__file__).parent / "include"
    std = max(re.findall(r"-std=(c\+\+\d\d)", inspect.getsource(cpp_extension)), key=lambda s: int(s[3:]))
    cmd = ["nvcc", "-c", *BUILD["NVCC_FLAGS"], f"-std={std}", *cpp_extension.COMMON_NVCC_FLAGS,
           "-DSSAM_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C", "-DTORCH_API_INCLUDE_EXTENSION_H",
           *(f"-I{harness.REPO / d}" for d in BUILD["INCLUDE_DIRS"]), "-I", str(generated),
           "-I", str(include), "-I", str(include / "torch" / "csrc" / "api" / "include"),
           "-Xcompiler", "-fPIC", "-diag-suppress", "3306", "-Xptxas", "-v"]
    if not (include / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h").exists():
        cmd.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    for arch in archs:
        cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return [*cmd, str(source), "-o", str(obj)]


def native_records(sources: Sequence[Path], archs: Sequence[int], log: harness.Log,
                   kernel_filter: str | None = None) -> list[dict[str, Any]]:
    """One record per ``__global__`` function × arch of ``sources`` (template instantiations whose dtype
    the kernel's op does not accept are compiled but never launched, and left out)."""
    nvcc, cuobjdump = shutil.which("nvcc"), tool("cuobjdump")
    if nvcc is None or cuobjdump is None or shutil.which("c++filt") is None:
        missing = ", ".join(n for n, p in (("nvcc", nvcc), ("cuobjdump", cuobjdump),
                                           ("c++filt", shutil.which("c++filt"))) if p is None)
        return [_error_record("native", "*", arch, f"{missing} not found") for arch in archs]
    sass = ptxas = ""
    with tempfile.TemporaryDirectory() as tmp:
        generated = Path(tmp) / "generated"
        BUILD["write_contract_header"](str(generated))
        for source in sources:
            obj = Path(tmp) / f"{source.stem}.o"
            cmd = nvcc_command(source, obj, archs, generated)
            log.write("$ " + " ".join(cmd))
            done = subprocess.run(cmd, capture_output=True, text=True)
            log.write(done.stdout + done.stderr)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                why = f"nvcc failed on {source.name} ({done.returncode}): {tail}"
                return [_error_record("native", "*", arch, why) for arch in archs]
            ptxas += done.stderr + done.stdout
            sass += subprocess.run([cuobjdump, "-sass", str(obj)], capture_output=True, text=True,
                                   check=True).stdout
    resources = parse_ptxas_log(ptxas)
    records = []
    for (symbol, arch), instructions in sorted(parse_sass(sass).items()):
        kernel, dtype, variant = demangled_kernel(symbol)
        cls = classify(kernel)
        unreachable = cls.dtypes and dtype not in cls.dtypes and dtype != "-"
        if unreachable or (kernel_filter and not re.search(kernel_filter, kernel)):
            continue
        res = resources.get((symbol, arch))
        records.append({"backend": "native", "kernel": kernel, "case": kernel, "op": cls.op, "arch": arch,
                        "dtype": dtype, "variant": variant, "streaming": cls.streaming,
                        **(res or {"registers": None, "spill_bytes": None, "stack_bytes": None,
                                   "shared_bytes": None}),
                        **sass_counts(instructions), "error": None if res else "no ptxas -v entry"})
    return records


def _error_record(backend: str, kernel: str, arch: int, error: str, **extra: Any) -> dict[str, Any]:
    cls = classify(kernel)
    return {"backend": backend, "kernel": kernel, "case": extra.pop("case", kernel), "op": cls.op,
            "arch": arch, "dtype": extra.pop("dtype", "-"), "variant": extra.pop("variant", "-"),
            "streaming": cls.streaming, "registers": None, "spill_bytes": None,
            "stack_bytes": None, "shared_bytes": None, "global_loads": {}, "global_stores": {},
            "fp64_instructions": None, "fp64_conversions": None, "nc_loads": None, "local_accesses": None,
            "error": error,
            **extra}


# ------------------------------------------------------------------------------------------------------
# Triton kernels
# ------------------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """CPU stand-ins for the op arguments of one dtype and size (only their dtype, size and 16-byte
    alignment matter: the kernels are compiled, never run)."""

    n: int
    dtype: str

    def __post_init__(self) -> None:
        import torch

        from ssam_kernels.ops import bitmask

        dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "int32": torch.int32}
        elem = dtypes[self.dtype] if self.dtype != "int32" else torch.float32  # int32: scores only
        self.device = torch.device("cpu")
        self.w, self.g, self.backup = (torch.ones(self.n, dtype=elem) for _ in range(3))
        self.f = torch.zeros(self.n, dtype=torch.float32)
        self.mask = torch.zeros(bitmask.num_words(self.n), dtype=torch.int32)
        self.offsets = torch.zeros(bitmask.num_chunks(self.n) + 1, dtype=torch.int64)
        self.scale = torch.tensor(0.05, dtype=torch.float32)
        self.scale_64 = torch.tensor(0.05, dtype=torch.float64)
        self.scores = torch.ones(self.n, dtype=dtypes[self.dtype])
        self.prefix, self.threshold, self.quota = (torch.zeros((), dtype=torch.int64) for _ in range(3))
        self.counts = torch.zeros(bitmask.num_chunks(self.n), dtype=torch.int32)
        self.candidates = torch.zeros(1024, dtype=torch.int64)
        self.cursor = torch.zeros(1, dtype=torch.int32)


@dataclass(frozen=True)
class Case:
    """One call of a Triton op; every kernel launch it makes is compiled for each of ``dtypes``."""

    name: str
    dtypes: tuple[str, ...]
    call: Callable[[Any, Inputs], object]  # (ssam_kernels.ops.triton, inputs)


TRITON_CASES: tuple[Case, ...] = (
    Case("grad_sq_norm", FLOAT, lambda T, t: T.grad_sq_norm(t.g)),
    Case("grad_sq_norm adaptive", FLOAT, lambda T, t: T.grad_sq_norm(t.g, t.w)),
    Case("perturb_ masked", FLOAT, lambda T, t: T.perturb_(t.w, t.g, t.mask, t.offsets, t.backup, t.scale)),
    Case("perturb_ masked adaptive", FLOAT,
         lambda T, t: T.perturb_(t.w, t.g, t.mask, t.offsets, t.backup, t.scale, True)),
    Case("perturb_ dense", FLOAT, lambda T, t: T.perturb_(t.w, t.g, None, None, t.backup, t.scale)),
    Case("perturb_ dense adaptive", FLOAT,
         lambda T, t: T.perturb_(t.w, t.g, None, None, t.backup, t.scale, True)),
    Case("restore_ masked", FLOAT, lambda T, t: T.restore_(t.w, t.mask, t.offsets, t.backup)),
    Case("restore_ dense", FLOAT, lambda T, t: T.restore_(t.w, None, None, t.backup)),
    Case("fisher_accumulate_", FLOAT, lambda T, t: T.fisher_accumulate_(t.f, t.g, 0.5)),
    Case("axpby_", FLOAT, lambda T, t: T.axpby_(t.w, t.g, t.scale, t.scale_64)),
    # The first (widest, 11-bit) digit pass of the selection driver (ssam_kernels.ops.select.PASSES).
    Case("radix_histogram", SCORES, lambda T, t: T.radix_histogram(t.scores, t.prefix, 21, 11, True)),
    Case("radix_histogram filtered", SCORES,
         lambda T, t: T.radix_histogram(t.scores, t.prefix, 21, 11, True, t.mask, False)),
    Case("threshold_mask", SCORES, lambda T, t: T.threshold_mask(t.scores, t.threshold, t.quota, True)),
    # The bucket path's mask pass (ssam_kernels.ops.select: shift BUCKET_SHIFT = 10).
    Case("bucket_mask", SCORES, lambda T, t: T.bucket_mask_multi(
        [t.scores], t.prefix, 10, True, [None], True, [t.mask], [t.counts], [0], t.candidates, t.cursor)),
    Case("bucket_mask filtered", SCORES, lambda T, t: T.bucket_mask_multi(
        [t.scores], t.prefix, 10, True, [t.mask], False, [t.mask], [t.counts], [0], t.candidates, t.cursor)),
    Case("hash_scores", ("int32",), lambda T, t: T.hash_scores(t.n, 0, 1, 0, t.device)),
)

VARIANTS = {"aligned": 1 << 16, "unaligned": (1 << 16) + 5}
"""``N`` per variant: Triton specialises ints divisible by 16 (and 16-byte aligned pointers, which every
fresh allocation is), so ``N % 16`` decides whether it may vectorise."""


@dataclass(frozen=True)
class Launch:
    """One recorded ``kernel[grid](*args, **kwargs)``."""

    fn: Any  # triton.runtime.jit.JITFunction
    args: tuple[Any, ...]
    kwargs: dict[str, Any]


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[Launch]]:
    """Within the block, ``kernel[grid](...)`` records its arguments instead of compiling or launching."""
    from triton.runtime.jit import JITFunction

    launches: list[Launch] = []
    original = JITFunction.run

    def record(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.append(Launch(self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def compile_launch(launch: Launch, arch: int) -> tuple[Any, str]:
    """Compile ``launch`` for ``sm_<arch>`` as ``JITFunction.run`` would on that GPU: Triton's binder
    specialises the arguments, ``_pack_args`` splits signature / constexprs / attributes. Returns the
    ``CompiledKernel`` and the ``ptxas -v`` log."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kwargs = dict(launch.kwargs, debug=fn.debug or knobs.runtime.debug,
                  instrumentation_mode=knobs.compilation.instrumentation_mode,
                  fpsan_homomorphic_casts=knobs.compilation.fpsan_homomorphic_casts)
    bound, specialization, options = create_function_from_signature(fn.signature, fn.params, backend)(
        *launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):  # knobs.nvidia.dump_ptxas_log prints the ptxas -v log
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    return compiled, captured.getvalue()


def triton_kernels() -> set[str]:
    """Names of the Triton kernels in ``ssam_kernels.ops.triton``: its ``@triton.jit`` functions named
    ``*_kernel`` (the others are device helpers they call)."""
    import importlib
    import pkgutil

    from triton.runtime.jit import JITFunction

    from ssam_kernels.ops import triton as package

    names = set()
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        names |= {name for name, obj in vars(module).items() if isinstance(obj, JITFunction)
                  and name.endswith("_kernel") and obj.__module__ == module.__name__}
    return names


def triton_records(archs: Sequence[int], log: harness.Log,
                   case_filter: str | None = None) -> list[dict[str, Any]]:
    """One record per kernel launch of each :data:`TRITON_CASES` case × arch × dtype × variant."""
    try:
        import triton
        from triton import knobs
    except ImportError as exc:
        return [_error_record("triton", "*", arch, f"triton could not be imported ({exc})") for arch in archs]
    from ssam_kernels.ops import triton as ops_triton
    from ssam_kernels.ops.triton._config import INTERPRET
    from ssam_kernels.ops.tuning import TRITON_GPU

    if INTERPRET:
        raise RuntimeError("TRITON_INTERPRET is set: the kernels were built for the interpreter; run "
                           "python -m benchmarks.static without it")
    log.write(f"Triton {triton.__version__}, GPU launch config {TRITON_GPU}")
    cuobjdump = tool("cuobjdump")
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its log
    records = []
    cases = [c for c in TRITON_CASES if not case_filter or re.search(case_filter, c.name)]
    with tempfile.TemporaryDirectory() as tmp:
        knobs.cache.dir = tmp
        for case in cases:
            for dtype in case.dtypes:
                for variant, n in VARIANTS.items():
                    with recorded_launches() as launches:
                        case.call(ops_triton, Inputs(n, dtype))
                    for launch, arch in ((la, a) for la in launches for a in archs):
                        key = {"case": case.name, "dtype": dtype, "variant": variant}
                        records.append(_triton_record(launch, arch, key, cuobjdump, Path(tmp), log))
    if not case_filter:  # a kernel that no case launches would silently drop out of the report
        launched = {r["kernel"] for r in records}
        records += [_error_record("triton", name, arch, "no TRITON_CASES line launches it")
                    for name in sorted(triton_kernels() - launched) for arch in archs]
    return records


def _triton_record(launch: Launch, arch: int, key: dict[str, str], cuobjdump: str | None, tmp: Path,
                   log: harness.Log) -> dict[str, Any]:
    kernel = launch.fn.__name__
    label = f"triton {kernel} [{key['case']}] {key['dtype']} {key['variant']} sm_{arch}"
    try:
        compiled, ptxas_log = compile_launch(launch, arch)
    except Exception as exc:  # any compiler failure is recorded and the run goes on
        log.write(f"{label}: FAILED {type(exc).__name__}: {exc}")
        return _error_record("triton", kernel, arch, f"{type(exc).__name__}: {str(exc)[:500]}", **key)
    log.write(f"{label}\n{ptxas_log.strip()}")
    res = next(iter(parse_ptxas_log(ptxas_log).values()), None)
    counts: dict[str, Any] = {}
    if cuobjdump is not None:
        cubin = tmp / f"{kernel}.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([cuobjdump, "-sass", str(cubin)], capture_output=True, text=True, check=True)
        counts = sass_counts(next(iter(parse_sass(sass.stdout).values()), []))
    ptx = ptx_global_accesses(compiled.asm["ptx"])
    cls = classify(kernel)
    constexprs = {k: v for k, v in launch.kwargs.items() if k in launch.fn.arg_names}
    ptxas = res or {"registers": None, "spill_bytes": None, "stack_bytes": None}
    return {"backend": "triton", "kernel": kernel, **key, "op": cls.op, "arch": arch,
            "streaming": cls.streaming,
            "registers": ptxas["registers"], "spill_bytes": ptxas["spill_bytes"],
            "stack_bytes": ptxas["stack_bytes"], "shared_bytes": compiled.metadata.shared,
            **(counts or {"global_loads": {}, "global_stores": {}, "fp64_instructions": None,
                          "fp64_conversions": None, "nc_loads": None, "local_accesses": None}),
            "ptx_global_loads": ptx["loads"], "ptx_global_stores": ptx["stores"],
            "num_warps": compiled.metadata.num_warps, "constexprs": constexprs,
            "error": None if res and counts else "no ptxas -v log or no cuobjdump"}


# ------------------------------------------------------------------------------------------------------
# Targets and report
# ------------------------------------------------------------------------------------------------------

def wide_fraction(record: dict[str, Any]) -> float | None:
    """Share of the bytes moved by one execution of each SASS global load/store instruction that move
    through instructions at least 64 bits wide. Bytes rather than instructions: nvcc unrolls a native
    kernel's scalar tail loop (four 4-byte accesses per 16-byte vector access of the bulk loop), which an
    instruction count would weigh four times over."""
    counts: Counter[bool] = Counter()
    for table in (record["global_loads"], record["global_stores"]):
        for bits, n in table.items():
            counts[int(bits) >= 64] += n * int(bits)
    total = counts[True] + counts[False]
    return counts[True] / total if total else None


class Violation(NamedTuple):
    """A missed target of one record: ``target`` is "spills", "width", "fp64", "error" or "unclassified"."""

    record: dict[str, Any]
    target: str
    detail: str

    def __str__(self) -> str:
        r = self.record
        where = f"{r['case']}, {r['dtype']}, {r['variant']}, sm_{r['arch']}"
        return f"{r['backend']} `{r['kernel']}` ({where}): {self.detail}"


def violations(records: Sequence[dict[str, Any]]) -> list[Violation]:
    """Every missed target:

    - no spills (every kernel);
    - streaming kernels use >= 64-bit global accesses: at least half of the bytes of their global
      load/store instructions (:func:`wide_fraction`) go through >= 64-bit ones (the scalar loads of a
      scale or a mask offset are few; a kernel whose element accesses are 32-bit or narrower fails);
    - no fp64 arithmetic in the per-element work of streaming kernels on sm_86/sm_89 (any ``D*``
      arithmetic instruction in the kernel counts);
    - plus every compile error and every kernel no :data:`KERNEL_CLASSES` entry classifies.
    """
    out = []
    for r in records:
        if r["error"]:
            out.append(Violation(r, "error", f"compile error: {r['error']}"))
            continue
        if r["spill_bytes"]:
            out.append(Violation(r, "spills", f"{r['spill_bytes']} bytes of spills"))
        if r["op"] == "?":
            out.append(Violation(r, "unclassified", "unclassified kernel (add it to KERNEL_CLASSES)"))
        if not r["streaming"]:
            continue
        wide = wide_fraction(r)
        if wide is None or wide < 0.5:
            out.append(Violation(r, "width", f"global accesses {_widths(r['global_loads'])} loads, "
                                 f"{_widths(r['global_stores'])} stores: {_pct(wide)} of the bytes in "
                                 ">= 64-bit accesses"))
        if r["arch"] in CONSUMER_ARCHS and r["fp64_instructions"]:
            out.append(Violation(r, "fp64", f"{r['fp64_instructions']} fp64 arithmetic instructions"))
    return out


def violation_summary(found: Sequence[Violation]) -> str:
    """A table of the violations grouped by kernel, case and target."""
    groups: dict[tuple[str, ...], tuple[set[str], set[str]]] = {}
    for v in found:
        r = v.record
        key = (r["backend"], f"`{r['kernel']}`", r["case"], v.target)
        cases, archs = groups.setdefault(key, (set(), set()))
        cases.add(f"{r['dtype']} {r['variant']}")
        archs.add(f"sm_{r['arch']}")
    rows = [(*key, ", ".join(sorted(cases)), ", ".join(sorted(archs)))
            for key, (cases, archs) in groups.items()]
    return harness.markdown_table(("backend", "kernel", "case", "target", "dtype, variant", "archs"), rows)


def _widths(table: dict[str, int]) -> str:
    widest_first = sorted(table.items(), key=lambda kv: -int(kv[0]))
    return ", ".join(f"{n}x{bits}b" for bits, n in widest_first) or "none"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _row(r: dict[str, Any], width: int) -> tuple[str, ...]:
    head = (r["backend"], f"`{r['kernel']}`", r["case"], r["dtype"], r["variant"])
    if r["error"]:
        return (*head, "error", *["-"] * (width - len(head) - 1))
    return (*head, _cell(r["registers"]), _cell(r["spill_bytes"]), _cell(r["shared_bytes"]),
            _widths(r["global_loads"]), _cell(r.get("nc_loads")), _widths(r["global_stores"]),
            _pct(wide_fraction(r)), _cell(r["fp64_instructions"]), _cell(r["fp64_conversions"]))


def markdown(records: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    """The report: provenance, one table per arch, then the target violations."""
    lines = ["# Static kernel report", "", *(f"- **{k}**: {v}" for k, v in meta.items()), "",
             "Static SASS instruction counts (`cuobjdump -sass`), registers and spills from `ptxas -v`. "
             "Loads/stores: `count x bits`. *wide*: share of the bytes of the global load/store instructions "
             "(one execution each) in instructions >= 64 bits. "
             "*nc loads*: loads through the read-only path (`LDG...CONSTANT`). "
             "fp64: DADD/DMUL/DFMA/DMNMX/DSET(P) instructions (conv.: F2F/I2F/F2I to or from F64). Native "
             "kernels are one binary for any N (variant `any`, or the operation a template parameter "
             "selects: `Perturb`, `PerturbAdaptive`, `Restore`): their vector paths run when every pointer "
             "is 16-byte aligned, scalar accesses do the rest.", ""]
    header = ("backend", "kernel", "case", "dtype", "variant", "regs", "spill B", "smem B", "loads",
              "nc loads", "stores", "wide", "fp64", "fp64 conv.")
    for arch in sorted({r["arch"] for r in records}):
        rows = [_row(r, len(header)) for r in records if r["arch"] == arch]
        lines += [f"## sm_{arch}", "", harness.markdown_table(header, rows), ""]
    found = violations(records)
    lines += ["## Targets", "",
              "No spills; every streaming kernel (norm, perturb, restore, Fisher; masked and dense; aligned "
              "and unaligned) uses >= 64-bit global accesses (*wide* >= 50%); no fp64 arithmetic in "
              "streaming kernels on sm_86/sm_89. "
              f"**{len(found)} violations.**", "", violation_summary(found), "", "All of them:", "",
              *(f"- {v}" for v in found), ""]
    return "\n".join(lines)


def _tool_version(path: str | None) -> str:
    if path is None:
        return "absent"
    done = subprocess.run([path, "--version"], capture_output=True, text=True)
    return (done.stdout.strip().splitlines() or ["?"])[-1]


def provenance(archs: Sequence[int]) -> dict[str, Any]:
    dirty = bool(harness._git("status", "--porcelain", "--untracked-files=no"))
    meta: dict[str, Any] = {"date_utc": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                            "commit": harness._git("rev-parse", "HEAD"), "worktree_dirty": dirty,
                            "archs": ", ".join(f"sm_{a}" for a in archs),
                            "nvcc": _tool_version(shutil.which("nvcc")),
                            "cuobjdump": _tool_version(tool("cuobjdump"))}
    with contextlib.suppress(ImportError):
        import triton

        meta["triton"] = triton.__version__
        from triton.backends.nvidia.compiler import get_ptxas

        for arch in archs:  # Triton picks its bundled ptxas by architecture
            meta[f"triton ptxas for sm_{arch}"] = _tool_version(get_ptxas(arch).path)
        from ssam_kernels.ops.tuning import TRITON_GPU

        meta["triton launch config"] = str(TRITON_GPU)
    return meta


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (static.json, static.md, static.log)")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)), help="e.g. 80,86,89,90 (sm_80 ...)")
    p.add_argument("--backends", default="native,triton", help="native, triton or both")
    p.add_argument("--kernels", default=None, help="regex: only native kernels / Triton cases matching it")
    p.add_argument("--sources", nargs="+", default=[str(s) for s in SOURCES],
                   help="CUDA sources of the native kernels")
    p.add_argument("--from-json", action="store_true",
                   help="compile nothing: re-render static.md from --out's static.json and static.meta.json")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.from_json:
        records = json.loads((out / "static.json").read_text())
        (out / "static.md").write_text(markdown(records, json.loads((out / "static.meta.json").read_text())))
        return 0
    try:
        archs = [int(a) for a in args.archs.split(",") if a.strip()]
    except ValueError:
        p.error(f"--archs: expected comma-separated integers such as 80,90, got {args.archs!r}")
    backends = {b.strip() for b in args.backends.split(",") if b.strip()}
    if not backends or backends - {"native", "triton"}:
        p.error(f"--backends: expected native, triton or both, got {args.backends!r}")
    out.mkdir(parents=True, exist_ok=True)
    log = harness.Log(out / "static.log")
    meta = provenance(archs)
    log.write(json.dumps(meta))
    records: list[dict[str, Any]] = []
    if "native" in backends:
        records += native_records([Path(s) for s in args.sources], archs, log, args.kernels)
    if "triton" in backends:
        records += triton_records(archs, log, args.kernels)
    (out / "static.json").write_text(json.dumps(records, indent=1) + "\n")
    (out / "static.meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    (out / "static.md").write_text(markdown(records, meta))
    found = violations(records)
    log.write(f"{len(records)} records, {sum(bool(r['error']) for r in records)} compile errors, "
              f"{len(found)} target violations -> {out}/static.md")
    log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
