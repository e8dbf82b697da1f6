"""The Triton backend: the primitives of :mod:`ssam_kernels.ops.reference`, with the same meanings.

One file per op family: :mod:`.norm` (``grad_sq_norm``), :mod:`.perturb` (``perturb_``, ``restore_``),
:mod:`.fisher` (``fisher_accumulate_``), :mod:`.axpby` (``axpby_``), :mod:`.radix` (``radix_histogram``,
``threshold_mask``, ``bucket_mask_multi``) and
:mod:`.hashing` (``hash_scores``). Runs on CUDA tensors, and on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1`` set before this package is imported; slow, for tests).

The hot-path ops (norm, perturb, restore, Fisher, axpby) are registered with :func:`torch.library.custom_op`
in the ``ssam_kernels`` namespace as ``triton_<op>`` (the native ops hold the plain names), with their
mutated arguments declared, so a ``torch.compile``\\ d caller sees one opaque op per call instead of
breaking its graph. ``custom_op`` rather than ``triton_op``: the launch options (``enable_fp_fusion=False``
for the reference's rounding) are not carried through Inductor's traced user-kernel path, and the opaque op
also works with interpreted kernels on CPU.
"""

from __future__ import annotations

import torch

try:
    import triton  # noqa: F401  (probe only: the submodules import it for real)
except ImportError as exc:
    _IMPORT_ERROR: str | None = f"triton could not be imported ({exc}); pip install triton"
else:
    _IMPORT_ERROR = None
    from ._config import INTERPRET
    from .axpby import axpby_, axpby_multi_
    from .fisher import fisher_accumulate_, fisher_accumulate_multi_
    from .hashing import hash_scores
    from .norm import grad_sq_norm, grad_sq_norm_multi
    from .perturb import perturb_, perturb_multi_, restore_, restore_multi_
    from .radix import (
        BUCKET_MASK_DEVICES,
        bucket_mask_multi,
        radix_histogram,
        radix_histogram_multi,
        threshold_mask,
        threshold_mask_multi,
    )

__all__ = ["BUCKET_MASK_DEVICES", "axpby_", "axpby_multi_", "bucket_mask_multi", "fisher_accumulate_",
           "fisher_accumulate_multi_", "grad_sq_norm", "grad_sq_norm_multi",
           "hash_scores", "perturb_", "perturb_multi_", "radix_histogram", "radix_histogram_multi",
           "restore_", "restore_multi_", "threshold_mask", "threshold_mask_multi", "unavailable_reason"]


def unavailable_reason(device: torch.device | str) -> str | None:
    """None when the Triton backend can run on ``device`` tensors, else why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    device_type = torch.device(device).type
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "torch.cuda is not available"
    if device_type == "cpu":
        if INTERPRET:
            return None
        return ("Triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                "ssam_kernels.ops.triton is imported")
    return f"Triton kernels do not run on {device_type} tensors"
