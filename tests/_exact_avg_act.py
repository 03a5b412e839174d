"""An exact oracle of the averaged activation backward (SPEC §1), for tests: s(x, x_new) and grad_in = g·s from
the exact values of the (already rounded) inputs, in rational arithmetic (piecewise-linear/-quadratic f) or
mpmath at a working precision raised until the secant no longer cancels.

What it assumes (the definition, made exact):
* eps is compared with the EXACT difference |x_new − x| (Fraction arithmetic, no rounding);
* f is PyTorch's f as a real function, except softplus's switch to the identity, which is taken where PyTorch
  takes it: on ``x·beta`` rounded to the compute dtype (float32 for float16/bfloat16/float32 inputs, float64 for
  float64), since PyTorch decides it there and f jumps by log1p(e^-threshold)/beta at the switch;
* gelu(approximate='tanh') uses the real constants sqrt(2/pi) and 0.044715 (kernels round them to the compute
  dtype: a relative 3e-8 change of the argument, far inside the bar);
* the fallback f'(x) (|d| <= eps) is the exact derivative with PyTorch's conventions at the kinks (relu 0 at 0,
  leaky_relu/elu the negative side's slope at 0, hardsigmoid 0 at ±3, hardswish x/3 + 1/2 on the open (-3, 3), as aten.hardswish_backward;
  hardtanh 1 on the open (min_val, max_val), 0 at and beyond the bounds, as aten.hardtanh_backward);
* hardtanh's bounds are taken in the compute dtype (float32 below float64), as PyTorch's hardtanh holds them;
* non-finite inputs as SPEC §1: NaN -> NaN; one end infinite -> the asymptotic slope of that end; both -> NaN, or
  0 for bounded f with ends of opposite sign; g = ±inf times a nonzero exact s -> ±inf, times an exactly zero
  s -> NaN (IEEE's inf·0).
"""
from __future__ import annotations

import math
from fractions import Fraction

import mpmath

from avg_kernels.activations import KernelAct, asymptotic_slopes, is_bounded

_K = None  # sqrt(2/pi), at the working precision


def _frac(v: float) -> Fraction:
    return Fraction(v)  # exact for every finite float


def _rounded_product(x: float, beta: float, fp64: bool) -> float:
    """x·beta rounded to the compute dtype (softplus's threshold test, as PyTorch evaluates it)."""
    import numpy as np

    if fp64:
        return float(np.float64(x) * np.float64(beta))
    with np.errstate(over="ignore"):
        return float(np.float32(x) * np.float32(beta))


def _ncdf(x):
    """Phi(x); beyond |x| = 1e30 by its asymptotic series' first term (relative error 1/x^2 < 1e-60), as
    mpmath's erfc fails for arguments near 1e154."""
    if abs(x) < 1e30:
        return mpmath.ncdf(x)
    tail = mpmath.npdf(x) / abs(x)
    return tail if x < 0 else 1 - tail


def _f_mp(k: KernelAct, x, x_float: float, fp64: bool):
    """f(x) in mpmath (x an mpf equal to the float x_float)."""
    n = k.name
    if n == "tanh":
        return mpmath.tanh(x)
    if n == "sigmoid":
        return 1 / (1 + mpmath.exp(-x))
    if n == "silu":
        return x / (1 + mpmath.exp(-x))
    if n == "gelu":
        return x * _ncdf(x)
    if n == "gelu_tanh":
        u = 2 * mpmath.sqrt(2 / mpmath.pi) * (x + mpmath.mpf("0.044715") * x ** 3)
        return x / (1 + mpmath.exp(-u))
    if n == "elu":
        return x if x > 0 else mpmath.mpf(k.p0) * mpmath.expm1(x)
    if n == "softplus":
        beta = mpmath.mpf(k.p0)
        if _rounded_product(x_float, k.p0, fp64) > k.p1:
            return x
        return mpmath.log1p(mpmath.exp(beta * x)) / beta
    raise AssertionError(n)


