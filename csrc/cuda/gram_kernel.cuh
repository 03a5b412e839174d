// The CUDA kernel of the im2col / Linear input Gram (SPEC §3), torch-free: an implicit GEMM.
//
// Block (tile t, group g, split s) owns the kTile × kTile tile (bi, bj), bi <= bj, of group g's
// Gram and the positions [s·steps·kStep, (s+1)·steps·kStep) of M. Per step its 256 threads gather a
// kTile × kStep slab of the unfolded matrix for the tile's rows and for its columns straight from x
// (im2col addresses, zero padding and the bias row of ones computed per element) into shared memory,
// then each thread accumulates a 4 × 4 sub-tile. The tile is stored at (bi, bj) and mirrored to
// (bj, bi) of the split's partial Gram (the launcher sums the splits when there are several).
//
// Everything that indexes (tile numbering, the per-thread row/position decomposition, masks, 64-bit
// offsets, the stores) is __host__ __device__: the __global__ gram_kernel runs it with
// blockIdx/threadIdx, and emulate_gram_block() runs the very same stages on the host, thread by
// thread, so CPU tests execute it (csrc/cpu/gram_cuda_emulation.cpp, tests/test_gram.py).
//
// This header compiles as plain C++ (g++, no CUDA headers) when not under nvcc.
#pragma once

#include <stdint.h>

#include <cmath>

#if defined(__CUDACC__)
#define AK_GRAM_HD __host__ __device__ __forceinline__
#define AK_GRAM_UNROLL _Pragma("unroll")
#else
#define AK_GRAM_HD inline
#define AK_GRAM_UNROLL
#endif

