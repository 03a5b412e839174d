// Ops<V> for at::vec::Vectorized<float/double>: lets the shared math of activations.h run on
// whole SIMD registers. float lanes use the exp/erfc/log1p below (AVX2 and AVX512), double lanes Sleef's.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <avg_kernels/activations.h>

#include <cmath>
#include <type_traits>

namespace avg_kernels {

namespace vec_math {

using VF = at::vec::Vectorized<float>;

// e^x for float lanes, ~1 ulp: x = n ln2 + r (Cody-Waite, |r| <= ln2/2), e^r by a degree-6
// polynomial (minimax for relative error on |r| <= ln2/2: 2e-9), times 2^n. About half the
// instructions of Sleef's expf_u10, which bounded every activation kernel here.
#if defined(CPU_CAPABILITY_AVX512)
using VR = __m512;
#define AK_VEC(op) _mm512_##op
#elif defined(CPU_CAPABILITY_AVX2)
using VR = __m256;
#define AK_VEC(op) _mm256_##op
#endif

#if defined(CPU_CAPABILITY_AVX512) || defined(CPU_CAPABILITY_AVX2)
// r = x - n ln2 in two steps (ln2_hi has 9 significant bits: n ln2_hi is exact for |n| < 2^15), and
// e^r; n is an integer-valued float.
inline VR exp_reduced(VR x, VR n) {
  VR r = AK_VEC(fnmadd_ps)(n, AK_VEC(set1_ps)(0.693359375f), x);
  r = AK_VEC(fnmadd_ps)(n, AK_VEC(set1_ps)(-2.12194440e-4f), r);
  VR p = AK_VEC(set1_ps)(1.38436060e-3f);
  p = AK_VEC(fmadd_ps)(p, r, AK_VEC(set1_ps)(8.37419648e-3f));
  p = AK_VEC(fmadd_ps)(p, r, AK_VEC(set1_ps)(4.16680053e-2f));
  p = AK_VEC(fmadd_ps)(p, r, AK_VEC(set1_ps)(1.66664302e-1f));
  p = AK_VEC(fmadd_ps)(p, r, AK_VEC(set1_ps)(4.99999940e-1f));
  p = AK_VEC(fmadd_ps)(p, r, AK_VEC(set1_ps)(1.0f));
  return AK_VEC(fmadd_ps)(p, r, AK_VEC(set1_ps)(1.0f));
}
#undef AK_VEC
#endif

// e^x for every x: overflow to inf, gradual underflow to 0, NaN kept.
inline VF exp(const VF& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(88.8f), _mm512_max_ps(_mm512_set1_ps(-104.0f), x));  // keeps NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_scalef_ps(exp_reduced(xc, n), n);  // vscalefps: exact, handles overflow and underflow
#elif defined(CPU_CAPABILITY_AVX2)
  // Without vscalefps, 2^n = 2^h 2^(n-h) with h = n >> 1: for n in [-150, 128] both factors are
  // normal floats, p 2^h is exact and the last product rounds once (to inf, or gradually to 0).
  const __m256 xc = _mm256_min_ps(_mm256_set1_ps(88.8f), _mm256_max_ps(_mm256_set1_ps(-104.0f), x));  // keeps NaN
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(xc, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 p = exp_reduced(xc, n);
  const __m256i ni = _mm256_cvtps_epi32(n);  // NaN lanes: p is NaN already
  const __m256i h = _mm256_srai_epi32(ni, 1);
  const __m256i bias = _mm256_set1_epi32(127);
  const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
  const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, h), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
#else
  return x.exp();
#endif
}

// e^x for x <= 0 (or NaN) only, as every exponential of activations.h is e^{-y}, y >= 0 (Ops<V>::exp
// below). Results below FLT_MIN are returned as 0, never as subnormals: a subnormal operand or result
// costs a microcode assist in every later operation, and a term below 1.2e-38 is far inside SPEC §1's
// absolute bar (1e-6) wherever it is used (tests/test_avg_act_edges.py checks the float range's edges).
// On AVX2 that leaves one power of two, built in the exponent field: k = x log2(e) + 1.5 2^23 + 127
// rounds to an integer whose low bits are n + 127, so k << 23 is 2^n (n in [-126, 0]).
inline VF exp_nonpos(const VF& x) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 lo = _mm512_set1_ps(-87.33654f);  // ln(FLT_MIN) rounded up: e^lo >= FLT_MIN
  const __m512 xc = _mm512_max_ps(lo, x);  // keeps NaN
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm512_maskz_scalef_ps(_mm512_cmp_ps_mask(x, lo, _CMP_NLT_UQ), exp_reduced(xc, n), n);  // x < lo: 0
#elif defined(CPU_CAPABILITY_AVX2)
  const __m256 lo = _mm256_set1_ps(-87.33654f);  // ln(FLT_MIN) rounded up: e^lo >= FLT_MIN
  const __m256 shifter = _mm256_set1_ps(12582912.0f + 127.0f);
  const __m256 xc = _mm256_max_ps(lo, x);  // keeps NaN
  const __m256 k = _mm256_fmadd_ps(xc, _mm256_set1_ps(1.44269504088896341f), shifter);
  const __m256 p = exp_reduced(xc, _mm256_sub_ps(k, shifter));
  const __m256 e = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_castps_si256(k), 23)));
  return _mm256_andnot_ps(_mm256_cmp_ps(x, lo, _CMP_LT_OQ), e);
