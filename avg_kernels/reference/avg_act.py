"""Reference averaged activation backward (SPEC §1), evaluated in float64.

The secant is computed with the same cancellation-free identities as the kernels (activations.h), in float64:
the literal (f(b) - f(a)) / (b - a) of float64 inputs cancels to garbage for small steps (tanh at x = -5.318,
d = 2.7e-12: 1.16e-4 for an exact 1.37e-4). tests/_exact_avg_act.py is the independent (mpmath) oracle.
"""
from __future__ import annotations

import numpy as np
import torch

from ..activations import KernelAct, asymptotic_slopes, is_bounded, native_backward

_GL_X, _GL_W = (torch.from_numpy(v) for v in np.polynomial.legendre.leggauss(8))  # Gauss-Legendre, 8 nodes
_RSQRT2PI = 0.39894228040143267794
_K2 = 2 * 0.7978845608028654  # 2 sqrt(2/pi)
_C3 = 0.044715


def fallback_mask(a: torch.Tensor, b: torch.Tensor, eps: float) -> torch.Tensor:
    """|b - a| <= eps on exact values (a, b float64 holding the inputs): d = fl(b - a) and its exact rounding
    error e (TwoSum), |b - a| = |d| + e sign(d); eps is a double, so the only undecided case |d| == eps is
    settled by the sign of e. NaN never falls back."""
    d = b - a
    z = d - b
    err = (b - (d - z)) + (-a - z)
    err_out = torch.where(d < 0, -err, err)
    ad = d.abs()
    return (ad < eps) | ((ad == eps) & (err_out <= 0))


def _sig(x):
    return torch.sigmoid(x)


def _om_ratio(y):
    """(1 - e^{-y}) / y for y > 0, subnormal y included (where torch's expm1 may flush to 0)."""
    return torch.where(y < 1e-8, 1 - y / 2, -torch.expm1(-y) / y)


def _s_sigmoid(lo, hi, d):
    """(sigma(hi) - sigma(lo)) / d, d = hi - lo > 0: sigma(-lo) sigma(hi) (1 - e^{-d}) / d."""
    return _sig(-lo) * _sig(hi) * _om_ratio(d)


def _s_phi(lo, hi, d):
    """(Phi(hi) - Phi(lo)) / d: Gauss-Legendre on phi for short steps, erfc tails elsewhere."""
    m, h = (lo + hi) / 2, d / 2
    nodes = m.unsqueeze(-1) + h.unsqueeze(-1) * _GL_X
    gl = (torch.exp(-0.5 * nodes * nodes) * _GL_W).sum(-1) * _RSQRT2PI / 2
    c_lo, c_hi = torch.special.ndtr(-lo.abs()), torch.special.ndtr(-hi.abs())
    opp = (lo < 0) != (hi < 0)
    big = torch.where(opp, 1 - c_lo - c_hi, (c_lo - c_hi).abs()) / d
    return torch.where(d * torch.clamp(m.abs(), min=1.0) < 0.5, gl, big)


