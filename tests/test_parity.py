"""Every fast backend against the reference oracle, through the public ops: bit for bit.

Backends (the ``backend`` fixture, which also sets the ``device`` the tensors live on):

- ``vectorized`` with its production tuning, and with 1024-entry chunks, the float64-emulated fp32 FMA,
  ``index_add`` histograms and the path of devices whose tensors the host does not read for free
  (``addcmul`` or ``fma32``, round to odd, instead of the host-checked double rounding), in three mixes
  (``ops.Tuning``, passed to every op of the test: the ``tuning`` fixture);
- ``native`` on CPU, and on CUDA (skipped without a GPU);
- ``triton``: on CPU in Triton's interpreter (``TRITON_INTERPRET=1``, set by conftest.py), on the GPU
  when there is one; its 2^20 + 3 cases run on a GPU only;
- ``cuda_sim`` (the native CUDA kernels run on CPU tensors, ``ssam_kernels.ops.cuda_sim``) under two
  launch shapes: an H100's, and a small GPU (1 SM, 2 blocks, grids of at most 3 blocks) whose
  grid-stride loops, warps and multi-block reductions all run at these sizes. cuda_sim is built only
  when ``SSAM_HIP_CPU_DIR`` names HIP-CPU at build time; without it its cases skip, saying so.

Triton's launch configurations other than the interpreter's (a tiny one that makes small inputs span many
programs, and the GPU's, run in the interpreter) pay per program, so they run the same checks at the few
sizes that exercise them (``test_triton_config_*``).

Inputs are fresh random draws with NaN, infinities and both zeros among them; every tensor lives in its
own storage at an offset of 0, 1 or 3 elements (1 and 3 put 16-byte packs off their alignment) with
poisoned elements on both sides, which must come out unchanged (cuda_sim also refuses any access
outside the tensors). Sizes end mid-word, mid-chunk and mid-pack; masks are dense, all-zero, all-one
and random; offsets int64 and int32; scales drawn, negative, and 0, inf and NaN (a skipped step). The
contract (docs/DESIGN.md): masks, counts, backups, restores and perturbed values are bit-identical to the
reference, except that a NaN may carry any payload where the reference has a NaN; norms are
deterministic and equal the reference's float64 sum up to its rounding.
"""

from __future__ import annotations

import contextlib
import types
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ssam_kernels import ops
from ssam_kernels.ops import TritonLaunch, Tuning, bitmask, reference
from ssam_kernels.ops.lists import list_primitive
from ssam_kernels.ops.select import PASSES
from ssam_kernels.ops.tuning import TRITON_GPU
from tests.helpers import (
    ALL_DTYPES,
    assert_same,
    assert_same_values,
    build_optimizer,
    seeded_mlp,
    selection_scores,
    train,
    weights,
)

SIZES = [0, 1, 31, 32, 33, 1023, 1025, 4097]
LARGE = (1 << 20) + 3
DTYPES = ALL_DTYPES
OFFSETS = [0, 1, 3]
MASKS = ["dense", "zeros", "ones", "random"]
SKIPPED_SCALES = [0.0, float("inf"), float("nan")]
SMALL_GPU = (1, 2, 3)  # SMs, resident blocks per SM, grid cap
H100 = (132, 6, 1 << 16)
GPU = "cuda" if torch.cuda.is_available() else None
TRITON_DEVICE = GPU or "cpu"

_VECTORIZED_TUNINGS = {
    "vectorized-chunk1k-emulated-fma": Tuning(chunk_entries=1024, fused_fma=False, bincount=False,
                                              mask_list_words=10),
    "vectorized-device-path": Tuning(chunk_entries=1024, host_reads=False),
    "vectorized-device-path-emulated-fma": Tuning(host_reads=False, fused_fma=False),
}


def _simulated(shape: tuple[int, int, int]) -> Callable[[], contextlib.AbstractContextManager]:
    """cuda_sim's simulated GPU of ``(SMs, resident blocks per SM, grid cap)`` for the test."""
    def apply() -> contextlib.AbstractContextManager:
        from ssam_kernels.ops import cuda_sim
        return cuda_sim.simulated(*shape)
    return apply


TRITON_TUNINGS = {
    # Small inputs span many programs, several tiles per program, persistent-loop iterations, one chunk
    # per program.
    "small": Tuning(triton=TritonLaunch(chunks=1, block=64, tiles=2, histogram_tiles=1, programs_per_sm=1,
                                        interpret_programs=3, num_warps=4)),
    "gpu": Tuning(triton=TRITON_GPU),  # the GPU's shapes, in the interpreter
}


@dataclass(frozen=True)
class Backend:
    name: str
    device: str = "cpu"
    tuning: Tuning | None = None
    gpu: Callable[[], contextlib.AbstractContextManager] | None = None  # cuda_sim's simulated GPU