def _fprime_mp(k: KernelAct, x, x_float: float, fp64: bool):
    n = k.name
    if n == "tanh":
        return 1 / mpmath.cosh(x) ** 2
    if n == "sigmoid":
        return 1 / ((1 + mpmath.exp(-x)) * (1 + mpmath.exp(x)))
    if n == "silu":
        sp, sm = 1 / (1 + mpmath.exp(-x)), 1 / (1 + mpmath.exp(x))
        return sp * (1 + x * sm)
    if n == "gelu":
        return _ncdf(x) + x * mpmath.npdf(x)
    if n == "gelu_tanh":
        k2 = 2 * mpmath.sqrt(2 / mpmath.pi)
        c = mpmath.mpf("0.044715")
        u = k2 * (x + c * x ** 3)
        hp, hm = 1 / (1 + mpmath.exp(-u)), 1 / (1 + mpmath.exp(u))
        return hp + x * hp * hm * k2 * (1 + 3 * c * x ** 2)
    if n == "elu":
        return mpmath.mpf(1) if x > 0 else mpmath.mpf(k.p0) * mpmath.exp(x)
    if n == "softplus":
        if _rounded_product(x_float, k.p0, fp64) > k.p1:
            return mpmath.mpf(1)
        return 1 / (1 + mpmath.exp(-mpmath.mpf(k.p0) * x))
    raise AssertionError(n)


def _bounds(k: KernelAct, fp64: bool) -> tuple[Fraction, Fraction]:
    """hardtanh's (min_val, max_val) in the compute dtype."""
    import numpy as np

    if fp64:
        return _frac(k.p0), _frac(k.p1)
    return _frac(float(np.float32(k.p0))), _frac(float(np.float32(k.p1)))


def _piecewise_f(k: KernelAct, x: Fraction, fp64: bool) -> Fraction:
    n = k.name
    if n == "hardtanh":
        lo, hi = _bounds(k, fp64)
        return min(max(x, lo), hi)
    if n == "relu":
        return max(x, Fraction(0))
    if n == "leaky_relu":
        return x if x > 0 else _frac(k.p0) * x
    if n == "hardsigmoid":
        return min(max(x + 3, Fraction(0)), Fraction(6)) / 6
    if n == "hardswish":
        return x * min(max(x + 3, Fraction(0)), Fraction(6)) / 6
    raise AssertionError(n)


def _piecewise_fprime(k: KernelAct, x: Fraction, fp64: bool) -> Fraction:
    n = k.name
    if n == "hardtanh":  # aten.hardtanh_backward: 1 on the open (min_val, max_val), 0 at the bounds and beyond
        lo, hi = _bounds(k, fp64)
        return Fraction(1) if lo < x < hi else Fraction(0)
    if n == "relu":
        return Fraction(1) if x > 0 else Fraction(0)
    if n == "leaky_relu":
        return Fraction(1) if x > 0 else _frac(k.p0)
    if n == "hardsigmoid":
        return Fraction(1, 6) if -3 < x < 3 else Fraction(0)
    if n == "hardswish":  # aten.hardswish_backward: x/3 + 1/2 on the open (-3, 3); 0 below, 1 above
        if -3 < x < 3:
            return x / 3 + Fraction(1, 2)
        return Fraction(0) if x <= -3 else Fraction(1)
    raise AssertionError(n)


PIECEWISE = {"relu", "leaky_relu", "hardsigmoid", "hardswish", "hardtanh"}


