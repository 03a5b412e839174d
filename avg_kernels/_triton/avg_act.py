"""Triton kernel of the averaged activation backward (SPEC §1): grad_in = grad_out * s(x, x_new).

ONE kernel, ``avg_act_backward_kernel``, JIT-specialised on the activation id (``ACT``, a
``tl.constexpr`` with the values of ``enum class Act``), the arithmetic type (``COMPUTE``: float32 for
float16/bfloat16/float32 inputs, float64 for float64, SPEC §0) and the block size. The math mirrors
``csrc/include/avg_kernels/activations.h`` line for line: same formulas, thresholds, series lengths and
evaluation order; every block names the header function it mirrors, so the two can be diffed.

Differences from the header, all result-neutral:
* ``Ops<V>::any()`` guards (softplus's rare lanes, fix_nonfinite's fast path, the two forms of gelu's
  s_Phi and elu's e^lo) are not branches here: a Triton program has no per-lane branch, so every lane
  evaluates those formulas and the same selects keep or discard them (identical results; the rare
  softplus terms cost 2 log1p + 1 exp per element).
* Constants: a Python float in a binary op with a tensor is materialised in the tensor's type, as the
  header's ``V(S(c))``; where a constant is an ``fma`` operand it is built with ``tl.full(.., COMPUTE)``
  (``tl.fma`` would round a bare Python float to float32 first, wrong for float64).
* Division: float32 ``/`` in Triton lowers to the approximate ``div.full.f32`` (2 ulp); ``_div`` uses
  ``tl.div_rn`` (IEEE, like the header compiled by nvcc/g++). float64 ``/`` is IEEE already.

Accuracy: exp/erfc/log1p come from libdevice (``triton.language.extra.libdevice``: ``__nv_expf``,
``__nv_erfcf``, ``__nv_log1pf`` and their float64 versions), not ``tl.exp``: that is ``ex2.approx.f32``
of a rounded ``x * log2(e)``, whose rounding alone costs a relative ~|x| * 6e-8 (estimate: ~4e-6 at
|x| = 60, tanh's argument at x = 30), a large slice of SPEC §1's 1e-5 bar.
Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) has no libdevice (``extern_elementwise`` is not
implemented there), so these three primitives are evaluated there by torch's CPU functions on the
interpreter's numpy data; every other operation is the interpreter's own.

Launch: see ``_LAUNCH`` (one table, per dtype). Indexing is int64 throughout (``block_offsets``), so
tensors over 2^31 elements are addressed correctly; only the last program masks (``block_is_full``);
empty tensors launch nothing.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import triton
import triton.language as tl

from .._contract.outputs import new_output
from ..activations import KERNEL_ACTS, KERNEL_IDS, KernelAct, is_bounded
from . import aot

# ---------------------------------------------------------------------------------------------
# enum class Act (activations.h), ids from the activation table (avg_kernels.activations.KERNEL_IDS)
# ---------------------------------------------------------------------------------------------
TANH = tl.constexpr(KERNEL_IDS["tanh"])
SIGMOID = tl.constexpr(KERNEL_IDS["sigmoid"])
RELU = tl.constexpr(KERNEL_IDS["relu"])
LEAKY_RELU = tl.constexpr(KERNEL_IDS["leaky_relu"])
ELU = tl.constexpr(KERNEL_IDS["elu"])
GELU = tl.constexpr(KERNEL_IDS["gelu"])
GELU_TANH = tl.constexpr(KERNEL_IDS["gelu_tanh"])
SILU = tl.constexpr(KERNEL_IDS["silu"])
SOFTPLUS = tl.constexpr(KERNEL_IDS["softplus"])
HARDSWISH = tl.constexpr(KERNEL_IDS["hardswish"])
HARDSIGMOID = tl.constexpr(KERNEL_IDS["hardsigmoid"])
HARDTANH = tl.constexpr(KERNEL_IDS["hardtanh"])

_BOUNDED = tuple(is_bounded(KernelAct(n)) for n in KERNEL_ACTS)  # act_is_bounded(Act), by kernel id

K_SMALL = tl.constexpr(0.5)  # detail::kSmall
_INF = tl.constexpr(float("inf"))
_NAN = tl.constexpr(float("nan"))
_ONE_SIXTH_F32 = tl.constexpr(float(np.float32(1.0) / np.float32(6.0)))  # 1.0f / 6.0f: hardsigmoid's f' in PyTorch

_INTERPRET = bool(triton.knobs.runtime.interpret)

# ---------------------------------------------------------------------------------------------
# Ops<V>: exp, erfc, log1p (accurate), min/max with the header's select semantics, IEEE division.
# ---------------------------------------------------------------------------------------------
if _INTERPRET:
    from triton.runtime.interpreter import TensorHandle

    def _host_unary(torch_fn):
        """A primitive evaluated on the interpreter's numpy data with torch (no libdevice there)."""

        def apply(x):
            h = x.handle
            data = np.asarray(torch_fn(torch.from_numpy(np.ascontiguousarray(h.data))).numpy(), dtype=h.data.dtype)
            return tl.tensor(TensorHandle(data, h.dtype.scalar), x.type)

        return apply

    _exp = _host_unary(torch.exp)
    _erfc = _host_unary(torch.erfc)
    _log1p = _host_unary(torch.log1p)
