#!/usr/bin/env bash
# One command for whoever gets a CUDA machine: environment, CUDA build, full tests, GPU benchmarks.
#
#   bash bench/gpu_check.sh [RESULTS_DIR]
#
# Writes into RESULTS_DIR (default bench/results/gpu-<UTC time>): nvidia-smi.txt, versions.txt,
# build.log, tests.log + tests.xml, bench.log + bench/ (Markdown/JSON/PNG tables), summary.txt.
#
# Environment (all optional):
#   PYTHON=python3          interpreter that creates the venv (or is used as is with VENV=none)
#   VENV=.venv-gpu          venv folder (created with --system-site-packages so a preinstalled CUDA
#                           torch is reused); VENV=none uses $PYTHON directly
#   SKIP_INSTALL=1          never run pip (offline machines): fail clearly if something is missing
#   TORCH_INDEX_URL=...     pip index for the CUDA torch wheel (e.g. https://download.pytorch.org/whl/cu130
#                           when the local nvcc is CUDA 13); default: PyPI's torch (a CUDA build on Linux)
#   BENCH_ARGS="--full"     arguments of `python -m avg_kernels bench` (e.g. "--quick" when time is short)
#   PYTEST_ARGS=""          extra pytest arguments
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-$ROOT/bench/results/gpu-$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-$ROOT/.venv-gpu}"
BENCH_ARGS="${BENCH_ARGS:---full}"
PYTEST_ARGS="${PYTEST_ARGS:-}"

say() { echo "[gpu_check] $*" | tee -a "$OUT/summary.txt"; }
die() { say "FAILED: $*"; say "results so far: $OUT"; exit 1; }

say "results folder: $OUT"
command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this script needs a CUDA machine"
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1 || die "nvidia-smi failed (see $OUT/nvidia-smi.txt)"
NVCC="$(command -v nvcc || true)"
if [ -z "$NVCC" ] && [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then NVCC="$CUDA_HOME/bin/nvcc"; fi
if [ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ]; then NVCC=/usr/local/cuda/bin/nvcc; fi
[ -n "$NVCC" ] || die "nvcc not found: install the CUDA toolkit or set CUDA_HOME (the CUDA kernels are compiled here)"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$NVCC")")}"
export PATH="$CUDA_HOME/bin:$PATH"

# --- environment -------------------------------------------------------------------------------
if [ "$VENV" = "none" ]; then
  PY="$(command -v "$PYTHON")"
else
  if [ ! -x "$VENV/bin/python" ]; then
    say "creating venv $VENV"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  fi
  PY="$VENV/bin/python"
fi
say "python: $PY"

pip_install() {
  [ "${SKIP_INSTALL:-0}" != 1 ] || die "missing: $* (SKIP_INSTALL=1, so not installing)"
  say "pip install $*"
  "$PY" -m pip install --quiet "$@" >> "$OUT/pip.log" 2>&1 || die "pip install $* failed (see $OUT/pip.log)"
}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else 1)" 2>/dev/null; then
  if [ -n "${TORCH_INDEX_URL:-}" ]; then
    pip_install "torch>=2.13" --index-url "$TORCH_INDEX_URL"  # brings its matching triton
  else
    pip_install "torch>=2.13"  # PyPI's Linux torch is a CUDA build and brings its matching triton
  fi
fi
MISSING=""
for mod in triton numpy ninja pybind11 pytest matplotlib tqdm sklearn mpmath setuptools wheel; do
  "$PY" -c "import $mod" 2>/dev/null || MISSING="$MISSING $mod"
done
if [ -n "$MISSING" ]; then
  pip_install $(echo "$MISSING" | sed 's/sklearn/scikit-learn/')
fi
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
  || die "torch $("$PY" -c 'import torch; print(torch.__version__)') sees no CUDA device"

TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda)')"
NVCC_CUDA="$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\).*/\1/p')"
if [ "${TORCH_CUDA%%.*}" != "${NVCC_CUDA%%.*}" ]; then
  die "torch was built with CUDA $TORCH_CUDA but nvcc is CUDA $NVCC_CUDA: install a matching torch, e.g. \
TORCH_INDEX_URL=https://download.pytorch.org/whl/cu$(echo "$NVCC_CUDA" | tr -d .) (with a fresh VENV)"
fi

{
  echo "date (UTC): $(date -u)"
  echo "git: $(git rev-parse HEAD 2>/dev/null || echo '?') $(git status --porcelain 2>/dev/null | wc -l) changed files"
  echo "csrc last changed in: $(git log -1 --format='%h %cs %s' -- csrc 2>/dev/null || echo '?')"
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); print("gpu", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))'
  "$PY" -c 'import triton; print("triton", triton.__version__)'
  "$NVCC" --version | tail -n 2
  "${CXX:-c++}" --version | head -n 1
  lscpu 2>/dev/null | grep -E 'Model name|^CPU\(s\)' || true
  echo "--- pip freeze"
  "$PY" -m pip freeze 2>/dev/null || true
} > "$OUT/versions.txt" 2>&1
say "versions: $OUT/versions.txt"

# --- build ---------------------------------------------------------------------------------------
say "building avg_kernels._C with CUDA (AVG_KERNELS_CUDA=1)"
AVG_KERNELS_CUDA=1 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || die "build failed (see $OUT/build.log)"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c 'import avg_kernels as ak; b = ak.available_backends(); print(b); assert "cuda" in b and "triton" in b, b' \
  >> "$OUT/build.log" 2>&1 || die "the built extension does not offer the cuda and triton backends (see $OUT/build.log)"
say "backends: $(tail -n 1 "$OUT/build.log")"

# --- tests (the suite poisons kernel outputs itself) ----------------------------------------------
say "running the full test suite"
set +e
# shellcheck disable=SC2086
"$PY" -m pytest tests -ra --junitxml="$OUT/tests.xml" $PYTEST_ARGS > "$OUT/tests.log" 2>&1
TEST_RC=$?
set -e
say "tests: exit $TEST_RC; $(tail -n 1 "$OUT/tests.log")"

# --- benchmarks ----------------------------------------------------------------------------------
say "running: python -m avg_kernels bench $BENCH_ARGS --device cuda"
set +e
# shellcheck disable=SC2086
"$PY" -m avg_kernels bench $BENCH_ARGS --device cuda --no-progress --out "$OUT/bench" > "$OUT/bench.log" 2>&1
BENCH_RC=$?
set -e
say "bench: exit $BENCH_RC; tables: $OUT/bench"

say "done: tests exit $TEST_RC, bench exit $BENCH_RC"
say "RESULTS: $OUT"
[ "$TEST_RC" = 0 ] && [ "$BENCH_RC" = 0 ]
