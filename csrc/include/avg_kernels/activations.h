// One definition of every activation's math, shared by the C++ CPU kernels (vectorised through
// at::vec, see csrc/cpu/vec_ops.h), the CUDA kernels (scalar, one element per thread) and the host
// emulation of the CUDA launch. avg_kernels/_triton/avg_act.py mirrors it line for line.
//
// Everything is written once against a value type V and its Ops<V> (exp, select, masks, ...):
// V is float/double here and at::vec::Vectorized<float/double> on the CPU. Branches are selects,
// so every lane evaluates every formula; rare, expensive paths hide behind Ops<V>::any(), and so do
// the alternative forms of gelu and elu that lanes with small steps never need. Ops<V>::exp is only
// ever called with a non-positive argument (every exponential here is e^{-y}, y >= 0): the CPU's
// float lanes rely on that (csrc/cpu/kernels/vec_ops.h, exp_nonpos).
//
// SPEC §1: s(a, b) = (f(b) - f(a)) / (b - a) if |b - a| > eps, else f'(a). The literal formula
// cancels catastrophically for small |b - a|, so each secant is computed from difference identities
// that never subtract two nearly equal values (derivations in the comments of each function).
#pragma once

#include <math.h>
#include <stdint.h>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define AK_HD __host__ __device__ __forceinline__
#else
#define AK_HD inline
#endif