else:
    from triton.language.extra import libdevice

    @triton.jit
    def _exp(x):
        return libdevice.exp(x)

    @triton.jit
    def _erfc(x):
        return libdevice.erfc(x)

    @triton.jit
    def _log1p(x):
        return libdevice.log1p(x)


@triton.constexpr_function
def _is_bounded(act):  # act_is_bounded: the table's `bounded` column
    return _BOUNDED[act]


@triton.jit
def _min(a, b):  # Ops::min: a < b ? a : b
    return tl.where(a < b, a, b)


@triton.jit
def _max(a, b):  # Ops::max: a > b ? a : b
    return tl.where(a > b, a, b)


@triton.jit
def _div(a, b, C: tl.constexpr):  # IEEE division (float32 "/" is div.full.f32 in Triton)
    if C == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.constexpr_function
def _om_terms(fp64):  # one_minus_exp_neg_small: K = sizeof(S) == 4 ? 9 : 16
    return 16 if fp64 else 9


@triton.constexpr_function
def _om_coef(k):  # detail::om_coef: (-1)^k / (k+1)!, in double (cast to S where used)
    c = 1.0
    for i in range(2, k + 2):
        c /= i
    return -c if k % 2 else c


@triton.constexpr_function
def _huge(fp64):  # fix_nonfinite's huge: 2^126 (float) / 2^1022 (double)
    return 4.49423283715579e307 if fp64 else 8.507059173023462e37


@triton.constexpr_function
def _gelu_tanh_lim(fp64):  # detail::gelu_tanh_lim: e^{-U(lim)} is 0 in S
    return 22.0 if fp64 else 11.0


@triton.constexpr_function
def _gelu_terms(fp64):  # avg_slope<Gelu>: K = sizeof(S) == 4 ? 4 : 9
    return 9 if fp64 else 4


@triton.constexpr_function
def _gelu_inv_fact(n, fp64):
    """avg_slope<Gelu>'s inv_fact after loop step n: 1/(n+2)! accumulated in S as the header does."""
    import numpy

    t = numpy.float64 if fp64 else numpy.float32
    f = t(1)
    for j in range(1, n + 1):
        if (j + 1) % 2 == 0:
            f = t(f / (t(j + 1) * t(j + 2)))
    return float(f)


# ---------------------------------------------------------------------------------------------
# namespace detail
# ---------------------------------------------------------------------------------------------
@triton.jit
def _om_poly(y, C: tl.constexpr):
    # detail::om_poly: OmHorner<V, 0, K>::eval(y), innermost term first.
    acc = tl.zeros_like(y)  # OmHorner<V, K, K>::eval = 0
    for k in tl.static_range(_om_terms(C == tl.float64) - 1, -1, -1):
        acc = tl.fma(acc, y, tl.full([], _om_coef(k), C))
    return acc


@triton.jit
def _one_minus_exp_neg_small(y, C: tl.constexpr):
    # detail::one_minus_exp_neg_small: om_poly(y) * y
    return _om_poly(y, C) * y


@triton.jit
def _sigmoid_core(A, B, AD, C: tl.constexpr):
    # detail::sigmoid_core -> (p, q, N)
    p = _exp(-tl.abs(A))
    q = _exp(-tl.abs(B))
    opp = (A < 0.0) != (B < 0.0)  # mxor
    om = _one_minus_exp_neg_small(AD, C)
    n_small = tl.where(opp, 1.0, _max(p, q)) * om
    n_large = tl.where(opp, tl.fma(-p, q, tl.full([], 1.0, C)), tl.abs(p - q))
    N = tl.where(AD < K_SMALL, n_small, n_large)
    return p, q, N


@triton.jit
def _sigmoid_times_1pq(B, q):
    # detail::sigmoid_times_1pq
    return tl.where(B < 0.0, q, 1.0)


@triton.jit
def _fallback_mask(a, b, d, e_lo, e_hi, e_tlo, e_thi):
    # detail::fallback_mask: |b - a| <= eps on exact values (EpsCut); the tie lanes' TwoSum is evaluated on
    # every lane (header: only if any lane ties) and selected.
    ad = tl.abs(d)
    fb = ad < e_lo
    tie = (ad <= e_hi) & (fb == 0)
    z = d - b
    err = (b - (d - z)) + (-a - z)
    err_out = tl.where(d < 0.0, -err, err)
    t = tl.where(ad == e_lo, e_tlo, e_thi)
    return fb | (tie & (err_out <= t))


