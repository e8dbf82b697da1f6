"""What is specific to the Triton backend: availability, the registered ops (opcheck, torch.compile),
where and with what arguments its kernels launch (on the tensors' device, no Python floats, aligned and
misaligned launches), large sizes and past-int32 selection on a GPU, and that every kernel compiles for
sm_90 without one. Its parity with the reference oracle, under each launch configuration, is in
tests/test_parity.py.

Without CUDA the kernels run in Triton's interpreter on CPU tensors: ``TRITON_INTERPRET=1`` must be
set before triton is first imported, so this module sets it at import time (pytest imports test
modules before running any test). If triton was already imported without it, or is missing, every
test here is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import types
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from ssam_kernels import ops
from ssam_kernels.ops import bitmask, reference
from tests.helpers import DTYPES

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
_WHY = ops._unavailable("triton", DEVICE.type)
pytestmark = pytest.mark.skipif(_WHY is not None, reason=f"Triton backend unavailable: {_WHY}")

if _WHY is None:
    import ssam_kernels.ops.triton as tb
    from ssam_kernels.ops.triton import _config

    LAUNCH = _config.as_ints(_config.launch_config(ops.Tuning()))  # the registered ops' launch argument

_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _gen(*params: object) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh draws per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _randn(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    # Never zero (a zero hides unwritten outputs and makes adaptive steps vanish).
    x = torch.randn(n, generator=gen)
    x = torch.where(x.abs() < 1e-3, torch.full_like(x, 0.5), x)
    return x.to(dtype).to(DEVICE)


def _mask(n: int, sparsity: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
    bits = torch.rand(n, generator=gen) >= sparsity
    words, offsets = bitmask.from_bool(bits)
    return words.to(DEVICE), offsets.to(DEVICE), int(bits.sum())


def assert_bits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    view = _INT_VIEW.get(actual.dtype, actual.dtype)
    assert torch.equal(actual.view(view).cpu(), expected.view(view).cpu())


# ----------------------------------------------------------------------------------------------------
# Availability and registration
# ----------------------------------------------------------------------------------------------------

def test_unavailable_reason() -> None:
    assert tb.unavailable_reason(DEVICE.type) is None
    assert "meta" in tb.unavailable_reason("meta")
    assert "triton" in ops.available_backends()


def test_custom_ops_registered() -> None:
    gen = _gen("opcheck")
    W, G = _randn(100, torch.float32, gen), _randn(100, torch.float32, gen)
    mask, offsets, k = _mask(100, 0.5, gen)
    backup = torch.empty(k, device=DEVICE)
    scale = torch.tensor(0.25, device=DEVICE)
    F = _randn(100, torch.float32, gen).abs()
    checks = ("test_schema", "test_faketensor")
    torch.library.opcheck(torch.ops.ssam_kernels.triton_grad_sq_norm_multi, ([G, G[:7]], [W, None], LAUNCH),
                          test_utils=checks)
    W2, G2 = _randn(40, torch.float32, gen), _randn(40, torch.float32, gen)  # a dense entry
    lists = ([W, W2], [G, G2], [mask, None], [offsets, None], [backup, torch.empty(40, device=DEVICE)])
    torch.library.opcheck(torch.ops.ssam_kernels.triton_perturb_multi_, (*lists, scale, True, LAUNCH),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.ssam_kernels.triton_restore_multi_,
                          ([W], [mask], [offsets], [backup], LAUNCH), test_utils=checks)
    torch.library.opcheck(torch.ops.ssam_kernels.triton_fisher_accumulate_multi_, ([F], [G], 0.5, LAUNCH),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.ssam_kernels.triton_axpby_multi_, ([W2], [G2], scale, scale, LAUNCH),
                          test_utils=checks)


def test_torch_compile_keeps_semantics() -> None:
    """The registered ops inside a compiled function: one graph, the same results as eager."""
    gen = _gen("compile")
    W0, G = _randn(3000, torch.float32, gen), _randn(3000, torch.float32, gen)
    mask, offsets, k = _mask(3000, 0.9, gen)

    def step(W: torch.Tensor, backup: torch.Tensor) -> torch.Tensor:
        total = torch.ops.ssam_kernels.triton_grad_sq_norm_multi([G], [None], LAUNCH)
        scale = (0.05 / (total.sqrt() + 1e-12)).float()
        torch.ops.ssam_kernels.triton_perturb_multi_([W], [G], [mask], [offsets], [backup], scale, False,
                                                     LAUNCH)
        return W * 2

    eager_W, eager_backup = W0.clone(), torch.full((k,), float("nan"), device=DEVICE)
    eager_out = step(eager_W, eager_backup)
    compiled_W, compiled_backup = W0.clone(), torch.full((k,), float("nan"), device=DEVICE)
    compiled_out = torch.compile(step, backend="aot_eager", fullgraph=True)(compiled_W, compiled_backup)
    assert_bits(compiled_W, eager_W)
    assert_bits(compiled_backup, eager_backup)
    assert_bits(compiled_out, eager_out)


def _record_launches(monkeypatch: pytest.MonkeyPatch) -> tuple[set[str], list[tuple[str, list, list]]]:
    """Runs every op on the Triton backend with each kernel wrapped to record its launches:
    ``(kernel names, [(kernel, devices made current by on_device, argument types)])``."""
    from ssam_kernels.ops.triton import fisher, hashing, norm, perturb, radix

    current: list[torch.device] = []
    launches: list[tuple[str, list, list]] = []

    @contextlib.contextmanager
    def on_device(t: torch.Tensor):
        current.append(t.device)
        yield
        current.pop()

    class Recorder:
        def __init__(self, name: str, kernel: object) -> None:
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid: object):
            def launch(*args: object, **kwargs: object) -> object:
                launches.append((self.name, list(current), [type(a) for a in args]))
                return self.kernel[grid](*args, **kwargs)
            return launch

    monkeypatch.setattr(_config, "on_device", on_device, raising=False)
    modules = (fisher, hashing, norm, perturb, radix)
    kernels = {f"{m.__name__}.{name}": (m, name) for m in modules for name in vars(m)
               if name.startswith("_") and name.endswith("_kernel")}
    for qualified, (module, name) in kernels.items():
        monkeypatch.setattr(module, name, Recorder(qualified, getattr(module, name)))
    gen = _gen("launches")
    W, G = _randn(3000, torch.float32, gen), _randn(3000, torch.float32, gen)
    mask, offsets, k = _mask(3000, 0.5, gen)
    backup = torch.empty(k, device=DEVICE)
    ops.grad_sq_norm(G, W, backend="triton")
    ops.perturb_(W, G, mask, offsets, backup, torch.tensor(0.5, device=DEVICE), backend="triton")
    ops.restore_(W, mask, offsets, backup, backend="triton")
    ops.fisher_accumulate_(W, G, 0.25, backend="triton")
    ops.dynamic_update([mask], [G], 100, "random", 1, 2, backend="triton")  # the bucket path
    # A bucket past the capacity: the third histogram pass, the tie count and threshold_mask.
    ops.select_topk([torch.zeros(3000, device=DEVICE)], 100, backend="triton",
                    tuning=ops.Tuning(bucket_min_capacity=1))
    return set(kernels), launches


def test_every_launch_runs_on_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the *current* CUDA device and stream: tensors on ``cuda:1`` would fail or race.
    Every launch must happen inside ``_config.on_device`` of the op's tensors."""
    kernels, launches = _record_launches(monkeypatch)
    assert {name for name, _, _ in launches} == kernels
    for name, devices, _ in launches:
        assert devices == [DEVICE], f"{name} launched outside on_device"


