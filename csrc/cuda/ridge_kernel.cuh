// CUDA kernels of the ridge solve's prologue and epilogue (SPEC §3, driver in csrc/cpu/ridge.cpp), torch-free.
//
// Everything a kernel does per thread (tile coordinates, 64-bit offsets, the transposed tile through
// shared memory, masking at D not a multiple of the tile, the per-entry flags) is written once here as
// __host__ __device__ code:
//   * on the GPU, the thin __global__ wrappers call the phase functions with blockIdx/threadIdx and a
//     __shared__ tile, with __syncthreads() between the phases;
//   * on the host, emulate_*() loop over every block and thread of a launch configuration and call the
//     very same functions, phase by phase, so the CPU tests execute the GPU's index and masking logic
//     (csrc/cpu/ridge_emulation.cpp, tests/test_ridge.py).
// The element math (symmetrisation, finiteness, the eigenvalue factors) is csrc/include/avg_kernels/ridge.h.
//
// This header compiles as plain C++ (g++, no CUDA headers) when not under nvcc.
#pragma once

#include <stdint.h>
#include <string.h>

#include <avg_kernels/half_bits.h>
#include <avg_kernels/ridge.h>


namespace avg_kernels {
namespace ridge {
namespace cuda {

// ------------------------------------------------------------------------------------------------
// Storage types of A. 16-bit types are carried as their bits (torch-free) and converted exactly by the
// project's one conversion header (csrc/include/avg_kernels/half_bits.h: hardware cvt on the device,
// field by field on the host).

struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

AVGK_RIDGE_HD float to_float(F16 h) { return half_bits_to_float(h.bits); }
AVGK_RIDGE_HD float to_float(BF16 h) { return bf16_bits_to_float(h.bits); }
AVGK_RIDGE_HD float to_float(float x) { return x; }
AVGK_RIDGE_HD double to_float(double x) { return x; }

template <class C, class In>
AVGK_RIDGE_HD C load_as(const In* p, int64_t i) {
  return C(to_float(p[i]));
}

// max into *addr of a value >= 0 (or -0, or NaN with the sign bit clear); *addr starts at +0.
// Non-negative IEEE floats order like their bit patterns read as signed integers.
AVGK_RIDGE_HD void atomic_max_nonneg(float* addr, float v) {
#if defined(__CUDA_ARCH__)
  atomicMax(reinterpret_cast<int*>(addr), __float_as_int(v));
#else
  if (v > *addr || v != v) *addr = v;
#endif
}

AVGK_RIDGE_HD void atomic_max_nonneg(double* addr, double v) {
#if defined(__CUDA_ARCH__)
  atomicMax(reinterpret_cast<long long*>(addr), __double_as_longlong(v));
#else
  if (v > *addr || v != v) *addr = v;
#endif
}

// ------------------------------------------------------------------------------------------------
// Prologue: Bm = (A + A^T)/2 + lam I, stats[b] = [non-finite flag, max |A_ii|].
// One block per 32 x 32 output tile (i0, j0) of one entry b: phase 1 loads the partner tile
// A[j0.., i0..] (coalesced along i) into shared memory, phase 2 reads A[i0.., j0..] (coalesced along j)
// and writes the tile of Bm (coalesced). 256 threads: 32 columns x 8 rows, 4 rows each.

constexpr int kTile = 32;
constexpr int kTileRows = 8;
constexpr int kPrologueThreads = kTile * kTileRows;

template <class In, class C>
struct PrologueArgs {
  const In* a;
  int64_t sb, si, sj;  // strides of A, in elements
  int64_t nb, D, nt;   // entries, size, tiles per dimension (ceil(D / kTile))
  C lam;
  C* out;    // (nb, D, D) contiguous
  C* stats;  // (nb, 2), zero on entry
};

struct TileCoords {
  int64_t b, i0, j0;
};

// Block `blk` (0 <= blk < nb * nt * nt, 64-bit) -> its entry and output tile.
AVGK_RIDGE_HD TileCoords tile_coords(int64_t blk, int64_t nt) {
  const int64_t per = nt * nt;
  const int64_t rem = blk % per;
  return TileCoords{blk / per, (rem / nt) * kTile, (rem % nt) * kTile};
}

template <class In, class C>
AVGK_RIDGE_HD void prologue_load(const PrologueArgs<In, C>& p, int64_t blk, int tid, C (*tile)[kTile + 1]) {
  const TileCoords t = tile_coords(blk, p.nt);
  const int tx = tid % kTile, ty = tid / kTile;
  const int64_t ii = t.i0 + tx;
  for (int r = ty; r < kTile; r += kTileRows) {
    const int64_t jj = t.j0 + r;
    tile[r][tx] = (ii < p.D && jj < p.D) ? load_as<C>(p.a, t.b * p.sb + jj * p.si + ii * p.sj) : C(0);  // A[jj, ii]
  }
}

template <class In, class C>
AVGK_RIDGE_HD void prologue_store(const PrologueArgs<In, C>& p, int64_t blk, int tid, C (*tile)[kTile + 1]) {
  const TileCoords t = tile_coords(blk, p.nt);
  const int tx = tid % kTile, ty = tid / kTile;
  const int64_t j = t.j0 + tx;
  for (int r = ty; r < kTile; r += kTileRows) {
    const int64_t i = t.i0 + r;
    if (i >= p.D || j >= p.D) continue;
    const C aij = load_as<C>(p.a, t.b * p.sb + i * p.si + j * p.sj);
    const C aji = tile[tx][r];  // A[j0 + tx, i0 + r] = A[j, i]
    C s = sym_entry(aij, aji);
    if (!is_finite(aij)) p.stats[2 * t.b] = C(1);  // benign race: every writer stores 1
    if (i == j) {
      s += p.lam;
      atomic_max_nonneg(&p.stats[2 * t.b + 1], abs_value(aij));
    }
    p.out[(t.b * p.D + i) * p.D + j] = s;
  }
}

// ------------------------------------------------------------------------------------------------
// Epilogue of the eigendecomposition path: y[b, c, j] *= inverse_factor(w[b, j], lam, cutoff_b).
// Grid-stride over the n = nb * C * D elements of y.

constexpr int kScaleThreads = 256;

template <class C>
struct ScaleArgs {
  C* y;        // (nb, C, D) contiguous
  const C* w;  // (nb, D) contiguous, ascending per row
  int64_t n, row_len, D;  // row_len = C * D
  C lam, rtol;
};

template <class C>
AVGK_RIDGE_HD void scale_element(const ScaleArgs<C>& s, int64_t idx) {
  const int64_t b = idx / s.row_len, j = idx % s.D;
  const C* wb = s.w + b * s.D;
  const C cut = eig_cutoff(wb[0], wb[s.D - 1], s.rtol);
  s.y[idx] *= inverse_factor(wb[j], s.lam, cut);
}

// ------------------------------------------------------------------------------------------------
// Launch configurations.

struct Launch {
  int64_t grid;
  int block;
};

// Every tile its own block, capped at 2^31 - 1 (gridDim.x); the kernels loop over the rest.
AVGK_RIDGE_HD Launch prologue_launch(int64_t nb, int64_t D) {
  const int64_t nt = (D + kTile - 1) / kTile;
  const int64_t blocks = nb * nt * nt;
  return Launch{blocks < 2147483647LL ? blocks : 2147483647LL, kPrologueThreads};
}

// Enough blocks to fill a large GPU (132 SMs x 8 blocks of 256 threads), grid-stride beyond.
AVGK_RIDGE_HD Launch scale_launch(int64_t n) {
  const int64_t blocks = (n + kScaleThreads - 1) / kScaleThreads;
  const int64_t cap = 132 * 8;
  return Launch{blocks < cap ? blocks : cap, kScaleThreads};
}

#if defined(__CUDACC__)
template <class In, class C>
__global__ void __launch_bounds__(kPrologueThreads) ridge_prologue_kernel(PrologueArgs<In, C> p) {
  __shared__ C tile[kTile][kTile + 1];
  const int64_t total = p.nb * p.nt * p.nt;
  for (int64_t blk = blockIdx.x; blk < total; blk += gridDim.x) {  // uniform across the block
    prologue_load(p, blk, int(threadIdx.x), tile);
    __syncthreads();
    prologue_store(p, blk, int(threadIdx.x), tile);
    __syncthreads();
  }
}

template <class C>
__global__ void __launch_bounds__(kScaleThreads) ridge_scale_kernel(ScaleArgs<C> s) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t idx = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; idx < s.n; idx += stride) scale_element(s, idx);
}
#endif

// ------------------------------------------------------------------------------------------------
// Host emulation of the launches above: the same functions, every block and thread, phase by phase.

template <class In, class C>
inline void emulate_prologue(const PrologueArgs<In, C>& p, int64_t grid) {
  C tile[kTile][kTile + 1];
  const int64_t total = p.nb * p.nt * p.nt;
  for (int64_t first = 0; first < grid; ++first) {
    for (int64_t blk = first; blk < total; blk += grid) {
      for (int tid = 0; tid < kPrologueThreads; ++tid) prologue_load(p, blk, tid, tile);
      for (int tid = 0; tid < kPrologueThreads; ++tid) prologue_store(p, blk, tid, tile);
    }
  }
}

template <class C>
inline void emulate_scale(const ScaleArgs<C>& s, int64_t grid, int block) {
  const int64_t stride = grid * block;
  for (int64_t g = 0; g < grid; ++g)
    for (int t = 0; t < block; ++t)
      for (int64_t idx = g * block + t; idx < s.n; idx += stride) scale_element(s, idx);
}

}  // namespace cuda
}  // namespace ridge
}  // namespace avg_kernels