@triton.jit
def _fix_nonfinite(a, b, d, s, fb, p0, ACT: tl.constexpr, C: tl.constexpr):
    # detail::fix_nonfinite (its any() fast path is not a branch here: the selects below leave s
    # unchanged on lanes where |d| = |b - a| < 2^126).
    if _is_bounded(ACT):
        pos_slope = tl.full([], 0.0, C)
    else:
        pos_slope = tl.full([], 1.0, C)
    if ACT == LEAKY_RELU:
        neg_slope = p0
    else:
        neg_slope = tl.full([], 0.0, C)
    a_inf = tl.abs(a) == _INF
    b_inf = tl.abs(b) == _INF
    inf_val = tl.where(a_inf, a, b)
    s_one = tl.where(0.0 < inf_val, pos_slope, neg_slope)
    if _is_bounded(ACT):
        s_both = tl.where(a == b, _NAN, 0.0)
    else:
        s_both = tl.full([], _NAN, C)
    ha = a * 0.5
    hb = b * 0.5
    g_a = ha * tl.where(0.0 < a, pos_slope, neg_slope)
    g_b = hb * tl.where(0.0 < b, pos_slope, neg_slope)
    if ACT != HARDTANH:  # hardtanh computes these lanes exactly itself (header: if constexpr)
        ovf = (tl.abs(d) >= _huge(C == tl.float64)) & ((a_inf | b_inf) == 0) & (fb == 0)  # finite, |d| >= huge
        s = tl.where(ovf, _div(g_b - g_a, hb - ha, C), s)
    s = tl.where(a_inf != b_inf, s_one, s)
    s = tl.where(a_inf & b_inf, s_both, s)
    a_nan = (a == a) == 0  # mnot(eq(a, a))
    b_nan = (b == b) == 0
    return tl.where(a_nan | b_nan, _NAN, s)