def slope(k: KernelAct, a: float, b: float, eps: float, fp64: bool):
    """The exact s(a, b) as an mpmath mpf / Fraction (finite a, b), or a float for the non-finite cases."""
    if math.isnan(a) or math.isnan(b):
        return math.nan
    if math.isinf(a) or math.isinf(b):
        pos, neg = asymptotic_slopes(k)
        if math.isinf(a) and math.isinf(b):
            return 0.0 if (is_bounded(k) and a != b) else math.nan
        end = a if math.isinf(a) else b
        return pos if end > 0 else neg
    fa, fb = _frac(a), _frac(b)
    d = fb - fa
    fallback = abs(d) <= _frac(eps)
    if k.name in PIECEWISE:
        if fallback:
            return _piecewise_fprime(k, fa, fp64)
        return (_piecewise_f(k, fb, fp64) - _piecewise_f(k, fa, fp64)) / d
    if fallback:
        with mpmath.workprec(200):
            return +_fprime_mp(k, mpmath.mpf(a), a, fp64)
    if k.name in ("tanh", "sigmoid"):
        # identities without cancellation: sigma(b) - sigma(a) = sigma(-a) sigma(b) (1 - e^{-(b-a)})
        with mpmath.workprec(200):
            t = 2 if k.name == "tanh" else 1
            A, B = mpmath.mpf(a) * t, mpmath.mpf(b) * t
            D = mpmath.mpf(d.numerator) / d.denominator * t
            ds = 1 / (1 + mpmath.exp(A)) / (1 + mpmath.exp(-B)) * -mpmath.expm1(-D)
            return +(ds * t * t / D) if k.name == "tanh" else +(ds / D)
    if k.name == "elu" and min(a, b) <= 0:
        # alpha (e^b - e^a) = alpha e^lo expm1(d) for both ends <= 0 (f saturates at -alpha: no cancellation)
        with mpmath.workprec(200):
            lo, hi = mpmath.mpf(min(a, b)), mpmath.mpf(max(a, b))
            D = abs(mpmath.mpf(d.numerator) / d.denominator)
            alpha = mpmath.mpf(k.p0)
            if hi <= 0:
                return +(alpha * mpmath.exp(lo) * mpmath.expm1(D) / D)
            return +((hi - alpha * mpmath.expm1(lo)) / D)
    # literal secant at a precision raised until f(b) - f(a) keeps >= 120 significant bits
    prec = 200
    while True:
        with mpmath.workprec(prec):
            A, B = mpmath.mpf(a), mpmath.mpf(b)
            fA, fB = _f_mp(k, A, a, fp64), _f_mp(k, B, b, fp64)
            num = fB - fA
            scale = abs(fA) + abs(fB)
            if num != 0 and abs(num) >= scale * mpmath.mpf(2) ** (120 - prec):
                return +(num / (mpmath.mpf(d.numerator) / d.denominator))
            if scale == 0:
                return mpmath.mpf(0)
        if prec > 20000:
            raise AssertionError(f"oracle: {k} secant at ({a!r}, {b!r}) still cancels at {prec} bits")
        prec *= 4


def _to_float(v) -> float:
    """float(v) of an mpf / Fraction, with huge exponents mapped to ±inf and tiny ones to ±0."""
    if v == 0:
        return 0.0
    sign = 1.0 if v > 0 else -1.0
    m = mpmath.mpf(v.numerator) / v.denominator if isinstance(v, Fraction) else mpmath.mpf(v)
    if abs(m) >= mpmath.mpf(2) ** 1024:
        return math.copysign(math.inf, sign)
    if abs(m) < mpmath.mpf(2) ** -1080:
        return math.copysign(0.0, sign)
    return float(m)


def grad_in(k: KernelAct, g: float, a: float, b: float, eps: float, fp64: bool):
    """The exact grad_in = g·s as a float64 (±inf where g·s is infinite or exceeds float64) or NaN; also
    returns the exact s as a float64 (0 only if s is exactly 0: a tiny nonzero s keeps its sign as ±5e-324)."""
    s = slope(k, a, b, eps, fp64)
    if isinstance(s, float) and (math.isnan(s) or math.isinf(s)):
        return math.nan, s
    s_zero = (s == 0)
    s_f = _to_float(s)
    s_sign = 0 if s_zero else (1 if s > 0 else -1)
    if s_f == 0.0 and s_sign:
        s_f = math.copysign(5e-324, s_sign)
    if math.isnan(g):
        return math.nan, s_f
    if math.isinf(g):
        return (math.nan if s_sign == 0 else math.copysign(math.inf, g * s_sign)), s_f
    if g == 0 or s_sign == 0:
        return 0.0, s_f
    with mpmath.workprec(200):
        y = mpmath.mpf(g) * (mpmath.mpf(s.numerator) / s.denominator if isinstance(s, Fraction) else s)
        return _to_float(y), s_f