namespace avg_kernels {

// The activation table (kernel level): X(Enumerator, id, name, bounded), one row per activation.
// It drives `enum class Act`, kNumActs, the dispatch switch (dispatch.h) and the CUDA
// instantiations (csrc/standalone/avg_act_instantiate.cu). It must equal the Python table
// (avg_kernels/activations.py: KERNEL_ACTS, KERNEL_IDS, Activation.bounded), which
// tests/test_activation_table.py checks by reading this macro. `name` is the kernel-level name
// (gelu is split by its `approximate` parameter: Gelu is x Phi(x), GeluTanh approximate="tanh");
// `bounded`: f is bounded at both ends, so the secant tends to 0 when an end goes to infinity
// (fix_nonfinite). Adding an activation: a row here, its math in avg_slope and act_value below
// (and the Triton mirror), and its record in the Python table.
#define AVG_KERNELS_ACTIVATIONS(X)        \
  X(Tanh, 0, "tanh", true)                \
  X(Sigmoid, 1, "sigmoid", true)          \
  X(Relu, 2, "relu", false)               \
  X(LeakyRelu, 3, "leaky_relu", false)    \
  X(Elu, 4, "elu", false)                 \
  X(Gelu, 5, "gelu", false)               \
  X(GeluTanh, 6, "gelu_tanh", false)      \
  X(Silu, 7, "silu", false)               \
  X(Softplus, 8, "softplus", false)       \
  X(Hardswish, 9, "hardswish", false)     \
  X(Hardsigmoid, 10, "hardsigmoid", true) \
  X(Hardtanh, 11, "hardtanh", true)

enum class Act : int32_t {
#define AK_ACT_ENUM(E, id, name, bounded) E = id,
  AVG_KERNELS_ACTIVATIONS(AK_ACT_ENUM)
#undef AK_ACT_ENUM
};

#define AK_ACT_COUNT(E, id, name, bounded) +1
constexpr int kNumActs = 0 AVG_KERNELS_ACTIVATIONS(AK_ACT_COUNT);
#undef AK_ACT_COUNT

namespace detail {
// Ids are the row numbers (the Python side numbers KERNEL_ACTS by position).
AK_HD constexpr bool act_ids_are_row_numbers() {
  int row = 0;
#define AK_ACT_ROW(E, id, name, bounded) \
  if (id != row++) return false;
  AVG_KERNELS_ACTIVATIONS(AK_ACT_ROW)
#undef AK_ACT_ROW
  return true;
}
}  // namespace detail
static_assert(detail::act_ids_are_row_numbers(), "AVG_KERNELS_ACTIVATIONS: ids must be 0, 1, 2, ... in row order");

// The table's `bounded` column.
AK_HD constexpr bool act_is_bounded(Act a) {
  switch (a) {
#define AK_ACT_BOUNDED(E, id, name, bounded) \
  case Act::E:                               \
    return bounded;
    AVG_KERNELS_ACTIVATIONS(AK_ACT_BOUNDED)
#undef AK_ACT_BOUNDED
  }
  return false;
}

// The table's kernel-level name (nullptr for an id outside the table).
AK_HD constexpr const char* act_name(Act a) {
  switch (a) {
#define AK_ACT_NAME(E, id, name, bounded) \
  case Act::E:                            \
    return name;
    AVG_KERNELS_ACTIVATIONS(AK_ACT_NAME)
#undef AK_ACT_NAME
  }
  return nullptr;
}

// Numeric parameters: leaky_relu p0 = negative_slope; elu p0 = alpha;
// softplus p0 = beta (> 0), p1 = threshold; hardtanh p0 = min_val <= p1 = max_val. Others ignore them.
template <class S>
struct ActParams {
  S p0;
  S p1;
};

// The fallback decision |x_new - x| <= eps of SPEC §1, taken on EXACT values: eps is the caller's
// double, x and x_new are values of S, and their difference D = b - a is rounded when computed in S
// (d = fl(D)). With lo / hi the largest / smallest S at or below / above eps (lo == hi when eps is an S):
//   |d| <  lo            -> |D| < eps (rounding is monotone and lo is an S): fallback;
//   |d| >  hi            -> |D| > eps: secant;
//   |d| == lo or == hi   -> decided by the rounding error e = D - d, exact in S (TwoSum):
//                           |D| = |d| + e sign(d) <= eps  <=>  e sign(d) <= t_lo (t_hi), with
//                           t_lo / t_hi the largest S <= eps - lo / eps - hi (the comparison of an S
//                           with a real r is the comparison with the largest S <= r).
// NaN d is never a fallback. make_eps_cut (host) builds it from the double eps; eps must be <= the
// largest finite S (the drivers compute in double otherwise: then |D| of finite ends may exceed
// FLT_MAX and still be <= eps).
template <class S>
struct EpsCut {
  S lo, hi, t_lo, t_hi;
  // eps already an S (tests, act_deriv): no rounding anywhere.
  static AK_HD EpsCut exactly(S e) { return EpsCut{e, e, S(0), S(0)}; }
};

// Host: the cut of a double eps >= 0 in S (float: rounded down/up with the residuals; double: exact).
template <class S>
inline EpsCut<S> make_eps_cut(double eps) {
  if constexpr (sizeof(S) == 8) {
    return EpsCut<S>::exactly(S(eps));
  } else {
    auto down = [](double v) {  // the largest float <= v
      float f = float(v);
      if (double(f) > v) f = nextafterf(f, -INFINITY);
      return f;
    };
    const float lo = down(eps);
    const float hi = double(lo) == eps ? lo : nextafterf(lo, INFINITY);
    // eps - lo and eps - hi are exact in double (Sterbenz, or both on the subnormal float grid), except
    // eps - hi for eps below the smallest subnormal, where every double in (-2^-149, 0) rounds down alike.
    return EpsCut<S>{lo, hi, down(eps - double(lo)), down(eps - double(hi))};
  }
}

// ---------------------------------------------------------------------------------------------
// Scalar operations (host and device). Vectorised versions live in csrc/cpu/vec_ops.h.
// ---------------------------------------------------------------------------------------------
template <class V>
struct Ops;

template <>
struct Ops<float> {
  using Scalar = float;
  using Mask = bool;
  static AK_HD float exp(float x) { return expf(x); }
  static AK_HD float erfc(float x) { return erfcf(x); }
  static AK_HD float log1p(float x) { return log1pf(x); }
  static AK_HD float abs(float x) { return fabsf(x); }
  static AK_HD float fma(float a, float b, float c) { return fmaf(a, b, c); }
  static AK_HD float min(float a, float b) { return a < b ? a : b; }
  static AK_HD float max(float a, float b) { return a > b ? a : b; }
  static AK_HD float select(bool m, float a, float b) { return m ? a : b; }
  static AK_HD bool lt(float a, float b) { return a < b; }
  static AK_HD bool le(float a, float b) { return a <= b; }
  static AK_HD bool eq(float a, float b) { return a == b; }
  static AK_HD bool mand(bool a, bool b) { return a && b; }
  static AK_HD bool mor(bool a, bool b) { return a || b; }
  static AK_HD bool mxor(bool a, bool b) { return a != b; }
  static AK_HD bool mnot(bool a) { return !a; }
  static AK_HD bool any(bool m) { return m; }
};

template <>
struct Ops<double> {
  using Scalar = double;
  using Mask = bool;
  static AK_HD double exp(double x) { return ::exp(x); }
  static AK_HD double erfc(double x) { return ::erfc(x); }
  static AK_HD double log1p(double x) { return ::log1p(x); }
  static AK_HD double abs(double x) { return fabs(x); }
  static AK_HD double fma(double a, double b, double c) { return ::fma(a, b, c); }
  static AK_HD double min(double a, double b) { return a < b ? a : b; }
  static AK_HD double max(double a, double b) { return a > b ? a : b; }
  static AK_HD double select(bool m, double a, double b) { return m ? a : b; }
  static AK_HD bool lt(double a, double b) { return a < b; }
  static AK_HD bool le(double a, double b) { return a <= b; }
  static AK_HD bool eq(double a, double b) { return a == b; }
  static AK_HD bool mand(bool a, bool b) { return a && b; }
  static AK_HD bool mor(bool a, bool b) { return a || b; }
  static AK_HD bool mxor(bool a, bool b) { return a != b; }
  static AK_HD bool mnot(bool a) { return !a; }
  static AK_HD bool any(bool m) { return m; }
};

namespace detail {

// Below this |argument| the exponential differences use a Taylor series instead of subtracting
// two exponentials: there the subtraction would cancel; at or above it, it loses < 1.4 bits.
constexpr double kSmall = 0.5;

// gelu_tanh's clamp of x: e^{-U(lim)} is exactly 0 in S (float U(11) = 112, double U(22) = 795).
template <class S>
AK_HD constexpr S gelu_tanh_lim() {
  return sizeof(S) == 4 ? S(11) : S(22);
}

// Taylor coefficient (-1)^k / (k+1)! of 1 - e^{-y} = y * sum_k (-y)^k / (k+1)!.
AK_HD constexpr double om_coef(int k) {
  double c = 1.0;
  for (int i = 2; i <= k + 1; ++i) c /= i;
  return (k % 2) ? -c : c;
}

// Horner evaluation of sum_{k=K0}^{K-1} om_coef(k) y^(k-K0), unrolled at compile time.
template <class V, int K0, int K>
struct OmHorner {
  static AK_HD V eval(V y) {
    using S = typename Ops<V>::Scalar;
    constexpr S c = S(om_coef(K0));
    return Ops<V>::fma(OmHorner<V, K0 + 1, K>::eval(y), y, V(c));
  }
};
template <class V, int K>
struct OmHorner<V, K, K> {
  static AK_HD V eval(V) { return V(typename Ops<V>::Scalar(0)); }
};

// (1 - e^{-y}) / y for |y| <= kSmall (the series before its last product by y).
template <class V>
AK_HD V om_poly(V y) {
  using S = typename Ops<V>::Scalar;
  constexpr int K = sizeof(S) == 4 ? 9 : 16;
  return OmHorner<V, 0, K>::eval(y);
}

// 1 - e^{-y} for |y| <= kSmall, accurate to ~1 ulp (9 terms: float, 16 terms: double).
template <class V>
AK_HD V one_minus_exp_neg_small(V y) {
  return om_poly(y) * y;
}

// Logistic secant core. For A, B (B == A on fallback lanes) and AD = |B - A| given exactly by
// the caller (it may come from a formula, not from a subtraction), with p = e^{-|A|},
// q = e^{-|B|} (so both in (0, 1], no overflow):
//   sigma(B) - sigma(A), same signs:      (p - q) / ((1+p)(1+q))    (up to sign)
//                        opposite signs:  (1 - p q) / ((1+p)(1+q))
// p - q = max(p,q) (1 - e^{-AD}) and 1 - p q = 1 - e^{-AD}: for AD < kSmall the Taylor series
// of 1 - e^{-AD} replaces the subtraction. N is |sigma(B) - sigma(A)| * (1+p)(1+q) >= 0.
template <class V>
struct SigCore {
  V p, q, N;
};

template <class V>
AK_HD SigCore<V> sigmoid_core(V A, V B, V AD) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  const V zero(S(0)), one(S(1));
  SigCore<V> c;
  c.p = O::exp(-O::abs(A));
  c.q = O::exp(-O::abs(B));
  auto opp = O::mxor(O::lt(A, zero), O::lt(B, zero));
  V om = one_minus_exp_neg_small(AD);
  V n_small = O::select(opp, one, O::max(c.p, c.q)) * om;
  V n_large = O::select(opp, O::fma(-c.p, c.q, one), O::abs(c.p - c.q));
  c.N = O::select(O::lt(AD, V(S(kSmall))), n_small, n_large);
  return c;
}

// sigma(B) * (1 + q) with q = e^{-|B|}: 1 for B >= 0, q for B < 0.
template <class V>
AK_HD V sigmoid_times_1pq(V B, V q) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  return O::select(O::lt(B, V(S(0))), q, V(S(1)));
}