def _backend_param(backend: Backend, id: str | None = None):
    marks = []
    if backend.device == "cuda":
        marks.append(pytest.mark.gpu)
    why = "no CUDA device" if backend.device == "cuda" and GPU is None else \
        ops._unavailable(backend.name, backend.device)
    if backend.name == "cuda_sim" and why is not None:
        why += (". Build it: SSAM_HIP_CPU_DIR=../shared/third_party/hip-cpu "
                "pip install --no-build-isolation -e .")
    marks.append(pytest.mark.skipif(why is not None, reason=f"{backend.name} unavailable: {why}"))
    return pytest.param(backend, id=id or backend.name, marks=marks)


BACKENDS = [
    _backend_param(Backend("vectorized")),
    *(_backend_param(Backend("vectorized", tuning=tuning), id) for id, tuning in _VECTORIZED_TUNINGS.items()),
    _backend_param(Backend("native")),
    _backend_param(Backend("native", "cuda"), "native-cuda"),
    _backend_param(Backend("triton", TRITON_DEVICE)),
    _backend_param(Backend("cuda_sim", gpu=_simulated(H100)), "cuda_sim-h100"),
    _backend_param(Backend("cuda_sim", gpu=_simulated(SMALL_GPU)), "cuda_sim-small"),
]
TRITON_CONFIGS = {name: _backend_param(Backend("triton", TRITON_DEVICE, tuning), f"triton-{name}")
                  for name, tuning in TRITON_TUNINGS.items()}


@pytest.fixture(params=BACKENDS)
def backend_case(request: pytest.FixtureRequest) -> Backend:
    return request.param


@pytest.fixture
def backend(backend_case: Backend) -> Iterator[str]:
    """The backend's name (cuda_sim: with its simulated GPU for the test)."""
    with backend_case.gpu() if backend_case.gpu else contextlib.nullcontext():
        yield backend_case.name


@pytest.fixture
def tuning(backend_case: Backend) -> Tuning | None:
    """The tuning every op of the test runs the backend with (None: the production one)."""
    return backend_case.tuning


@pytest.fixture
def device(backend_case: Backend) -> torch.device:
    """The device of the backend's tensors (the reference runs on CPU copies)."""
    return torch.device(backend_case.device)


@pytest.fixture
def large_backend(backend: str, device: torch.device) -> str:
    """The backends that take the 2^20 + 3 cases (Triton's interpreter is too slow for them)."""
    if backend == "triton" and device.type == "cpu":
        pytest.skip("Triton's interpreter: the 2^20 + 3 cases run on a GPU")
    return backend


