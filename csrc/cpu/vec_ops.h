// Ops<V> for at::vec::Vectorized<float/double>: lets the shared math of activations.h run on
// whole SIMD registers (exp/erfc/log1p are Sleef's u10/u15 routines shipped inside libtorch).
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <avg_kernels/activations.h>

namespace avg_kernels {

template <class T>
struct VecOpsImpl {
  using V = at::vec::Vectorized<T>;
  using Scalar = T;
  using Mask = V;  // all-ones / all-zeros lanes, as Vectorized comparisons return them
  static V exp(const V& x) { return x.exp(); }
  static V erfc(const V& x) { return x.erfc(); }
  static V log1p(const V& x) { return x.log1p(); }
  static V abs(const V& x) { return x.abs(); }
  static V fma(const V& a, const V& b, const V& c) { return at::vec::fmadd(a, b, c); }
  static V min(const V& a, const V& b) { return at::vec::minimum(a, b); }
  static V max(const V& a, const V& b) { return at::vec::maximum(a, b); }
  static V select(const Mask& m, const V& a, const V& b) { return V::blendv(b, a, m); }
  static Mask lt(const V& a, const V& b) { return a < b; }
  static Mask le(const V& a, const V& b) { return a <= b; }
  static Mask eq(const V& a, const V& b) { return a == b; }
  static Mask mand(const Mask& a, const Mask& b) { return a & b; }
  static Mask mor(const Mask& a, const Mask& b) { return a | b; }
  static Mask mxor(const Mask& a, const Mask& b) { return a ^ b; }
  static Mask mnot(const Mask& a) { return a ^ (V(T(0)) == V(T(0))); }
  // zero_mask() has one bit per lane that equals 0.0; a set mask lane is all-ones (a NaN).
  static bool any(const Mask& m) { return m.zero_mask() != (1 << V::size()) - 1; }
};

template <>
struct Ops<at::vec::Vectorized<float>> : VecOpsImpl<float> {};
template <>
struct Ops<at::vec::Vectorized<double>> : VecOpsImpl<double> {};

}  // namespace avg_kernels