// Overwrites s where x or x_new is not finite (SPEC §1): NaN -> NaN; exactly one infinite ->
// the secant's limit, the asymptotic slope at that infinity; both infinite -> NaN, except 0
// for bounded f (the table's `bounded` column) with opposite signs (the literal secant is then
// 2/inf or 1/inf).
// d = b - a: a non-finite a or b makes d inf or NaN, so lanes with |d| < 2^126 need nothing here (the
// fast path). Lanes with finite ends and |d| >= 2^126 (which may have overflowed to inf, and whose
// formulas above may have overflowed to inf/inf) take the asymptotic secant: f(x) = g(x) + O(1) with
// g(x) = x times the asymptotic slope of x's side (f deviates from it by at most 3, hardswish), so
// s = (g(b/2) - g(a/2)) / (b/2 - a/2) (the ends halved, exactly, so nothing overflows) is within
// 6 / 2^126 < 1e-37 of the secant (bounded f: 0).
// The fallback lanes |b - a| <= eps, decided exactly (EpsCut above); d = b - a as computed in S.
template <class V>
AK_HD auto fallback_mask(V a, V b, V d, const EpsCut<typename Ops<V>::Scalar>& cut) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  V ad = O::abs(d);
  auto fb = O::lt(ad, V(cut.lo));
  auto tie = O::mand(O::le(ad, V(cut.hi)), O::mnot(fb));  // |d| == lo or hi (never NaN)
  if (O::any(tie)) {
    V z = d - b;                              // TwoSum(b, -a): d + err == b - a exactly
    V err = (b - (d - z)) + (-a - z);
    V err_out = O::select(O::lt(d, V(S(0))), -err, err);  // |b - a| - |d|
    V t = O::select(O::eq(ad, V(cut.lo)), V(cut.t_lo), V(cut.t_hi));
    fb = O::mor(fb, O::mand(tie, O::le(err_out, t)));
  }
  return fb;
}

// 2^126 (float) / 2^1022 (double): a quarter of the range, where the formulas' products by |d| overflow
// (a double threshold of 2^126 took the halved asymptotic secant for ordinary doubles: leaky_relu at
// x = -3.8e53 with d = 2^126 cancelled in slope*(b/2) - slope*(a/2) to 0.0078 for 0.01)
template <class S>
AK_HD constexpr S huge_step() {
  return S(sizeof(S) == 4 ? 8.507059173023462e37 : 4.49423283715579e307);
}

template <Act A, class V, class M>
AK_HD V fix_nonfinite(V a, V b, V d, V s, M fb, ActParams<typename Ops<V>::Scalar> prm) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  const V inf = V(S(INFINITY)), zero = V(S(0));
  const V nan = V(S(NAN));
  const V huge(huge_step<S>());
  if (!O::any(O::mnot(O::lt(O::abs(d), huge)))) return s;  // fast path: every |d| < 2^126
  constexpr bool bounded = act_is_bounded(A);
  const S pos_slope = bounded ? S(0) : S(1);
  const S neg_slope = (A == Act::LeakyRelu) ? prm.p0 : S(0);
  auto a_inf = O::eq(O::abs(a), inf);
  auto b_inf = O::eq(O::abs(b), inf);
  V inf_val = O::select(a_inf, a, b);
  V s_one = O::select(O::lt(zero, inf_val), V(pos_slope), V(neg_slope));
  V s_both = bounded ? O::select(O::eq(a, b), nan, zero) : nan;
  V ha = a * V(S(0.5)), hb = b * V(S(0.5));
  V g_a = ha * O::select(O::lt(zero, a), V(pos_slope), V(neg_slope));
  V g_b = hb * O::select(O::lt(zero, b), V(pos_slope), V(neg_slope));
  // finite ends, |d| >= 2^126, not a fallback lane (an eps >= 2^126 keeps f'(a), computed at d = 0);
  // hardtanh computes these lanes exactly itself (its bounds may be anywhere up to the largest S, so
  // f is not g + O(1) there)
  if constexpr (A != Act::Hardtanh) {
    auto ovf = O::mand(O::mand(O::le(huge, O::abs(d)), O::mnot(O::mor(a_inf, b_inf))), O::mnot(fb));
    s = O::select(ovf, (g_b - g_a) / (hb - ha), s);
  }
  s = O::select(O::mxor(a_inf, b_inf), s_one, s);
  s = O::select(O::mand(a_inf, b_inf), s_both, s);
  auto a_nan = O::mnot(O::eq(a, a));
  auto b_nan = O::mnot(O::eq(b, b));
  return O::select(O::mor(a_nan, b_nan), nan, s);
}

}  // namespace detail

