#!/usr/bin/env bash
# CI check of the CUDA kernels without a GPU and without libtorch:
#   1. configures and builds the standalone CMake project (CMakeLists.txt) from scratch: nvcc
#      compiles every kernel of csrc/cuda/avg_act_kernel.cuh (every activation of the table
#      AVG_KERNELS_ACTIVATIONS x 4 dtypes x {16-byte vector, scalar}), of
#      csrc/cuda/ag_update_kernel.cuh (9 multi-tensor AG kernels: AG-1 into θ or θ', float and double; AG-2) and
#      of csrc/cuda/gram_kernel.cuh (4 dtypes x {int32, int64 positions}) for sm_80 and sm_90 with
#      -Xptxas -v, and g++ the C++ unit tests;
#   2. runs the unit tests (ctest);
#   3. prints a per-kernel register / stack / spill / local-memory table from ptxas' report and
#      FAILS when any kernel spills, has a stack frame or uses local memory, or when a kernel is
#      missing (the expected count is (8 x activations avg_act + 9 AG + 8 Gram + 10 ridge) kernels x
#      2 architectures, the activations counted in the table; the configure line prints it).
#
# Usage: .ci/cuda_compile_check.sh [BUILD_DIR]   (default build/cuda-compile-check; removed first)
# Env:   CUDA_ARCHS (default "80-real;90-real"), EXPECT_ENTRIES (default from the activation table, see
#        above), JOBS (default nproc).
# Needs cmake >= 3.24, nvcc (CUDA >= 12; on PATH or CUDACXX), a C++17 compiler, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
BUILD_DIR=${1:-build/cuda-compile-check}
CUDA_ARCHS=${CUDA_ARCHS:-80-real;90-real}
# Rows of the X-macro AVG_KERNELS_ACTIVATIONS (from its #define to the first blank line).
N_ACTS=$(sed -n '/^#define AVG_KERNELS_ACTIVATIONS(X)/,/^$/p' csrc/include/avg_kernels/activations.h | grep -c '^ *X(')
EXPECT_ENTRIES=${EXPECT_ENTRIES:-$(( (N_ACTS * 4 * 2 + 9 + 8 + 10) * 2 ))}
JOBS=${JOBS:-$(nproc)}
GEN=()
command -v ninja >/dev/null && GEN=(-G Ninja)

start=$(date +%s)
rm -rf "$BUILD_DIR"
mkdir -p "$BUILD_DIR"
LOG="$BUILD_DIR/build.log"
echo "== configure ($BUILD_DIR, CUDA architectures $CUDA_ARCHS; expecting $EXPECT_ENTRIES kernels, $N_ACTS activations)"
cmake -S . -B "$BUILD_DIR" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DAVG_KERNELS_CUDA=ON \
  "-DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS" > "$BUILD_DIR/configure.log" 2>&1 \
  || { cat "$BUILD_DIR/configure.log"; exit 1; }
configured=$(date +%s)
echo "== build (nvcc + g++, $JOBS jobs)"
# ptxas writes its report on stderr of each compile; ninja/make print it with the command output.
if ! cmake --build "$BUILD_DIR" -j "$JOBS" > "$LOG" 2>&1; then
  grep -E "error|Error" "$LOG" | head -40 || true
  echo "FAIL: build failed, full log in $LOG"
  exit 1
fi
built=$(date +%s)
if grep -E "warning" "$LOG" | grep -v "ptxas info" > "$BUILD_DIR/warnings.txt"; then
  echo "== compiler warnings:"
  head -20 "$BUILD_DIR/warnings.txt"
fi
echo "== unit tests"
ctest --test-dir "$BUILD_DIR" --output-on-failure
tested=$(date +%s)
echo "== ptxas report"
status=0
python3 .ci/ptxas_table.py "$LOG" --expect "$EXPECT_ENTRIES" || status=1
echo "== time: configure $((configured - start)) s, build $((built - configured)) s, tests $((tested - built)) s, total $((tested - start)) s"
exit $status
