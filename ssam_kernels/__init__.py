"""ssam_kernels: Sparse SAM (SSAM) for PyTorch with fused kernels.

See README.md and ``docs/usage.md`` for usage, ``docs/DESIGN.md`` for the design and the op contract.
"""

from . import ops
from .batchnorm import frozen_bn_stats
from .fisher import fisher_information
from .masks import DynamicMask, FisherMask, MaskPolicy, RandomMask, topk_mask
from .ops import available_backends
from .optim import SAM, SSAM
from .schedules import AESAM, EveryK, EveryStep, LookSAM, Schedule

__all__ = [
    "AESAM", "SAM", "SSAM", "DynamicMask", "EveryK", "EveryStep", "FisherMask", "LookSAM",
    "MaskPolicy", "RandomMask", "Schedule", "available_backends", "fisher_information", "frozen_bn_stats",
    "ops", "topk_mask",
]
__version__ = "0.1.0"