// ---------------------------------------------------------------------------------------------
// avg_slope<A>(a, b): the averaged slope s(x=a, x_new=b) of SPEC §1, in the arithmetic of V.
// ---------------------------------------------------------------------------------------------
template <Act A, class V>
AK_HD V avg_slope(V a, V b, ActParams<typename Ops<V>::Scalar> prm, const EpsCut<typename Ops<V>::Scalar>& cut) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  using detail::kSmall;
  const V zero(S(0)), one(S(1));
  const V small = V(S(kSmall));
  V d = b - a;
  // Fallback lanes (|b - a| <= eps exactly, never true for NaN d) evaluate every formula at b = a,
  // d = 0: each formula below then reduces to f'(a) through its own num/den selection.
  auto fb = detail::fallback_mask(a, b, d, cut);
  V bb = O::select(fb, a, b);
  V ad = O::select(fb, zero, O::abs(d));
  V den_fac = O::select(fb, one, ad);
  V s;

  if constexpr (A == Act::Sigmoid || A == Act::Tanh || A == Act::Silu) {
    // tanh(x) = 2 sigma(2x) - 1, so s_tanh(a, b) = 4 s_sigma(2a, 2b) (scaling by 2 is exact).
    constexpr bool tanh_ = (A == Act::Tanh);
    V A2 = tanh_ ? a * V(S(2)) : a;
    V B2 = tanh_ ? bb * V(S(2)) : bb;
    V AD2 = tanh_ ? ad * V(S(2)) : ad;
    auto c = detail::sigmoid_core(A2, B2, AD2);
    V num = O::select(fb, c.p, c.N);  // fallback: sigma'(A) = p / (1+p)^2
    V den = (one + c.p) * (one + c.q) * (tanh_ ? O::select(fb, one, AD2) : den_fac);
    if constexpr (A == Act::Silu) {
      // silu = x sigma(x): s = sigma(lo) + hi * s_sigma(a, b) with lo <= hi the ends (both terms >= 0
      // when hi >= 0: no cancellation, e.g. s(-20, 0) = sigma(-20)), over one common denominator.
      auto a_lo = O::le(a, bb);
      V h_lo = O::select(a_lo, detail::sigmoid_times_1pq(A2, c.p) * (one + c.q),
                         detail::sigmoid_times_1pq(B2, c.q) * (one + c.p));
      s = O::fma(h_lo, den_fac, O::max(a, bb) * num) / den;
    } else {
      s = (tanh_ ? num * V(S(4)) : num) / den;
    }
  } else if constexpr (A == Act::GeluTanh) {
    // gelu_tanh = x h(x), h(x) = sigma(U(x)), U(x) = 2k (x + c x^3): s = h(lo) + hi s_h(a, b) (lo <= hi
    // the ends: no cancellation when hi >= 0), and U(b) - U(a) = g (b - a) with
    // g = 2k (1 + c (a^2 + a b + b^2)) > 0, so the sigmoid core gets |U(b) - U(a)| without a
    // subtraction. The ends are clamped at +-lim, where e^{-U(lim)} is 0 in S (float: U(11) = 112,
    // double: U(22) = 795): h is then exactly saturated, x^3 stays finite, and the fallback's
    // a h'(a) is exactly 0 for every |a| >= lim (a clamp where e^{-U} is merely tiny is not enough:
    // h'(10) = 3e-37 times a = 3e38 gave 88, h'(11) = 2e-47 times a = 1e100 in double gave 4e52).
    const V k2(S(2 * 0.7978845608028654));  // 2 sqrt(2/pi)
    const V c3(S(0.044715));
    const V lim(detail::gelu_tanh_lim<S>());
    V ac = O::min(O::max(a, -lim), lim);
    V bc = O::min(O::max(bb, -lim), lim);
    V Ua = k2 * ac * O::fma(c3 * ac, ac, one);
    V Ub = k2 * bc * O::fma(c3 * bc, bc, one);
    V g = k2 * O::fma(c3, O::fma(ac, ac, O::fma(ac, bc, bc * bc)), one);
    auto c = detail::sigmoid_core(Ua, Ub, g * O::abs(bc - ac));
    V num = O::select(fb, c.p * g, c.N);  // fallback: h'(a) = sigma'(U(a)) g(a, a)
    V den = (one + c.p) * (one + c.q) * den_fac;
    auto a_lo = O::le(a, bb);
    V h_lo = O::select(a_lo, detail::sigmoid_times_1pq(Ua, c.p) * (one + c.q),
                       detail::sigmoid_times_1pq(Ub, c.q) * (one + c.p));
    s = O::fma(h_lo, den_fac, O::max(a, bb) * num) / den;
  } else if constexpr (A == Act::Gelu) {
    // gelu = x Phi(x): s = Phi(b) + a s_Phi(a, b). With C(x) = Phi(-|x|) (an erfc, accurate in the
    // tails): Phi(b) - Phi(a) = |C(a) - C(b)| (same signs) or 1 - C(a) - C(b) (opposite signs),
    // used for |d| >= kSmall; below it the midpoint expansion of the mean of phi over [a, b]:
    //   s_Phi = phi(m) sum_k He_2k(m) h^2k / (2k+1)!,  m = (a+b)/2, h = (b-a)/2  (He: Hermite;
    //   phi^(2k) = He_2k phi).
    const V rsqrt2(S(0.70710678118654752440));
    const V rsqrt2pi(S(0.39894228040143267794));
    V Cb = O::erfc(O::abs(bb) * rsqrt2) * V(S(0.5));
    V h = (bb - a) * V(S(0.5));
    const V mlim(S(40));  // phi(40) == 0 even in float64; keeps m^6 finite
    V m = O::min(O::max(a + h, -mlim), mlim);
    // He_2k(m) grows like m^2k, so the series is used only where |h| max(1, |m|) < kSmall/2: there
    // the first omitted term is < 4e-9 (float, K=4) / < 2e-18 (double, K=9) relative. Elsewhere
    // the erfc difference loses at most a factor 1/(1 - e^{-|m| |d|}) (same signs) to cancellation.
    // A lane needs one of the two forms: each is evaluated only when some lane needs it (with small
    // steps, as in training, the erfc at a is never needed).
    auto use_series = O::lt(ad * O::max(one, O::abs(m)), small);
    V phi_b = O::select(O::lt(bb, zero), Cb, one - Cb);
    V s_big = zero;
    if (O::any(O::mnot(use_series))) {
      // s = Phi(lo) + hi s_Phi with lo <= hi the ends: both terms >= 0 when hi >= 0 (no cancellation:
      // s(-20, 0) = Phi(-20) = 2.8e-89, where Phi(b) + a s_Phi cancelled to a wrong-signed 1e-8).
      V Ca = O::erfc(O::abs(a) * rsqrt2) * V(S(0.5));
      auto opp = O::mxor(O::lt(a, zero), O::lt(bb, zero));
      V dPhi = O::select(opp, one - Ca - Cb, O::abs(Ca - Cb));
      auto a_lo = O::le(a, bb);
      V lo = O::min(a, bb);
      V C_lo = O::select(a_lo, Ca, Cb);
      V phi_lo = O::select(O::lt(lo, zero), C_lo, one - C_lo);
      s_big = O::fma(O::max(a, bb), dPhi / den_fac, phi_lo);
    }
    V s_phi = zero;
    if (O::any(use_series)) {
      V m2 = m * m, h2 = h * h;
      V phi = O::exp(m2 * V(S(-0.5))) * rsqrt2pi;
      // sum_{k<K} He_2k(m) h^2k / (2k+1)!, Hermite by recurrence He_{n+1} = m He_n - n He_{n-1}.
      constexpr int K = sizeof(S) == 4 ? 4 : 9;
      V he_prev = one, he = m, h2k = one, series = one;
      S inv_fact = S(1);
      for (int n = 1; n < 2 * K - 1; ++n) {
        V he_next = O::fma(m, he, -V(S(n)) * he_prev);  // He_{n+1}
        he_prev = he;
        he = he_next;
        if ((n + 1) % 2 == 0) {
          inv_fact /= S(n + 1) * S(n + 2);  // 1 / (n+2)!
          h2k = h2k * h2;
          series = O::fma(he * V(inv_fact), h2k, series);
        }
      }
      s_phi = phi * series;
    }
    // series lanes (|d| max(1, |m|) < kSmall): Phi(b) + a s_Phi, where a >= -kSmall when b >= 0
    s = O::select(use_series, O::fma(a, s_phi, phi_b), s_big);
  } else if constexpr (A == Act::Elu) {
    // elu = x (x > 0), alpha (e^x - 1) (x <= 0). With lo <= hi:
    //   both <= 0: alpha (e^hi - e^lo) = alpha e^hi (1 - e^{-|d|})
    //   lo <= 0 < hi: hi + alpha (1 - e^lo)       (two positive terms, no cancellation)
    // Both 1 - e^{-y} use the Taylor series below kSmall; one series evaluation serves both.
    // e^lo is needed only where the series is not used (y >= kSmall): evaluated when some lane needs it.
    const V alpha(prm.p0);
    V lo = O::min(a, bb), hi = O::max(a, bb);
    V Eh = O::exp(O::min(hi, zero));
    auto neg = O::le(hi, zero);
    V y = O::select(neg, ad, -lo);  // both <= 0: |d|; crossing: -lo
    auto use_series = O::lt(y, small);
    // Steps below 2^-100 (subnormal ones included) scale the numerator's terms and |d| by 2^100 (exact):
    // alpha (1 - e^{-y}) would otherwise round on the subnormal grid (elu(0) - elu(-1e-45) with alpha = 0.5
    // gave 0 or 1e-45, a slope of 0 or 1 for 0.5). Lanes with y >= kSmall have |d| >= kSmall: sc = 1.
    V sc = O::select(O::lt(den_fac, V(S(7.888609052210118e-31))), V(S(1.2676506002282294e30)), one);
    V om = detail::om_poly(y) * (y * sc);  // (1 - e^{-y}) sc on series lanes
    V El = Eh;
    if (O::any(O::mnot(use_series))) El = O::exp(O::min(lo, zero));
    V n_neg = O::select(use_series, Eh * om, Eh - El) * alpha;
    V n_cross = O::fma(alpha, O::select(use_series, om, one - El), hi * sc);
    V N = O::select(O::le(zero, lo), ad * sc, O::select(neg, n_neg, n_cross));
    V fprime = O::select(O::lt(zero, a), one, Eh * alpha);  // fallback lanes: hi = a; PyTorch: f'(0) = alpha
    s = O::select(fb, fprime, N / (den_fac * sc));
  } else if constexpr (A == Act::Relu || A == Act::LeakyRelu) {
    // Piecewise linear: s = P/d + slope_neg Q/d with P = max(b,0) - max(a,0) and
    // Q = min(b,0) - min(a,0) the parts of the segment on each side (P + Q = b - a): exact when the
    // ends have opposite signs (b - 0, 0 - a), else one is the rounded d and the other 0. (Dividing
    // first: slope_neg * Q underflows for a subnormal Q.)
    const V ns((A == Act::LeakyRelu) ? prm.p0 : S(0));
    V den_d = O::select(fb, one, d);
    V sec = (O::max(bb, zero) - O::max(a, zero)) / den_d;
    if constexpr (A == Act::LeakyRelu) sec = O::fma(ns, (O::min(bb, zero) - O::min(a, zero)) / den_d, sec);
    s = O::select(fb, O::select(O::lt(zero, a), one, ns), sec);  // PyTorch: f'(0) = slope_neg
  } else if constexpr (A == Act::Softplus) {
    // softplus = log1p(e^{beta x}) / beta for y = beta x <= threshold, else x (PyTorch's switch).
    // In y units (D = beta |d|, s = delta / D), with lo <= hi both below the threshold and
    // 1 - e^{-D} by Taylor below kSmall, e^D - 1 = (1 - e^{-D}) / e^{-D}:
    //   lo + hi <= 0:           delta = log1p(sigma(lo) (e^D - 1))            (argument >= 0)
    //   lo + hi > 0, lo >= 0 or D < kSmall:
    //                           delta = D + log1p(-sigma(-lo) (1 - e^{-D}))  (argument in (-0.4, 0])
    //   lo + hi > 0, lo < 0:    delta = hi + log1p((e^{-hi} - e^{lo}) / (1 + e^{lo}))  (delta >= hi)
    // Rare lanes (crossing the threshold, or D > 30 where e^D - 1 could overflow) use
    //   delta = (max(hi,0) + L(hi)) - (max(lo,0) + L(lo)),  L(y) = log1p(e^{-|y|}),
    // with f(x) = x above the threshold.
    const V beta(prm.p0), thr(prm.p1);
    V ya = a * beta, yb = bb * beta;
    V D = ad * beta;
    V lo = O::min(ya, yb), hi = O::max(ya, yb);
    auto hi_above = O::lt(thr, hi);
    auto lo_above = O::lt(thr, lo);
    V El = O::exp(-O::abs(lo));
    V inv1pEl = one / (one + El);
    auto lo_neg = O::lt(lo, zero);
    V sig_lo = O::select(lo_neg, El, one) * inv1pEl;  // sigma(lo)
    V sig_nlo = O::select(lo_neg, one, El) * inv1pEl;  // sigma(-lo)
    V Ed = O::exp(-D);
    V om = O::select(O::lt(D, small), detail::one_minus_exp_neg_small(D), one - Ed);
    auto left = O::le(lo + hi, zero);
    auto straddle = O::mand(lo_neg, O::le(small, D));  // right-hand lanes only
    V arg = O::select(left, sig_lo * om / Ed,
                      O::select(straddle, (Ed / El - El) * inv1pEl, -sig_nlo * om));
    V lg = O::log1p(arg);
    V delta = O::select(left, lg, O::select(straddle, hi, D) + lg);
    auto crossing = O::mxor(hi_above, lo_above);
    auto rare = O::mor(crossing, O::lt(V(S(30)), D));  // D = inf (beta |d| overflows) included
    V sec = delta / O::select(fb, one, D);
    // D = beta |d| < 2^-24: the midpoint slope sigma(lo + D/2) to first order (relative error < D^2);
    // delta / D would divide rounding errors, or 0 by 0 where beta |d| underflows (|d| subnormal, beta < 1)
    sec = O::select(O::lt(D, V(S(0x1p-24))), O::fma(D * V(S(0.5)), sig_lo * sig_nlo, sig_lo), sec);
    if (O::any(rare)) {
      V Llo = O::log1p(El);
      V f_lo = O::max(lo, zero) + Llo;
      V f_hi = O::select(hi_above, hi, O::max(hi, zero) + O::log1p(O::exp(-O::abs(hi))));
      // Crossing: f(hi) - f(lo) = hi - L(lo) for lo < 0, else (hi - lo) - L(lo) with hi - lo = D (exact
      // when lo is close below the threshold).
      V cross = O::select(lo_neg, hi, D) - Llo;
      V sec_y = O::select(crossing, cross, f_hi - f_lo) / O::select(fb, one, D);
      // beta |x| or beta |d| beyond the largest S (D = inf, finite ends): in x units, f(x) = x above the
      // threshold and (max(y, 0) + L(y)) / beta below (0 at y = -inf), the literal secant (|d| > 30 / beta:
      // nothing cancels).
      V inv_beta = one / beta;  // (a product, not two divisions: Triton's fp64 sm_80 kernel kept a stack frame)
      V fx_lo = O::select(lo_above, O::min(a, bb), f_lo * inv_beta);
      V fx_hi = O::select(hi_above, O::max(a, bb), f_hi * inv_beta);
      V sec_x = (fx_hi - fx_lo) / O::select(fb, one, ad);
      sec = O::select(rare, O::select(O::eq(D, V(S(INFINITY))), sec_x, sec_y), sec);
    }
    sec = O::select(lo_above, one, sec);
    V fprime = O::select(O::lt(thr, ya), one, sig_lo);  // fallback lanes: lo == ya
    s = O::select(fb, fprime, sec);
  } else if constexpr (A == Act::Hardswish || A == Act::Hardsigmoid) {
    // PyTorch: hardsigmoid = clamp(x + 3, 0, 6) / 6, hardswish = x hardsigmoid(x): polynomial on
    // each of (-inf, -3], [-3, 3], [3, inf), so the secant (the mean of f' over [lo, hi]) splits
    // exactly by region. With u = clamp(lo, -3, 3), v = clamp(hi, -3, 3):
    //   s = w_mid m_mid + w_hi,  w_mid = (v - u) / |d|,  w_hi = (max(hi, 3) - max(lo, 3)) / |d|,
    // the fractions of the segment inside (-3, 3) and above 3 (exactly 1 or 0 when the segment
    // lies in one region: v - u is then the same subtraction as d), and m_mid the mean of f' over
    // [u, v]: 1/6 for hardsigmoid (whose f' is 0 above 3, so no w_hi term); (u + v + 3) / 6 for
    // hardswish (f' = x/3 + 1/2), evaluated as ((u + 3) + v) / 6: u + 3 is exact for u in [-3, -1],
    // the only place where the sum can cancel, so it rounds once.
    // Fallback lanes take PyTorch's f' (hardsigmoid_backward / hardswish_backward): on the open
    // interval (-3, 3) hardsigmoid 1.0f/6 (a float constant, also for double) and hardswish
    // x/3 + 1/2; outside it 0, except hardswish 1 at x >= 3.
    const V three(S(3)), m_three(S(-3));
    V lo = O::min(a, bb), hi = O::max(a, bb);
    V u = O::min(O::max(lo, m_three), three);
    V v = O::min(O::max(hi, m_three), three);
    V w_mid = (v - u) / den_fac;
    auto inside = O::mand(O::lt(m_three, a), O::lt(a, three));
    if constexpr (A == Act::Hardsigmoid) {
      V fprime = O::select(inside, V(S(1.0f / 6.0f)), zero);
      s = O::select(fb, fprime, w_mid * V(S(1.0 / 6.0)));
    } else {
      V m_mid = ((u + three) + v) / V(S(6));
      V w_hi = (O::max(hi, three) - O::max(lo, three)) / den_fac;
      V fprime = O::select(inside, a / three + V(S(0.5)), O::select(O::lt(a, three), zero, one));
      s = O::select(fb, fprime, O::fma(w_mid, m_mid, w_hi));
    }
  } else if constexpr (A == Act::Hardtanh) {
    // f = clamp(x, L, H) (PyTorch's hardtanh, L = min_val <= H = max_val): f' is 1 on (L, H), 0 outside,
    // so the secant is the fraction of the segment [lo, hi] inside [L, H]:
    //   s = (v - u) / |d|,  u = clamp(lo, L, H), v = clamp(hi, L, H).
    // Inside [L, H] (u = lo, v = hi) v - u is the same subtraction as d: s = 1 exactly; across a bound
    // v - u is one rounding (u or v is L or H), so s is within 3 roundings (v - u, d, the quotient: 1.5 ulp);
    // outside, v - u = 0: s = 0. No cancellation. |d| >= 2^126 (it may have overflowed, and so may v - u
    // when H - L is that large): both halved, (v/2 - u/2) / (hi/2 - lo/2), so nothing overflows (fix_nonfinite
    // leaves these lanes); halving is exact but for subnormal u, v, whose lost bit moves s by < 2^-275.
    // Fallback lanes: PyTorch's hardtanh_backward, 1 strictly inside (L, H), 0 at and beyond the bounds.
    const V L(prm.p0), H(prm.p1);
    const V half(S(0.5));
    V lo = O::min(a, bb), hi = O::max(a, bb);
    V u = O::min(O::max(lo, L), H);
    V v = O::min(O::max(hi, L), H);
    auto big = O::le(V(detail::huge_step<S>()), ad);
    V num = v - u, den = den_fac;
    if (O::any(big)) {
      num = O::select(big, v * half - u * half, num);
      den = O::select(big, hi * half - lo * half, den);
    }
    auto inside = O::mand(O::lt(L, a), O::lt(a, H));
    s = O::select(fb, O::select(inside, one, zero), num / den);
  } else {
    static_assert(A != A, "avg_slope: an activation of AVG_KERNELS_ACTIVATIONS has no math here");
  }
  return detail::fix_nonfinite<A>(a, b, d, s, fb, prm);
}