#else
  return x.exp();
#endif
}

// erfc(z) = e^{-z^2} t P(t), t = 2 / (2 + |z|), P of degree 8 fitted (weighted least squares,
// relative) to erfc(z) e^{z^2} / t on z in [0, 10]; z^2 = p + pe exactly (fma) and
// e^{-z^2} = e^{-p} (1 - pe), so the rounding of z^2 does not cost 2 z^2 ulps. Max relative
// error 3.5e-7 on [0, 9] (measured against math.erfc in float64 on 200001 points), vs 3.3 ns
// per element for Sleef's erfcf_u15. erfc(-z) = 2 - erfc(z).
inline VF erfc(const VF& z) {
  const VF za = at::vec::minimum(z.abs(), VF(10.5f));  // erfc(10.5) < 1e-49: rounds to 0
  const VF t = VF(2.0f) / (VF(2.0f) + za);
  VF P(-0.06010870635509491f);
  for (float c : {0.2894461154937744f, -0.4968295693397522f, 0.2885151505470276f, -0.03339901939034462f,
                  0.20536042749881744f, 0.2424793839454651f, 0.28245383501052856f, 0.28208234906196594f})
    P = at::vec::fmadd(P, t, VF(c));
  const VF p = za * za;
#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
  const VF pe = at::vec::fmsub(za, za, p);
#else
  // The default level has no fused multiply-add (at::vec's fmsub rounds za * za first, which leaves
  // z^2 ulps of error in e^{-z^2}): the exact residual lane by lane instead.
  float zs[VF::size()], ps[VF::size()];
  za.store(zs);
  p.store(ps);
  for (int i = 0; i < VF::size(); ++i) ps[i] = std::fma(zs[i], zs[i], -ps[i]);
  const VF pe = VF::loadu(ps);
#endif
  const VF r = exp_nonpos(-p) * (VF(1.0f) - pe) * t * P;
  return VF::blendv(r, VF(2.0f) - r, z < VF(0.0f));
}

