// CUDA kernels of the AG-1 update and AG-2 rescale (SPEC §2) over the multi-tensor launcher
// (multi_tensor_apply.cuh), torch-free.
//
// Per-thread work is __host__ __device__ (ag1_thread, ag2_partial_thread, ag2_final_thread,
// ag2_scale_thread); the __global__ kernels are thin wrappers, and the Emulator below runs the very
// same functions for every (block, thread) on the host, so CPU tests execute the chunking, the
// 64-bit indexing, the vector/tail element I/O and the block reductions of the GPU code.
//
// Launches per call, for each arithmetic group (float: every member float16/bfloat16/float32;
// double: some member float64) and each table of at most Table3::max_tensors tensors and
// Table3::max_blocks chunks (one table holds a ResNet-50; see multi_tensor_apply.cuh):
//   AG-1: ag1_kernel.
//   AG-2: ag2_reduce_kernel (per-block float64 partials of Σ|θ' − θ|, Σ|θ'' − θ|), then ONE
//         ag2_final_kernel for the whole call (sums the partials in a fixed order and stores
//         (‖θ' − θ‖₁, ‖θ'' − θ‖₁, scale) on the device), then ag2_scale_kernel, which reads the scale
//         from device memory: no device-to-host synchronisation, bitwise reproducible.
#pragma once

#include <math.h>

#include "avg_kernels/ag2_scale.h"
#include "multi_tensor_apply.cuh"