// avg_slope with an eps that is already a value of S (compared exactly).
template <Act A, class V>
AK_HD V avg_slope(V a, V b, ActParams<typename Ops<V>::Scalar> prm, typename Ops<V>::Scalar eps) {
  return avg_slope<A>(a, b, prm, EpsCut<typename Ops<V>::Scalar>::exactly(eps));
}

namespace detail {
// The sign (-1, 0, +1) of the EXACT slope on lanes with finite ends where the computed s is 0: s has
// underflowed (sigmoid'(-111) = 3e-49, relu's 1e-40 / 3e38, ...) or the exact slope is 0 (relu on the
// negative side, hardsigmoid outside [-3, 3]); only grad_out = +-inf needs it (avg_grad). By the shape
// of f, per activation:
//   tanh, sigmoid: increasing, +1. softplus: +1, except across its threshold, where PyTorch's f jumps
//   down by L(thr) = log1p(e^-thr) and a computed 0 is f(hi) - f(lo) = 0 (it cannot underflow there): 0.
//   elu: 1 above 0, alpha e^x (sign of alpha) below; crossing: the sign of hi + alpha (1 - e^lo).
//   relu/leaky_relu: the sign of P + slope_neg Q (exact, see avg_slope) times the sign of d.
//   silu, gelu, gelu_tanh (x h(x), h increasing in (0, 1)): the slope is never exactly 0; s = h(lo) + hi s_h
//   is positive for hi >= 0, and underflows for hi < 0 only in the tail, where f decreases: -1. (Near
//   f's minimum, where |f(b) - f(a)| is below the rounding of f, the computed sign is not guaranteed.)
//   hardsigmoid: +1 where the segment meets (-3, 3), else 0. hardswish: +1 if hi > 3; else the sign of
//   (u + 3) + v (exact: one rounding) where the segment meets (-3, 3), else 0. hardtanh: +1 where the
//   segment meets (L, H) (u < v, clamped as in avg_slope), else 0.
// Fallback lanes take the sign of f'(a) the same way (their s is 0 only by underflow or exactly).
template <Act A, class V, class M>
AK_HD V zero_slope_sign(V a, V b, M fb, ActParams<typename Ops<V>::Scalar> prm) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  const V zero(S(0)), one(S(1)), m_one(S(-1));
  auto sgn = [&](V v) { return O::select(O::lt(zero, v), one, O::select(O::lt(v, zero), m_one, zero)); };
  V bb = O::select(fb, a, b);
  V lo = O::min(a, bb), hi = O::max(a, bb);
  if constexpr (A == Act::Tanh || A == Act::Sigmoid) {
    return one;
  } else if constexpr (A == Act::Softplus) {
    // across the threshold s = cross / D (avg_slope) never underflows (cross >= hi - L(lo) is not tiny
    // unless D is): a computed 0 there is cross = 0, the jump meeting the step
    const V beta(prm.p0), thr(prm.p1);
    auto crossing = O::mand(O::mnot(fb), O::mxor(O::lt(thr, hi * beta), O::lt(thr, lo * beta)));
    return O::select(crossing, zero, one);
  } else if constexpr (A == Act::Elu) {
    const V alpha(prm.p0);
    V neg = sgn(alpha);
    V cross = sgn(O::fma(alpha, one - O::exp(O::min(lo, zero)), hi));
    return O::select(O::lt(zero, lo), one, O::select(O::le(hi, zero), neg, cross));
  } else if constexpr (A == Act::Relu || A == Act::LeakyRelu) {
    const V ns((A == Act::LeakyRelu) ? prm.p0 : S(0));
    V P = O::max(hi, zero) - O::max(lo, zero);
    V Q = O::min(hi, zero) - O::min(lo, zero);
    return O::select(fb, O::select(O::lt(zero, a), one, sgn(ns)), sgn(O::fma(ns, Q, P)));
  } else if constexpr (A == Act::Silu || A == Act::Gelu || A == Act::GeluTanh) {
    return O::select(O::le(zero, hi), one, m_one);
  } else if constexpr (A == Act::Hardsigmoid) {
    const V three(S(3));
    V u = O::min(O::max(lo, -three), three), v = O::min(O::max(hi, -three), three);
    auto inside = O::mand(O::lt(-three, a), O::lt(a, three));
    return O::select(fb, O::select(inside, one, zero), O::select(O::lt(u, v), one, zero));
  } else if constexpr (A == Act::Hardswish) {
    const V three(S(3));
    V u = O::min(O::max(lo, -three), three), v = O::min(O::max(hi, -three), three);
    V mid = O::select(O::lt(u, v), sgn((u + three) + v), zero);
    auto inside = O::mand(O::lt(-three, a), O::lt(a, three));
    V f1 = O::select(inside, sgn(a / three + V(S(0.5))), O::select(O::lt(a, three), zero, one));
    return O::select(fb, f1, O::select(O::lt(three, hi), one, mid));
  } else if constexpr (A == Act::Hardtanh) {
    const V L(prm.p0), H(prm.p1);
    V u = O::min(O::max(lo, L), H), v = O::min(O::max(hi, L), H);
    auto inside = O::mand(O::lt(L, a), O::lt(a, H));
    return O::select(fb, O::select(inside, one, zero), O::select(O::lt(u, v), one, zero));
  } else {
    static_assert(A != A, "zero_slope_sign: an activation of AVG_KERNELS_ACTIVATIONS has no rule here");
  }
}
}  // namespace detail

