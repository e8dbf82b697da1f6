#!/usr/bin/env bash
# Compiles (nvcc -c, no link, no GPU needed) every CUDA source of setup.py (CUDA_SOURCES, with its NVCC_FLAGS
# and INCLUDE_DIRS) against the installed torch's headers, for the architectures in SSAM_CHECK_ARCHS (default "80 90"; nvcc 13 dropped compute capabilities < 7.5).
# Exits non-zero, naming the file, if any of them fails. Works with a CPU-only torch: its wheel ships the
# c10/cuda and ATen headers, only the CMake-generated c10/cuda/impl/cuda_cmake_macros.h is missing, and
# C10_CUDA_NO_CMAKE_CONFIGURE_FILE tells c10 to do without it.
#
# Usage: csrc/check_cuda_compile.sh   (NVCC=/path/to/nvcc picks the compiler, SSAM_CHECK_JOBS=N the number of
#                                     files compiled at once, default nproc)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
nvcc="${NVCC:-nvcc}"
command -v "$nvcc" >/dev/null || { echo "check_cuda_compile: nvcc not found (set NVCC or PATH)" >&2; exit 2; }
archs="${SSAM_CHECK_ARCHS:-80 90}"

torch_include="$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "include"))')"
# The nvcc flags torch.utils.cpp_extension adds to every CUDA extension (what setup.py's build uses).
read -r -a common_flags <<<"$(python -c 'from torch.utils import cpp_extension as c; print(*c.COMMON_NVCC_FLAGS)')"
# The C++ standard torch's own extension builder uses (C++20 from torch 2.10 on, C++17 before).
cxx_std="$(python - <<'PY'
import re, inspect
from torch.utils import cpp_extension
print(max(re.findall(r"-std=(c\+\+\d\d)", inspect.getsource(cpp_extension)), key=lambda s: int(s[3:])))
PY
)"

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
# setup.py's CUDA sources, nvcc flags and include dirs, one list a line, and ssam_contract.h (the op contract's
# constants) generated into $out/generated as setup.py and CMake generate it.
{ read -r -a sources; read -r -a nvcc_flags; read -r -a include_dirs; } < <(python -c '
import runpy, sys
spec = runpy.run_path(sys.argv[1], run_name="ssam_build_spec")
spec["write_contract_header"](sys.argv[2])
for name in ("CUDA_SOURCES", "NVCC_FLAGS", "INCLUDE_DIRS"):
    print(*spec[name])' "$root/setup.py" "$out/generated")
sources=("${sources[@]/#/$root/}")
[[ ${#sources[@]} -gt 0 ]] || { echo "check_cuda_compile: setup.py lists no CUDA sources" >&2; exit 2; }

flags=(-c "${nvcc_flags[@]}" "-std=$cxx_std" "${common_flags[@]}" -DSSAM_WITH_CUDA=1 -DTORCH_EXTENSION_NAME=_C
       -DTORCH_API_INCLUDE_EXTENSION_H "${include_dirs[@]/#/-I$root/}" -I "$out/generated" -I "$torch_include"
       -I "$torch_include/torch/csrc/api/include" -Xcompiler -fPIC -diag-suppress 3306)
if [[ ! -f "$torch_include/c10/cuda/impl/cuda_cmake_macros.h" ]]; then
  flags+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
for arch in $archs; do
  flags+=(-gencode "arch=compute_$arch,code=sm_$arch")
done

shopt -s nullglob
jobs="${SSAM_CHECK_JOBS:-$(nproc)}"
echo "check_cuda_compile: $("$nvcc" --version | tail -1); -std=$cxx_std; sm_${archs// /, sm_}; $jobs at a time"

# One file: its compiler output to $out/NAME.log, its verdict to stdout after it finished.
compile() {
  local src="$1" name start
  name="$(basename "$src")"
  start=$SECONDS
  if "$nvcc" "${flags[@]}" "$src" -o "$out/$name.o" >"$out/$name.log" 2>&1; then
    cat "$out/$name.log"
    echo "check_cuda_compile: OK     $name ($((SECONDS - start)) s)"
  else
    cat "$out/$name.log" >&2
    echo "check_cuda_compile: FAILED $name" >&2
    touch "$out/$name.failed"
  fi
}

# The files are independent and each spends most of its time in torch's headers: they compile in parallel.
for src in "${sources[@]}"; do
  while [[ $(jobs -rp | wc -l) -ge $jobs ]]; do
    wait -n || true
  done
  compile "$src" &
done
wait
failed=("$out"/*.failed)
if [[ ${#failed[@]} -gt 0 ]]; then
  names=("${failed[@]##*/}")
  echo "check_cuda_compile: ${#failed[@]} CUDA source(s) failed to compile: ${names[*]%.failed}" >&2
  exit 1
fi
