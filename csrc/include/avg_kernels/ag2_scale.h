// AG-2's scale ‖θ' − θ‖₁ / ‖Δ‖₁ (SPEC §2) as factors that neither overflow nor underflow, shared by the CPU
// driver (csrc/cpu/ag_update.cpp), the CUDA kernel (csrc/cuda/ag_update_kernel.cuh, host and device) and
// mirrored by the Triton kernel (avg_kernels/_triton/ag_update.py) and the reference (reference/ag_update.py).
//
// With float64 parameters the norms a = ‖θ' − θ‖₁ and b = ‖Δ‖₁ can lie near the ends of double's range and
// a / b overflow (a = 1e300, b = 1e-300: Δ·inf gives ±inf, and 0·inf NaN, where the exact θ + Δ·a/b is finite)
// or underflow (a = 1e-300, b = 1e300: the ratio 0 or a subnormal with few bits, where Δ·a/b may be normal).
// The update is applied as
//     θ ← fma((Δ·u1)·u2, v, θ)
// with u1·u2·v = a / b up to one rounding (that of v, or of u1):
//   * a / b a normal double (or a or b zero/non-finite): u1 = u2 = 1, v = a / b (the plain fma: same bits);
//   * a / b > DBL_MAX: u1·u2 = 2^k with b·2^k in [1, 2), v = a / (b·2^k) <= a. Since |Δ_i| <= b (a sum of
//     non-negative terms rounds to at least each term), Δ_i·2^k < 2 is exact, and the fma rounds once;
//   * 0 < a / b < DBL_MIN: u1 = a·2^j / b (a·2^j exact and < 2^1022, so |Δ_i|·u1 <= a·2^j never overflows),
//     u2 = 1, v = 2^-j (j <= 1074: a double), so the tiny factor is applied inside the fma with θ: one rounding
//     of Δ_i·u1 (a normal number unless Δ_i itself is tiny) and the fma's own.
// Plain C++ (no CUDA headers) unless compiled by nvcc.
#pragma once

#include <cfloat>
#include <cmath>

#if defined(__CUDACC__)
#define AK_AG2_HD __host__ __device__ inline
#else
#define AK_AG2_HD inline
#endif

namespace avg_kernels::ag2 {

struct Factors {
  double u1, u2, v;
};

// floor(log2 x) for a positive finite x (subnormals included).
AK_AG2_HD int floor_log2(double x) {
  int e = 0;
  (void)frexp(x, &e);  // x = m·2^e, m in [0.5, 1)
  return e - 1;
}

AK_AG2_HD Factors factors(double a, double b) {
  const double q = b == 0.0 ? 0.0 : a / b;
  const bool plain = !(a > 0.0 && b > 0.0 && a <= DBL_MAX && b <= DBL_MAX) || (q >= DBL_MIN && q <= DBL_MAX);
  if (plain) return {1.0, 1.0, q};
  if (q > DBL_MAX) {  // then b < 1 (a <= DBL_MAX): 1 <= k <= 1074
    const int k = -floor_log2(b);
    const int k1 = k < 1023 ? k : 1023;
    const double u1 = ldexp(1.0, k1), u2 = ldexp(1.0, k - k1);
    return {u1, u2, a / (b * u1 * u2)};
  }
  // 0 <= q < DBL_MIN: then a < 4, so j >= 1020
  const int j0 = 1021 - floor_log2(a);
  const int j = j0 < 1074 ? j0 : 1074;
  const int j1 = j < 1023 ? j : 1023;
  return {a * ldexp(1.0, j1) * ldexp(1.0, j - j1) / b, 1.0, ldexp(1.0, -j)};
}

// Whether the factors are the plain scale (u1 = u2 = 1): the fast paths then need no extra multiply.
AK_AG2_HD bool plain(const Factors& f) { return f.u1 == 1.0 && f.u2 == 1.0; }

}  // namespace avg_kernels::ag2
