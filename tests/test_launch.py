"""The host-side launch arithmetic of the CUDA kernels (``csrc/launch.h``: the whole-wave grid of the norm,
the per-tensor 16-byte alignment decision and the list kernels' warp search): its C++ tests
(``csrc/tests/test_launch.cpp``), compiled with the host C++ compiler and run here, as ctest runs them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("c++") is None, reason="no host C++ compiler")
def test_launch_arithmetic(tmp_path: Path) -> None:
    exe = tmp_path / "test_launch"
    build = subprocess.run(["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", "-o", str(exe),
                            str(REPO / "csrc" / "tests" / "test_launch.cpp")], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "all passed" in run.stdout