# ---------------------------------------------------------------------------------------------
# avg_slope<A>(a, b, prm, eps)
# ---------------------------------------------------------------------------------------------
@triton.jit
def avg_slope(a, b, p0, p1, e_lo, e_hi, e_tlo, e_thi, ACT: tl.constexpr, C: tl.constexpr):
    """s(x=a, x_new=b) of SPEC §1 in the arithmetic of C (a, b already of type C; p0, p1 and the EpsCut
    e_lo, e_hi, e_tlo, e_thi 0-d C)."""
    d = b - a
    # Fallback lanes (|b - a| <= eps exactly, never true for NaN d) evaluate every formula at b = a, d = 0.
    fb = _fallback_mask(a, b, d, e_lo, e_hi, e_tlo, e_thi)
    bb = tl.where(fb, a, b)
    ad = tl.where(fb, 0.0, tl.abs(d))
    den_fac = tl.where(fb, 1.0, ad)

    if (ACT == SIGMOID) or (ACT == TANH) or (ACT == SILU):
        # tanh(x) = 2 sigma(2x) - 1, so s_tanh(a, b) = 4 s_sigma(2a, 2b) (scaling by 2 is exact).
        if ACT == TANH:
            A2 = a * 2.0
            B2 = bb * 2.0
            AD2 = ad * 2.0
        else:
            A2 = a
            B2 = bb
            AD2 = ad
        p, q, N = _sigmoid_core(A2, B2, AD2, C)
        num = tl.where(fb, p, N)  # fallback: sigma'(A) = p / (1+p)^2
        if ACT == TANH:
            den = (1.0 + p) * (1.0 + q) * tl.where(fb, 1.0, AD2)
        else:
            den = (1.0 + p) * (1.0 + q) * den_fac
        if ACT == SILU:
            # silu = x sigma(x): s = sigma(lo) + hi * s_sigma(a, b) (lo <= hi the ends), one denominator.
            a_lo = a <= bb
            h_lo = tl.where(a_lo, _sigmoid_times_1pq(A2, p) * (1.0 + q), _sigmoid_times_1pq(B2, q) * (1.0 + p))
            s = _div(tl.fma(h_lo, den_fac, _max(a, bb) * num), den, C)
        elif ACT == TANH:
            s = _div(num * 4.0, den, C)
        else:
            s = _div(num, den, C)
    elif ACT == GELU_TANH:
        # gelu_tanh = x h(x), h = sigma(U(x)), U(x) = 2k (x + c x^3); U(b) - U(a) = g (b - a);
        # s = h(lo) + hi s_h; clamp at detail::gelu_tanh_lim (e^{-U(lim)} == 0 in C).
        k2 = tl.full([], 2 * 0.7978845608028654, C)  # 2 sqrt(2/pi)
        c3 = tl.full([], 0.044715, C)
        lim = _gelu_tanh_lim(C == tl.float64)
        one = tl.full([], 1.0, C)
        ac = _min(_max(a, -lim), lim)
        bc = _min(_max(bb, -lim), lim)
        Ua = k2 * ac * tl.fma(c3 * ac, ac, one)
        Ub = k2 * bc * tl.fma(c3 * bc, bc, one)
        g = k2 * tl.fma(c3, tl.fma(ac, ac, tl.fma(ac, bc, bc * bc)), one)
        p, q, N = _sigmoid_core(Ua, Ub, g * tl.abs(bc - ac), C)
        num = tl.where(fb, p * g, N)  # fallback: h'(a) = sigma'(U(a)) g(a, a)
        den = (1.0 + p) * (1.0 + q) * den_fac
        a_lo = a <= bb
        h_lo = tl.where(a_lo, _sigmoid_times_1pq(Ua, p) * (1.0 + q), _sigmoid_times_1pq(Ub, q) * (1.0 + p))
        s = _div(tl.fma(h_lo, den_fac, _max(a, bb) * num), den, C)
    elif ACT == GELU:
        # gelu = x Phi(x): s = Phi(b) + a s_Phi(a, b); C(x) = Phi(-|x|) by erfc; below kSmall the
        # midpoint expansion s_Phi = phi(m) sum_k He_2k(m) h^2k / (2k+1)!.
        rsqrt2 = tl.full([], 0.70710678118654752440, C)
        rsqrt2pi = tl.full([], 0.39894228040143267794, C)
        Cb = _erfc(tl.abs(bb) * rsqrt2) * 0.5
        h = (bb - a) * 0.5
        mlim = 40.0  # phi(40) == 0 even in float64; keeps m^6 finite
        m = _min(_max(a + h, -mlim), mlim)
        use_series = ad * _max(tl.abs(m), 1.0) < K_SMALL  # series only where |h| max(1,|m|) < kSmall/2
        # header: if (O::any(!use_series)) { ... } -- evaluated on every lane here, selected below.
        Ca = _erfc(tl.abs(a) * rsqrt2) * 0.5
        opp = (a < 0.0) != (bb < 0.0)
        dPhi = tl.where(opp, 1.0 - Ca - Cb, tl.abs(Ca - Cb))
        # s = Phi(lo) + hi s_Phi (lo <= hi the ends: no cancellation when hi >= 0)
        C_lo = tl.where(a <= bb, Ca, Cb)
        phi_lo = tl.where(_min(a, bb) < 0.0, C_lo, 1.0 - C_lo)
        s_big = tl.fma(_max(a, bb), _div(dPhi, den_fac, C), phi_lo)
        # header: if (O::any(use_series)) { ... }
        m2 = m * m
        h2 = h * h
        phi = _exp(m2 * -0.5) * rsqrt2pi
        # sum_{k<K} He_2k(m) h^2k / (2k+1)!, Hermite by recurrence He_{n+1} = m He_n - n He_{n-1}.
        he_prev = tl.full([], 1.0, C)
        he = m
        h2k = tl.full([], 1.0, C)
        series = tl.full([], 1.0, C)
        for n in tl.static_range(1, 2 * _gelu_terms(C == tl.float64) - 1):
            he_next = tl.fma(m, he, -n * he_prev)  # He_{n+1}
            he_prev = he
            he = he_next
            if (n + 1) % 2 == 0:
                h2k = h2k * h2
                series = tl.fma(he * _gelu_inv_fact(n, C == tl.float64), h2k, series)
        s_phi = phi * series
        phi_b = tl.where(bb < 0.0, Cb, 1.0 - Cb)
        s = tl.where(use_series, tl.fma(a, s_phi, phi_b), s_big)
    elif ACT == ELU:
        # elu: both <= 0: alpha e^hi (1 - e^{-|d|}); lo <= 0 < hi: hi + alpha (1 - e^lo).
        alpha = p0
        lo = _min(a, bb)
        hi = _max(a, bb)
        Eh = _exp(_min(hi, 0.0))
        # header: only if (O::any(!use_series)); selected away elsewhere. Evaluated before the series: in
        # the other order ptxas (Triton 3.9, fp64, sm_80) needed an 8-byte stack frame.
        El = _exp(_min(lo, 0.0))
        neg = hi <= 0.0
        y = tl.where(neg, ad, -lo)  # both <= 0: |d|; crossing: -lo
        use_series = y < K_SMALL
        # steps below 2^-100 scaled by 2^100 (exact) before the products (subnormal grid)
        sc = tl.where(den_fac < 7.888609052210118e-31, 1.2676506002282294e30, 1.0)
        om = _om_poly(y, C) * (y * sc)
        n_neg = tl.where(use_series, Eh * om, Eh - El) * alpha
        n_cross = tl.fma(alpha, tl.where(use_series, om, 1.0 - El), hi * sc)
        N = tl.where(0.0 <= lo, ad * sc, tl.where(neg, n_neg, n_cross))
        fprime = tl.where(0.0 < a, 1.0, Eh * alpha)  # fallback lanes: hi = a; PyTorch: f'(0) = alpha
        s = tl.where(fb, fprime, _div(N, den_fac * sc, C))
    elif (ACT == RELU) or (ACT == LEAKY_RELU):
        # Piecewise linear: s = P/d + slope_neg Q/d, P = max(b,0) - max(a,0), Q = min(b,0) - min(a,0).
        den_d = tl.where(fb, 1.0, d)
        sec = _div(_max(bb, 0.0) - _max(a, 0.0), den_d, C)
        if ACT == LEAKY_RELU:
            ns = p0
            sec = tl.fma(ns, _div(_min(bb, 0.0) - _min(a, 0.0), den_d, C), sec)
        else:
            ns = tl.full([], 0.0, C)
        s = tl.where(fb, tl.where(0.0 < a, 1.0, ns), sec)  # PyTorch: f'(0) = slope_neg
    elif (ACT == HARDSWISH) or (ACT == HARDSIGMOID):
        # Regions (-inf, -3], [-3, 3], [3, inf): s = w_mid m_mid + w_hi with u, v = lo, hi clamped to
        # [-3, 3], w_mid = (v - u) / |d|, w_hi = (max(hi, 3) - max(lo, 3)) / |d|; m_mid = 1/6
        # (hardsigmoid) or ((u + 3) + v) / 6 (hardswish). Fallback: PyTorch's f' on (-3, 3).
        three = tl.full([], 3.0, C)
        lo = _min(a, bb)
        hi = _max(a, bb)
        u = _min(_max(lo, -3.0), 3.0)
        v = _min(_max(hi, -3.0), 3.0)
        w_mid = _div(v - u, den_fac, C)
        inside = (-3.0 < a) & (a < 3.0)
        if ACT == HARDSIGMOID:
            fprime = tl.where(inside, tl.full([], _ONE_SIXTH_F32, C), 0.0)
            s = tl.where(fb, fprime, w_mid * tl.full([], 1.0 / 6.0, C))
        else:
            m_mid = _div((u + 3.0) + v, tl.full([], 6.0, C), C)
            w_hi = _div(_max(hi, 3.0) - _max(lo, 3.0), den_fac, C)
            fprime = tl.where(inside, _div(a, three, C) + 0.5, tl.where(a < 3.0, 0.0, 1.0))
            s = tl.where(fb, fprime, tl.fma(w_mid, m_mid, w_hi))
    elif ACT == HARDTANH:
        # clamp(x, L, H): s = (v - u) / |d| with u, v = lo, hi clamped to [L, H] (the fraction of the
        # segment inside); |d| >= huge: both halved (header: behind any()). Fallback: 1 on (L, H), else 0.
        lo = _min(a, bb)
        hi = _max(a, bb)
        u = _min(_max(lo, p0), p1)
        v = _min(_max(hi, p0), p1)
        big = _huge(C == tl.float64) <= ad
        num = tl.where(big, v * 0.5 - u * 0.5, v - u)
        den = tl.where(big, hi * 0.5 - lo * 0.5, den_fac)
        inside = (p0 < a) & (a < p1)
        s = tl.where(fb, tl.where(inside, 1.0, 0.0), _div(num, den, C))
    else:
        tl.static_assert(ACT == SOFTPLUS, "unknown activation id")
        # softplus = log1p(e^{beta x}) / beta for y = beta x <= threshold, else x; in y units.
        beta = p0
        thr = p1
        ya = a * beta
        yb = bb * beta
        D = ad * beta
        lo = _min(ya, yb)
        hi = _max(ya, yb)
        hi_above = thr < hi
        lo_above = thr < lo
        El = _exp(-tl.abs(lo))
        inv1pEl = _div(1.0, 1.0 + El, C)
        lo_neg = lo < 0.0
        sig_lo = tl.where(lo_neg, El, 1.0) * inv1pEl  # sigma(lo)
        sig_nlo = tl.where(lo_neg, 1.0, El) * inv1pEl  # sigma(-lo)
        Ed = _exp(-D)
        om = tl.where(D < K_SMALL, _one_minus_exp_neg_small(D, C), 1.0 - Ed)
        left = lo + hi <= 0.0
        straddle = lo_neg & (D >= K_SMALL)  # right-hand lanes only
        arg = tl.where(left, _div(sig_lo * om, Ed, C),
                       tl.where(straddle, (_div(Ed, El, C) - El) * inv1pEl, -sig_nlo * om))
        lg = _log1p(arg)
        delta = tl.where(left, lg, tl.where(straddle, hi, D) + lg)
        crossing = hi_above != lo_above
        rare = crossing | (30.0 < D)  # D = inf (beta |d| overflows) included
        sec = _div(delta, tl.where(fb, 1.0, D), C)
        # D < 2^-24: the midpoint slope to first order (header: delta / D would be 0 / 0 where D underflows)
        sec = tl.where(D < 5.9604644775390625e-08, tl.fma(D * 0.5, sig_lo * sig_nlo, sig_lo), sec)
        # header: if (O::any(rare)) { ... } -- evaluated on every lane here, selected by `rare`.
        Llo = _log1p(El)
        f_lo = _max(lo, 0.0) + Llo
        f_hi = tl.where(hi_above, hi, _max(hi, 0.0) + _log1p(_exp(-tl.abs(hi))))
        # Crossing: hi - L(lo) for lo < 0, else (hi - lo) - L(lo) with hi - lo = D.
        cross = tl.where(lo_neg, hi, D) - Llo
        sec_y = _div(tl.where(crossing, cross, f_hi - f_lo), tl.where(fb, 1.0, D), C)
        # D = inf with finite ends: the literal secant in x units.
        inv_beta = _div(1.0, beta, C)  # one scalar division per program (header: / beta)
        fx_lo = tl.where(lo_above, _min(a, bb), f_lo * inv_beta)
        fx_hi = tl.where(hi_above, _max(a, bb), f_hi * inv_beta)
        sec_x = _div(fx_hi - fx_lo, tl.where(fb, 1.0, ad), C)
        sec = tl.where(rare, tl.where(D == _INF, sec_x, sec_y), sec)
        sec = tl.where(lo_above, 1.0, sec)
        fprime = tl.where(thr < ya, 1.0, sig_lo)  # fallback lanes: lo == ya
        s = tl.where(fb, fprime, sec)
    return _fix_nonfinite(a, b, d, s, fb, p0, ACT, C)