def _gen(*params: object) -> torch.Generator:
    """A generator seeded from the test's parameters: fresh draws per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(repr(params).encode()))


def _values(n: int, dtype: torch.dtype, gen: torch.Generator, specials: bool = True) -> torch.Tensor:
    """Normal draws, with NaN, ±inf, ±0 and a huge value at a few random entries."""
    x = torch.randn(n, generator=gen, dtype=torch.float64)
    if specials and n:
        special = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0, 3e38],
                               dtype=torch.float64)
        x[torch.randint(0, n, (min(n, 6),), generator=gen)] = special[: min(n, 6)]
    return x.to(dtype)


class Placed:
    """A tensor in its own storage at ``offset`` elements on ``device``, between poisoned elements that no
    op may touch."""

    PAD = 5

    def __init__(self, values: torch.Tensor, offset: int, device: torch.device) -> None:
        n = values.numel()
        self.storage = torch.full((offset + n + self.PAD,), 77, dtype=values.dtype, device=device)
        self.tensor = self.storage[offset: offset + n]
        self.tensor.copy_(values)
        self.offset, self.n = offset, n
        self.guard = self._guard().clone()

    def _guard(self) -> torch.Tensor:
        return torch.cat([self.storage[: self.offset], self.storage[self.offset + self.n:]])

    def check_untouched(self) -> None:
        assert torch.equal(self._guard(), self.guard), "an op wrote outside its tensor"


def _placed(tensors: list[torch.Tensor | None], offset: int, device: torch.device) -> list[Placed | None]:
    return [Placed(t, offset, device) if t is not None else None for t in tensors]


def _tensors(placed: list[Placed | None]) -> list[torch.Tensor | None]:
    return [p.tensor if p is not None else None for p in placed]


def _check_untouched(*placed: list[Placed | None]) -> None:
    for group in placed:
        for p in group:
            if p is not None:
                p.check_untouched()


def _same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert_same_values(got.cpu(), want)


def _mask(kind: str, n: int, gen: torch.Generator) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    if kind == "dense":
        return None, None, n
    live = {"zeros": torch.zeros(n, dtype=torch.bool), "ones": torch.ones(n, dtype=torch.bool),
            "random": torch.rand(n, generator=gen) < 0.5}[kind]
    words, offsets = bitmask.from_bool(live)
    return words, offsets, int(live.sum())


def _live(words: torch.Tensor | None, n: int) -> torch.Tensor:
    return bitmask.unpack(words, n) if words is not None else torch.ones(n, dtype=torch.bool)


def _scale(value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(value, dtype=torch.float64 if dtype == torch.float64 else torch.float32)


# ------------------------------------------------------------------------------------------------
# Element-wise ops
# ------------------------------------------------------------------------------------------------

def _perturb_restore(backend: str, tuning: Tuning | None, device: torch.device, dtype: torch.dtype, n: int,
                     offset: int,
                     mask_kind: str, scales: list[tuple[float, bool]], gen: torch.Generator) -> None:
    """perturb_ then restore_ at each ``(scale, adaptive)``, the mask's offsets int64 then int32 in turn;
    backups start poisoned and restore_ must write every perturbed entry back."""
    W0, G = _values(n, dtype, gen), _values(n, dtype, gen)
    words, offsets, k = _mask(mask_kind, n, gen)
    for case, (value, adaptive) in enumerate(scales):
        scale = _scale(value, dtype)
        w_ref, b_ref = W0.clone(), torch.empty(k, dtype=dtype)
        ops.perturb_(w_ref, G, words, offsets, b_ref, scale, adaptive, backend="reference")
        offs = offsets.int() if offsets is not None and case % 2 else offsets
        w, g, b, m, o = _placed([W0, G, torch.full((k,), 5.0, dtype=dtype), words, offs], offset, device)
        ops.perturb_(w.tensor, g.tensor, *_tensors([m, o]), b.tensor, scale.to(device), adaptive,
                     backend=backend, tuning=tuning)
        _same(w.tensor, w_ref)
        _same(b.tensor, b_ref)
        w.tensor[_live(words, n).to(device)] = 0  # restore_ must write every perturbed entry back
        ops.restore_(w.tensor, *_tensors([m, o]), b.tensor, backend=backend, tuning=tuning)
        _same(w.tensor, W0)
        _check_untouched([w, g, b, m, o])


def _scales(*params: object) -> list[tuple[float, bool]]:
    """A positive and a negative scale with ``adaptive`` both ways, and one skipped step's (0, inf or
    NaN, taken in turn over the cases ``params`` name)."""
    skipped = SKIPPED_SCALES[zlib.crc32(repr(params).encode()) % len(SKIPPED_SCALES)]
    return [(0.37, False), (-0.61, True), (skipped, bool(zlib.crc32(repr(params).encode()) & 4))]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_perturb_restore(backend, tuning, device, dtype, n, offset, mask_kind):
    if backend == "triton" and device.type == "cpu" and offset != 0 and (offset, mask_kind) != (1, "random"):
        pytest.skip("Triton's interpreter: off the 16-byte alignment (offsets 1 and 3) only offset 1 with "
                    "the random mask runs; every mask kind runs at offset 0")
    params = (dtype, n, offset, mask_kind)
    _perturb_restore(backend, tuning, device, dtype, n, offset, mask_kind, _scales(*params), _gen(*params))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_perturb_restore_large(large_backend, tuning, device, dtype):
    _perturb_restore(large_backend, tuning, device, dtype, LARGE, 1, "random", [(0.37, False)],
                     _gen(dtype, LARGE))


def _perturb_restore_lists(backend: str, tuning: Tuning | None, device: torch.device, dtype: torch.dtype,
                           offset: int,
                           sizes: list[int], gen: torch.Generator) -> None:
    cases = [(n, kind) for n in sizes for kind in MASKS]
    W0 = [_values(n, dtype, gen) for n, _ in cases]
    G = [_values(n, dtype, gen) for n, _ in cases]
    masks = [_mask(kind, n, gen) for n, kind in cases]
    for value, adaptive in ((-0.61, False), (0.37, True), (float("nan"), True)):
        scale = _scale(value, dtype)
        w_ref = [w.clone() for w in W0]
        b_ref = [torch.empty(k, dtype=dtype) for _, _, k in masks]
        ops.perturb_(w_ref, G, [m for m, _, _ in masks], [o for _, o, _ in masks], b_ref, scale, adaptive,
                     backend="reference")
        w, g = _placed(W0, offset, device), _placed(G, offset, device)
        b = _placed([torch.full((k,), 5.0, dtype=dtype) for _, _, k in masks], offset, device)
        m = _placed([t for t, _, _ in masks], offset, device)
        o = _placed([t for _, t, _ in masks], offset, device)
        tensors = [_tensors(ps) for ps in (w, g, m, o, b)]
        ops.perturb_(*tensors, scale.to(device), adaptive, backend=backend, tuning=tuning)
        for got, want in zip(tensors[0] + tensors[4], w_ref + b_ref, strict=True):
            _same(got, want)
        for got, orig, (words, _, _) in zip(tensors[0], W0, masks, strict=True):
            got[_live(words, orig.numel()).to(device)] = 0  # restore_ must write every perturbed entry back
        ops.restore_(tensors[0], tensors[2], tensors[3], tensors[4], backend=backend, tuning=tuning)
        for got, orig in zip(tensors[0], W0, strict=True):
            _same(got, orig)
        _check_untouched(w, g, b, m, o)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_perturb_restore_lists(backend, tuning, device, dtype, offset):
    """One list op over tensors of every size and mask kind (one launch over a table on CUDA)."""
    _perturb_restore_lists(backend, tuning, device, dtype, offset, SIZES, _gen(dtype, offset))


def _grad_sq_norm(backend: str, tuning: Tuning | None, device: torch.device, dtype: torch.dtype, n: int,
                  offset: int,
                  gen: torch.Generator) -> None:
    G, W = _values(n, dtype, gen, specials=False), _values(n, dtype, gen, specials=False)
    for w in (None, W):
        g_p, w_p = _placed([G, w], offset, device)
        got = ops.grad_sq_norm(g_p.tensor, w_p.tensor if w_p else None, backend=backend, tuning=tuning)
        expected = ops.grad_sq_norm(G, w, backend="reference")
        assert got.dtype == torch.float64 and got.dim() == 0 and got.device == device
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-12, atol=0)
        again = ops.grad_sq_norm(g_p.tensor, w_p.tensor if w_p else None, backend=backend, tuning=tuning)
        assert torch.equal(again, got)
        _check_untouched([g_p, w_p])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [*SIZES, 70001])
@pytest.mark.parametrize("offset", [0, 3])
def test_grad_sq_norm(backend, tuning, device, dtype, n, offset):
    _grad_sq_norm(backend, tuning, device, dtype, n, offset, _gen(dtype, n, offset))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", OFFSETS)
def test_grad_sq_norm_lists(backend, tuning, device, dtype, offset):
    gen = _gen(dtype, offset)
    G = [_values(n, dtype, gen, specials=False) for n in SIZES]
    W = [_values(n, dtype, gen, specials=False) if i % 2 else None for i, n in enumerate(SIZES)]
    g_p, w_p = _placed(G, offset, device), _placed(W, offset, device)
    got = ops.grad_sq_norm(_tensors(g_p), _tensors(w_p), backend=backend, tuning=tuning)
    torch.testing.assert_close(got.cpu(), ops.grad_sq_norm(G, W, backend="reference"), rtol=1e-12, atol=0)
    _check_untouched(g_p, w_p)
    # Non-finite squares: the sum is inf or NaN exactly where the reference's is.
    G[2][3] = float("inf")
    G = [t.to(device) for t in G]
    W = [t.to(device) if t is not None else None for t in W]
    assert bool(ops.grad_sq_norm(G, W, backend=backend, tuning=tuning).isinf())


def test_grad_sq_norm_large(large_backend, tuning, device):
    G = _values(LARGE, torch.float32, _gen(LARGE), specials=False)
    torch.testing.assert_close(ops.grad_sq_norm(G.to(device), backend=large_backend, tuning=tuning).cpu(),
                               ops.grad_sq_norm(G, backend="reference"), rtol=1e-12, atol=0)


def _fisher_accumulate(backend: str, tuning: Tuning | None, device: torch.device, dtype: torch.dtype, n: int,
                       offset: int,
                       gen: torch.Generator) -> None:
    F0, G = torch.rand(n, generator=gen) + 0.5, _values(n, dtype, gen)
    for alpha in (1.0, 0.37, 1 / 3000):
        f_ref = F0.clone()
        ops.fisher_accumulate_(f_ref, G, alpha, backend="reference")
        f, g = _placed([F0, G], offset, device)
        ops.fisher_accumulate_(f.tensor, g.tensor, alpha, backend=backend, tuning=tuning)
        _same(f.tensor, f_ref)
        _check_untouched([f, g])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [*SIZES, LARGE])
@pytest.mark.parametrize("offset", [0, 1])
def test_fisher_accumulate(backend, tuning, device, dtype, n, offset):
    if n == LARGE and backend == "triton" and device.type == "cpu":
        pytest.skip("Triton's interpreter: the 2^20 + 3 cases run on a GPU")
    gen = _gen(dtype, n, offset)
    _fisher_accumulate(backend, tuning, device, dtype, n, offset, gen)
    # The list form over every size.
    Fs = [torch.rand(m, generator=gen) for m in SIZES]
    Gs = [_values(m, dtype, gen) for m in SIZES]
    f_ref = [f.clone() for f in Fs]
    ops.fisher_accumulate_(f_ref, Gs, 0.5, backend="reference")
    Fs = [f.to(device) for f in Fs]
    ops.fisher_accumulate_(Fs, [g.to(device) for g in Gs], 0.5, backend=backend, tuning=tuning)
    for got, want in zip(Fs, f_ref, strict=True):
        _same(got, want)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _axpby_scales(dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(a, b)`` of axpby_: ``(1, s)`` (perturb_'s arithmetic), ``(-c, 1)``, ``(0, 1)``, both negative,
    and a float64 ``a`` that fp32 cannot hold with an fp32 ``b`` (scales of the data's precision
    otherwise, as the optimizer passes them)."""
    pairs = [(_scale(a, dtype), _scale(b, dtype)) for a, b in ((1.0, 0.37), (-0.61, 1.0), (0.0, 1.0),
                                                               (-1.7, -0.3))]
    return [*pairs, (torch.tensor(0.1, dtype=torch.float64), torch.tensor(3.3, dtype=torch.float32))]