def _secant(k: KernelAct, lo: torch.Tensor, hi: torch.Tensor, above_lo, above_hi) -> torch.Tensor:
    """s over [lo, hi] (float64, lo < hi finite, hi - lo finite) without cancellation."""
    d = hi - lo
    n = k.name
    if n in ("tanh", "sigmoid"):
        t = 2.0 if n == "tanh" else 1.0
        return _s_sigmoid(t * lo, t * hi, t * d) * (t * t)  # tanh(x) = 2 sigma(2x) - 1
    if n == "silu":
        return _sig(lo) + hi * _s_sigmoid(lo, hi, d)
    if n == "gelu_tanh":
        lc, hc = lo.clamp(-22, 22), hi.clamp(-22, 22)  # sigma(U(+-22)) saturates in float64
        u_lo, u_hi = _K2 * lc * (1 + _C3 * lc * lc), _K2 * hc * (1 + _C3 * hc * hc)
        g = _K2 * (1 + _C3 * (lc * lc + lc * hc + hc * hc))
        s_h = _sig(-u_lo) * _sig(u_hi) * _om_ratio(g * (hc - lc)) * (g * ((hc - lc) / d))
        return _sig(u_lo) + hi * s_h
    if n == "gelu":
        return torch.special.ndtr(lo) + hi * _s_phi(lo, hi, d)
    if n == "elu":
        alpha = k.p0
        neg = alpha * torch.exp(torch.clamp(hi, max=0)) * _om_ratio(d)
        ml = -torch.clamp(lo, max=0)  # (1 - e^lo) / d as (-lo / d) (1 - e^lo) / (-lo): no product on subnormals
        cross = hi / d + alpha * (ml / d) * torch.where(ml > 0, _om_ratio(ml.clamp(min=1e-300)), 1.0)
        return torch.where(lo > 0, 1.0, torch.where(hi <= 0, neg, cross))
    if n in ("relu", "leaky_relu"):
        ns = k.p0 if n == "leaky_relu" else 0.0
        return (hi.clamp(min=0) - lo.clamp(min=0)) / d + ns * ((hi.clamp(max=0) - lo.clamp(max=0)) / d)
    if n == "hardtanh":  # the fraction of [lo, hi] inside [L, H] (k holds the bounds in the compute dtype)
        return (hi.clamp(k.p0, k.p1) - lo.clamp(k.p0, k.p1)) / d
    if n in ("hardsigmoid", "hardswish"):
        u, v = lo.clamp(-3, 3), hi.clamp(-3, 3)
        if n == "hardsigmoid":
            return (v - u) / d / 6
        return (v - u) / d * ((u + 3) + v) / 6 + (hi.clamp(min=3) - lo.clamp(min=3)) / d
    if n == "softplus":
        beta = k.p0
        ylo, yhi, D = beta * lo, beta * hi, beta * d
        L = lambda y: torch.log1p(torch.exp(-y.abs()))  # noqa: E731
        f_lo, f_hi = ylo.clamp(min=0) + L(ylo), yhi.clamp(min=0) + L(yhi)
        below = torch.log1p(_sig(ylo) * torch.expm1(D.clamp(max=700)))
        below = torch.where(D > 700, f_hi - f_lo, below)
        # a step below 1e-100: the midpoint slope (error D^2: none in float64), not below / D, since beta·d
        # may underflow to 0 where d does not (beta < 1, d subnormal)
        s_below = torch.where(D < 1e-100, _sig(ylo + D / 2), below / D)
        cross = torch.where(ylo < 0, yhi, D) - L(ylo)
        s = torch.where(above_lo, 1.0, torch.where(above_hi, cross / D, s_below))
        # beta |x| or beta d beyond float64: the literal secant in x units
        fx_lo = torch.where(above_lo, lo, f_lo / beta)
        fx_hi = torch.where(above_hi, hi, f_hi / beta)
        return torch.where(torch.isfinite(D), s, (fx_hi - fx_lo) / d)
    raise AssertionError(n)


def _fprime(k: KernelAct, a: torch.Tensor, above) -> torch.Tensor:
    """f'(a), accurately (the d -> 0 limit of _secant's identities; PyTorch's own formulas cancel in the tails,
    e.g. gelu_tanh's 1 + tanh(u), and overflow: its x^3 beyond |x| ~ 1e102), with PyTorch's values at the
    kinks (the piecewise-linear ones are PyTorch's own backward, exact)."""
    n = k.name
    if n == "tanh":
        return 4 * _sig(2 * a) * _sig(-2 * a)
    if n == "sigmoid":
        return _sig(a) * _sig(-a)
    if n == "silu":
        return _sig(a) + a * (_sig(a) * _sig(-a))
    if n == "gelu":
        return torch.special.ndtr(a) + a * torch.exp(-0.5 * a * a) * _RSQRT2PI
    if n == "gelu_tanh":
        ac = a.clamp(-22, 22)
        u = _K2 * ac * (1 + _C3 * ac * ac)
        return _sig(u) + a * (_sig(u) * _sig(-u) * _K2 * (1 + 3 * _C3 * ac * ac))
    if n == "elu":
        return torch.where(a > 0, 1.0, k.p0 * torch.exp(a.clamp(max=0)))
    if n == "softplus":
        return torch.where(above, 1.0, _sig(k.p0 * a))
    from ..activations import forward

    return native_backward(torch.ones_like(a), a, forward(a, k), k)


def _literal_halved(k: KernelAct, lo, hi, above_lo, above_hi):
    """(f(hi) - f(lo)) / (hi - lo) for finite ends whose difference overflows float64, on halves."""
    from ..activations import forward

    f_lo, f_hi = forward(lo, k), forward(hi, k)
    if k.name == "softplus":
        f_lo = torch.where(above_lo, lo, f_lo)
        f_hi = torch.where(above_hi, hi, f_hi)
    return (f_hi / 2 - f_lo / 2) / (hi / 2 - lo / 2)


