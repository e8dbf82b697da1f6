"""benchmarks.static: the parsers on embedded tool output, the targets, and a small real compile per backend
(a tiny CUDA source for sm_86 with nvcc; the Fisher kernel for sm_90 with Triton, in a subprocess without
the interpreter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import harness, static

SASS = """
Fatbin elf code:
================
arch = sm_86
code version = [1,8]

	code for sm_86
	.target	sm_86

		Function : _Z13fisher_kernelIfEvPfPKT_dl
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM86"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                    /* 0x00000a0000017a02 */
                                                                             /* 0x000fe40000000f00 */
        /*0010*/                   LDG.E.128 R4, [R2.64] ;
        /*0020*/              @!P0 LDG.E.128.CONSTANT R8, [R2.64+0x10] ;
        /*0030*/                   LDG.E R12, [R2.64] ;
        /*0040*/                   LDG.E.U16 R13, [R2.64] ;
        /*0050*/                   F2F.F64.F32 R14, R4 ;
        /*0060*/                   DFMA R14, R14, R14, R16 ;
        /*0070*/               @P1 DADD R14, R14, R18 ;
        /*0080*/                   DSETP.GT.AND P0, PT, R14, R16, PT ;
        /*0090*/                   F2F.F32.F64 R4, R14 ;
        /*00a0*/                   STG.E.64 [R2.64], R4 ;
        /*00b0*/                   STL.64 [R1], R4 ;
        /*00c0*/                   DEPBAR.LE SB0, 0x0 ;
        /*00d0*/                   EXIT ;
		..........
arch = sm_90
		Function : _Z13restore_kernelPfPKfl
        /*0000*/                   LDG.E R0, desc[UR4][R2.64] ;
        /*0010*/                   STG.E.U16 desc[UR4][R4.64], R0 ;
"""

PTXAS_LOG = """
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z13fisher_kernelIfEvPfPKT_dl' for 'sm_86'
ptxas info    : Function properties for _Z13fisher_kernelIfEvPfPKT_dl
    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 392 bytes cmem[0]
ptxas-blackwell info    : Compiling entry function '_histogram_kernel' for 'sm_90a'
ptxas-blackwell info    : Function properties for _histogram_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas-blackwell info    : Used 32 registers, used 1 barriers, 8192 bytes smem, 400 bytes cmem[0]
"""

PTX = """
	@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];
	ld.global.L1::evict_last.b64 %rd5, [%rd4];
	ld.global.b16 %rs1, [%rd6];
	ld.shared.v4.b32 { %r5, %r6, %r7, %r8 }, [%r9];
	st.global.v2.b32 [ %rd7 + 0 ], { %r1, %r2 };