def test_no_launch_gets_a_python_float(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU JIT types a Python float argument fp32 while the interpreter keeps float64, so a float
    ``alpha`` was rounded on the GPU only: scalars travel as tensors or ints."""
    kernels, launches = _record_launches(monkeypatch)
    assert {name for name, _, _ in launches} == kernels
    for name, _, arg_types in launches:
        assert float not in arg_types, f"{name} got a Python float (fp32 on the GPU)"


def test_on_device_makes_the_tensors_device_current(monkeypatch: pytest.MonkeyPatch) -> None:
    entered: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "device",
                        lambda device: entered.append(device) or contextlib.nullcontext())
    with _config.on_device(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _config.on_device(torch.empty(1)):
        pass
    assert entered == [torch.device("cuda", 1)]  # CPU tensors (the interpreter): nothing to switch


def _view_at(n: int, offset: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """``n`` random entries starting ``offset`` entries into a fresh buffer (16-byte aligned iff
    ``offset · element_size`` is a multiple of 16)."""
    return _randn(n + offset, dtype, gen)[offset:]


@pytest.mark.parametrize("dtype", DTYPES)
def test_misaligned_tensors_launch_apart(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> None:
    """The aligned launches tell the compiler their pointers are 16-byte aligned (``tl.multiple_of``);
    a view that starts off a 16-byte boundary (a flat segment's, a slice's) must go to the other launch
    of its op, and every entry still gets the reference's result."""
    flags: list[tuple[str, bool]] = []
    launch = _config.launch

    def recorded(kernel: object, grid: tuple[int, ...], *args: object, **kwargs: object) -> None:
        flags.append((kernel.__name__, kwargs["ALIGNED"]))
        launch(kernel, grid, *args, **kwargs)

    monkeypatch.setattr(_config, "launch", recorded)
    gen = _gen("aligned", dtype)
    sizes = [1037, 70, 45]
    # Entry 0 aligned; entry 1: W and G aligned, its (dense) backup not; entry 2: W and G at entry 1.
    W = [_view_at(n, off, dtype, gen) for n, off in zip(sizes, (0, 0, 1), strict=True)]
    G = [_view_at(n, off, dtype, gen) for n, off in zip(sizes, (0, 0, 1), strict=True)]
    F = [_view_at(n, 0, torch.float32, gen).abs() for n in sizes]
    mask, offsets, live = zip(*(_mask(n, 0.5, gen) for n in sizes), strict=True)
    masks, offs = [mask[0], None, mask[2]], [offsets[0], None, offsets[2]]
    backup = [torch.empty(live[0], dtype=dtype), _view_at(sizes[1], 1, dtype, gen),
              torch.empty(live[2], dtype=dtype)]

    got = tb.grad_sq_norm_multi(G, [None, None, W[2]])
    want = sum(reference.grad_sq_norm(g, w) for g, w in zip(G, [None, None, W[2]], strict=True))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=0)
    assert flags == [("_sq_norm_kernel", True), ("_sq_norm_kernel", False)]  # plain: 0, 1; ASAM: 2

    flags.clear()
    F_ref = [f.clone() for f in F]
    tb.fisher_accumulate_multi_(F, G, 0.37)
    for f, f_ref, g in zip(F, F_ref, G, strict=True):
        reference.fisher_accumulate_(f_ref, g, 0.37)
        assert_bits(f, f_ref)
    assert flags == [("_fisher_kernel", True), ("_fisher_kernel", False)]

    flags.clear()
    W0 = [w.clone() for w in W]
    scale = torch.tensor(0.25)
    tb.perturb_multi_(W, G, masks, offs, backup, scale)
    for j in range(3):
        w_ref, b_ref = W0[j].clone(), torch.empty_like(backup[j])
        reference.perturb_(w_ref, G[j], masks[j], offs[j], b_ref, scale)
        assert_bits(W[j], w_ref)
        assert_bits(backup[j], b_ref)
    tb.restore_multi_(W, masks, offs, backup)
    for w, w0 in zip(W, W0, strict=True):
        assert_bits(w, w0)
    assert flags == [("_perturb_kernel", True), ("_perturb_kernel", False), ("_perturb_kernel", False),
                     ("_restore_kernel", True), ("_restore_kernel", False), ("_restore_kernel", False)]


