"""The list forms of the per-step ops: ``grad_sq_norm``, ``perturb_``, ``restore_`` and
``fisher_accumulate_`` over lists of tensors, on every backend available on CPU, against the reference
backend's single-tensor ops applied tensor by tensor (the oracle), bit for bit; validation once per list
with errors naming the entry; and launches per step that do not grow with the number of parameters.
"""

from __future__ import annotations

import pytest
import torch

import ssam_kernels as sk
from ssam_kernels import ops
from ssam_kernels.ops import bitmask
from tests.helpers import native_op_counts, triton_launch_log

FAST = [b for b in ("native", "triton") if ops._unavailable(b, "cpu") is None]
ALL_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
SIZES = [0, 1, 31, 1025, 33, 4099, 2048]  # empty, one, odd, chunk + 1, block-sized


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The bit pattern of a float tensor, so NaN == NaN and -0.0 != +0.0."""
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _case(sizes: list[int], dtypes: list[torch.dtype], sparsity: float | None, seed: int) -> dict:
    """A list of (W, G, mask, offsets, backup) per entry; ``sparsity`` None: all dense; else each entry is
    masked at that sparsity except every third, which is dense (a None mask in a list)."""
    gen = torch.Generator().manual_seed(seed)
    case: dict = {k: [] for k in ("W", "G", "mask", "offsets", "backup")}
    for j, (n, dtype) in enumerate(zip(sizes, dtypes, strict=True)):
        case["W"].append(torch.randn(n, generator=gen).to(dtype))
        case["G"].append(torch.randn(n, generator=gen).to(dtype))
        if sparsity is None or j % 3 == 2:
            words = offsets = None
            live = n
        else:
            selected = torch.rand(n, generator=gen) >= sparsity
            words, offsets = bitmask.from_bool(selected)
            live = int(selected.sum())
        case["mask"].append(words)
        case["offsets"].append(offsets)
        case["backup"].append(torch.full((live,), float("nan")).to(dtype))  # poisoned
    return case


def _clone(case: dict) -> dict:
    return {k: [t.clone() if t is not None else None for t in v] for k, v in case.items()}


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b, strict=True))


lists = pytest.mark.parametrize("sizes,dtypes", [
    (SIZES, [torch.float32] * len(SIZES)),
    (SIZES, [ALL_DTYPES[j % 4] for j in range(len(SIZES))]),  # mixed dtypes: one call per dtype
    ([4099, 0, 7], [torch.float64] * 3),
])


@pytest.mark.parametrize("backend", FAST)
@lists
@pytest.mark.parametrize("sparsity", [None, 0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_restore_lists_match_reference(backend, sizes, dtypes, sparsity, adaptive):
    case = _case(sizes, dtypes, sparsity, seed=len(sizes) + int(10 * (sparsity or 0)))
    expected, got = _clone(case), _clone(case)
    scale = torch.tensor(0.375)
    for j in range(len(sizes)):  # the oracle: the reference's single-tensor op, tensor by tensor
        ops.perturb_(*(expected[k][j] for k in ("W", "G", "mask", "offsets", "backup")), scale, adaptive,
                     backend="reference")
    ops.perturb_(got["W"], got["G"], got["mask"], got["offsets"], got["backup"], scale, adaptive,
                 backend=backend)
    assert _same(got["W"], expected["W"]) and _same(got["backup"], expected["backup"])
    ops.restore_(got["W"], got["mask"], got["offsets"], got["backup"], backend=backend)
    assert _same(got["W"], case["W"])


@pytest.mark.parametrize("backend", FAST)
def test_perturb_list_skips_on_nonfinite_scale(backend):
    case = _case([33, 1025], [torch.float32] * 2, 0.5, seed=3)
    got = _clone(case)
    ops.perturb_(got["W"], got["G"], got["mask"], got["offsets"], got["backup"], torch.tensor(float("nan")),
                 backend=backend)
    assert _same(got["W"], case["W"])
    assert all(not b.isnan().any() for b in got["backup"])  # the backup is still written


@pytest.mark.parametrize("backend", ["reference", *FAST])
@lists
def test_grad_sq_norm_list(backend, sizes, dtypes):
    case = _case(sizes, dtypes, None, seed=11)
    W = [w if j % 2 else None for j, w in enumerate(case["W"])]  # ASAM on some entries only
    got = ops.grad_sq_norm(case["G"], W, backend=backend)
    assert got.dtype == torch.float64 and got.dim() == 0
    # The documented total: per (device, dtype) group in order of first appearance, the group's
    # tensors in list order.
    order = sorted(range(len(sizes)), key=lambda j: dtypes.index(dtypes[j]))
    in_order = torch.zeros((), dtype=torch.float64)
    for j in order:
        in_order = in_order + ops.grad_sq_norm(case["G"][j], W[j], backend=backend)
    if backend in ("reference", "native"):
        assert torch.equal(got, in_order)  # bit-identical to adding the single results
    else:
        torch.testing.assert_close(got, in_order, rtol=1e-13, atol=0)
        assert torch.equal(got, ops.grad_sq_norm(case["G"], W, backend=backend))  # deterministic
    exact = sum(float(((g.double() * (w.double() if w is not None else 1)) ** 2).sum())
                for g, w in zip(case["G"], W, strict=True))
    assert abs(float(got) - exact) <= 1e-12 * exact


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("gdtype", ALL_DTYPES)
def test_fisher_accumulate_list(backend, gdtype):
    gen = torch.Generator().manual_seed(5)
    G = [torch.randn(n, generator=gen).to(gdtype) for n in SIZES]
    F0 = [torch.rand(n, generator=gen) for n in SIZES]
    expected, got = [f.clone() for f in F0], [f.clone() for f in F0]
    for f, g in zip(expected, G, strict=True):
        ops.fisher_accumulate_(f, g, 0.3, backend="reference")
    ops.fisher_accumulate_(got, G, 0.3, backend=backend)
    assert _same(got, expected)


def test_backend_without_list_primitives_is_looped(monkeypatch):
    """A backend with only the single-tensor primitives (the reference here) still runs lists."""
    for name in ("grad_sq_norm_multi", "perturb_multi_", "restore_multi_", "fisher_accumulate_multi_"):
        assert not hasattr(ops.reference, name)
    case = _case([5, 40], [torch.float32] * 2, 0.5, seed=1)
    ops.perturb_(case["W"], case["G"], case["mask"], case["offsets"], case["backup"], torch.tensor(1.0),
                 backend="reference")


@pytest.mark.parametrize("backend", ["reference", *FAST])
@pytest.mark.parametrize("compiled_checks", [True, False])
def test_list_validation_names_the_entry(monkeypatch, backend, compiled_checks):
    """Every bad entry raises the error naming it, whether the extension's one-pass check
    (``_C.first_invalid_entry``) or the Python predicate screens the lists first."""
    if not compiled_checks:
        monkeypatch.setattr(ops, "_C", None)
    elif ops._C is None:
        pytest.skip("the compiled extension is not built")
    case = _case([33, 1025, 40], [torch.float32] * 3, 0.5, seed=2)
    W, G, M, Off, B = (case[k] for k in ("W", "G", "mask", "offsets", "backup"))
    s = torch.tensor(1.0)

    def expect(error, match, fn):
        with pytest.raises(error, match=match):
            fn()
    expect(TypeError, r"W\[1\]", lambda: ops.perturb_([W[0], W[1].half(), W[2]], G, M, Off, B, s,
                                                      backend=backend))
    expect(TypeError, r"G\[1\]", lambda: ops.perturb_(W, [G[0], G[1].double(), G[2]], M, Off, B, s,
                                                      backend=backend))
    expect(ValueError, r"G\[2\]", lambda: ops.perturb_(W, [*G[:2], G[2][:5]], M, Off, B, s, backend=backend))
    expect(ValueError, r"mask\[1\]", lambda: ops.perturb_(W, G, [M[0], M[1][:3], M[2]], Off, B, s,
                                                          backend=backend))
    expect(ValueError, r"offsets\[0\]: required", lambda: ops.restore_(W, M, [None, *Off[1:]], B,
                                                                       backend=backend))
    expect(ValueError, r"backup\[2\]", lambda: ops.restore_(W, M, Off, [*B[:2], torch.zeros(41)],
                                                            backend=backend))
    expect(ValueError, r"W\[1\]", lambda: ops.perturb_([W[0], torch.randn(2050)[::2], W[2]],
                                                       G, M, Off, B, s, backend=backend))
    expect(ValueError, "backup: expected 3 tensors", lambda: ops.restore_(W, M, Off, B[:2], backend=backend))
    expect(TypeError, r"mask\[0\]", lambda: ops.restore_(W, [M[0].long(), *M[1:]], Off, B, backend=backend))
    expect(ValueError, r"offsets\[1\]", lambda: ops.restore_(W, M, [Off[0], Off[1][:-1], Off[2]], B,
                                                              backend=backend))
    expect(TypeError, r"backup\[1\]", lambda: ops.restore_(W, M, Off, [B[0], B[1].double(), B[2]],
                                                            backend=backend))
    expect(ValueError, r"backup\[0\]", lambda: ops.restore_(W, M, Off, [torch.zeros(34), *B[1:]],
                                                             backend=backend))
    meta = [torch.zeros(40, device="meta") for _ in range(3)]  # entry 2 is dense
    expect(ValueError, r"W\[2\]: expected device", lambda: ops.perturb_(
        [*W[:2], meta[0]], [*G[:2], meta[1]], M, Off, [*B[:2], meta[2]], s, backend=backend))
    expect(TypeError, r"W\[0\]", lambda: ops.restore_([W[0].numpy(), *W[1:]], M, Off, B, backend=backend))
    expect(ValueError, r"W\[1\]", lambda: ops.grad_sq_norm(G, [None, W[0], None], backend=backend))
    expect(TypeError, r"G\[2\]", lambda: ops.grad_sq_norm([*G[:2], G[2].int()], backend=backend))
    expect(TypeError, "G: expected a list", lambda: ops.perturb_(W, G[0], M, Off, B, s, backend=backend))
    expect(TypeError, "scale", lambda: ops.perturb_(W, G, M, Off, B, 1.0, backend=backend))
    expect(ValueError, "G: expected at least one tensor", lambda: ops.grad_sq_norm([], backend=backend))
    expect(TypeError, r"F\[0\]", lambda: ops.fisher_accumulate_([G[0].double()], [G[0]], backend=backend))
    bad = [o.clone() if o is not None else None for o in Off]
    bad[1][1] += 1  # offsets that do not match the mask: refused on CPU, nothing written
    before = [w.clone() for w in W]
    expect(ValueError, r"offsets\[1\]: do not match", lambda: ops.perturb_(W, G, M, bad, B, s,
                                                                          backend=backend))
    assert _same(W, before)
    ops.perturb_([], [], None, None, [], s, backend=backend)  # an empty list is nothing to do


@pytest.mark.parametrize("backend", FAST)
def test_bounds_hold_in_lists(backend):
    """The bounds of the single op per entry: a short backup, a long one, mask bits past N."""
    case = _case([100, 1025, 77], [torch.float32] * 3, 0.5, seed=4)
    case["mask"][0][-1] |= -(1 << (100 % 32))  # bits past N in the last word of entry 0
    case["backup"][0] = case["backup"][0][:10]  # short: entries ranked past 10 stay unchanged
    case["backup"][1] = torch.full((case["backup"][1].numel() + 7,), float("nan"))  # long: tail not written
    expected, got = _clone(case), _clone(case)
    for j in range(3):
        ops.perturb_(*(expected[k][j] for k in ("W", "G", "mask", "offsets", "backup")), torch.tensor(0.5),
                     backend="reference")
    ops.perturb_(got["W"], got["G"], got["mask"], got["offsets"], got["backup"], torch.tensor(0.5),
                 backend=backend)
    assert _same(got["W"], expected["W"]) and _same(got["backup"], expected["backup"])


# ----------------------------------------------------------------------------------------------------
# Launches per step do not grow with the number of parameters
# ----------------------------------------------------------------------------------------------------

def _step_ops(count: int, backend: str, sparsity: float, max_numel: int = 3000) -> dict[str, int]:
    """The ssam_kernels operator calls (native) of one first_step + second_step of the per-tensor
    layout over ``count`` parameters of 1 to ``max_numel`` entries, counted with torch.profiler."""
    gen = torch.Generator().manual_seed(count)
    params = [torch.nn.Parameter(torch.randn(int(n), generator=gen))
              for n in torch.randint(1, max_numel, (count,), generator=gen)]
    for p in params:
        p.grad = torch.randn_like(p)
    mask = sk.RandomMask(seed=1) if sparsity else None
    opt = sk.SSAM(params, torch.optim.SGD, sparsity=sparsity, mask=mask, backend=backend, layout="tensors",
                  lr=0.1)
    opt.first_step()  # builds the mask
    opt.second_step()

    def run() -> None:
        opt.first_step()
        opt.second_step()
    return native_op_counts(run)


@pytest.mark.skipif("native" not in FAST, reason="native extension not built")
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_native_calls_per_step_independent_of_parameter_count(sparsity):
    few, many = _step_ops(10, "native", sparsity), _step_ops(200, "native", sparsity)
    assert few == many
    assert few == {"ssam_kernels::grad_sq_norm_multi": 1, "ssam_kernels::perturb_multi_": 1,
                   "ssam_kernels::restore_multi_": 1}


@pytest.mark.skipif("triton" not in FAST, reason="triton not available")
@pytest.mark.parametrize("sparsity", [0.0, 0.5])
def test_triton_launches_per_step_independent_of_parameter_count(monkeypatch, sparsity):
    launches = triton_launch_log(monkeypatch)

    def per_step(count: int) -> list[str]:
        launches.clear()
        # the profiled step is the second of two; small parameters: the interpreter pays per entry
        _step_ops(count, "triton", sparsity, max_numel=100)
        return sorted(launches)
    few, many = per_step(10), per_step(60)
    assert few == many
    # With a mask, building it (RandomMask) adds one launch of the hash over all parameters (their
    # positions follow each other) and the selection's list launches: the bucket path's two histogram
    # passes and its mask pass.
    selection = ["_hash_kernel"] + 2 * ["_histogram_kernel"] + ["_bucket_mask_kernel"]
    if not sparsity:
        selection = []
    assert few == sorted(2 * ["_sq_norm_kernel", "_perturb_kernel", "_restore_kernel"] + selection)