def _zero_slope_sign(k: KernelAct, lo, hi, a, fb) -> torch.Tensor:
    """detail::zero_slope_sign of activations.h: the exact slope's sign where the float64 s is 0."""
    n = k.name
    one = torch.ones_like(lo)
    if n in ("tanh", "sigmoid"):
        return one
    if n == "softplus":
        crossing = ~fb & ((k.p0 * hi > k.p1) != (k.p0 * lo > k.p1))
        return torch.where(crossing, 0.0, one)  # across the threshold s cannot underflow: 0 is exact
    if n == "elu":
        cross = (hi + k.p0 * -torch.expm1(lo.clamp(max=0))).sign()
        return torch.where(lo > 0, one, torch.where(hi <= 0, one * float(np.sign(k.p0)), cross))
    if n in ("relu", "leaky_relu"):
        ns = k.p0 if n == "leaky_relu" else 0.0
        sec = ((hi.clamp(min=0) - lo.clamp(min=0)) + ns * (hi.clamp(max=0) - lo.clamp(max=0))).sign()
        return torch.where(fb, torch.where(a > 0, one, one * float(np.sign(ns))), sec)
    if n in ("silu", "gelu", "gelu_tanh"):
        return torch.where(hi >= 0, one, -one)
    if n == "hardtanh":
        inside = (a > k.p0) & (a < k.p1)
        return torch.where(fb, inside.double(), (lo.clamp(k.p0, k.p1) < hi.clamp(k.p0, k.p1)).double())
    u, v = lo.clamp(-3, 3), hi.clamp(-3, 3)
    inside = (a > -3) & (a < 3)
    if n == "hardsigmoid":
        return torch.where(fb, inside.double(), (u < v).double())
    mid = torch.where(u < v, ((u + 3) + v).sign(), 0.0)
    f1 = torch.where(inside, (a / 3 + 0.5).sign(), torch.where(a < 3, 0.0, 1.0))
    return torch.where(fb, f1, torch.where(hi > 3, one, mid))


def avg_act_backward(grad_out: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, k: KernelAct,
                     eps: float) -> torch.Tensor:
    """grad_out * s(x, x_new) in float64, rounded once to grad_out's dtype (a new contiguous tensor).

    * ``|x_new - x| <= eps`` (decided on exact values): s is f'(x), accurately (PyTorch's f' at the kinks).
    * Otherwise the secant of PyTorch's f, computed without cancellation (the kernels' identities; softplus's
      switch to the identity is taken on x·beta in the compute dtype, as PyTorch takes it).
    * x or x_new not finite: NaN -> NaN; one end infinite -> the secant's limit (the asymptotic slope at that
      end); both infinite -> NaN, or 0 for bounded f with ends of opposite sign.
    * grad_out = ±inf: ±inf times the exact slope's sign, NaN where the slope is exactly 0 (also where s
      underflowed float64: the sign comes from the shape of f, as in the kernels).
    """
    g, a, b = grad_out.double(), x.double(), x_new.double()
    fb = fallback_mask(a, b, eps)
    lo, hi = torch.minimum(a, b), torch.maximum(a, b)
    finite = torch.isfinite(a) & torch.isfinite(b)
    # softplus's switch, decided in the compute dtype (float32 below float64)
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    if k.name == "hardtanh" and ct == torch.float32:
        # f's bounds as PyTorch's hardtanh and the kernels hold them: rounded to the compute dtype
        k = k._replace(p0=float(np.float32(k.p0)), p1=float(np.float32(k.p1)))
    if k.name == "softplus":
        above = lambda v: (v.to(ct) * torch.tensor(k.p0, dtype=ct)) > torch.tensor(k.p1, dtype=ct)  # noqa: E731
        above_lo, above_hi = above(lo), above(hi)
    else:
        above_lo = above_hi = above = None
    safe = finite & ~fb & (lo < hi)
    lo_s, hi_s = torch.where(safe, lo, 0.0), torch.where(safe, hi, 1.0)
    wide = safe & torch.isinf(hi - lo)
    lo_n, hi_n = torch.where(wide, 0.0, lo_s), torch.where(wide, 1.0, hi_s)
    with torch.no_grad():
        s = _secant(k, lo_n, hi_n, None if above_lo is None else above_lo & ~wide & safe,
                    None if above_hi is None else above_hi & ~wide & safe)
        if wide.any():
            s = torch.where(wide, _literal_halved(k, lo_s, hi_s, above_lo, above_hi), s)
        fprime = _fprime(k, a, above(a) if k.name == "softplus" else None)
    s = torch.where(fb, fprime, s)

    pos, neg = asymptotic_slopes(k)
    a_inf, b_inf = a.isinf(), b.isinf()
    inf_end = torch.where(a_inf, a, b)
    s = torch.where(a_inf ^ b_inf, torch.where(inf_end > 0, pos, neg), s)
    both = torch.full_like(s, float("nan"))
    if is_bounded(k):
        both = torch.where(a == b, both, 0.0)
    s = torch.where(a_inf & b_inf, both, s)
    s = torch.where(a.isnan() | b.isnan(), float("nan"), s)
    out = g * s
    fix = g.isinf() & (s == 0) & finite
    if fix.any():
        bb = torch.where(fb, a, b)  # fallback lanes: the segment [a, a]
        out = torch.where(fix, g * _zero_slope_sign(k, torch.minimum(a, bb), torch.maximum(a, bb), a, fb), out)
    return out.to(grad_out.dtype).contiguous()
