"""setup.py's constants are the one list of the compiled sources and flags (CMake, the CUDA compile check and
the static report read them): they name every source file in csrc/, and reading them builds nothing."""

from __future__ import annotations

import runpy
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_setup_lists_every_source_and_reading_it_builds_nothing(tmp_path: Path) -> None:
    spec = runpy.run_path(str(REPO / "setup.py"), run_name="ssam_build_spec")
    csrc = REPO / "csrc"

    def on_disk(pattern: str) -> set[str]:
        return {p.relative_to(REPO).as_posix() for p in csrc.glob(pattern)}

    assert set(spec["CPP_SOURCES"]) == on_disk("*.cpp") | on_disk("cpu/*.cpp")
    assert set(spec["CUDA_SOURCES"]) == on_disk("cuda/*.cu")
    assert set(spec["CUDA_SIM_SOURCES"]) == on_disk("sim/*.cpp")
    spec["write_cmake_spec"](str(tmp_path))
    cmake = (tmp_path / "build_spec.cmake").read_text()
    assert f"set(SSAM_CXX_FLAGS {' '.join(spec['CXX_FLAGS'])})" in cmake
    assert f"set(SSAM_CPP_SOURCES {' '.join(spec['CPP_SOURCES'])})" in cmake
    assert (tmp_path / "ssam_contract.h").is_file()
    assert "extensions" not in spec  # setup() did not run
