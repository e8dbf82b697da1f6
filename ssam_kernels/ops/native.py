"""The ``native`` backend: the compiled extension ``ssam_kernels._C`` (C++ kernels for CPU tensors, CUDA
kernels for CUDA tensors when built with CUDA), called through ``torch.ops.ssam_kernels.*``.

Importing ``ssam_kernels._C`` loads the library, which registers the operators (``csrc/registration.cpp``)
and their CPU / CUDA kernels. This module exposes the backend interface of :mod:`.reference` on top of
them, with the same meanings, and registers fake (meta) implementations so the ops trace under
``torch.compile`` / FakeTensor. It imports even when the extension is not built; ``unavailable_reason``
then says why, and the functions are not called (:func:`ssam_kernels.ops.resolve_backend`).
"""

from __future__ import annotations

import re

import torch

from . import bitmask
from .tuning import DEFAULT, Tuning

try:
    from .. import _C
except ImportError as exc:  # not built: SSAM_KERNELS_NO_EXT, no compiler, or a failed optional build
    _C = None
    _IMPORT_ERROR = str(exc)
else:
    _IMPORT_ERROR = ""


CHECKS_OVERLAP = ("cpu", "cuda")
"""Device types on which these ops apply the overlap rule of ``ops._check_disjoint`` to a whole call
themselves, with its messages (``csrc/ssam_ops.h``: ``check_disjoint``, run by the CPU kernels and the CUDA
launchers): the ops layer leaves it to them there."""


def unavailable_reason(device: torch.device | str) -> str | None:
    """Why the compiled kernels cannot run on ``device`` tensors, or None if they can. For a GPU also
    whether it can run what was compiled (``_C.compiled_archs()``; the current GPU when ``device`` has no
    index): without a kernel image for it every launch would fail with "no kernel image is available",
    so ``auto`` picks Triton."""
    device = torch.device(device)
    if _C is None:
        return f"the compiled extension ssam_kernels._C is not built ({_IMPORT_ERROR})"
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        if not _C.built_with_cuda():
            return "ssam_kernels._C was built without CUDA"
        if not torch.cuda.is_available():
            return None  # no GPU to judge; nothing runs on CUDA tensors here anyway
        capability = torch.cuda.get_device_capability(device.index if device.index is not None
                                                      else torch.cuda.current_device())
        archs = _C.compiled_archs()
        if runs_on(archs, capability) is False:
            major, minor = capability
            return (f"ssam_kernels._C was compiled for TORCH_CUDA_ARCH_LIST={archs!r}, which has no kernel "
                    f"image for {device} (compute capability {major}.{minor}); rebuild with "
                    f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" (see docs/building.md)")
        return None
    return f"the compiled extension has no kernels for {device.type} tensors"


_ARCH = re.compile(r"(\d+)\.(\d+)([af]?)(\+PTX)?", re.IGNORECASE)


def runs_on(archs: str, capability: tuple[int, int]) -> bool | None:
    """Whether code compiled for ``archs`` (a ``TORCH_CUDA_ARCH_LIST``: entries ``X.Y``, ``X.Ya``,
    ``X.Yf``, each optionally ``+PTX``, separated by ``;`` or spaces) runs on a GPU of ``capability``;
    None when no entry can be read (e.g. only architecture names), so it cannot be told.

    Machine code for ``X.Y`` runs on ``X.Z`` with ``Z >= Y`` (``X.Ya``: on ``X.Y`` only); PTX for
    ``X.Y`` is compiled by the driver for any GPU of capability ``>= X.Y``.
    """
    entries = [m for m in (_ARCH.fullmatch(t) for t in re.split(r"[;\s]+", archs.strip()) if t) if m]
    if not entries:
        return None
    for m in entries:
        arch = (int(m[1]), int(m[2]))
        exact_only = m[3].lower() == "a"
        if arch == capability or (not exact_only and arch[0] == capability[0] and arch[1] <= capability[1]):
            return True
        if m[4] and not exact_only and arch <= capability:
            return True
    return False


