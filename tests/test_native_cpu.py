"""The native CPU streaming kernels (``grad_sq_norm``, ``fisher_accumulate_``): exact against the
reference and independent of the thread count, on sizes that span many parallel blocks and end in a
partial vector. Skipped when the extension is not built."""

from __future__ import annotations

import pytest
import torch

from ssam_kernels.ops import native, reference
from tests.helpers import DTYPES

pytestmark = pytest.mark.skipif(native.unavailable_reason("cpu") is not None,
                                reason=f"native backend unavailable: {native.unavailable_reason('cpu')}")

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


# ------------------------------------------------------------------------------------------------
# Masked perturb_ / restore_, a mask word at a time (AVX-512 compress/expand where the CPU has it, the
# portable loops otherwise; test_portable_path runs these tests again on the portable loops)
# ------------------------------------------------------------------------------------------------

WORD_DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def _word_pattern(pattern: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """A bool mask of n entries whose words are full, empty, single-bit, half-set or random."""
    i = torch.arange(n)
    if pattern == "random":
        return torch.rand(n, generator=gen) < 0.5
    if pattern == "full-and-empty":  # whole words set, whole words clear, in runs
        return (i // 32) % 3 != 1
    if pattern == "one-bit":  # a single (varying) bit per word: the first and last lanes included
        return i % 32 == (i // 32) % 32
    if pattern == "halves":  # 16-lane halves alternately full and empty
        return (i // 16) % 2 == 0
    return torch.rand(n, generator=gen) < 0.03  # sparse: most words empty


def _special_values(n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """Random values with NaNs of several payloads, signed zeros and infinities scattered in."""
    x = torch.randn(n, generator=gen).to(dtype)
    bits = x.view(_BITS[dtype])
    where = torch.randint(0, max(n, 1), (min(n, 40),), generator=gen)
    payloads = {torch.float32: [0x7FC00001, -0x003FFFFF, 0x7F800001], torch.float64: [0x7FF8000000000001],
                torch.bfloat16: [0x7FC1, -0x003F], torch.float16: [0x7E01, -0x01FF]}[dtype]
    for j, w in enumerate(where.tolist()):
        bits[w] = payloads[j % len(payloads)]
    x[where[::3]] = torch.tensor([-0.0, float("inf"), -float("inf")]).to(dtype).repeat(len(where[::3]))[
        : len(where[::3])]
    return x


@pytest.mark.parametrize("dtype", WORD_DTYPES)
@pytest.mark.parametrize("n", [31, 32, 33, 1024, 1057, 3 * 1024 + 31, (1 << 15) + 29])
@pytest.mark.parametrize("pattern", ["random", "full-and-empty", "one-bit", "halves", "sparse"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_masked_words_bit_identical(dtype, n, pattern, adaptive, threads):
    """Backup, W's unset entries and the restored W bit for bit equal to the reference's (NaN payloads
    included), the perturbed entries equal to its values, for every kind of mask word and a partial last
    word; the same with 1 and 2 threads."""
    gen = torch.Generator().manual_seed(n)
    live = _word_pattern(pattern, n, gen)
    from ssam_kernels.ops import bitmask
    words, offsets = bitmask.from_bool(live)
    k = int(live.sum())
    W0, G = _special_values(n, dtype, gen), _special_values(n, dtype, gen)
    scale = torch.tensor(0.731, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    W_ref, backup_ref = W0.clone(), torch.empty(k, dtype=dtype)
    reference.perturb_(W_ref, G, words, offsets, backup_ref, scale, adaptive)
    bits = _BITS[dtype]
    for count in (1, 2):
        torch.set_num_threads(count)
        W, backup = W0.clone(), torch.full((k,), float("nan"), dtype=dtype)
        native.perturb_(W, G, words, offsets, backup, scale, adaptive)
        assert torch.equal(backup.view(bits), backup_ref.view(bits))
        assert torch.equal(W[~live].view(bits), W0[~live].view(bits))  # unset lanes: every bit kept
        # Set lanes: the reference's values (a NaN's payload from the arithmetic is not part of it).
        torch.testing.assert_close(W[live], W_ref[live], rtol=0, atol=0, equal_nan=True)
        W[live] = float("nan")
        native.restore_(W, words, offsets, backup)
        assert torch.equal(W.view(bits), W0.view(bits))


def test_portable_path():
    """The masked tests above again with SSAM_KERNELS_CPU_PORTABLE=1 (the portable compress/expand that
    CPUs without AVX-512 run), in a fresh process (the switch is read once)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = dict(os.environ, SSAM_KERNELS_CPU_PORTABLE="1")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", __file__,
               "-k", "masked_words"]
    done = subprocess.run(command, cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert " passed" in done.stdout