@triton.jit
def _sgn(v):
    return tl.where(0.0 < v, 1.0, tl.where(v < 0.0, -1.0, 0.0))


@triton.jit
def _zero_slope_sign(a, b, fb, p0, p1, ACT: tl.constexpr, C: tl.constexpr):
    # detail::zero_slope_sign: the sign of the exact slope where the computed s is 0 (finite ends).
    bb = tl.where(fb, a, b)
    lo = _min(a, bb)
    hi = _max(a, bb)
    one = tl.full([], 1.0, C)
    if (ACT == TANH) or (ACT == SIGMOID):
        r = one + 0.0 * a
    elif ACT == SOFTPLUS:
        crossing = (fb == 0) & ((p1 < hi * p0) != (p1 < lo * p0))
        r = tl.where(crossing, 0.0, 1.0)
    elif ACT == ELU:
        neg = _sgn(p0)
        cross = _sgn(tl.fma(p0 + 0.0 * a, 1.0 - _exp(_min(lo, 0.0)), hi))
        r = tl.where(0.0 < lo, 1.0, tl.where(hi <= 0.0, neg, cross))
    elif (ACT == RELU) or (ACT == LEAKY_RELU):
        if ACT == LEAKY_RELU:
            ns = p0
        else:
            ns = tl.full([], 0.0, C)
        P = _max(hi, 0.0) - _max(lo, 0.0)
        Q = _min(hi, 0.0) - _min(lo, 0.0)
        r = tl.where(fb, tl.where(0.0 < a, 1.0, _sgn(ns)), _sgn(tl.fma(ns + 0.0 * a, Q, P)))
    elif (ACT == SILU) or (ACT == GELU) or (ACT == GELU_TANH):
        r = tl.where(0.0 <= hi, 1.0, -1.0)
    elif ACT == HARDSIGMOID:
        u = _min(_max(lo, -3.0), 3.0)
        v = _min(_max(hi, -3.0), 3.0)
        inside = (-3.0 < a) & (a < 3.0)
        r = tl.where(fb, tl.where(inside, 1.0, 0.0), tl.where(u < v, 1.0, 0.0))
    elif ACT == HARDTANH:
        u = _min(_max(lo, p0), p1)
        v = _min(_max(hi, p0), p1)
        inside = (p0 < a) & (a < p1)
        r = tl.where(fb, tl.where(inside, 1.0, 0.0), tl.where(u < v, 1.0, 0.0))
    else:
        tl.static_assert(ACT == HARDSWISH, "unknown activation id")
        three = tl.full([], 3.0, C)
        u = _min(_max(lo, -3.0), 3.0)
        v = _min(_max(hi, -3.0), 3.0)
        mid = tl.where(u < v, _sgn((u + 3.0) + v), 0.0)
        inside = (-3.0 < a) & (a < 3.0)
        f1 = tl.where(inside, _sgn(_div(a, three, C) + 0.5), tl.where(a < 3.0, 0.0, 1.0))
        r = tl.where(fb, f1, tl.where(3.0 < hi, 1.0, mid))
    return r