// log1p(y) for float lanes, ~2 ulp: u = 1 + y = m 2^k with m in [0.75, 1.5) (vgetexpps /
// vgetmantps), log m = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 1/5, by its odd series to s^11;
// the rounding of 1 + y is added back as (y - (u - 1)) / u. About 20 instructions against
// Sleef's log1pf_u10 (0.95 ns per element), which bounded softplus.
inline VF log1p(const VF& y) {
#if defined(CPU_CAPABILITY_AVX512)
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 u = _mm512_add_ps(one, y);
  const __m512 corr = _mm512_div_ps(_mm512_sub_ps(y, _mm512_sub_ps(u, one)), u);
  __m512 m = _mm512_getmant_ps(u, _MM_MANT_NORM_1_2, _MM_MANT_SIGN_zero);  // [1, 2)
  __m512 k = _mm512_getexp_ps(u);
  const __mmask16 big = _mm512_cmp_ps_mask(m, _mm512_set1_ps(1.5f), _CMP_GE_OQ);
  m = _mm512_mask_mul_ps(m, big, m, _mm512_set1_ps(0.5f));
  k = _mm512_mask_add_ps(k, big, k, one);
  // Near 0 (u in (0.75, 1.5), k = 0) use s = y / (2 + y) directly: no rounding of 1 + y at all.
  const __mmask16 near0 = _mm512_cmp_ps_mask(y, _mm512_set1_ps(-0.25f), _CMP_GT_OQ) &
                          _mm512_cmp_ps_mask(y, _mm512_set1_ps(0.5f), _CMP_LT_OQ);
  const __m512 num = _mm512_mask_mov_ps(_mm512_sub_ps(m, one), near0, y);
  const __m512 den = _mm512_mask_mov_ps(_mm512_add_ps(m, one), near0, _mm512_add_ps(y, _mm512_set1_ps(2.0f)));
  k = _mm512_mask_mov_ps(k, near0, _mm512_setzero_ps());
  const __m512 corr0 = _mm512_mask_mov_ps(corr, near0, _mm512_setzero_ps());
  // 2s as (num + num) / den: for a subnormal y, y / (2 + y) would round on the subnormal grid first.
  const __m512 two_s = _mm512_div_ps(_mm512_add_ps(num, num), den);
  const __m512 s = _mm512_mul_ps(two_s, _mm512_set1_ps(0.5f));
  const __m512 s2 = _mm512_mul_ps(s, s);
  __m512 p = _mm512_set1_ps(1.0f / 11);
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 9));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 7));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 5));
  p = _mm512_fmadd_ps(p, s2, _mm512_set1_ps(1.0f / 3));
  const __m512 logm = _mm512_fmadd_ps(_mm512_mul_ps(two_s, s2), p, two_s);
  __m512 r = _mm512_fmadd_ps(k, _mm512_set1_ps(-2.12194440e-4f), _mm512_add_ps(logm, corr0));  // k ln2_lo
  r = _mm512_fmadd_ps(k, _mm512_set1_ps(0.693359375f), r);                                     // k ln2_hi
  // Special values: y = inf -> inf, y = -1 -> -inf, y < -1 -> NaN, NaN -> NaN (kept by the arithmetic).
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(y, _mm512_set1_ps(INFINITY), _CMP_EQ_OQ), y);
  r = _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(y, _mm512_set1_ps(-1.0f), _CMP_EQ_OQ), _mm512_set1_ps(-INFINITY));
  return _mm512_mask_mov_ps(r, _mm512_cmp_ps_mask(y, _mm512_set1_ps(-1.0f), _CMP_LT_OQ), _mm512_set1_ps(NAN));
#elif defined(CPU_CAPABILITY_AVX2)
  // As above, the split u = m 2^k done on the bits: subtracting the bits of 0.75 leaves k in the
  // exponent field and m's mantissa below it (u is never subnormal: 1 + y is 0 or >= 2^-25).
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 u = _mm256_add_ps(one, y);
  const __m256 corr = _mm256_div_ps(_mm256_sub_ps(y, _mm256_sub_ps(u, one)), u);
  const __m256i b075 = _mm256_set1_epi32(0x3f400000);  // 0.75f
  const __m256i t = _mm256_sub_epi32(_mm256_castps_si256(u), b075);
  __m256 k = _mm256_cvtepi32_ps(_mm256_srai_epi32(t, 23));
  const __m256 m = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_and_si256(t, _mm256_set1_epi32(0x007fffff)), b075));
  const __m256 near0 = _mm256_and_ps(_mm256_cmp_ps(y, _mm256_set1_ps(-0.25f), _CMP_GT_OQ),
                                     _mm256_cmp_ps(y, _mm256_set1_ps(0.5f), _CMP_LT_OQ));
  const __m256 num = _mm256_blendv_ps(_mm256_sub_ps(m, one), y, near0);
  const __m256 den = _mm256_blendv_ps(_mm256_add_ps(m, one), _mm256_add_ps(y, _mm256_set1_ps(2.0f)), near0);
  k = _mm256_andnot_ps(near0, k);
  const __m256 corr0 = _mm256_andnot_ps(near0, corr);
  const __m256 two_s = _mm256_div_ps(_mm256_add_ps(num, num), den);  // as above: exact for subnormal y
  const __m256 s = _mm256_mul_ps(two_s, _mm256_set1_ps(0.5f));
  const __m256 s2 = _mm256_mul_ps(s, s);
  __m256 p = _mm256_set1_ps(1.0f / 11);
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 9));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 7));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 5));
  p = _mm256_fmadd_ps(p, s2, _mm256_set1_ps(1.0f / 3));
  const __m256 logm = _mm256_fmadd_ps(_mm256_mul_ps(two_s, s2), p, two_s);
  __m256 r = _mm256_fmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), _mm256_add_ps(logm, corr0));
  r = _mm256_fmadd_ps(k, _mm256_set1_ps(0.693359375f), r);
  r = _mm256_blendv_ps(r, y, _mm256_cmp_ps(y, _mm256_set1_ps(INFINITY), _CMP_EQ_OQ));
  r = _mm256_blendv_ps(r, _mm256_set1_ps(-INFINITY), _mm256_cmp_ps(y, _mm256_set1_ps(-1.0f), _CMP_EQ_OQ));
  return _mm256_blendv_ps(r, _mm256_set1_ps(NAN), _mm256_cmp_ps(y, _mm256_set1_ps(-1.0f), _CMP_LT_OQ));