def _axpby(backend: str, tuning: Tuning | None, device: torch.device, dtype: torch.dtype, n: int,
           offsets: tuple[int, int],
           gen: torch.Generator) -> None:
    """axpby_ at every ``_axpby_scales`` pair, ``X`` and ``Y`` placed ``offsets`` elements into their
    storages: ``X`` as the reference writes it, ``Y`` and the guards unchanged."""
    X0, Y = _values(n, dtype, gen), _values(n, dtype, gen)
    for a, b in _axpby_scales(dtype):
        x_ref = X0.clone()
        ops.axpby_(x_ref, Y, a, b, backend="reference")
        x, y = Placed(X0, offsets[0], device), Placed(Y, offsets[1], device)
        ops.axpby_(x.tensor, y.tensor, a.to(device), b.to(device), backend=backend, tuning=tuning)
        _same(x.tensor, x_ref)
        assert torch.equal(_bits(y.tensor.cpu()), _bits(Y)), "Y was written"
        _check_untouched([x, y])


AXPBY_OFFSETS = [(0, 0), (3, 1), (0, 1)]  # X's and Y's: aligned, both off 16 bytes (differently), Y only


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("offsets", AXPBY_OFFSETS, ids=str)
def test_axpby(backend, tuning, device, dtype, n, offsets):
    _axpby(backend, tuning, device, dtype, n, offsets, _gen("axpby", dtype, n, offsets))


