"""The op contract's constants reach the C++ and CUDA kernels only through ``ssam_contract.h``, which
``ssam_kernels/ops/contract.py`` writes: the header states contract.py's values, the build compiled the
current header, and no file of csrc/ spells one of the numbers itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ssam_kernels.ops import contract

REPO = Path(__file__).resolve().parent.parent
CONSTANT = re.compile(r"^constexpr (int|int64_t|uint32_t) (\w+) = (0x[0-9A-F]+u|\d+);", re.MULTILINE)


def header_values(text: str) -> dict[str, int]:
    return {name: int(value.rstrip("u"), 0) for _, name, value in CONSTANT.findall(text)}


def test_header_states_the_contract() -> None:
    s0, s1, s2 = contract.MIX32_SHIFTS
    m0, m1 = contract.MIX32_MULTIPLIERS
    assert header_values(contract.cpp_header()) == {
        "kChunk": contract.CHUNK, "kWordsPerChunk": contract.WORDS_PER_CHUNK, "kKeyBits": contract.KEY_BITS,
        "kKeyMask": contract.KEY_MASK, "kKeySignBit": contract.KEY_SIGN_BIT, "kNanKey": contract.NAN_KEY,
        "kMix32Shift0": s0, "kMix32Shift1": s1, "kMix32Shift2": s2, "kMix32Multiplier0": m0,
        "kMix32Multiplier1": m1, "kHashStepSalt": contract.HASH_STEP_SALT}
    assert "do not edit" in contract.cpp_header().splitlines()[0]


def test_write_cpp_header_keeps_an_unchanged_header(tmp_path: Path) -> None:
    path = Path(contract.write_cpp_header(str(tmp_path / "generated")))
    assert path.read_text() == contract.cpp_header()
    stamp = path.stat().st_mtime_ns
    contract.write_cpp_header(str(tmp_path / "generated"))
    assert path.stat().st_mtime_ns == stamp  # nothing that includes it recompiles
    path.write_text("stale")
    contract.write_cpp_header(str(tmp_path / "generated"))
    assert path.read_text() == contract.cpp_header()


def test_the_build_compiled_the_current_header() -> None:
    built = REPO / "build" / "ssam_generated" / contract.CPP_HEADER
    if not built.exists():
        pytest.skip("no extension built in place here (setup.py writes build/ssam_generated)")
    assert built.read_text() == contract.cpp_header(), "contract.py changed since the build: rebuild"


# Literals of the contract that csrc/ must take from the header. The C++ tests state what they check
# themselves (as tests/oracles.py does), and cuda_sim's block-size limit is CUDA's 1024, not the chunk.
LITERALS = [
    *(rf"0x0*{value:x}(?![0-9a-f])|\b{value}\b"
      for value in (*contract.MIX32_MULTIPLIERS, contract.HASH_STEP_SALT, contract.KEY_SIGN_BIT)),
    rf"\b{contract.CHUNK}\b", rf"\b{contract.CHUNK - 1}\b",
]
ALLOWED = {("csrc/sim/device.h",
            "constexpr int kMaxBlockThreads = 1024;  // CUDA's limit on the threads of a block")}


def test_csrc_spells_no_contract_constant() -> None:
    sources = [p for p in (REPO / "csrc").rglob("*") if p.suffix in {".h", ".cpp", ".cu", ".cuh", ".sh"}
               and "tests" not in p.relative_to(REPO / "csrc").parts]
    assert len(sources) > 10
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for path in sources for number, line in enumerate(path.read_text().splitlines(), 1)
             if any(re.search(pattern, line, re.IGNORECASE) for pattern in LITERALS)
             and (path.relative_to(REPO).as_posix(), line.strip()) not in ALLOWED]
    assert not found, "use the constants of ssam_contract.h:\n" + "\n".join(found)