#else
  return y.log1p();
#endif
}

}  // namespace vec_math

template <class T>
struct VecOpsImpl {
  using V = at::vec::Vectorized<T>;
  using Scalar = T;
  static V exp(const V& x) { return x.exp(); }
  static V erfc(const V& x) { return x.erfc(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V abs(const V& x) { return x.abs(); }
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
#if defined(CPU_CAPABILITY_AVX512)
  // AVX512 has predicate registers: masks live there (one compare, one blend), not in all-ones
  // vectors (compare, widen, compare back, blend). min/max need no NaN care: the math handles
  // non-finite lanes at the end (detail::fix_nonfinite).
  static constexpr bool kF = sizeof(T) == 4;
  using Mask = std::conditional_t<sizeof(T) == 4, __mmask16, __mmask8>;
  template <int P>
  static Mask cmp(const V& a, const V& b) {
    if constexpr (kF) return _mm512_cmp_ps_mask(a, b, P);
    else return _mm512_cmp_pd_mask(a, b, P);
  }
  static V min(const V& a, const V& b) {
    if constexpr (kF) return _mm512_min_ps(a, b);
    else return _mm512_min_pd(a, b);
  }
  static V max(const V& a, const V& b) {
    if constexpr (kF) return _mm512_max_ps(a, b);
    else return _mm512_max_pd(a, b);
  }
  static V select(Mask m, const V& a, const V& b) {
    if constexpr (kF) return _mm512_mask_blend_ps(m, b, a);
    else return _mm512_mask_blend_pd(m, b, a);
  }
  static Mask lt(const V& a, const V& b) { return cmp<_CMP_LT_OQ>(a, b); }
  static Mask le(const V& a, const V& b) { return cmp<_CMP_LE_OQ>(a, b); }
  static Mask eq(const V& a, const V& b) { return cmp<_CMP_EQ_OQ>(a, b); }
  static Mask mand(Mask a, Mask b) { return a & b; }
  static Mask mor(Mask a, Mask b) { return a | b; }
  static Mask mxor(Mask a, Mask b) { return a ^ b; }
  static Mask mnot(Mask a) { return static_cast<Mask>(~a); }
  static bool any(Mask m) { return m != 0; }
#else
  using Mask = V;  // all-ones / all-zeros lanes, as Vectorized comparisons return them
#if defined(CPU_CAPABILITY_AVX2)
  // Plain vminps/vmaxps, as for AVX512 (at::vec::minimum adds a NaN compare and an or), and one
  // vmovmskps for any().
  static constexpr bool kF = sizeof(T) == 4;
  static V min(const V& a, const V& b) {
    if constexpr (kF) return _mm256_min_ps(a, b);
    else return _mm256_min_pd(a, b);
  }
  static V max(const V& a, const V& b) {
    if constexpr (kF) return _mm256_max_ps(a, b);
    else return _mm256_max_pd(a, b);
  }
  static bool any(const Mask& m) {
    if constexpr (kF) return _mm256_movemask_ps(m) != 0;
    else return _mm256_movemask_pd(m) != 0;
  }
#else
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  // zero_mask() has one bit per lane that equals 0.0; a set mask lane is all-ones (a NaN).
  static bool any(const Mask& m) { return m.zero_mask() != (1 << V::size()) - 1; }
#endif
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask le(const V& a, const V& b) { return a <= b; }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static Mask mand(const Mask& a, const Mask& b) { return a & b; }
  static Mask mor(const Mask& a, const Mask& b) { return a | b; }
  static Mask mxor(const Mask& a, const Mask& b) { return a ^ b; }
  static Mask mnot(const Mask& a) { return a ^ (V(T(0)) == V(T(0))); }
#endif
};

// Float lanes use vec_math's functions; exp is only ever called with x <= 0 (see exp_nonpos).
template <>
struct Ops<at::vec::Vectorized<float>> : VecOpsImpl<float> {
  static V exp(const V& x) { return vec_math::exp_nonpos(x); }
  static V erfc(const V& x) { return vec_math::erfc(x); }
  static V log1p(const V& x) { return vec_math::log1p(x); }
};
template <>
struct Ops<at::vec::Vectorized<double>> : VecOpsImpl<double> {};

}  // namespace avg_kernels