class CompiledOps:
    """The backend interface of :mod:`.reference` over the ops of one ``torch.library`` namespace: the
    extension's ``ssam_kernels`` (this module) or cuda_sim's ``ssam_cuda_sim`` (:mod:`.cuda_sim`), which
    share their schemas (``csrc/schemas.h``). ``direct``: eager list ops on plain CPU tensors first try
    the extension's direct calls (``_C.*_cpu``), which skip ``torch.ops``' conversion of the lists.
    Every method takes the backends' ``tuning`` keyword and has no use for it: the compiled kernels'
    block sizes and launch shapes are set where they are compiled (``csrc/``)."""

    def __init__(self, namespace: str, direct: bool = False) -> None:
        self.namespace = namespace
        self.direct = direct

    @property
    def _ops(self) -> object:
        return getattr(torch.ops, self.namespace)

    def _try_direct(self) -> bool:
        """Whether a list op may try its direct ``_C`` call: not while torch.compile traces (the
        registered op must be what it records); the C function checks the rest."""
        return self.direct and not torch.compiler.is_compiling()

    def grad_sq_norm(self, G: torch.Tensor, W: torch.Tensor | None = None, *, tuning: Tuning = DEFAULT
                     ) -> torch.Tensor:
        """``Σ g_i²`` (or ``Σ (g_i · w_i)²`` with ``W``) accumulated in float64 in a fixed order; a float64
        0-d tensor on ``G``'s device."""
        return self._ops.grad_sq_norm(G, W)

    def perturb_(self, W: torch.Tensor, G: torch.Tensor, mask: torch.Tensor | None,
                 offsets: torch.Tensor | None, backup: torch.Tensor, scale: torch.Tensor,
                 adaptive: bool = False, *, tuning: Tuning = DEFAULT) -> None:
        """For every set bit ``i`` below N with ``rank(i) < len(backup)``: ``backup[rank(i)] = W[i]``;
        then, if ``scale`` is finite and non-zero, ``W[i] = W[i] + scale·g_i`` (adaptive: ``+
        scale·w_i²·g_i``) with one fp32 fused multiply-add (float64 W: in float64;
        ``csrc/ssam_math.h``, bounds: ``ops.perturb_``)."""
        self._ops.perturb_(W, G, mask, _offsets(mask, offsets, W), backup, scale, adaptive)

    def restore_(self, W: torch.Tensor, mask: torch.Tensor | None, offsets: torch.Tensor | None,
                 backup: torch.Tensor, *, tuning: Tuning = DEFAULT) -> None:
        """``W[i] = backup[rank(i)]`` for every set bit ``i`` below N with ``rank(i) < len(backup)``."""
        self._ops.restore_(W, mask, _offsets(mask, offsets, W), backup)

    def fisher_accumulate_(self, F: torch.Tensor, G: torch.Tensor, alpha: float = 1.0,
                           *, tuning: Tuning = DEFAULT) -> None:
        """``F += alpha · G²`` with ``F`` float32 (``G`` any float dtype), one fp32 fused multiply-add."""
        self._ops.fisher_accumulate_(F, G, alpha)

    def grad_sq_norm_multi(self, G: list[torch.Tensor], W: list[torch.Tensor | None],
                           *, tuning: Tuning = DEFAULT) -> torch.Tensor:
        """The list form of :meth:`grad_sq_norm` (one device and dtype) in one call. CPU: one parallel
        pass, the per-tensor totals added in list order (bit-identical to adding the single results);
        CUDA: one launch over a table of the tensors, one partial per block of a one-wave grid added in a
        fixed order (deterministic per device)."""
        if self._try_direct():
            total = _C.grad_sq_norm_multi_cpu(G, W)
            if total is not None:
                return total
        return self._ops.grad_sq_norm_multi(G, W)

    def perturb_multi_(self, W: list[torch.Tensor], G: list[torch.Tensor], mask: list[torch.Tensor | None],
                       offsets: list[torch.Tensor | None], backup: list[torch.Tensor], scale: torch.Tensor,
                       adaptive: bool = False, *, tuning: Tuning = DEFAULT) -> None:
        """:meth:`perturb_` on every entry of the lists (one device and dtype) in one call; the
        registered op serves torch.compile, fake tensors, modes, CUDA, and the errors of bad arguments."""
        if self._try_direct() and _C.perturb_multi_cpu(W, G, mask, offsets, backup, scale, bool(adaptive)):
            return
        self._ops.perturb_multi_(W, G, mask, _offsets_list(mask, offsets, W), backup, scale, adaptive)

    def restore_multi_(self, W: list[torch.Tensor], mask: list[torch.Tensor | None],
                       offsets: list[torch.Tensor | None], backup: list[torch.Tensor],
                       *, tuning: Tuning = DEFAULT) -> None:
        """:meth:`restore_` on every entry of the lists (one device and dtype) in one call."""
        if self._try_direct() and _C.restore_multi_cpu(W, mask, offsets, backup):
            return
        self._ops.restore_multi_(W, mask, _offsets_list(mask, offsets, W), backup)

    def fisher_accumulate_multi_(self, F: list[torch.Tensor], G: list[torch.Tensor], alpha: float = 1.0,
                                 *, tuning: Tuning = DEFAULT) -> None:
        """:meth:`fisher_accumulate_` on every pair of the lists (``G`` of one device and dtype) in one
        call."""
        self._ops.fisher_accumulate_multi_(F, G, alpha)

    def axpby_(self, X: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
               *, tuning: Tuning = DEFAULT) -> None:
        """``X = a·X + b·Y`` element-wise: ``fma(b, y, rn(a·x))`` in fp32 with ``a``, ``b`` rounded to fp32
        (float64 X: in float64, no FMA; ``csrc/ssam_math.h``: ``axpby``)."""
        self._ops.axpby_(X, Y, a, b)

    def axpby_multi_(self, X: list[torch.Tensor], Y: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor,
                     *, tuning: Tuning = DEFAULT) -> None:
        """:meth:`axpby_` on every pair of the lists (one device and dtype) in one call (CPU: one parallel
        loop over all tensors; CUDA: one launch over a table of them)."""
        self._ops.axpby_multi_(X, Y, a, b)

    def radix_histogram(self, scores: torch.Tensor, prefix: torch.Tensor, shift: int, bits: int,
                        largest: bool, filter_words: torch.Tensor | None = None, filter_value: bool = True,
                        *, tuning: Tuning = DEFAULT) -> torch.Tensor:
        """Counts (int64, ``2^bits``) of the eligible entries whose key agrees with ``prefix`` above bit
        ``shift + bits``, by the digit ``(key >> shift) & (2^bits - 1)`` (keys:
        ``reference.score_keys``)."""
        return self._ops.radix_histogram(scores, prefix, shift, bits, largest, filter_words, filter_value)

    def threshold_mask(self, scores: torch.Tensor, threshold: torch.Tensor, tie_quota: torch.Tensor,
                       largest: bool, filter_words: torch.Tensor | None = None, filter_value: bool = True,
                       *, tuning: Tuning = DEFAULT) -> torch.Tensor:
        """Mask words selecting the eligible entries with key > ``threshold``, plus the first
        ``tie_quota`` eligible entries (index order) with key == ``threshold``."""
        return self._ops.threshold_mask(scores, threshold, tie_quota, largest, filter_words, filter_value)

    def radix_histogram_multi(self, scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, bits: int,
                              largest: bool, filters: list[torch.Tensor | None], filter_value: bool = True,
                              *, tuning: Tuning = DEFAULT) -> torch.Tensor:
        """The sum over the list (one device and dtype) of :meth:`radix_histogram` of each segment, in
        one call (CPU: one parallel loop over all segments; CUDA: one launch over a table of them)."""
        return self._ops.radix_histogram_multi(scores, prefix, shift, bits, largest, filters, filter_value)

    def threshold_mask_multi(self, scores: list[torch.Tensor], threshold: torch.Tensor,
                             tie_quota: torch.Tensor, largest: bool, filters: list[torch.Tensor | None],
                             filter_value: bool = True,
                             *, tuning: Tuning = DEFAULT) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The mask words of each segment (eligible keys > ``threshold``, then the first ``tie_quota``
        eligible ties of the list in list order) and the quota left, ``max(tie_quota - ties, 0)``."""
        return self._ops.threshold_mask_multi(scores, threshold, tie_quota, largest, filters, filter_value)

    def bucket_mask_multi(self, scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, largest: bool,
                          filters: list[torch.Tensor | None], filter_value: bool, words: list[torch.Tensor],
                          counts: list[torch.Tensor], starts: list[int], candidates: torch.Tensor,
                          cursor: torch.Tensor, *, tuning: Tuning = DEFAULT) -> None:
        """The bucket path's mask pass (:class:`ssam_kernels.ops.select.BucketBackend`), in one launch."""
        self._ops.bucket_mask_multi(scores, prefix, shift, largest, filters, filter_value, words, counts,
                                    starts, candidates, cursor)

    def hash_scores(self, n: int, seed: int, step: int, base: int, device: torch.device,
                    *, tuning: Tuning = DEFAULT) -> torch.Tensor:
        """``h(seed, step, j)`` for ``j = base … base + n - 1`` as int32 bit patterns
        (``reference.hash_scores``)."""
        out = torch.empty(n, dtype=torch.int32, device=device)
        self._ops.hash_fill_(out, seed, step, base)
        return out