# ----------------------------------------------------------------------------------------------------
# GPU: large sizes (skipped without CUDA)
# ----------------------------------------------------------------------------------------------------

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("n", [(1 << 27) - 5, 1 << 27])
def test_gpu_large_elementwise(n: int, dtype: torch.dtype) -> None:
    gen = torch.Generator(device="cuda").manual_seed(n)
    W0 = torch.randn(n, device="cuda", generator=gen).to(dtype)
    G = torch.randn(n, device="cuda", generator=gen).to(dtype)
    bits = torch.rand(n, device="cuda", generator=gen) >= 0.9
    mask, offsets = bitmask.from_bool(bits)
    k = int(bits.sum())
    torch.testing.assert_close(tb.grad_sq_norm(G, W0), reference.grad_sq_norm(G, W0), rtol=1e-12, atol=0)
    assert_bits(tb.grad_sq_norm(G), tb.grad_sq_norm(G))
    scale = torch.tensor(0.01, device="cuda")
    W, W_ref = W0.clone(), W0.clone()
    backup = torch.full((k,), float("nan"), dtype=dtype, device="cuda")
    tb.perturb_(W, G, mask, offsets, backup, scale, True)
    reference.perturb_(W_ref, G, mask, offsets, torch.empty_like(backup), scale, True)
    assert_bits(backup, W0[bits])
    assert_bits(W, W_ref)
    tb.restore_(W, mask, offsets, backup)
    assert_bits(W, W0)
    scores = [G.float().abs()]
    for (m, o), (m_ref, o_ref) in zip(ops.select_topk(scores, n // 2, backend="triton"),
                                      ops.select_topk(scores, n // 2, backend="reference"), strict=True):
        assert_bits(m, m_ref)
        assert_bits(o, o_ref)


@gpu
@pytest.mark.gpu
@pytest.mark.slow
def test_gpu_select_topk_past_int32() -> None:
    n = (1 << 31) + 4099
    free, _ = torch.cuda.mem_get_info()
    if free < 24 * (1 << 30):
        pytest.skip(f"needs ~24 GiB of free GPU memory, {free / (1 << 30):.1f} GiB free")
    # fp16 scores with heavy ties (2^16 distinct values): the threshold is shared by ~32K entries.
    scores = torch.randint(-(1 << 15), 1 << 15, (n,), dtype=torch.int16, device="cuda").view(torch.float16)
    scores[-3:] = 70000.0  # rounds to inf in fp16: the very last entries are among the largest
    k = n // 3
    (mask, offsets), = ops.select_topk([scores], k, backend="triton")
    assert int(offsets[-1]) == k and int(bitmask.count(mask)) == k
    selected = bitmask.unpack(mask, n)
    assert bool(selected[-3:].all())
    # Every selected key >= every unselected key, and ties taken in index order; in blocks, because
    # int64 keys of all 2^31 entries would need 16 GiB.
    low, high, last_taken_tie, first_skipped_tie = 1 << 32, -1, -1, n
    block = 1 << 27
    for start in range(0, n, block):
        keys, taken = reference.score_keys(scores[start: start + block]), selected[start: start + block]
        low = min(low, int(keys[taken].min())) if bool(taken.any()) else low
        high = max(high, int(keys[~taken].max())) if bool((~taken).any()) else high
    assert low >= high
    for start in range(0, n, block):
        keys, taken = reference.score_keys(scores[start: start + block]), selected[start: start + block]
        ties = keys == low
        if bool((ties & taken).any()):
            last_taken_tie = start + int((ties & taken).nonzero()[-1])
        if bool((ties & ~taken).any()):
            first_skipped_tie = min(first_skipped_tie, start + int((ties & ~taken).nonzero()[0]))
    assert last_taken_tie < first_skipped_tie


# ----------------------------------------------------------------------------------------------------
# Without a GPU: every kernel compiles for sm_90 (catches GPU-only lowering errors on CPU CI)
# ----------------------------------------------------------------------------------------------------

def _compile_for_sm90() -> None:
    """Compile each kernel ahead of time for ``cuda:90`` (PTX and cubin via the bundled ptxas)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ssam_kernels.ops.triton import fisher, hashing, norm, perturb, radix

    def build(fn: object, pointers: dict[str, str], scalars: dict[str, str], constexprs: dict) -> None:
        signature = {**pointers, **scalars, **dict.fromkeys(constexprs, "constexpr")}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                       target=GPUTarget("cuda", 90, 32), options={"num_warps": 8, "enable_fp_fusion": False})

    n = {"N": "i64"}
    vec = {"fp32": 4, "fp64": 2, "bf16": 8, "fp16": 8}  # entries per 16-byte access
    for dt, aligned in ((d, a) for d in ("fp32", "fp64", "bf16", "fp16") for a in (True, False)):
        table = {"table_ptr": "*i64", "g_like": f"*{dt}"}
        for adaptive in (False, True):
            build(norm._sq_norm_kernel, {**table, "partial_ptr": "*fp64"}, {"ENTRIES_AT": "i64"},
                  {"ADAPTIVE": adaptive, "ALIGNED": aligned, "BLOCK": 2048, "TILES": 8})
        build(fisher._fisher_kernel, {**table, "alpha_ptr": "*fp32"}, {"ENTRIES_AT": "i64"},
              {"ALIGNED": aligned, "BLOCK": 2048, "TILES": 8})
        for has_mask in (True, False):
            for offsets in ("i32", "i64"):
                table = {"table_ptr": "*i64", "w_like": f"*{dt}", "off_like": f"*{offsets}"}
                flags = {"HAS_MASK": has_mask, "ALIGNED": aligned, "CHUNKS": 4, "VEC": vec[dt]}
                for scale in ("fp32", "fp64"):
                    build(perturb._perturb_kernel, {**table, "scale_ptr": f"*{scale}"},
                          {"ENTRIES_AT": "i64"}, {**flags, "ADAPTIVE": True})
                build(perturb._restore_kernel, table, {"ENTRIES_AT": "i64"}, flags)
    for st in ("fp32", "fp64", "bf16", "i32"):
        flags = {"LARGEST": False, "INT_SCORES": st == "i32", "HAS_FILTER": True, "FILTER_VALUE": False,
                 "BLOCK": 2048}
        scores = {"table_ptr": "*i64", "scores_like": f"*{st}"}
        entries = {"ENTRIES_AT": "i64"}
        build(radix._histogram_kernel, {**scores, "prefix_ptr": "*i64", "partial_ptr": "*i32"},
              {**entries, "ROWS": "i64", "ITERS": "i32", "PROGRAMS": "i32"},
              {"SHIFT": 21, "BITS": 11, **flags})
        build(radix._tie_count_kernel, {**scores, "threshold_ptr": "*i64", "count_ptr": "*i32"}, entries,
              flags)
        build(radix._threshold_mask_kernel, {**scores, "threshold_ptr": "*i64", "quota_ptr": "*i64",
                                             "ties_before_ptr": "*i64"}, entries, flags)
    build(hashing._hash_kernel, {"out_ptr": "*i32"}, {**n, "base": "i64", "key": "i32"}, {"BLOCK": 2048})


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU tests compile and run the kernels")
def test_kernels_compile_for_sm90(tmp_path: object) -> None:
    # A fresh process: these kernels were decorated for the interpreter here.
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(ops.__file__))))
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": path}
    done = subprocess.run([sys.executable, __file__, "--compile-sm90"], env=env, capture_output=True,
                          text=True, timeout=600, check=False)
    if "ptxas" in done.stderr and done.returncode != 0 and "not found" in done.stderr:
        pytest.skip("triton's ptxas is not available")
    assert done.returncode == 0, done.stderr[-4000:]


if __name__ == "__main__" and sys.argv[1:] == ["--compile-sm90"]:
    _compile_for_sm90()