@pytest.mark.parametrize("offset", [0, 1])
def test_axpby_lists(backend, tuning, device, offset):
    """One list op over every size and dtype, the dtypes interleaved (one group per dtype, each picked out
    of the list), at scales that include infinity; then a list of one entry and the empty list."""
    gen = _gen("axpby-lists", offset)
    cases = [(n, dtype) for n in SIZES for dtype in DTYPES]
    X0 = [_values(n, dtype, gen) for n, dtype in cases]
    Y = [_values(n, dtype, gen) for n, dtype in cases]
    scales = [(torch.tensor(0.37, dtype=torch.float64), torch.tensor(-1.3)),
              (torch.tensor(1.0), torch.tensor(-0.61, dtype=torch.float64)),
              (torch.tensor(float("inf")), torch.tensor(0.5))]
    for a, b in scales:
        for entries in (range(len(cases)), [len(cases) - 2], []):
            x_ref = [X0[j].clone() for j in entries]
            ops.axpby_(x_ref, [Y[j] for j in entries], a, b, backend="reference")
            x = _placed([X0[j] for j in entries], offset, device)
            y = _placed([Y[j] for j in entries], offset, device)
            ops.axpby_(_tensors(x), _tensors(y), a.to(device), b.to(device), backend=backend,
                       tuning=tuning)
            for got, want in zip(_tensors(x), x_ref, strict=True):
                _same(got, want)
            for got, j in zip(_tensors(y), entries, strict=True):
                assert torch.equal(_bits(got.cpu()), _bits(Y[j])), "Y was written"
            _check_untouched(x, y)


@pytest.mark.parametrize("n", [0, 1, 33, 4097, LARGE])
@pytest.mark.parametrize("base", [0, 12345, 2**32 - 100, 2**40 + 3])
def test_hash_scores(backend, tuning, device, n, base):
    if n == LARGE and backend == "triton" and device.type == "cpu":
        pytest.skip("Triton's interpreter: the 2^20 + 3 cases run on a GPU")
    for seed, step in ((0xDEADBEEF, 17), (0, 0), (0xFFFFFFFF, 0xFFFFFFFF)):
        _same(ops.hash_scores(n, seed, step, base, device=device, backend=backend, tuning=tuning),
              ops.hash_scores(n, seed, step, base, backend="reference"))