namespace avg_kernels {
namespace cuda_gram {

constexpr int kTile = 64;     // rows/columns of A per block
constexpr int kStep = 16;     // positions per shared-memory stage
constexpr int kThreads = 256; // 16 × 16 threads, 4 × 4 outputs each
constexpr int kSub = 4;
constexpr int kLoads = kTile * kStep / kThreads;  // elements of each operand one thread gathers per stage
// Shared-memory row stride: the stores of a warp (16 positions × 2 rows) spread over the banks,
// rows stay 16-byte aligned for vector reads.
constexpr int kLd = kTile + 4;

static_assert(kThreads == (kTile / kSub) * (kTile / kSub), "one 4x4 sub-tile per thread");
static_assert(kTile * kStep % kThreads == 0 && kThreads % kStep == 0, "loads split evenly");

template <class In, class Acc>
struct GramArgs {
  const In* x;      // (N, C, H, W) with strides (sn, sc, sh, sw); a Conv1d input has H = 1
  Acc* out;         // (splits, groups, d, d), contiguous
  int64_t sn, sc, sh, sw;
  int64_t cg, h, w, oh, ow;  // channels per group, input and output spatial sizes
  int32_t kw, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int32_t k2;       // kernel offsets (kh · kw)
  int64_t d_in, d;  // rows of X without / with the bias row
  int64_t m;        // positions N · oh · ow
  int64_t steps;    // stages per split
  int64_t groups;
  int64_t n_tiles;  // tiles per side: ceil(d / kTile)
  bool bias;
};

// Tile t of the upper triangle, numbered column by column: (0,0), (0,1), (1,1), (0,2), ...:
// bj = largest j with j(j+1)/2 <= t, bi = t - bj(bj+1)/2. Exact for t < 2^52 (the double sqrt is
// corrected by integer steps).
AK_GRAM_HD void tile_coords(int64_t t, int64_t* bi, int64_t* bj) {
  int64_t j = static_cast<int64_t>((sqrt(8.0 * static_cast<double>(t) + 1.0) - 1.0) / 2.0);
  while (j * (j + 1) / 2 > t) --j;
  while ((j + 1) * (j + 2) / 2 <= t) ++j;
  *bj = j;
  *bi = t - j * (j + 1) / 2;
}

AK_GRAM_HD int64_t tile_count(int64_t n_tiles) { return n_tiles * (n_tiles + 1) / 2; }

// One unfolded row d of the tile: its offset in x and its window, precomputed once per block.
struct RowInfo {
  int64_t offset;  // channel and kernel-offset part of the address
  int32_t dh, dw;  // kernel offset minus padding
  int32_t kind;    // 0: x row, 1: the bias row, 2: past D (zero)
};

template <class In, class Acc>
AK_GRAM_HD RowInfo row_info(const GramArgs<In, Acc>& a, int64_t g, int64_t d) {
  RowInfo r{0, 0, 0, 2};
  if (d < a.d_in) {
    const int64_t c = d / a.k2;
    const int32_t i = static_cast<int32_t>(d - c * a.k2);
    const int32_t kh = i / a.kw, kw = i - (i / a.kw) * a.kw;
    r.dh = kh * a.dil_h - a.pad_h;
    r.dw = kw * a.dil_w - a.pad_w;
    r.offset = (g * a.cg + c) * a.sc + int64_t(r.dh) * a.sh + int64_t(r.dw) * a.sw;
    r.kind = 0;
  } else if (d < a.d) {
    r.kind = 1;
  }
  return r;
}

// Position m: its offset in x and the top-left input coordinate of its window. Idx = int32_t when
// M < 2^31 (cheap division), int64_t otherwise.
struct ColInfo {
  int64_t offset;
  int64_t hs, ws;
  bool valid;
};

template <class Idx, class In, class Acc>
AK_GRAM_HD ColInfo col_info(const GramArgs<In, Acc>& a, int64_t m) {
  ColInfo c{0, 0, 0, m < a.m};
  if (!c.valid) return c;
  const Idx mm = static_cast<Idx>(m), ow = static_cast<Idx>(a.ow), oh = static_cast<Idx>(a.oh);
  const Idx q = mm / ow;
  const Idx x_ow = mm - q * ow;
  const Idx n = q / oh;
  const Idx x_oh = q - n * oh;
  c.hs = int64_t(x_oh) * a.stride_h;
  c.ws = int64_t(x_ow) * a.stride_w;
  c.offset = int64_t(n) * a.sn + c.hs * a.sh + c.ws * a.sw;
  return c;
}

template <class In, class Acc>
AK_GRAM_HD Acc unfolded(const GramArgs<In, Acc>& a, const RowInfo& r, const ColInfo& c) {
  if (!c.valid || r.kind == 2) return Acc(0);
  if (r.kind == 1) return Acc(1);
  const int64_t ih = c.hs + r.dh, iw = c.ws + r.dw;
  if (ih < 0 || ih >= a.h || iw < 0 || iw >= a.w) return Acc(0);
  return static_cast<Acc>(a.x[c.offset + r.offset]);
}

// Per-thread state of a block: the rows it gathers for both operands, and its 4 x 4 accumulators.
template <class Acc>
struct ThreadState {
  RowInfo rows_i[kLoads], rows_j[kLoads];
  Acc acc[kSub][kSub];
};

template <class In, class Acc>
struct BlockCoords {
  int64_t bi, bj, g, split;
};

// The element e = tid + kThreads·l (l < kLoads) of a kTile × kStep slab sits at row e / kStep,
// position e % kStep: a thread's kLoads elements share one position (kThreads % kStep == 0).
AK_GRAM_HD int load_row(int tid, int l) { return (tid + kThreads * l) / kStep; }
AK_GRAM_HD int load_pos(int tid) { return tid % kStep; }

template <class In, class Acc>
AK_GRAM_HD void init_thread(const GramArgs<In, Acc>& a, const BlockCoords<In, Acc>& b, int tid, ThreadState<Acc>& s) {
  AK_GRAM_UNROLL
  for (int l = 0; l < kLoads; ++l) {
    s.rows_i[l] = row_info(a, b.g, b.bi * kTile + load_row(tid, l));
    s.rows_j[l] = row_info(a, b.g, b.bj * kTile + load_row(tid, l));
  }
  AK_GRAM_UNROLL
  for (int r = 0; r < kSub; ++r)
    AK_GRAM_UNROLL
    for (int c = 0; c < kSub; ++c) s.acc[r][c] = Acc(0);
}

// Stage 1: gather this thread's elements of step `step` into shared memory (transposed: [pos][row]).
template <class Idx, class In, class Acc>
AK_GRAM_HD void load_stage(const GramArgs<In, Acc>& a, const BlockCoords<In, Acc>& b, int64_t step, int tid,
                           const ThreadState<Acc>& s, Acc (*sa)[kLd], Acc (*sb)[kLd]) {
  const int p = load_pos(tid);
  const int64_t m = (b.split * a.steps + step) * kStep + p;
  const ColInfo c = col_info<Idx>(a, m);
  AK_GRAM_UNROLL
  for (int l = 0; l < kLoads; ++l) {
    sa[p][load_row(tid, l)] = unfolded(a, s.rows_i[l], c);
    sb[p][load_row(tid, l)] = unfolded(a, s.rows_j[l], c);
  }
}

// Stage 2: this thread's 4 x 4 outer products over the kStep positions in shared memory.
template <class Acc>
AK_GRAM_HD void compute_stage(int tid, const Acc (*sa)[kLd], const Acc (*sb)[kLd], ThreadState<Acc>& s) {
  const int r0 = (tid / (kTile / kSub)) * kSub, c0 = (tid % (kTile / kSub)) * kSub;
  AK_GRAM_UNROLL
  for (int k = 0; k < kStep; ++k) {
    Acc av[kSub], bv[kSub];
    AK_GRAM_UNROLL
    for (int r = 0; r < kSub; ++r) av[r] = sa[k][r0 + r];
    AK_GRAM_UNROLL
    for (int c = 0; c < kSub; ++c) bv[c] = sb[k][c0 + c];
    AK_GRAM_UNROLL
    for (int r = 0; r < kSub; ++r)
      AK_GRAM_UNROLL
      for (int c = 0; c < kSub; ++c) s.acc[r][c] += av[r] * bv[c];
  }
}

// Stage 3: store the sub-tile at (bi, bj) and, off the diagonal, its transpose at (bj, bi).
template <class In, class Acc>
AK_GRAM_HD void store_thread(const GramArgs<In, Acc>& a, const BlockCoords<In, Acc>& b, int tid,
                             const ThreadState<Acc>& s) {
  const int r0 = (tid / (kTile / kSub)) * kSub, c0 = (tid % (kTile / kSub)) * kSub;
  Acc* out = a.out + (b.split * a.groups + b.g) * a.d * a.d;
  AK_GRAM_UNROLL
  for (int r = 0; r < kSub; ++r) {
    const int64_t i = b.bi * kTile + r0 + r;
    AK_GRAM_UNROLL
    for (int c = 0; c < kSub; ++c) {
      const int64_t j = b.bj * kTile + c0 + c;
      if (i < a.d && j < a.d) {
        out[i * a.d + j] = s.acc[r][c];
        if (b.bi != b.bj) out[j * a.d + i] = s.acc[r][c];
      }
    }
  }
}

template <class In, class Acc>
AK_GRAM_HD BlockCoords<In, Acc> block_coords(int64_t tile, int64_t g, int64_t split) {
  BlockCoords<In, Acc> b{0, 0, g, split};
  tile_coords(tile, &b.bi, &b.bj);
  return b;
}

#if defined(__CUDACC__)
template <class Idx, class In, class Acc>
__global__ void __launch_bounds__(kThreads) gram_kernel(const GramArgs<In, Acc> a) {
  __shared__ Acc sa[kStep][kLd];
  __shared__ Acc sb[kStep][kLd];
  const int tid = threadIdx.x;
  const BlockCoords<In, Acc> b = block_coords<In, Acc>(blockIdx.x, blockIdx.y, blockIdx.z);
  ThreadState<Acc> s;
  init_thread(a, b, tid, s);
  for (int64_t step = 0; step < a.steps; ++step) {
    load_stage<Idx>(a, b, step, tid, s, sa, sb);
    __syncthreads();
    compute_stage<Acc>(tid, sa, sb, s);
    __syncthreads();
  }
  store_thread(a, b, tid, s);
}
#endif

// The host twin of gram_kernel for one block: the same stages, the threads run one after another
// between the barriers. `states` holds kThreads ThreadStates.
template <class Idx, class In, class Acc>
void emulate_gram_block(const GramArgs<In, Acc>& a, int64_t tile, int64_t g, int64_t split, ThreadState<Acc>* states) {
  Acc sa[kStep][kLd], sb[kStep][kLd];
  const BlockCoords<In, Acc> b = block_coords<In, Acc>(tile, g, split);
  for (int t = 0; t < kThreads; ++t) init_thread(a, b, t, states[t]);
  for (int64_t step = 0; step < a.steps; ++step) {
    for (int t = 0; t < kThreads; ++t) load_stage<Idx>(a, b, step, t, states[t], sa, sb);
    for (int t = 0; t < kThreads; ++t) compute_stage<Acc>(t, sa, sb, states[t]);
  }
  for (int t = 0; t < kThreads; ++t) store_thread(a, b, t, states[t]);
}

// Launch shape, host side: splits of M so that ~4 blocks per SM run, each with >= 8 stages.
struct GramLaunch {
  int64_t tiles, splits, steps;
  bool wide;  // int64 position arithmetic (M plus the last split's overhang reaches 2^31)
};

inline GramLaunch gram_launch(int64_t d, int64_t groups, int64_t m, int64_t sm_count, int64_t force_splits) {
  GramLaunch l{};
  l.tiles = tile_count((d + kTile - 1) / kTile);
  const int64_t total = (m + kStep - 1) / kStep;
  int64_t splits = force_splits;
  if (splits <= 0) {
    const int64_t blocks = l.tiles * groups;
    const int64_t want = blocks > 0 ? (4 * sm_count + blocks - 1) / blocks : 1;
    splits = want < total / 8 ? want : total / 8;
    if (splits < 1) splits = 1;
  }
  l.steps = total > 0 ? (total + splits - 1) / splits : 0;
  l.splits = l.steps > 0 ? (total + l.steps - 1) / l.steps : 1;
  l.wide = (l.splits * l.steps) * kStep >= (int64_t(1) << 31);
  return l;
}

}  // namespace cuda_gram
}  // namespace avg_kernels
