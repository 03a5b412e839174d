// The ridge solve driver (SPEC §3) shared by the CPU and CUDA backends: ATen linalg (batched
// Cholesky with per-entry info, cholesky_solve, eigh for the failing entries only) around two fused
// kernels that each backend supplies. Defined in csrc/ridge_driver.cpp (compiled by the C++ compiler in
// every build; it only calls ATen, so it drives CUDA tensors too).
#pragma once

#include <cstdint>

namespace at {
class Tensor;
}

namespace avg_kernels {

struct RidgeKernels {
  // Prologue, one pass over A: Bm = (A3 + A3^T) / 2 + lam * I in the compute dtype (Bm: contiguous
  // (nb, D, D), written completely); stats (nb, 2) in the compute dtype, zero on entry:
  // stats[b, 0] = 1 if A3[b] has a non-finite entry, stats[b, 1] = max_i |A3[b, i, i]|.
  // A3 may have any strides.
  void (*prologue)(const at::Tensor& A3, double lam, at::Tensor& Bm, at::Tensor& stats);
  // Epilogue of the eigendecomposition path, in place: Y[b, c, j] *= inverse_factor(w[b, j], lam,
  // cutoff_b) (csrc/include/avg_kernels/ridge.h), cutoff_b = rtol * max_j |w[b, j]| (used when lam = 0).
  // Y: contiguous (nb, C, D); w: contiguous (nb, D), ascending per row; both in the compute dtype.
  void (*scale)(at::Tensor& Y, const at::Tensor& w, double lam, double rtol);
  // Optional fused path for small systems (D <= small_max_d, lam > 0): prologue, Cholesky of
  // S + lam I, the Gram certificate (Cholesky of S + tau I with tau = 1e-3 max|S_ii|, only where
  // lam > tau) and both triangular solves, one task per batch entry. Writes P (contiguous
  // (nb, C, D), compute dtype) for every entry whose factorisation succeeded and status (nb, 3),
  // compute dtype, zero on entry: [non-finite flag, Cholesky failed flag, certificate failed flag].
  // nullptr: the driver uses prologue + at::linalg_cholesky_ex + at::cholesky_solve.
  void (*small_solve)(const at::Tensor& G3, const at::Tensor& A3, double lam, at::Tensor& P, at::Tensor& status) =
      nullptr;
  int64_t small_max_d = 0;
  // lam > 0 and D above small_max_d (or C large enough against D for the explicit inverse + one GEMM
  // to be cheaper, at any D >= 64: solve_by_inverse in csrc/ridge_driver.cpp): factorise and solve one
  // entry at a time in one reused buffer, in order on the calling thread (CPU: LAPACK is per matrix
  // anyway, and nb x D x D temporaries cost page faults) instead of batched at::linalg_cholesky_ex +
  // at::cholesky_solve (GPU: one batched call).
  bool per_entry_lapack = false;
};

// P = G (sym(A) + lam I)^{-1} (lam > 0) or G pinv(sym(A)) (lam = 0), G (..., C, D), A (..., D, D),
// validated by the caller (avg_kernels/ops/ridge.py) except for the data checks done here.
at::Tensor ridge_solve_driver(const at::Tensor& G, const at::Tensor& A, double lam, const RidgeKernels& k);

}  // namespace avg_kernels
