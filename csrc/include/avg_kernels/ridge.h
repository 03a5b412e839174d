// Element math of the ridge solve (SPEC §3), shared by the C++ CPU kernels (csrc/cpu/ridge.cpp), the CUDA
// kernels (csrc/cuda/ridge_kernel.cuh) and their host emulation: one definition of each formula.
//
// C is the compute type: float for float16/bfloat16/float32 operands, double for float64 (SPEC §0).
// No libtorch, no CUDA headers: compiles as plain C++ and under nvcc.
#pragma once

#if defined(__CUDACC__)
#define AVGK_RIDGE_HD __host__ __device__ __forceinline__
#else
#define AVGK_RIDGE_HD inline
#endif

namespace avg_kernels {
namespace ridge {

// An eigenvalue below -kGramTol * ||S||_2 means "clearly not a Gram" (SPEC §3).
constexpr double kGramTol = 1e-3;

template <class C>
AVGK_RIDGE_HD C abs_value(C x) {
  return x < C(0) ? -x : x;  // NaN stays NaN
}

// One entry of S = (A + A^T) / 2. Exact (no rounding, no overflow of a + b) when A is symmetric.
template <class C>
AVGK_RIDGE_HD C sym_entry(C aij, C aji) {
  return aij == aji ? aij : C(0.5) * aij + C(0.5) * aji;
}

// a is finite: neither NaN nor +-inf (x - x is 0 exactly for finite x, NaN otherwise).
template <class C>
AVGK_RIDGE_HD bool is_finite(C a) {
  return (a - a) == C(0);
}

// The pseudoinverse cutoff of one batch entry from its ascending eigenvalues (first and last):
// torch.linalg.pinv(hermitian=True) keeps |w| > rtol * max|w|.
template <class C>
AVGK_RIDGE_HD C eig_cutoff(C w_first, C w_last, C rtol) {
  const C a = abs_value(w_first), b = abs_value(w_last);
  return rtol * (a > b ? a : b);
}

// The factor that eigenvalue w of S contributes to G V diag(r) V^T:
//   lam > 0: 1 / (max(w, 0) + lam)            (the eigendecomposition fallback: clamped at 0)
//   lam = 0: |w| > cutoff ? 1 / w : 0          (pinv, hermitian: signed reciprocal above the cutoff)
template <class C>
AVGK_RIDGE_HD C inverse_factor(C w, C lam, C cutoff) {
  if (lam > C(0)) return C(1) / ((w > C(0) ? w : C(0)) + lam);
  return abs_value(w) > cutoff ? C(1) / w : C(0);
}

}  // namespace ridge
}  // namespace avg_kernels
