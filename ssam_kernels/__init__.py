"""ssam_kernels: Sparse SAM (SSAM) for PyTorch with fused kernels.

See README.md for usage and ``shared/DESIGN.md`` for the op contract.
"""

from . import ops
from .fisher import fisher_information
from .ops import available_backends

__all__ = ["available_backends", "fisher_information", "ops"]
__version__ = "0.1.0"
