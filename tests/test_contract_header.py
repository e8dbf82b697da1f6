"""The op contract's constants and argument rules reach the C++ and CUDA kernels only through
``ssam_contract.h``, which ``ssam_kernels/ops/contract.py`` writes: the header states contract.py's values
and dtype sets, the build compiled the current header, no file of csrc/ spells one of the numbers itself,
and the compiled list check accepts exactly what the Python checks accept."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from ssam_kernels import ops
from ssam_kernels.ops import bitmask, contract

REPO = Path(__file__).resolve().parent.parent
CONSTANT = re.compile(r"^constexpr (int|int64_t|uint32_t) (\w+) = (0x[0-9A-F]+u|\d+);", re.MULTILINE)


def header_values(text: str) -> dict[str, int]:
    return {name: int(value.rstrip("u"), 0) for _, name, value in CONSTANT.findall(text)}


def test_header_states_the_contract() -> None:
    s0, s1, s2 = contract.MIX32_SHIFTS
    m0, m1 = contract.MIX32_MULTIPLIERS
    assert header_values(contract.cpp_header()) == {
        "kChunk": contract.CHUNK, "kWordBits": contract.WORD_BITS, "kWordsPerChunk": contract.WORDS_PER_CHUNK,
        "kKeyBits": contract.KEY_BITS,
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


DTYPE_SET = re.compile(r"^#define SSAM_(\w+)\(X\) (.*)$", re.MULTILINE)
SCALAR_TYPES = {"Float": "float32", "Double": "float64", "BFloat16": "bfloat16", "Half": "float16",
                "Int": "int32", "Long": "int64"}


def test_header_states_the_dtype_sets_and_sizes() -> None:
    text = contract.cpp_header()
    sets = {name: tuple(SCALAR_TYPES[t] for t in re.findall(r"X\((\w+)\)", body))
            for name, body in DTYPE_SET.findall(text)}
    assert sets == {name: getattr(contract, name) for name in
                    ("FLOAT_DTYPES", "SCORE_DTYPES", "MASK_DTYPES", "OFFSETS_DTYPES", "SCALE_DTYPES",
                     "FISHER_DTYPES")}
    for rule in ("num_words", "num_chunks", "num_offsets"):
        assert f"constexpr int64_t {rule}(int64_t n)" in text
    assert [contract.num_words(n) for n in (0, 1, 32, 33)] == [0, 1, 1, 2]
    assert [contract.num_offsets(n) for n in (0, 1, 1024, 1025)] == [1, 2, 2, 3]


EVERY_DTYPE = [torch.float32, torch.float64, torch.bfloat16, torch.float16, torch.int32, torch.int64,
               torch.int16, torch.uint8, torch.bool, torch.complex64]


def _entries() -> list[tuple[str, dict[str, torch.Tensor | None]]]:
    """One valid masked perturb_ entry, and variants that each change one argument's dtype, size or shape."""
    n = 1025
    mask, offsets = bitmask.from_bool(torch.rand(n, generator=torch.Generator().manual_seed(0)) < 0.5)
    valid = {"W": torch.randn(n), "G": torch.randn(n), "mask": mask, "offsets": offsets,
             "backup": torch.empty(int(offsets[-1]))}
    cases = [("valid", valid), ("dense", {**valid, "mask": None, "offsets": None, "backup": torch.empty(n)})]
    for name, t in valid.items():
        cases += [(f"{name} {dtype}", {**valid, name: t.to(dtype)})
                  for dtype in EVERY_DTYPE if dtype != t.dtype]
        cases += [(f"{name} one longer", {**valid, name: torch.cat([t, t[:1]])}),
                  (f"{name} 2-D", {**valid, name: t.view(1, -1)}),
                  (f"{name} strided", {**valid, name: torch.stack([t, t], 1)[:, 0]})]
    cases += [(f"W, G, backup {dtype}", {**valid, **{k: valid[k].to(dtype) for k in ("W", "G", "backup")}})
              for dtype in EVERY_DTYPE]
    return cases


def _python_accepts(entry: dict[str, torch.Tensor | None], scale: torch.Tensor) -> bool:
    try:
        ops._check_element_lists(*([entry[k]] for k in ("W", "G", "mask", "offsets", "backup")), scale)
    except (TypeError, ValueError):
        return False
    return True


@pytest.mark.skipif(ops._C is None, reason="the compiled extension is not built")
@pytest.mark.parametrize("scale_dtype", EVERY_DTYPE[:4])
def test_compiled_list_check_accepts_what_python_accepts(monkeypatch, scale_dtype) -> None:
    """``_C.first_invalid_entry`` (entry_ok, on the generated dtype sets and sizes) and the Python checks
    (the predicate and the full checks, with the extension switched off) agree on every variant."""
    compiled = ops._C
    monkeypatch.setattr(ops, "_C", None)
    scale = torch.tensor(0.5, dtype=scale_dtype)
    disagree = []
    for name, entry in _entries():
        lists = [[entry[k]] for k in ("W", "G")] + [[entry[k]] for k in ("mask", "offsets", "backup")]
        by_cpp = compiled.first_invalid_entry(lists[0], lists[1], False, *lists[2:], scale) < 0
        if by_cpp != _python_accepts(entry, scale):
            disagree.append(f"{name}: compiled {'accepts' if by_cpp else 'rejects'}")
    assert not disagree, disagree