// grad_in = g * s(a, b), the kernels' per-element result. The product is IEEE's, except where it is
// NaN because g = +-inf meets a computed s of 0 with finite ends: there the exact slope decides
// (detail::zero_slope_sign): an exact slope that underflowed gives +-inf with its sign, an exactly
// zero slope gives NaN (inf * 0). Checked once per vector on the result (the fast path: no NaN).
template <Act A, class V>
AK_HD V avg_grad(V g, V a, V b, ActParams<typename Ops<V>::Scalar> prm, const EpsCut<typename Ops<V>::Scalar>& cut) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  V s = avg_slope<A>(a, b, prm, cut);
  V r = g * s;
  auto nan_r = O::mnot(O::eq(r, r));
  if (O::any(nan_r)) {
    const V inf = V(S(INFINITY)), zero = V(S(0));
    auto fix = O::mand(O::mand(nan_r, O::eq(O::abs(g), inf)), O::eq(s, zero));
    fix = O::mand(fix, O::mand(O::lt(O::abs(a), inf), O::lt(O::abs(b), inf)));
    if (O::any(fix)) {
      auto fb = detail::fallback_mask(a, b, b - a, cut);
      r = O::select(fix, g * detail::zero_slope_sign<A>(a, b, fb, prm), r);
    }
  }
  return r;
}

