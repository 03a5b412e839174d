// The CPU kernels of one capability level, as a table of plain function pointers.
//
// csrc/cpu/kernels/*.cpp are compiled once per level (setup.py: default, avx2, avx512; flags from
// avg_kernels/_cpu_levels.py) into their own Python extension modules avg_kernels._cpu_<level>, each
// with -fvisibility=hidden, so inline functions of headers compiled with AVX flags (c10::Half's F16C
// conversion, at::vec) stay private to that module and can never be picked by the linker for another
// level. Each module exports its table in a capsule; avg_kernels/_build.py imports the best level the
// running CPU supports (or AVG_KERNELS_CPU_CAPABILITY) and hands the table to avg_kernels._C, whose ops
// (registration, argument checks, drivers: compiled once, at the default level) call through it.
//
// Everything here is layout-stable across levels: pointers, integers, at::Tensor and ATen/STL types
// whose layout no compiler flag changes. Bump kKernelsAbi when the table changes.
#pragma once

#include <cstdint>

#include "../ag_entry.h"
#include "avg_kernels/ag2_scale.h"
#include "../ridge_driver.h"
#include "kernels/gram_plan.h"

namespace at {
class Tensor;
}

namespace avg_kernels::cpu {

constexpr uint32_t kKernelsAbi = 2;

// Positions summed by one float32 GEMM (the Gram's GEMM paths) before its result joins a float64
// accumulator: MKL accumulates the inner dimension in float32 (measured 2.6e-5 relative error on a
// diagonal at 43690 positions, over SPEC §3's 1e-5 bar; ~1e-6 at 1024).
constexpr int64_t kGramGemmK = 1024;
constexpr const char* kKernelsCapsule = "avg_kernels.cpu_kernels";

struct Kernels {
  uint32_t abi;        // kKernelsAbi of the module that built the table
  uint32_t size;       // sizeof(Kernels) there
  const char* level;   // "default", "avx2" or "avx512"

  // Averaged activation backward (SPEC §1): out = grad_out * s(x, x_new), all contiguous, one dtype,
  // out allocated by the caller; act = kernel id (activations.h), p0/p1 its parameters.
  void (*avg_act_backward)(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& x_new, at::Tensor& out,
                           int64_t act, double p0, double p1, double eps);
  // f(x) of the shared header math (tests compare it with torch's own activations).
  void (*act_value)(const at::Tensor& x, at::Tensor& out, int64_t act, double p0, double p1);

  // AG-1 / AG-2 over prepared flat entries (csrc/ag_lists.h); threads across entries and chunks.
  // AG-1: member 0 is written; into_new: members are (θ', θ, ḡ) instead of (θ, θ', ḡ) (ag1_update_new_).
  void (*ag1_update)(const ag::FlatEntry<3>* entries, int64_t n, bool into_new);
  // (‖θ' − θ‖₁, ‖θ'' − θ‖₁), summed in float64 in a fixed order (independent of the thread count).
  void (*ag2_norms)(const ag::FlatEntry<3>* entries, int64_t n, double* n_step, double* n_delta);
  void (*ag2_scale)(const ag::FlatEntry<3>* entries, int64_t n, ag2::Factors scale);

  // Conv Gram of a 4-d input (N, C, H, W) into out (groups, D, D), float32 (float64 for float64 x):
  // the shifted-correlation kernels, and explicit im2col chunks + GEMM (the few-channel path).
  // Geometry (gh, gw: per spatial dim) and out validated by the caller.
  void (*gram_correlation)(const at::Tensor& x4, const gram::ConvDim& gh, const gram::ConvDim& gw, int64_t groups,
                           bool bias, at::Tensor& out);
  void (*gram_im2col_gemm)(const at::Tensor& x4, const gram::ConvDim& gh, const gram::ConvDim& gw, int64_t groups,
                           bool bias, at::Tensor& out);

  // Ridge solve kernels (csrc/ridge_driver.h documents each).
  void (*ridge_prologue)(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats);
  void (*ridge_scale)(at::Tensor& Y, const at::Tensor& w, double lam, double rtol);
  void (*ridge_small_solve)(const at::Tensor& G3, const at::Tensor& A3, double lam, at::Tensor& P, at::Tensor& status);
  int64_t ridge_small_max_d;

  // One vectorised math primitive (0 exp, 1 erfc, 2 log1p) elementwise, float32/float64: for tests.
  void (*vec_math)(const at::Tensor& x, at::Tensor& out, int64_t fn);
};

// The ridge driver's kernels from a level's table: fused = with the small-system path and one LAPACK
// factorisation per entry (production); without, prologue + batched LAPACK at every D (tests).
inline RidgeKernels ridge_kernels(const Kernels& k, bool fused) {
  RidgeKernels r{k.ridge_prologue, k.ridge_scale};
  if (fused) {
    r.small_solve = k.ridge_small_solve;
    r.small_max_d = k.ridge_small_max_d;
    r.per_entry_lapack = true;
  }
  return r;
}

}  // namespace avg_kernels::cpu