BUCKET_MASK_DEVICES = ("cuda",)
"""Device types :func:`bucket_mask_multi` has kernels for (CPU tensors keep the third histogram pass and
``threshold_mask``)."""

_OPS = CompiledOps("ssam_kernels", direct=True)


def __getattr__(name: str) -> object:
    """The backend's op functions are :class:`CompiledOps`' methods over ``torch.ops.ssam_kernels``."""
    return getattr(_OPS, name)


def _offsets(mask: torch.Tensor | None, offsets: torch.Tensor | None, W: torch.Tensor) -> torch.Tensor | None:
    """The kernels find ranks from the offsets; a caller of the backend may leave them to us."""
    if mask is None or offsets is not None:
        return offsets
    return bitmask.offsets(mask, W.numel())


def _offsets_list(mask: list[torch.Tensor | None], offsets: list[torch.Tensor | None], W: list[torch.Tensor]
                  ) -> list[torch.Tensor | None]:
    """:func:`_offsets` for each entry (the ops layer always gives them: then the list as it is)."""
    if all(o is not None or m is None for m, o in zip(mask, offsets, strict=True)):
        return offsets
    return [_offsets(m, o, w) for m, o, w in zip(mask, offsets, W, strict=True)]


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

    @torch.library.register_fake("ssam_kernels::grad_sq_norm_multi")
    def _grad_sq_norm_multi_fake(G: list[torch.Tensor], W: list[torch.Tensor | None]) -> torch.Tensor:
        return G[0].new_empty((), dtype=torch.float64)

    @torch.library.register_fake("ssam_kernels::perturb_multi_")
    def _perturb_multi_fake(W: list[torch.Tensor], G: list[torch.Tensor], mask: list[torch.Tensor | None],
                            offsets: list[torch.Tensor | None], backup: list[torch.Tensor],
                            scale: torch.Tensor, adaptive: bool) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::restore_multi_")
    def _restore_multi_fake(W: list[torch.Tensor], mask: list[torch.Tensor | None],
                            offsets: list[torch.Tensor | None], backup: list[torch.Tensor]) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::fisher_accumulate_multi_")
    def _fisher_accumulate_multi_fake(F: list[torch.Tensor], G: list[torch.Tensor], alpha: float) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::axpby_")
    def _axpby_fake(X: torch.Tensor, Y: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::axpby_multi_")
    def _axpby_multi_fake(X: list[torch.Tensor], Y: list[torch.Tensor], a: torch.Tensor, b: torch.Tensor
                          ) -> None:
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

    @torch.library.register_fake("ssam_kernels::radix_histogram_multi")
    def _radix_histogram_multi_fake(scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, bits: int,
                                    largest: bool, filters: list[torch.Tensor | None],
                                    filter_value: bool) -> torch.Tensor:
        return prefix.new_empty(1 << bits, dtype=torch.int64)

    @torch.library.register_fake("ssam_kernels::threshold_mask_multi")
    def _threshold_mask_multi_fake(scores: list[torch.Tensor], threshold: torch.Tensor,
                                   tie_quota: torch.Tensor, largest: bool, filters: list[torch.Tensor | None],
                                   filter_value: bool) -> tuple[list[torch.Tensor], torch.Tensor]:
        return ([s.new_empty(bitmask.num_words(s.numel()), dtype=torch.int32) for s in scores],
                tie_quota.new_empty(()))

    @torch.library.register_fake("ssam_kernels::bucket_mask_multi")
    def _bucket_mask_multi_fake(scores: list[torch.Tensor], prefix: torch.Tensor, shift: int, largest: bool,
                                filters: list[torch.Tensor | None], filter_value: bool,
                                words: list[torch.Tensor], counts: list[torch.Tensor], starts: list[int],
                                candidates: torch.Tensor, cursor: torch.Tensor) -> None:
        return None

    @torch.library.register_fake("ssam_kernels::hash_fill_")
    def _hash_fill_fake(out: torch.Tensor, seed: int, step: int, base: int) -> None:
        return None
