"""Builds ssam_kernels and, when it can, its compiled extension ``ssam_kernels._C``.

- CUDA extension: torch was built with CUDA and a CUDA toolkit is found (``CUDA_HOME`` / ``nvcc``);
  architectures from ``TORCH_CUDA_ARCH_LIST`` (default ``8.0;9.0``).
- CPU C++ extension: otherwise, when a C++ compiler is found.
- Nothing compiled: ``SSAM_KERNELS_NO_EXT=1``, no compiler, no sources, or a failed build. The package
  then installs as pure Python and runs on the reference (and Triton) backends; a failed optional build
  prints why and never leaves a broken install.

Build with the installed torch: ``pip install --no-build-isolation .``
"""

from __future__ import annotations

import glob
import os
import shutil
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


def _log(message: str) -> None:
    print(f"ssam_kernels setup: {message}", file=sys.stderr)


def _extensions() -> tuple[list, type[build_ext]]:
    """The extension modules to build and the build_ext command class, or none."""
    if os.environ.get("SSAM_KERNELS_NO_EXT", "0") not in ("", "0"):
        _log("SSAM_KERNELS_NO_EXT is set: installing without the compiled extension")
        return [], build_ext
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*.cu")))
    if not cpp_sources:
        return [], build_ext
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        _log("no C++ compiler found: installing without the compiled extension")
        return [], build_ext
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _log("torch is not importable in the build environment (use --no-build-isolation): "
             "installing without the compiled extension")
        return [], build_ext

    # torch.utils.cpp_extension picks the C++ standard of the installed torch (C++17 or C++20).
    # -ffp-contract=off: no FMA contraction, so the fp32 formulas round like the reference's.
    cxx_flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    include_dirs = [os.path.join(HERE, "csrc")]
    define_macros = [("SSAM_PYTHON_MODULE", "1")]
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None and cuda_sources
    if with_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
        ext = cpp_extension.CUDAExtension(
            "ssam_kernels._C", cpp_sources + cuda_sources, include_dirs=include_dirs,
            define_macros=[*define_macros, ("SSAM_WITH_CUDA", "1")], extra_link_args=["-fopenmp"],
            # No --use_fast_math: flushing denormals would change results the contract fixes.
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3"]})
        _log(f"building the CUDA extension for TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    else:
        ext = cpp_extension.CppExtension("ssam_kernels._C", cpp_sources, include_dirs=include_dirs,
                                         define_macros=define_macros, extra_compile_args=cxx_flags,
                                         extra_link_args=["-fopenmp"])
        _log("building the CPU C++ extension (no CUDA torch or toolkit found)")

    class OptionalBuildExt(cpp_extension.BuildExtension):
        """Builds the extension; a failure leaves a working pure-Python install and says why."""

        def build_extensions(self) -> None:
            try:
                super().build_extensions()
            except Exception as exc:
                _log(f"the compiled extension failed to build ({exc}); installing without it. "
                     "The reference backend still works; see README 'Build from source'.")
                self.extensions = []

    return [ext], OptionalBuildExt.with_options(use_ninja=shutil.which("ninja") is not None)


extensions, build_ext_class = _extensions()
setup(ext_modules=extensions, cmdclass={"build_ext": build_ext_class})