@triton.jit
def avg_grad(g, a, b, p0, p1, e_lo, e_hi, e_tlo, e_thi, ACT: tl.constexpr, C: tl.constexpr):
    """avg_grad<ACT>: g * s(a, b), except that g = +-inf times a computed s of 0 (finite ends) takes the exact
    slope's sign (detail::zero_slope_sign): +-inf where it underflowed, NaN where it is exactly 0."""
    s = avg_slope(a, b, p0, p1, e_lo, e_hi, e_tlo, e_thi, ACT, C)
    r = g * s
    fix = (tl.abs(g) == _INF) & (s == 0.0) & (tl.abs(a) < _INF) & (tl.abs(b) < _INF)
    fb = _fallback_mask(a, b, b - a, e_lo, e_hi, e_tlo, e_thi)
    return tl.where(fix, g * _zero_slope_sign(a, b, fb, p0, p1, ACT, C), r)


# ---------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------
@triton.jit
def block_offsets(pid, BLOCK: tl.constexpr):
    """Element offsets of program ``pid``, in int64: pid * BLOCK overflows int32 past 2^31 elements."""
    return pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)


@triton.jit
def block_is_full(pid, n, BLOCK: tl.constexpr):
    """True when all BLOCK elements of program ``pid`` are < n (int64, like block_offsets)."""
    return (pid.to(tl.int64) + 1) * BLOCK <= n


