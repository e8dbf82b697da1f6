"""The native CPU streaming kernels (``grad_sq_norm``, ``fisher_accumulate_``): exact against the
reference and independent of the thread count, on sizes that span many parallel blocks and end in a
partial vector. Skipped when the extension is not built."""

from __future__ import annotations

import pytest
import torch

from ssam_kernels.ops import native, reference

pytestmark = pytest.mark.skipif(native.unavailable_reason("cpu") is not None,
                                reason=f"native backend unavailable: {native.unavailable_reason('cpu')}")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SIZES = [15, 17, (1 << 14) - 1, (1 << 14) + 17, 5 * (1 << 15) + 3]


@pytest.fixture
def threads():
    saved = torch.get_num_threads()
    yield
    torch.set_num_threads(saved)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("weighted", [False, True])
def test_grad_sq_norm_same_for_any_thread_count(threads, dtype, n, weighted):
    G, W = torch.randn(n).to(dtype), torch.randn(n).to(dtype)
    results = []
    for count in (1, 2, 3):
        torch.set_num_threads(count)
        results.append(native.grad_sq_norm(G, W if weighted else None))
    assert all(torch.equal(r, results[0]) for r in results)  # fixed blocks, fixed order: same bits
    torch.testing.assert_close(results[0], reference.grad_sq_norm(G, W if weighted else None),
                               rtol=1e-12, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("alpha", [1.0, 0.37, -2.5])
def test_fisher_accumulate_bit_identical(threads, dtype, n, alpha):
    F0, G = torch.rand(n) + 0.5, torch.randn(n).to(dtype)
    expected = F0.clone()
    reference.fisher_accumulate_(expected, G, alpha)
    for count in (1, 2):
        torch.set_num_threads(count)
        F = F0.clone()
        native.fisher_accumulate_(F, G, alpha)
        assert torch.equal(F.view(torch.int32), expected.view(torch.int32))