def test_hash_scores_lists(backend, tuning, device):
    """The list form: runs of consecutive positions (one call each), a gap, an empty segment and a run
    that crosses 2^32, each tensor the single op's."""
    sizes, bases = [33, 0, 1025, 7, 40, 5], [100, 133, 133, 1158, 2**32 - 20, 2**32 + 20]
    got = ops.hash_scores(sizes, 0xC0FFEE, 9, bases, device, backend=backend, tuning=tuning)
    assert len(got) == len(sizes)
    for g, n, b in zip(got, sizes, bases, strict=True):
        _same(g, ops.hash_scores(n, 0xC0FFEE, 9, b, backend="reference"))


# ------------------------------------------------------------------------------------------------
# Selection
# ------------------------------------------------------------------------------------------------

SCORE_DTYPES = [*DTYPES, torch.int32]


def _backend_module(name: str, device: torch.device) -> types.ModuleType:
    return ops.resolve_backend(name, device)


def _singles(module: types.ModuleType) -> types.SimpleNamespace:
    """The backend seen through its single-tensor selection primitives only: ``list_primitive`` then
    loops over the segments (as for a backend without the list primitives)."""
    return types.SimpleNamespace(radix_histogram=module.radix_histogram, threshold_mask=module.threshold_mask)


def _selection_primitives(backend: str, tuning: Tuning | None, device: torch.device, dtype: torch.dtype,
                          ties: bool,
                          sizes: list[int], gen: torch.Generator, singles: bool = True) -> None:
    """radix_histogram(_multi) and threshold_mask(_multi) of the backend against the reference's, with
    and without eligibility filters, at prefixes and thresholds taken from the entries and at ones that
    no entry may match."""
    module = _backend_module(backend, device)
    oracle = _backend_module("reference", torch.device("cpu"))
    scores = [selection_scores(n, dtype, gen, ties) for n in sizes]
    filters = [bitmask.from_bool(torch.rand(n, generator=gen) < 0.5)[0] for n in sizes]
    scores_d, filters_d = [s.to(device) for s in scores], [f.to(device) for f in filters]
    keys = reference.score_keys(torch.cat(scores), True)
    for form in (module, _singles(module)) if singles else (module,):
        for largest in (True, False):
            for filt, filt_d, value in ((None, None, True), (filters, filters_d, True),
                                        (filters, filters_d, False)):
                fl, fl_d = filt or [None] * len(scores), filt_d or [None] * len(scores)
                for prefix_key in (int(keys[keys.numel() // 2]), 0x5A5A5A5A):
                    for shift, bits in PASSES:
                        prefix = torch.tensor(prefix_key & ~((1 << (shift + bits)) - 1) & 0xFFFFFFFF)
                        got = list_primitive(form, "radix_histogram")(
                            scores_d, prefix.to(device), shift, bits, largest, fl_d, value,
                            tuning=tuning or Tuning())
                        want = list_primitive(oracle, "radix_histogram")(
                            scores, prefix, shift, bits, largest, fl, value)
                        assert got.dtype == torch.int64 and torch.equal(got.cpu(), want)
                key = reference.score_keys(torch.cat(scores), largest)
                for threshold in {0, int(key[0]), int(key[key.numel() // 3]), int(key.max())}:
                    tied = int((key == threshold).sum())
                    for quota in (0, tied // 2, tied + 1):
                        t, q = torch.tensor(threshold), torch.tensor(quota)
                        got_words, got_left = list_primitive(form, "threshold_mask")(
                            scores_d, t.to(device), q.to(device), largest, fl_d, value,
                            tuning=tuning or Tuning())
                        want_words, want_left = list_primitive(oracle, "threshold_mask")(
                            scores, t, q, largest, fl, value)
                        assert torch.equal(got_left.cpu(), want_left)
                        for a, b in zip(got_words, want_words, strict=True):
                            assert torch.equal(a.cpu(), b)


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("ties", [False, True])
def test_selection_primitives(backend, tuning, device, dtype, ties):
    # Triton's interpreter pays per program: the forms and the ties (dtype-independent once the scores are
    # keys) run in full for float32 and int32; the other dtypes' key conversions run untied, as lists.
    full = not (backend == "triton" and device.type == "cpu") or dtype in (torch.float32, torch.int32)
    if ties and not full:
        pytest.skip("Triton's interpreter: ties run for float32 and int32 scores")
    _selection_primitives(backend, tuning, device, dtype, ties, SIZES, _gen(dtype, ties), singles=full)


def _select_both(backend: str, tuning: Tuning | None, device: torch.device, scores: list[torch.Tensor],
                 k: int) -> None:
    got = ops.select_topk([s.to(device) for s in scores], k, backend=backend, tuning=tuning)
    want = ops.select_topk(scores, k, backend="reference")
    for (m, o), (m_ref, o_ref) in zip(got, want, strict=True):
        assert torch.equal(m.cpu(), m_ref) and torch.equal(o.cpu(), o_ref)
    assert sum(int(bitmask.count(m)) for m, _ in got) == k


def _select_topk(backend: str, tuning: Tuning | None, device: torch.device, sizes: list[int],
                 gen: torch.Generator) -> None:
    """Exact-k selection over segments of the sizes (mixed dtypes, every other one tied), at k from none
    to all."""
    scores = [selection_scores(n, DTYPES[i % 3], gen, ties=i % 2 == 1)
              for i, n in enumerate(sizes)]
    total = sum(sizes)
    for k in sorted({0, 1, total // 1000, total // 3, total // 2, total - 1, total} & set(range(total + 1))):
        _select_both(backend, tuning, device, scores, k)


@pytest.mark.parametrize("dtype", SCORE_DTYPES)
@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.5, 1.0])
def test_select_topk(backend, tuning, device, dtype, fraction):
    """Exact-k selection over segments of every size (the bucket path where the backend has one)."""
    gen = _gen(dtype, fraction)
    scores = [selection_scores(n, dtype, gen, ties=i % 2 == 1) for i, n in enumerate(SIZES)]
    _select_both(backend, tuning, device, scores, int(sum(s.numel() for s in scores) * fraction))


def test_select_topk_mixed_dtypes(backend, tuning, device):
    _select_topk(backend, tuning, device, [1025, 1, 4999, 33, 0], _gen("mixed"))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.sampled_from([0.0, -0.0, 1.0, -1.0, 2.5, float("nan"), float("inf"), -float("inf")]),
                max_size=200), st.floats(0, 1))
def test_select_topk_specials(backend, tuning, device, values, fraction):
    """Only ties and special values (signed zeros, infinities, NaN), drawn by hypothesis."""
    _select_both(backend, tuning, device, [torch.tensor(values, dtype=torch.float32)],
                 int(len(values) * fraction))


def test_select_topk_paths(backend, tuning, device, monkeypatch):
    """The bucket path (a bucket within capacity) and its fallback (one bucket of more than
    ``Tuning.bucket_min_capacity`` equal keys: the third histogram pass and threshold_mask), each
    counted."""
    module = _backend_module(backend, device)
    calls = {"bucket_mask_multi": 0, "threshold_mask_multi": 0}
    for name in calls:
        primitive = getattr(module, name, None)
        if primitive is not None:
            def counted(*args, _name=name, _primitive=primitive, **kwargs):
                calls[_name] += 1
                return _primitive(*args, **kwargs)
            monkeypatch.setattr(module, name, counted)
    has_bucket = getattr(module, "bucket_mask_multi", None) is not None and \
        device.type in getattr(module, "BUCKET_MASK_DEVICES", ())
    gen = _gen("paths")
    _select_both(backend, tuning, device, [torch.randn(5000, generator=gen), torch.randn(3001,
                 generator=gen)], 2500)
    assert calls["bucket_mask_multi"] == (1 if has_bucket else 0)
    capacity = (tuning or Tuning()).bucket_min_capacity
    ties = torch.full((capacity + 103,), 0.25)
    ties[:100] = 1.0  # then more than the capacity's entries in the threshold's bucket
    _select_both(backend, tuning, device, [ties, torch.randn(33, generator=gen)], capacity // 2)
    assert calls["bucket_mask_multi"] == (1 if has_bucket else 0)  # the fallback took over


def test_select_topk_large(large_backend, tuning, device):
    gen = _gen(LARGE)
    scores = [selection_scores(LARGE, torch.float32, gen, ties=False),
              selection_scores(4097, torch.bfloat16, gen, ties=True)]
    _select_both(large_backend, tuning, device, scores, LARGE // 3)


def _dynamic_update(backend: str, tuning: Tuning | None, device: torch.device, sizes: list[int], grow: str,
                    drop_fraction: float,
                    gen: torch.Generator) -> None:
    drop_scores = [selection_scores(n, DTYPES[i % 3], gen, ties=i % 2 == 1) for i, n in enumerate(sizes)]
    masks = [bitmask.from_bool(torch.rand(n, generator=gen) < 0.4)[0] for n in sizes]
    live = sum(int(bitmask.count(m)) for m in masks)
    n_drop = int(min(live, sum(sizes) - live) * drop_fraction)
    grow_scores = [selection_scores(n, torch.float16, gen, ties=True) for n in sizes]
    got = ops.dynamic_update([m.to(device) for m in masks], [s.to(device) for s in drop_scores], n_drop,
                             "random" if grow == "random" else [s.to(device) for s in grow_scores],
                             seed=7, step=3, backend=backend, tuning=tuning)
    want = ops.dynamic_update(masks, drop_scores, n_drop, "random" if grow == "random" else grow_scores,
                              seed=7, step=3, backend="reference")
    for (m, o), (m_ref, o_ref) in zip(got, want, strict=True):
        assert torch.equal(m.cpu(), m_ref) and torch.equal(o.cpu(), o_ref)
    assert sum(int(bitmask.count(m)) for m, _ in got) == live


@pytest.mark.parametrize("grow", ["random", "scores"])
@pytest.mark.parametrize("drop_fraction", [0.0, 0.1, 0.5, 1.0])
def test_dynamic_update(backend, tuning, device, grow, drop_fraction):
    _dynamic_update(backend, tuning, device, SIZES, grow, drop_fraction, _gen(grow, drop_fraction))


# ------------------------------------------------------------------------------------------------
# Triton's other launch configurations, in the interpreter at the sizes that exercise them: "small" at
# sizes that span many of its programs, "gpu" at sizes that end mid-word, mid-vector and mid-tile with
# the partial last group alone in its tile (2051, 2056: a whole last group, a partial last word) and in
# a later program of a norm/Fisher tile (16437).
# ------------------------------------------------------------------------------------------------

def _sized(n: int, config: str):
    """``(n, Triton's backend case with launch configuration config)``, one parameter set."""
    case = TRITON_CONFIGS[config]
    return pytest.param(n, *case.values, id=f"{n}-{case.id}", marks=case.marks)


TRITON_SIZES = [*(_sized(n, "small") for n in (33, 1025)), *(_sized(n, "gpu") for n in (2051, 2056, 16437))]
by_triton_config = pytest.mark.parametrize(("n", "backend_case"), TRITON_SIZES, indirect=["backend_case"])


@pytest.mark.parametrize("dtype", DTYPES)
@by_triton_config
def test_triton_config_elementwise(backend, tuning, device, dtype, n):
    """perturb_/restore_ (dense and a random mask), grad_sq_norm, fisher_accumulate_ and axpby_."""
    for mask_kind in ("dense", "random"):
        params = ("config", dtype, n, mask_kind)
        _perturb_restore(backend, tuning, device, dtype, n, 1, mask_kind, _scales(*params), _gen(*params))
    _grad_sq_norm(backend, tuning, device, dtype, n, 0, _gen("config-norm", dtype, n))
    _fisher_accumulate(backend, tuning, device, dtype, n, 0, _gen("config-fisher", dtype, n))
    _axpby(backend, tuning, device, dtype, n, (3, 1), _gen("config-axpby", dtype, n))


@by_triton_config
def test_triton_config_selection(backend, tuning, device, n):
    """The list primitives in the other launch configurations (the single-segment forms run in the default
    one: the interpreter takes minutes per size for both), int32 hash scores at the smallest size."""
    for dtype in (torch.float32, torch.int32) if n == 33 else (torch.float32,):
        _selection_primitives(backend, tuning, device, dtype, True, [n, 0, 31], _gen("config", dtype, n),
                              singles=False)


@pytest.mark.parametrize("backend_case", [TRITON_CONFIGS["small"]], indirect=True)
def test_triton_config_lists_and_selections(backend, tuning, device):
    _perturb_restore_lists(backend, tuning, device, torch.bfloat16, 1, [0, 33, 1025], _gen("config-lists"))
    _select_topk(backend, tuning, device, [33, 0, 1023, 1], _gen("config-topk"))
    _dynamic_update(backend, tuning, device, [33, 0, 1023, 1], "scores", 0.5, _gen("config-dynamic"))


# ------------------------------------------------------------------------------------------------
# Whole optimizer trajectories
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["sam", "dynamic", "fisher", "dynamic_groups"])
@pytest.mark.parametrize("layout", ["flat", "tensors"])
def test_optimizer_trajectory(backend, tuning, device, kind, layout, monkeypatch):
    """Six steps of each optimizer kind on the backend: the weights and masks of the reference's run."""
    runs = []
    for name in ("reference", backend):
        monkeypatch.setenv(ops.ENV_VAR, name)
        model = seeded_mlp(21).to(device)
        opt = build_optimizer(kind, model, layout, tuning=tuning)
        train(model, opt, 6)
        masks = [m.cpu() for m in opt.get_mask()] if kind != "sam" else []
        runs.append(([w.cpu() for w in weights(model)], masks))
    assert_same(runs[1][0], runs[0][0])
    assert_same(runs[1][1], runs[0][1])