@triton.jit
def avg_act_backward_kernel(g_ptr, x_ptr, xn_ptr, out_ptr, n, p0: "fp64", p1: "fp64", e_lo: "fp64", e_hi: "fp64",
                            e_tlo: "fp64", e_thi: "fp64", ACT: tl.constexpr, COMPUTE: tl.constexpr,
                            BLOCK: tl.constexpr):
    """out[i] = avg_grad<ACT>(g[i], x[i], xn[i]) for i < n (contiguous tensors of one dtype).

    p0, p1 arrive as float64 and are rounded once to COMPUTE (the C++ kernels' opmath_t(p0)); e_lo, e_hi,
    e_tlo, e_thi are the EpsCut of eps (``eps_cut``), values of COMPUTE (exact conversions).
    """
    pid = tl.program_id(0)
    offs = block_offsets(pid, BLOCK)
    # Every program but the last holds a full block: unmasked loads/stores there stay 128-bit vectors
    # even when n is not a multiple of 16 (a mask `offs < n` with unknown n divisibility would make
    # Triton split them into scalar accesses); only the tail program masks.
    full = block_is_full(pid, n, BLOCK)
    if full:
        g = tl.load(g_ptr + offs)
        a = tl.load(x_ptr + offs)
        b = tl.load(xn_ptr + offs)
    else:
        g = tl.load(g_ptr + offs, mask=offs < n, other=0.0)
        a = tl.load(x_ptr + offs, mask=offs < n, other=0.0)
        b = tl.load(xn_ptr + offs, mask=offs < n, other=0.0)
    y = avg_grad(g.to(COMPUTE), a.to(COMPUTE), b.to(COMPUTE), tl.full([], p0, COMPUTE), tl.full([], p1, COMPUTE),
                 tl.full([], e_lo, COMPUTE), tl.full([], e_hi, COMPUTE), tl.full([], e_tlo, COMPUTE),
                 tl.full([], e_thi, COMPUTE), ACT, COMPUTE).to(out_ptr.dtype.element_ty)
    if full:
        tl.store(out_ptr + offs, y)
    else:
        tl.store(out_ptr + offs, y, mask=offs < n)


# ---------------------------------------------------------------------------------------------
# Launch configuration (production): the one place it is chosen.
# ---------------------------------------------------------------------------------------------
class Launch(NamedTuple):
    block: int  # elements per program
    num_warps: int
    compute: object  # tl.float32 / tl.float64


# A memory-bound elementwise op (3 loads + 1 store per element, a few libdevice calls in between):
# each thread handles 16 bytes of each tensor, i.e. one 128-bit vector load per input
# (ld.global.v4.b32) and one vector store, with 4 warps (128 threads) per program:
# BLOCK = 128 * 16 / itemsize. More elements per thread would multiply the live registers of the
# longer formulas (gelu, softplus) for no bandwidth gain; fewer would leave the loads unvectorised.
# tests/test_triton_aot.py checks every activation at these sizes on sm_80/sm_90: no spills, 128-bit
# loads. Registers range from ~34 (fp32 relu) to ~167 (fp16/bf16 softplus, 8 fp32 lanes per thread):
# the latter allows 3 programs (384 threads) per SM, ~18 KB of loads in flight; if a GPU measurement
# shows that short of bandwidth, halve BLOCK for that case (unmeasured: no GPU here).
_NUM_WARPS = 4
_LAUNCH = {
    torch.float16: Launch(block=_NUM_WARPS * 32 * 8, num_warps=_NUM_WARPS, compute=tl.float32),
    torch.bfloat16: Launch(block=_NUM_WARPS * 32 * 8, num_warps=_NUM_WARPS, compute=tl.float32),
    torch.float32: Launch(block=_NUM_WARPS * 32 * 4, num_warps=_NUM_WARPS, compute=tl.float32),
    torch.float64: Launch(block=_NUM_WARPS * 32 * 2, num_warps=_NUM_WARPS, compute=tl.float64),
}


