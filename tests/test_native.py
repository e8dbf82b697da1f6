"""What is specific to the compiled extension (``backend="native"``): its primitives' own entry points
(offsets computed when not given, sizes past its internal blocks), the registered ops' schemas and fake
impls (opcheck), which GPUs its kernel images run on, availability and ``auto``'s fallback, and the CUDA
hot path's freedom from synchronisation. Its parity with the reference oracle, on CPU and CUDA, is in
tests/test_parity.py.

The device tests run on CPU, and on CUDA too when a GPU is present and the extension was built with CUDA.
Skipped, with the reason, when the extension is not built.
"""

from __future__ import annotations

import os

import pytest
import torch

from ssam_kernels import ops
from ssam_kernels.ops import bitmask, native, reference

pytestmark = pytest.mark.skipif(native.unavailable_reason("cpu") is not None,
                                reason=f"native backend unavailable: {native.unavailable_reason('cpu')}")

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"),
        pytest.mark.skipif(torch.cuda.is_available() and native.unavailable_reason("cuda") is not None,
                           reason=f"native backend unavailable on cuda: {native.unavailable_reason('cuda')}"),
    ]),
]


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(20240611)


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def random_mask(n: int, sparsity: float, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``(words, offsets, K)`` of a mask with exactly ``int(n * (1 - sparsity))`` live entries."""
    live = torch.zeros(n, dtype=torch.bool)
    k = int(n * (1 - sparsity))
    live[torch.randperm(n)[:k]] = True
    words, offsets = bitmask.from_bool(live)
    return words.to(device), offsets.to(device), k


def randn(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.randn(n, device=device).to(dtype)


def tied_scores(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Scores with many ties, both zeros, infinities and NaN."""
    x = torch.randint(-4, 5, (n,), device=device).to(dtype) / 2
    specials = torch.tensor([float("nan"), -0.0, 0.0, float("inf"), -float("inf")], device=device).to(dtype)
    if n:
        x[torch.randint(0, n, (min(n, 25),), device=device)] = specials[torch.randint(0, 5, (min(n, 25),))]
    return x


def test_perturb_without_offsets_computes_them(device):
    n = 3000
    W0, G = randn(n, torch.float32, device), randn(n, torch.float32, device)
    mask, offsets, k = random_mask(n, 0.7, device)
    W, W_ref = W0.clone(), W0.clone()
    backup, backup_ref = torch.empty(k, device=device), torch.empty(k, device=device)
    scale = torch.tensor(0.5, device=device)
    native.perturb_(W, G, mask, None, backup, scale)
    reference.perturb_(W_ref, G, mask, offsets, backup_ref, scale)
    assert torch.equal(W, W_ref) and torch.equal(backup, backup_ref)


# ------------------------------------------------------------------------------------------------
# Registration: schemas, fake impls, availability
# ------------------------------------------------------------------------------------------------

def _opcheck_cases(device: torch.device) -> list[tuple[object, tuple]]:
    n = 2500
    W, G = randn(n, torch.float32, device), randn(n, torch.float32, device)
    mask, offsets, k = random_mask(n, 0.5, device)
    scores = tied_scores(n, torch.bfloat16, device)
    lib = torch.ops.ssam_kernels
    scale = torch.tensor(0.3, device=device)
    zero, five, top = (torch.tensor(v, device=device) for v in (0, 5, 2**31))
    return [
        (lib.grad_sq_norm.default, (G, W)),
        (lib.grad_sq_norm.default, (G, None)),
        (lib.perturb_.default, (W, G, mask, offsets, torch.empty(k, device=device), scale, True)),
        (lib.perturb_.default, (W, G, None, None, torch.empty(n, device=device), scale, False)),
        (lib.restore_.default, (W, mask, offsets, torch.randn(k, device=device))),
        (lib.fisher_accumulate_.default, (torch.rand(n, device=device), G.half(), 0.5)),
        (lib.radix_histogram.default, (scores, zero, 21, 11, True, mask, False)),
        (lib.threshold_mask.default, (scores, top, five, False, None, True)),
        (lib.hash_fill_.default, (torch.empty(n, dtype=torch.int32, device=device), 3, 4, 2**33)),
    ]


@pytest.mark.parametrize("case", range(9))
def test_opcheck(device, case):
    op, args = _opcheck_cases(device)[case]
    torch.library.opcheck(op, args)


@pytest.mark.parametrize("archs, capability, runs", [
    ("8.0;9.0", (7, 5), False),  # T4: the old default had no image for it
    ("8.0;9.0", (8, 6), True),  # sm_80 machine code runs on 8.x, x >= 0
    ("8.0;9.0", (10, 0), False),  # B200 without PTX
    ("8.0;9.0", (12, 0), False),  # RTX 50xx without PTX
    ("8.0;9.0+PTX", (10, 0), True),  # the driver compiles sm_90 PTX for newer GPUs
    ("8.0;9.0+PTX", (12, 0), True),
    ("8.6 8.9", (8, 0), False),  # machine code never runs on an older minor
    ("9.0a", (9, 0), True),
    ("9.0a+PTX", (10, 0), False),  # arch-specific code runs on exactly that GPU
    ("7.5;8.0;8.6;8.9;9.0+PTX", (7, 5), True),  # setup.py's default without a visible GPU
    ("7.5;8.0;8.6;8.9;9.0+PTX", (12, 0), True),
    ("Ampere", (8, 0), None),  # architecture names: cannot tell
])
def test_runs_on(archs, capability, runs):
    assert native.runs_on(archs, capability) is runs


class _FakeExtension:
    def __init__(self, archs: str) -> None:
        self.archs = archs

    def built_with_cuda(self) -> bool:
        return True

    def compiled_archs(self) -> str:
        return self.archs


@pytest.mark.parametrize("capability, fallback", [((9, 0), False), ((7, 5), True), ((12, 0), True)])
def test_auto_falls_back_to_triton_on_a_gpu_without_a_kernel_image(monkeypatch, capability, fallback):
    """A GPU the extension has no image for: native is unavailable (saying why and how to rebuild), and
    ``auto`` picks Triton instead of failing at every launch. No GPU needed: the extension's
    compiled list and the device's capability are simulated."""
    monkeypatch.setattr(native, "_C", _FakeExtension("8.0;9.0"))
    monkeypatch.setenv("SSAM_KERNELS_SELFCHECK", "0")  # no GPU to run the first-use check on
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    why = native.unavailable_reason("cuda")
    if not fallback:
        assert why is None
        assert ops.resolve_backend("auto", torch.device("cuda")) is native
        return
    assert why is not None and f"{capability[0]}.{capability[1]}" in why and "8.0;9.0" in why
    assert ops.resolve_backend("auto", torch.device("cuda")).__name__ == "ssam_kernels.ops.triton"
    with pytest.raises(RuntimeError, match="no kernel image"):
        ops.resolve_backend("native", torch.device("cuda"))


def test_kernel_image_is_judged_for_the_tensors_gpu(monkeypatch):
    """Two GPUs, the current one supported and the tensors' one not: native is unavailable for the
    tensors' device (the check reads its capability, not the current device's)."""
    monkeypatch.setattr(native, "_C", _FakeExtension("8.0;9.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: [(9, 0), (7, 5)][device])
    assert native.unavailable_reason(torch.device("cuda", 0)) is None
    assert native.unavailable_reason("cuda") is None  # the current device
    why = native.unavailable_reason(torch.device("cuda", 1))
    assert why is not None and "cuda:1" in why and "7.5" in why


def test_setup_chooses_cuda_archs_with_ptx(monkeypatch):
    """setup.py's default architectures: the visible GPUs' with PTX, else a list that runs (as machine
    code or PTX) on every GPU from T4 to RTX 50xx; TORCH_CUDA_ARCH_LIST wins when set."""
    import runpy
    import types

    import setuptools

    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: None)  # load setup.py's functions only
    monkeypatch.setenv("SSAM_KERNELS_NO_EXT", "1")  # and build (or write) nothing
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    choose = runpy.run_path(os.path.join(root, "setup.py"))["_cuda_arch_list"]

    def fake_torch(*capabilities):
        return types.SimpleNamespace(cuda=types.SimpleNamespace(
            is_available=lambda: bool(capabilities), device_count=lambda: len(capabilities),
            get_device_capability=lambda i: capabilities[i]))

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    default = choose(fake_torch())
    for capability in [(7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (10, 0), (12, 0)]:
        assert native.runs_on(default, capability), capability
    assert choose(fake_torch((8, 9), (7, 5), (8, 9))) == "7.5;8.9+PTX"
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    assert choose(fake_torch((8, 9))) == "8.0;9.0"


def test_extension_reports_what_it_compiled():
    archs = native._C.compiled_archs()
    assert isinstance(archs, str)
    assert (archs != "") == native._C.built_with_cuda()


def test_available_backends_lists_native():
    backends = ops.available_backends()
    assert "cpu" in backends["native"]
    if torch.cuda.is_available() and native.unavailable_reason("cuda") is None:
        assert "cuda" in backends["native"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or native.unavailable_reason("cuda") is not None,
                    reason="needs a CUDA device and the extension built with CUDA")
def test_cuda_hot_path_does_not_synchronise():
    n = 1 << 16
    W, G = randn(n, torch.float32, "cuda"), randn(n, torch.float32, "cuda")
    mask, offsets, k = random_mask(n, 0.5, torch.device("cuda"))
    backup = torch.empty(k, device="cuda")
    scale = torch.tensor(0.1, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        native.grad_sq_norm(G)
        native.perturb_(W, G, mask, offsets, backup, scale, False)
        native.restore_(W, mask, offsets, backup)
        prefix = torch.zeros((), dtype=torch.int64, device="cuda")
        native.radix_histogram(G, prefix, 21, 11, True, None, True)
        native.threshold_mask(G, prefix, prefix, True, mask, True)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_large_inputs_span_kernel_blocks(device):
    """Sizes past the kernels' internal blocks (CPU: 2^14-entry norm partials, 2^16-entry tie blocks;
    CUDA: many warps and grid-stride rounds), so ties and partial sums cross block boundaries."""
    n = 3 * (1 << 16) + 77
    scores = tied_scores(n, torch.float32, device)
    keys = reference.score_keys(scores, True)
    threshold = torch.tensor(int(keys[n // 3]), device=device)
    tie_quota = (keys == threshold).sum() // 2
    assert torch.equal(native.threshold_mask(scores, threshold, tie_quota, True, None, True),
                       reference.threshold_mask(scores, threshold, tie_quota, True, None, True))
    G = randn(n, torch.bfloat16, device)
    torch.testing.assert_close(native.grad_sq_norm(G), reference.grad_sq_norm(G), rtol=1e-12, atol=0)
    got = ops.select_topk([scores, G], n // 3, backend="native")
    expected = ops.select_topk([scores, G], n // 3, backend="reference")
    assert all(torch.equal(m, m_ref) for (m, _), (m_ref, _) in zip(got, expected, strict=True))
