"""The ``native`` backend: the compiled extension ``ssam_kernels._C`` (C++ kernels for CPU tensors, CUDA
kernels for CUDA tensors when built with CUDA), called through ``torch.ops.ssam_kernels.*``.

Importing ``ssam_kernels._C`` loads the library, which registers the operators (``csrc/registration.cpp``)
and their CPU / CUDA kernels. This module exposes the backend interface of :mod:`.reference` on top of
them, with the same meanings, and registers fake (meta) implementations so the ops trace under
``torch.compile`` / FakeTensor. It imports even when the extension is not built; ``unavailable_reason``
then says why, and the functions are not called (:func:`ssam_kernels.ops.resolve_backend`).
"""

from __future__ import annotations

import torch

from . import bitmask

try:
    from .. import _C
except ImportError as exc:  # not built: SSAM_KERNELS_NO_EXT, no compiler, or a failed optional build
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""


def unavailable_reason(device_type: str) -> str | None:
    """Why the compiled kernels cannot run on ``device_type`` tensors, or None if they can."""
    if _C is None:
        return f"the compiled extension ssam_kernels._C is not built ({_IMPORT_ERROR})"
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        return None if _C.built_with_cuda() else "ssam_kernels._C was built without CUDA"
    return f"the compiled extension has no kernels for {device_type} tensors"


def grad_sq_norm(G: torch.Tensor, W: torch.Tensor | None = None) -> torch.Tensor:
    """``Σ g_i²`` (or ``Σ (g_i · w_i)²`` with ``W``) accumulated in float64 in a fixed order; a float64
    0-d tensor on ``G``'s device."""
    return torch.ops.ssam_kernels.grad_sq_norm(G, W)


def perturb_(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor, scale: torch.Tensor, adaptive: bool = False) -> None:
    """For every set bit ``i``: ``backup[rank(i)] = W[i]``; then, if ``scale`` is finite and non-zero,
    ``W[i] = W[i] + scale·g_i`` (adaptive: ``+ scale·w_i²·g_i``) in float64, rounded once."""
    torch.ops.ssam_kernels.perturb_(W, G, mask, _offsets(mask, offsets, W), backup, scale, adaptive)


def restore_(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
             backup: torch.Tensor) -> None:
    """``W[i] = backup[rank(i)]`` for every set bit ``i`` (bit-exact)."""
    torch.ops.ssam_kernels.restore_(W, mask, _offsets(mask, offsets, W), backup)


def fisher_accumulate_(F: torch.Tensor, G: torch.Tensor, alpha: float = 1.0) -> None:
    """``F += alpha · G²`` with ``F`` float32, computed in float64 and rounded once."""
    torch.ops.ssam_kernels.fisher_accumulate_(F, G, alpha)


def radix_histogram(scores: torch.Tensor, prefix: torch.Tensor, shift: int, bits: int, largest: bool,
                    filter_words: torch.Tensor | None = None, filter_value: bool = True) -> torch.Tensor:
    """Counts (int64, ``2^bits``) of the eligible entries whose key agrees with ``prefix`` above bit
    ``shift + bits``, by the digit ``(key >> shift) & (2^bits - 1)`` (keys: ``reference.score_keys``)."""
    return torch.ops.ssam_kernels.radix_histogram(scores, prefix, shift, bits, largest, filter_words,
                                                  filter_value)


def threshold_mask(scores: torch.Tensor, threshold: torch.Tensor, tie_quota: torch.Tensor, largest: bool,
                   filter_words: torch.Tensor | None = None, filter_value: bool = True) -> torch.Tensor:
    """Mask words selecting the eligible entries with key > ``threshold``, plus the first ``tie_quota``
    eligible entries (index order) with key == ``threshold``."""
    return torch.ops.ssam_kernels.threshold_mask(scores, threshold, tie_quota, largest, filter_words,
                                                 filter_value)


def hash_scores(n: int, seed: int, step: int, base: int, device: torch.device) -> torch.Tensor:
    """``h(seed, step, j)`` for ``j = base … base + n - 1`` as int32 bit patterns
    (``reference.hash_scores``)."""
    out = torch.empty(n, dtype=torch.int32, device=device)
    torch.ops.ssam_kernels.hash_fill_(out, seed, step, base)
    return out


def _offsets(mask: torch.Tensor | None, offsets: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor | None:
    """The kernels find ranks from the offsets; a caller of the backend may leave them to us."""
    if mask is None or offsets is not None:
        return offsets
    return bitmask.offsets(mask, W.numel())


if _C is not None:
    @torch.library.register_fake("ssam_kernels::grad_sq_norm")
    def _grad_sq_norm_fake(G: torch.Tensor, W: torch.Tensor | None) -> torch.Tensor:
        return G.new_empty((), dtype=torch.float64)

    @torch.library.register_fake("ssam_kernels::perturb_")
    def _perturb_fake(W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None,
                      offsets: torch.Tensor | None, backup: torch.Tensor, scale: torch.Tensor,
                      adaptive: bool) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::restore_")
    def _restore_fake(W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
                      backup: torch.Tensor) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::fisher_accumulate_")
    def _fisher_accumulate_fake(F: torch.Tensor, G: torch.Tensor, alpha: float) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::radix_histogram")
    def _radix_histogram_fake(scores: torch.Tensor, prefix: torch.Tensor, shift: int, bits: int,
                              largest: bool, filter_words: torch.Tensor | None,
                              filter_value: bool) -> torch.Tensor:
        return scores.new_empty(1 << bits, dtype=torch.int64)

    @torch.library.register_fake("ssam_kernels::threshold_mask")
    def _threshold_mask_fake(scores: torch.Tensor, threshold: torch.Tensor, tie_quota: torch.Tensor,
                             largest: bool, filter_words: torch.Tensor | None,
                             filter_value: bool) -> torch.Tensor:
        return scores.new_empty(bitmask.num_words(scores.numel()), dtype=torch.int32)

    @torch.library.register_fake("ssam_kernels::hash_fill_")
    def _hash_fill_fake(out: torch.Tensor, seed: int, step: int, base: int) -> None:
        return None