namespace avg_kernels {
namespace ag_cuda {

using mta::kILP;
using mta::kThreads;
using mta::Table3;

AK_MTA_HD float abs_op(float x) { return fabsf(x); }
AK_MTA_HD double abs_op(double x) { return fabs(x); }
AK_MTA_HD float fma_op(float a, float b, float c) { return fmaf(a, b, c); }
AK_MTA_HD double fma_op(double a, double b, double c) { return fma(a, b, c); }

// θ − |θ' − θ| sign(ḡ) with numpy's sign: ḡ = ±0 keeps θ exactly, NaN gives NaN. No product, so
// no rounding besides the subtraction and the sum (bit-identical on every backend).
template <class Op>
AK_MTA_HD Op ag1_elem(Op t, Op q, Op g) {
  const Op d = abs_op(q - t);
  return g > Op(0) ? t - d : g < Op(0) ? t + d : g == Op(0) ? t : g;
}

// Members (w, r, ḡ), w written: ag1_update_ w = θ, r = θ'; ag1_update_new_ (kIntoNew) w = θ', r = θ. Both
// compute ag1_elem(θ, θ', ḡ), so they write bitwise the same θ_{t+1}.
template <class Op, bool kIntoNew, class Table>
AK_MTA_HD void ag1_thread(const Table& tab, int block, int tid, int nthreads, int64_t chunk) {
  const mta::BlockTask b = mta::block_task(tab, block, chunk);
  void* p = tab.addr[0][b.slot];
  const void* q = tab.addr[1][b.slot];
  const void* g = tab.addr[2][b.slot];
  const uint8_t dp = tab.dtype[0][b.slot], dq = tab.dtype[1][b.slot], dg = tab.dtype[2][b.slot];
  const bool aligned = mta::group_aligned(p, dp) && mta::group_aligned(q, dq) && mta::group_aligned(g, dg);
  mta::for_groups(b.begin, b.end, tid, nthreads, aligned, [&](int64_t i, int count, bool whole) {
    Op tv[kILP], qv[kILP], gv[kILP];
    mta::load_group(p, dp, i, count, whole, tv);
    mta::load_group(q, dq, i, count, whole, qv);
    mta::load_group(g, dg, i, count, whole, gv);
    AK_MTA_UNROLL
    for (int k = 0; k < kILP; ++k) tv[k] = kIntoNew ? ag1_elem(qv[k], tv[k], gv[k]) : ag1_elem(tv[k], qv[k], gv[k]);
    mta::store_group(p, dp, i, count, whole, tv);
  });
}

// Members: addr[0] = params (θ''), addr[1] = params_old (θ), addr[2] = params_step (θ').
// Accumulates this thread's Σ|θ' − θ| and Σ|θ'' − θ| (each |a − b| in Op, summed in float64, in
// index order; lanes past the end load 0 and add nothing).
template <class Op, class Table>
AK_MTA_HD void ag2_partial_thread(const Table& tab, int block, int tid, int nthreads, int64_t chunk, double& step,
                                  double& delta) {
  const mta::BlockTask b = mta::block_task(tab, block, chunk);
  const void* p = tab.addr[0][b.slot];
  const void* o = tab.addr[1][b.slot];
  const void* s = tab.addr[2][b.slot];
  const uint8_t dp = tab.dtype[0][b.slot], d_o = tab.dtype[1][b.slot], ds = tab.dtype[2][b.slot];
  const bool aligned = mta::group_aligned(p, dp) && mta::group_aligned(o, d_o) && mta::group_aligned(s, ds);
  mta::for_groups(b.begin, b.end, tid, nthreads, aligned, [&](int64_t i, int count, bool whole) {
    Op pv[kILP], ov[kILP], sv[kILP];
    mta::load_group(p, dp, i, count, whole, pv);
    mta::load_group(o, d_o, i, count, whole, ov);
    mta::load_group(s, ds, i, count, whole, sv);
    AK_MTA_UNROLL
    for (int k = 0; k < kILP; ++k) {
      step += double(abs_op(sv[k] - ov[k]));
      delta += double(abs_op(pv[k] - ov[k]));
    }
  });
}

// Final reduce, thread part: partials[2 k], partials[2 k + 1] for k = tid, tid + nthreads, ...
AK_MTA_HD void ag2_final_thread(const double* partials, int64_t n_blocks, int tid, int nthreads, double& step,
                                double& delta) {
  step = 0;
  delta = 0;
  for (int64_t k = tid; k < n_blocks; k += nthreads) {
    step += partials[2 * k];
    delta += partials[2 * k + 1];
  }
}

// norms = (‖θ' − θ‖₁, ‖θ'' − θ‖₁, scale, u1, u2, v); scale is 0 when ‖θ'' − θ‖₁ = 0 (nothing is then
// written); (u1, u2, v) the scale as factors that neither overflow nor underflow (avg_kernels/ag2_scale.h).
AK_MTA_HD void ag2_store_norms(double step, double delta, double* norms) {
  norms[0] = step;
  norms[1] = delta;
  norms[2] = delta == 0.0 ? 0.0 : step / delta;
  const ag2::Factors f = ag2::factors(step, delta);
  norms[3] = f.u1;
  norms[4] = f.u2;
  norms[5] = f.v;
}

template <class Op, class Table>
AK_MTA_HD void ag2_scale_thread(const Table& tab, int block, int tid, int nthreads, int64_t chunk,
                                const double* norms) {
  if (norms[1] == 0.0) return;  // ‖θ'' − θ‖₁ = 0: leave everything as it is
  const double u1 = norms[3], u2 = norms[4], scale_d = norms[5];
  const Op scale = Op(scale_d);
  // A scale that is not a normal float in float arithmetic (it would underflow or overflow when rounded), or a
  // ratio outside double's normal range (factors u1, u2 != 1): multiply in double with the factors, rounding
  // once (uniform across the grid: no divergence).
  const bool wide = !(u1 == 1.0 && u2 == 1.0) ||
                    (sizeof(Op) == 4 && scale_d != 0.0 &&
                     !(fabs(scale_d) >= 1.1754943508222875e-38 && fabs(scale_d) <= 3.4028234663852886e38));
  const mta::BlockTask b = mta::block_task(tab, block, chunk);
  void* p = tab.addr[0][b.slot];
  const void* o = tab.addr[1][b.slot];
  const uint8_t dp = tab.dtype[0][b.slot], d_o = tab.dtype[1][b.slot];
  const bool aligned = mta::group_aligned(p, dp) && mta::group_aligned(o, d_o);
  mta::for_groups(b.begin, b.end, tid, nthreads, aligned, [&](int64_t i, int count, bool whole) {
    Op pv[kILP], ov[kILP];
    mta::load_group(p, dp, i, count, whole, pv);
    mta::load_group(o, d_o, i, count, whole, ov);
    AK_MTA_UNROLL
    for (int k = 0; k < kILP; ++k)
      pv[k] = wide ? Op(fma(double(pv[k] - ov[k]) * u1 * u2, scale_d, double(ov[k])))
                   : fma_op(pv[k] - ov[k], scale, ov[k]);
    mta::store_group(p, dp, i, count, whole, pv);
  });
}

// ---------------------------------------------------------------------------------------------
// __global__ wrappers.
// ---------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
template <class Op, bool kIntoNew>
__global__ void __launch_bounds__(kThreads, 2) ag1_kernel(const __grid_constant__ Table3 tab, int64_t chunk) {
  ag1_thread<Op, kIntoNew>(tab, blockIdx.x, threadIdx.x, kThreads, chunk);
}

template <class Op>
__global__ void __launch_bounds__(kThreads, 2)
    ag2_reduce_kernel(const __grid_constant__ Table3 tab, int64_t chunk, double* partials) {
  double step = 0, delta = 0;
  ag2_partial_thread<Op>(tab, blockIdx.x, threadIdx.x, kThreads, chunk, step, delta);
  mta::block_tree_sum2<kThreads>(step, delta);
  if (threadIdx.x == 0) {
    const int64_t k = tab.first_block + blockIdx.x;
    partials[2 * k] = step;
    partials[2 * k + 1] = delta;
  }
}

__global__ void __launch_bounds__(kThreads, 2) ag2_final_kernel(const double* partials, int64_t n_blocks, double* norms) {
  double step, delta;
  ag2_final_thread(partials, n_blocks, threadIdx.x, kThreads, step, delta);
  mta::block_tree_sum2<kThreads>(step, delta);
  if (threadIdx.x == 0) ag2_store_norms(step, delta, norms);
}

template <class Op>
__global__ void __launch_bounds__(kThreads, 2)
    ag2_scale_kernel(const __grid_constant__ Table3 tab, int64_t chunk, const double* norms) {
  ag2_scale_thread<Op>(tab, blockIdx.x, threadIdx.x, kThreads, chunk, norms);
}
#endif

// ---------------------------------------------------------------------------------------------
// The launch sequence, shared by the CUDA launcher and the host emulation. `L` provides
// ag1<Op>(table, chunk), ag2_reduce<Op>(table, chunk, partials), ag2_final(partials, n, norms)
// and ag2_scale<Op>(table, chunk, norms). groups[0]: float arithmetic, groups[1]: double.
// ---------------------------------------------------------------------------------------------
#if !defined(__CUDACC_RTC__)
struct Limits {
  int64_t chunk = mta::kChunk;
  int max_tensors = Table3::max_tensors;
  int max_blocks = Table3::max_blocks;
};

using Refs = std::vector<mta::TensorRef<3>>;

// into_new: the groups' members are (θ', θ, ḡ) (ag1_update_new_), else (θ, θ', ḡ).
template <class L>
void launch_ag1(const Refs (&groups)[2], const Limits& lim, L& launcher, bool into_new = false) {
  for (int g = 0; g < 2; ++g)
    mta::plan_tables<Table3>(groups[g], lim.chunk, lim.max_tensors, lim.max_blocks, [&](const Table3& t) {
      if (into_new) {
        if (g == 0) launcher.template ag1<float, true>(t, lim.chunk);
        else launcher.template ag1<double, true>(t, lim.chunk);
      } else {
        if (g == 0) launcher.template ag1<float, false>(t, lim.chunk);
        else launcher.template ag1<double, false>(t, lim.chunk);
      }
    });
}

// partials: 2 * (count_blocks of both groups) doubles; norms: 3 doubles (both in the launcher's
// memory space). With no elements at all, norms is set to zeros and nothing else runs.
template <class L>
void launch_ag2(const Refs (&groups)[2], const Limits& lim, double* partials, double* norms, L& launcher) {
  const int64_t n0 = mta::count_blocks(groups[0], lim.chunk);
  const int64_t n_blocks = n0 + mta::count_blocks(groups[1], lim.chunk);
  int64_t base[2] = {0, n0};
  for (int g = 0; g < 2; ++g)
    mta::plan_tables<Table3>(
        groups[g], lim.chunk, lim.max_tensors, lim.max_blocks,
        [&](const Table3& t) {
          if (g == 0) launcher.template ag2_reduce<float>(t, lim.chunk, partials);
          else launcher.template ag2_reduce<double>(t, lim.chunk, partials);
        },
        base[g]);
  launcher.ag2_final(partials, n_blocks, norms);
  for (int g = 0; g < 2; ++g)
    mta::plan_tables<Table3>(groups[g], lim.chunk, lim.max_tensors, lim.max_blocks, [&](const Table3& t) {
      if (g == 0) launcher.template ag2_scale<float>(t, lim.chunk, norms);
      else launcher.template ag2_scale<double>(t, lim.chunk, norms);
    });
}

// Host emulation of the launches: every block, every thread, same functions, same order of the
// floating-point operations that decide a result (per-thread sums, the tree, the final sums).
struct Emulator {
  int64_t launches[4] = {0, 0, 0, 0};  // ag1, ag2_reduce, ag2_final, ag2_scale