"""


def test_parse_sass_counts_widths_fp64_and_local() -> None:
    functions = static.parse_sass(SASS)
    assert set(functions) == {("_Z13fisher_kernelIfEvPfPKT_dl", 86), ("_Z13restore_kernelPfPKfl", 90)}
    counts = static.sass_counts(functions["_Z13fisher_kernelIfEvPfPKT_dl", 86])
    assert counts == {"global_loads": {"16": 1, "32": 1, "128": 2}, "global_stores": {"64": 1},
                      "fp64_instructions": 3, "fp64_conversions": 2, "nc_loads": 1, "local_accesses": 1}
    other = static.sass_counts(functions["_Z13restore_kernelPfPKfl", 90])
    assert other["global_loads"] == {"32": 1} and other["global_stores"] == {"16": 1}


def test_access_bits() -> None:
    names = ("LDG.E", "LDG.E.64", "STG.E.128", "LDG.E.S8", "LDG.E.EL.128.CONSTANT", "STG.E.U16")
    assert [static.access_bits(i) for i in names] == [32, 64, 128, 8, 128, 16]


def test_parse_ptxas_log() -> None:
    res = static.parse_ptxas_log(PTXAS_LOG)
    assert res[("_Z13fisher_kernelIfEvPfPKT_dl", 86)] == {"registers": 40, "spill_bytes": 12,
                                                          "stack_bytes": 8, "shared_bytes": 0}
    assert res[("_histogram_kernel", 90)] == {"registers": 32, "spill_bytes": 0, "stack_bytes": 0,
                                              "shared_bytes": 8192}


def test_ptx_global_accesses() -> None:
    assert static.ptx_global_accesses(PTX) == {"loads": {"16": 1, "64": 1, "128": 1}, "stores": {"64": 1}}


def test_classify_native_and_triton_names() -> None:
    assert static.classify("masked_kernel").op == "perturb_/restore_"
    assert static.classify("_perturb_kernel").streaming
    assert static.classify("sq_norm_partial_kernel").streaming
    assert not static.classify("sq_norm_final_kernel").streaming
    assert static.classify("_threshold_mask_kernel").op == "select_topk"
    assert static.classify("unknown_thing") is static.UNCLASSIFIED


def _record(**changes: object) -> dict:
    base = {"backend": "triton", "kernel": "_fisher_kernel", "case": "fisher_accumulate_",
            "op": "fisher_accumulate_", "arch": 80, "dtype": "fp32", "variant": "aligned", "streaming": True,
            "registers": 32, "spill_bytes": 0, "stack_bytes": 0, "shared_bytes": 0,
            "global_loads": {"128": 4}, "global_stores": {"128": 2},
            "fp64_instructions": 24, "fp64_conversions": 0, "local_accesses": 0, "error": None}
    return {**base, **changes}


def test_violations() -> None:
    assert static.violations([_record()]) == []  # fp64 on sm_80 is not a target, wide accesses pass
    found = static.violations([
        _record(arch=86),                                                     # fp64 on a consumer arch
        _record(global_loads={"32": 16, "64": 1}, global_stores={"32": 8}),   # scalar element accesses
        _record(spill_bytes=8),
        _record(error="ptxas failed"),
        _record(streaming=False, global_loads={"32": 3}, arch=89),            # not a streaming kernel
        _record(kernel="new_kernel", op="?", streaming=False),
    ])
    assert [v.target for v in found] == ["fp64", "width", "spills", "error", "unclassified"]
    text = [str(v) for v in found]
    assert "24 fp64" in text[0] and "sm_86" in text[0]
    assert "8% of the bytes in >= 64-bit accesses" in text[1]  # 8 of 8 + 16·4 + 8·4 bytes
    assert "8 bytes of spills" in text[2]
    assert "compile error: ptxas failed" in text[3]
    assert "unclassified" in text[4]
    summary = static.violation_summary(found)
    assert "| triton | `_fisher_kernel` | fisher_accumulate_ | fp64 | fp32 aligned | sm_86 |" in summary


def test_markdown_lists_records_and_violations() -> None:
    text = static.markdown([_record(), _record(arch=89), _record(error="boom", arch=89)], {"commit": "abc"})
    assert "- **commit**: abc" in text and "## sm_80" in text and "## sm_89" in text
    assert "4x128b" in text and "**2 violations.**" in text


def test_cli_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        static.main(["--out", str(tmp_path), "--archs", "sm80"])
    with pytest.raises(SystemExit):
        static.main(["--out", str(tmp_path), "--backends", "cuda"])


def test_triton_records_refuse_interpreted_kernels() -> None:
    pytest.importorskip("triton")
    from ssam_kernels.ops.triton._config import INTERPRET

    if not INTERPRET:
        pytest.skip("the kernels were built for a GPU here")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        static.triton_records([90], harness.Log(None, quiet=True))


TINY_CUDA = r"""
#include <cuda_runtime.h>
// A vectorised streaming kernel with fp64 arithmetic, a scalar one, and a template instantiation the
// op's dtypes exclude (int); in an anonymous namespace, as in csrc/cuda/*.cuh.
namespace {
template <typename T>
__global__ void fisher_kernel(float4* f, const float4* g, double alpha, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) {
    float4 a = f[i], b = g[i];
    a.x = (float)(a.x + alpha * ((double)b.x * b.x));
    a.y = (float)(a.y + alpha * ((double)b.y * b.y));
    a.z = (float)(a.z + alpha * ((double)b.z * b.z));
    a.w = (float)(a.w + alpha * ((double)b.w * b.w));
    f[i] = a;
  }
}
template __global__ void fisher_kernel<float>(float4*, const float4*, double, long);
template __global__ void fisher_kernel<int>(float4*, const float4*, double, long);
__global__ void restore_kernel(float* w, const float* b, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) w[i] = b[i];
}
// An operation tag as a second template parameter: the record's variant.
struct Restore {};
template <typename T, typename Op>
__global__ void element_kernel(float4* w, const float4* b, long n) {
  long i = blockIdx.x * (long)blockDim.x + threadIdx.x;
  if (i < n) w[i] = b[i];
}
template __global__ void element_kernel<float, Restore>(float4*, const float4*, long);
}  // namespace
"""


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++filt") is None, reason="nvcc not found")
def test_native_records_of_a_tiny_source(tmp_path: Path) -> None:
    if static.tool("cuobjdump") is None:
        pytest.skip("cuobjdump not found (neither on PATH nor bundled with triton)")
    source = tmp_path / "tiny.cu"
    source.write_text(TINY_CUDA)
    records = static.native_records([source], [86], harness.Log(tmp_path / "log", quiet=True))
    by_kernel = {(r["kernel"], r["dtype"]): r for r in records}
    assert set(by_kernel) == {("fisher_kernel", "fp32"), ("restore_kernel", "-"),  # <int> left out
                              ("element_kernel", "fp32")}
    assert by_kernel["element_kernel", "fp32"]["variant"] == "Restore"
    assert by_kernel["element_kernel", "fp32"]["op"] == "perturb_/restore_"
    for r in records:
        assert r["error"] is None and r["arch"] == 86
        assert r["variant"] == ("Restore" if r["kernel"] == "element_kernel" else "any")
        assert r["registers"] > 0 and r["spill_bytes"] == 0 and sum(r["global_loads"].values()) > 0
    fisher = by_kernel["fisher_kernel", "fp32"]
    assert fisher["global_loads"].get("128", 0) >= 2 and fisher["fp64_instructions"] > 0
    found = static.violations(records)
    assert {(v.record["kernel"], v.target) for v in found} == {("fisher_kernel", "fp64"),
                                                                ("restore_kernel", "width")}


def test_triton_fisher_kernel_for_sm90(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")  # compile the GPU kernels, not the interpreter's
    done = subprocess.run([sys.executable, "-m", "benchmarks.static", "--out", str(tmp_path), "--archs", "90",
                           "--backends", "triton", "--kernels", "^fisher"], cwd=harness.REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    records = json.loads((tmp_path / "static.json").read_text())
    assert {(r["dtype"], r["variant"]) for r in records} == {(d, v) for d in static.FLOAT
                                                            for v in static.VARIANTS}
    keys = {"backend", "kernel", "arch", "dtype", "variant", "registers", "spill_bytes", "shared_bytes",
            "global_loads", "global_stores", "fp64_instructions"}
    for r in records:
        assert keys <= set(r) and r["error"] is None, r
        assert r["backend"] == "triton" and r["kernel"] == "_fisher_kernel" and r["arch"] == 90
        assert r["registers"] > 0 and r["spill_bytes"] >= 0 and sum(r["global_loads"].values()) > 0
        assert all(int(bits) in (8, 16, 32, 64, 128) for bits in r["global_loads"])
        assert r["constexprs"]["BLOCK"] > 0
    # N % 16 == 0 reaches the compiler as a divisibility hint: the aligned fp32 kernel loads in vectors.
    aligned = next(r for r in records if r["dtype"] == "fp32" and r["variant"] == "aligned")
    assert max(map(int, aligned["global_loads"])) >= 64
    assert (tmp_path / "static.md").read_text().startswith("# Static kernel report")


COVERAGE = """
import json
from benchmarks import static
from ssam_kernels.ops import triton as ops_triton
launched = set()
for case in static.TRITON_CASES:
    with static.recorded_launches() as launches:
        case.call(ops_triton, static.Inputs(1 << 12, case.dtypes[0]))
    assert launches, case.name
    launched |= {launch.fn.__name__ for launch in launches}
print(json.dumps({"found": sorted(static.triton_kernels()), "launched": sorted(launched)}))
"""


def test_every_triton_kernel_has_a_case() -> None:
    """A new ``*_kernel`` in ssam_kernels.ops.triton without a TRITON_CASES line fails here (and is
    reported as an error record by a full run)."""
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="0")
    done = subprocess.run([sys.executable, "-c", COVERAGE], cwd=harness.REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    found, launched = set(result["found"]), set(result["launched"])
    assert "_perturb_kernel" in found and found <= launched, (found, launched)