def launch_config(dtype: torch.dtype) -> Launch:
    try:
        return _LAUNCH[dtype]
    except KeyError:
        raise TypeError(f"avg_act_backward (triton): dtype {dtype} is not supported; expected one of "
                        f"{list(_LAUNCH)}") from None


_FLT_MAX = float(np.finfo(np.float32).max)


def eps_cut(eps: float, fp64: bool) -> tuple[float, float, float, float]:
    """make_eps_cut<S> (activations.h): (lo, hi, t_lo, t_hi), values of S, for the exact |d| <= eps decision."""
    if fp64:
        return eps, eps, 0.0, 0.0

    def down(v: float) -> float:  # the largest float32 <= v
        with np.errstate(over="ignore"):
            f = np.float32(v)
        if float(f) > v:
            f = np.nextafter(f, np.float32(-np.inf))
        return float(f)

    lo = down(eps)
    hi = lo if lo == eps else float(np.nextafter(np.float32(lo), np.float32(np.inf)))
    return lo, hi, down(eps - lo), down(eps - hi)


def avg_act_backward(grad_out: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, k: KernelAct,
                     eps: float) -> torch.Tensor:
    """grad_out * s(x, x_new) for activation ``k``; arguments already validated by the public op
    (one shape, dtype and device). Returns a new contiguous tensor of x's shape and dtype."""
    if x.dtype != torch.float64 and eps > _FLT_MAX:
        # the exact eps decision needs float64 arithmetic then (as the C++ drivers: csrc/checks.h)
        return avg_act_backward(grad_out.double(), x.double(), x_new.double(), k, eps).to(x.dtype)
    cfg = launch_config(x.dtype)
    out = new_output(x.shape, x)
    n = out.numel()
    if n == 0:
        return out
    g, a, b = grad_out.contiguous(), x.contiguous(), x_new.contiguous()
    grid = (triton.cdiv(n, cfg.block),)
    args = (g, a, b, out, n, float(k.p0), float(k.p1), *eps_cut(float(eps), cfg.compute == tl.float64))
    meta = dict(ACT=k.kernel_id, COMPUTE=cfg.compute, BLOCK=cfg.block, num_warps=cfg.num_warps)
    if out.is_cuda:
        with torch.cuda.device(out.device):
            avg_act_backward_kernel[grid](*args, **meta)
    else:
        avg_act_backward_kernel[grid](*args, **meta)
    return out


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile checks: every activation x dtype at the production configuration.
# ---------------------------------------------------------------------------------------------
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}

# Run-time specialisations of `n` that Triton compiles separately: (name suffix, type, 16-divisible).
# Every activation gets the common one (n % 16 == 0); the rarer ones are checked on the kernel with
# the most live values (softplus) to keep the AOT test short.
_N_VARIANTS = (("", "i32", True), (",n%16!=0", "i32", False), (",n>=2^31", "i64", True))


def _register_aot() -> None:
    for dtype, cfg in _LAUNCH.items():
        t = _TL_NAME[dtype]
        for act in KERNEL_ACTS:
            for suffix, n_type, n_aligned in _N_VARIANTS:
                if suffix and act != "softplus":
                    continue
                aot.register(aot.KernelConfig(
                    name=f"avg_act_backward[{act},{t}{suffix}]",
                    kernel=f"{__name__}:avg_act_backward_kernel",
                    signature={"g_ptr": f"*{t}", "x_ptr": f"*{t}", "xn_ptr": f"*{t}", "out_ptr": f"*{t}",
                               "n": n_type, "p0": "fp64", "p1": "fp64", "e_lo": "fp64", "e_hi": "fp64",
                               "e_tlo": "fp64", "e_thi": "fp64",
                               "ACT": "constexpr", "COMPUTE": "constexpr", "BLOCK": "constexpr"},
                    constexprs={"ACT": KERNEL_ACTS.index(act), "COMPUTE": cfg.compute, "BLOCK": cfg.block},
                    aligned=("g_ptr", "x_ptr", "xn_ptr", "out_ptr") + (("n",) if n_aligned else ()),
                    num_warps=cfg.num_warps,
                ))


_register_aot()