  template <class Op, bool kIntoNew>
  void ag1(const Table3& t, int64_t chunk) {
    ++launches[0];
    for (int b = 0; b < t.n_blocks; ++b)
      for (int tid = 0; tid < kThreads; ++tid) ag1_thread<Op, kIntoNew>(t, b, tid, kThreads, chunk);
  }

  template <class Op>
  void ag2_reduce(const Table3& t, int64_t chunk, double* partials) {
    ++launches[1];
    std::vector<double> a(kThreads), d(kThreads);
    for (int b = 0; b < t.n_blocks; ++b) {
      for (int tid = 0; tid < kThreads; ++tid) {
        a[tid] = 0;
        d[tid] = 0;
        ag2_partial_thread<Op>(t, b, tid, kThreads, chunk, a[tid], d[tid]);
      }
      mta::tree_sum2_host(a, d);
      partials[2 * (t.first_block + b)] = a[0];
      partials[2 * (t.first_block + b) + 1] = d[0];
    }
  }

  void ag2_final(const double* partials, int64_t n_blocks, double* norms) {
    ++launches[2];
    std::vector<double> a(kThreads), d(kThreads);
    for (int tid = 0; tid < kThreads; ++tid) ag2_final_thread(partials, n_blocks, tid, kThreads, a[tid], d[tid]);
    mta::tree_sum2_host(a, d);
    ag2_store_norms(a[0], d[0], norms);
  }

  template <class Op>
  void ag2_scale(const Table3& t, int64_t chunk, const double* norms) {
    ++launches[3];
    for (int b = 0; b < t.n_blocks; ++b)
      for (int tid = 0; tid < kThreads; ++tid) ag2_scale_thread<Op>(t, b, tid, kThreads, chunk, norms);
  }
};
#endif

}  // namespace ag_cuda
}  // namespace avg_kernels