// f'(x) as the secant's fallback computes it (shares every formula with avg_slope).
template <Act A, class V>
AK_HD V act_deriv(V x, ActParams<typename Ops<V>::Scalar> prm) {
  return avg_slope<A>(x, x, prm, typename Ops<V>::Scalar(0));
}

// f(x), the forward. Kernels never need it (the forward is PyTorch's own op, bitwise); it is
// here so that the header holds each activation whole and tests can check it against PyTorch.
template <Act A, class V>
AK_HD V act_value(V x, ActParams<typename Ops<V>::Scalar> prm) {
  using O = Ops<V>;
  using S = typename O::Scalar;
  const V zero(S(0)), one(S(1));
  if constexpr (A == Act::Tanh) {
    // tanh(|x|) = (1 - q) / (1 + q), q = e^{-2|x|}, with 1 - q by its series below kSmall: 2 sigma(2x) - 1
    // cancelled near 0 (1e-7 absolute, 2.7e-5 relative at x = 0.0037 in float)
    V Y = O::abs(x) * V(S(2));
    V q = O::exp(-Y);
    V om = O::select(O::lt(Y, V(S(detail::kSmall))), detail::one_minus_exp_neg_small(Y), one - q);
    V t = om / (one + q);
    return O::select(O::lt(x, zero), -t, t);
  } else if constexpr (A == Act::Sigmoid || A == Act::Silu) {
    V q = O::exp(-O::abs(x));
    V sig = detail::sigmoid_times_1pq(x, q) / (one + q);
    if constexpr (A == Act::Silu) return x * sig;
    else return sig;
  } else if constexpr (A == Act::Relu || A == Act::LeakyRelu) {
    const S ns = (A == Act::LeakyRelu) ? prm.p0 : S(0);
    return O::select(O::lt(zero, x), x, x * V(ns));
  } else if constexpr (A == Act::Elu) {
    // alpha (e^x - 1): e^x - 1 = -(1 - e^{-(-x)}), by Taylor for |x| < kSmall.
    V em1 = O::select(O::lt(-x, V(S(detail::kSmall))), -detail::one_minus_exp_neg_small(-x),
                      O::exp(O::min(x, zero)) - one);
    return O::select(O::lt(zero, x), x, em1 * V(prm.p0));
  } else if constexpr (A == Act::Gelu) {
    V C = O::erfc(O::abs(x) * V(S(0.70710678118654752440))) * V(S(0.5));
    return x * O::select(O::lt(x, zero), C, one - C);
  } else if constexpr (A == Act::GeluTanh) {
    const V lim(detail::gelu_tanh_lim<S>());  // h(+-lim) exactly saturated in S
    V xc = O::min(O::max(x, -lim), lim);
    V U = V(S(2 * 0.7978845608028654)) * xc * O::fma(V(S(0.044715)) * xc, xc, one);
    V q = O::exp(-O::abs(U));
    return x * detail::sigmoid_times_1pq(U, q) / (one + q);
  } else if constexpr (A == Act::Softplus) {
    V y = x * V(prm.p0);
    V sp = (O::max(y, zero) + O::log1p(O::exp(-O::abs(y)))) / V(prm.p0);
    return O::select(O::lt(V(prm.p1), y), x, sp);
  } else if constexpr (A == Act::Hardswish || A == Act::Hardsigmoid) {
    // PyTorch's CPU forward: min(max(x + 3, 0), 6) / 6, for hardswish x * min(...) / 6.
    V r = O::min(O::max(x + V(S(3)), zero), V(S(6)));
    if constexpr (A == Act::Hardswish) return x * r / V(S(6));
    else return r / V(S(6));
  } else if constexpr (A == Act::Hardtanh) {
    // clamp(x, L, H); min/max return their second operand on NaN (as vminps/vmaxps): NaN x stays NaN
    return O::min(V(prm.p1), O::max(V(prm.p0), x));
  } else {
    static_assert(A != A, "act_value: an activation of AVG_KERNELS_ACTIVATIONS has no math here");
  }
}

}  // namespace avg_kernels
