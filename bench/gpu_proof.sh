#!/usr/bin/env bash
# The GPU proof on a bare CUDA machine, in one command (no pip, no network, no TensorRT needed):
#
#     bash bench/gpu_proof.sh OUT_DIR [arguments of python -m javisrt.bench.gpu_proof]
#     e.g. bash bench/gpu_proof.sh "$OUT"                   # all parts, 300 s deadline
#          bash bench/gpu_proof.sh "$OUT" --parts 2,4        # rerun selected parts
#
# 1. builds javisrt._sampler with cmake + nvcc (Hopper gencode of cpp/CMakeLists.txt) into the checkout
#    and checks that it was compiled with CUDA (_sampler.cuda_compiled());
# 2. makes `import javisrt` load this checkout (a temporary folder holding a `javisrt` symlink to the
#    repository root goes first on PYTHONPATH);
# 3. runs `python -m javisrt.bench.gpu_proof --out OUT_DIR ...`: part JSONs, part1_junit.xml and
#    summary.md land directly in OUT_DIR (7 files at most); the summary table is printed last.
#
# Needs: python3 with torch (CUDA), triton, numpy, pybind11, pytest; cmake >= 3.18; nvcc; the Python
# headers. PYTHON overrides the interpreter. If the loop cannot be built with CUDA, the proof still runs
# (part 4 then records why the device loop is missing) and this script exits 3.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_ARG="${1:?usage: bash bench/gpu_proof.sh OUT_DIR [python -m javisrt.bench.gpu_proof arguments]}"
shift
mkdir -p "$OUT_ARG"
OUT_DIR="$(cd "$OUT_ARG" && pwd)"
PY="${PYTHON:-python3}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/javisrt-proof.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
export PYTHONUNBUFFERED=1

echo "== javisrt GPU proof: $REPO -> $OUT_DIR"
"$PY" - <<'EOF'
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"cuda available: {torch.cuda.is_available()}", flush=True)
EOF
nvcc --version | tail -n 2 || true
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true

# 1. the C++ sampling loop, with CUDA
loop_ok=1
build_loop() {
  local pybind11_dir generator=()
  pybind11_dir="$("$PY" -c 'import pybind11; print(pybind11.get_cmake_dir())')"
  command -v ninja >/dev/null && generator=(-G Ninja)
  cmake -S "$REPO/cpp" -B "$WORK/build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DJAVISRT_CUDA=ON \
    -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$REPO/" \
    -DPython_EXECUTABLE="$(command -v "$PY")" \
    -DPYTHON_EXECUTABLE="$(command -v "$PY")" \
    -Dpybind11_DIR="$pybind11_dir" >"$WORK/cmake.log" 2>&1 \
    && cmake --build "$WORK/build" -j "$(nproc)" >>"$WORK/cmake.log" 2>&1
}
t0=$SECONDS
if build_loop; then
  echo "== built javisrt._sampler in $((SECONDS - t0)) s: $(ls "$REPO"/_sampler*.so)"
else
  loop_ok=0
  echo "ERROR: building javisrt._sampler failed; the last lines of the cmake log:" >&2
  tail -n 40 "$WORK/cmake.log" >&2
fi

# 2. `import javisrt` = this checkout
mkdir -p "$WORK/path"
ln -s "$REPO" "$WORK/path/javisrt"
export PYTHONPATH="$WORK/path${PYTHONPATH:+:$PYTHONPATH}"

if [ "$loop_ok" = 1 ] && ! "$PY" - <<'EOF'
from javisrt import _sampler
assert _sampler.cuda_compiled(), "javisrt._sampler was built without nvcc: cuda_compiled() is False"
print(f"== javisrt._sampler: cuda_compiled() True, {_sampler.cuda_device_count()} CUDA device(s)", flush=True)
EOF
then
  loop_ok=0
  echo "ERROR: javisrt._sampler is not a working CUDA build (see above)" >&2
fi

# 3. the proof
set +e
(cd "$REPO" && "$PY" -m javisrt.bench.gpu_proof --out "$OUT_DIR" "$@")
status=$?
set -e
if [ "$loop_ok" != 1 ]; then
  echo "ERROR: the proof ran without a CUDA-built javisrt._sampler (device loop unproven)" >&2
  exit 3
fi
exit "$status"
