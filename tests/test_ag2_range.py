"""AG-2's rescale when the norm ratio ‖θ' − θ‖₁ / ‖Δ‖₁ lies outside double's range (float64 parameters with norms
near the ends of it: 1e300 against 1e-300, subnormal norms). The scale is applied as factors that neither
overflow nor underflow (csrc/include/avg_kernels/ag2_scale.h, docs/numerics.md) on every backend: the reference,
the C++ CPU kernels at every capability level, Triton (interpreted here) and the CUDA kernel's host emulation.
The oracle is exact: Python fractions for the norms, the ratio and θ + Δ·a/b, rounded once."""
from __future__ import annotations

import math
import random
import sys
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings, strategies as st

import avg_kernels as ak
from avg_kernels.reference.ag_update import ag2_factors

from conftest import backend_device, hook_ops, interpreted

EPS = 2.0 ** -53
TINY = 2.0 ** -1074


def _float(q: Fraction) -> float:
    """The double nearest to q (±inf beyond the range): int / int is correctly rounded."""
    try:
        return q.numerator / q.denominator
    except OverflowError:
        return math.copysign(math.inf, q)


def exact_ag2(ps, olds, steps):
    """(results, |Δ_i|·a/b per element) per tensor: the exact results (Fractions; plain floats where b = 0)
    and the magnitudes as floats."""
    flat = lambda ts: [[float(v) for v in t.double().flatten().tolist()] for t in ts]
    P, O, S = flat(ps), flat(olds), flat(steps)
    a = sum(abs(Fraction(s) - Fraction(o)) for ss, oo in zip(S, O) for s, o in zip(ss, oo))
    b = sum(abs(Fraction(p) - Fraction(o)) for pp, oo in zip(P, O) for p, o in zip(pp, oo))
    if b == 0:
        return P, [[0.0] * len(pp) for pp in P]
    out, mag = [], []
    for pp, oo in zip(P, O):
        out.append([Fraction(o) + (Fraction(p) - Fraction(o)) * a / b for p, o in zip(pp, oo)])
        mag.append([float(abs(Fraction(p) - Fraction(o)) * a / b) for p, o in zip(pp, oo)])
    return out, mag


def check_close(ps, want, mag, n, dtypes):
    """Every element within the bar: the float64 rounding of the norms (n terms each), of Δ and of the scale,
    plus the result's own rounding (half an ulp; one more subnormal unit for a product rounded on the
    subnormal grid before the add); float32 parameters: float arithmetic's roundings. Never NaN; ±inf only where the
    exact value rounds to it."""
    for p, w, m, dt in zip(ps, want, mag, dtypes):
        got = p.double().flatten().tolist()
        for g, r, mv in zip(got, w, m):
            # compared with the exact value r, not its rounding: near a rounding tie, a result within the bar of r
            # may be the other neighbour of the rounded r
            wv = _float(Fraction(r))
            assert not math.isnan(g), (g, wv)
            if math.isinf(wv) or (dt == torch.float32 and abs(wv) > 3.4028235677973366e38):
                assert math.isinf(g) and g * wv > 0, (g, wv)
                continue
            tol = (2 * n + 8) * EPS * mv + EPS * abs(wv) + 2 * TINY
            if dt == torch.float32:  # float arithmetic (SPEC §2): Δ, the scale rounded to float, the result
                tol += 3 * 2.0 ** -24 * mv + 2.0 ** -24 * abs(wv) + 2.0 ** -149
            assert abs(Fraction(g) - Fraction(r)) <= Fraction(tol), (g, wv, mv, tol)


def _values(rng: random.Random, n: int, e: int, zeros: bool):
    """n doubles of magnitude about 2^e (random signs and mantissas), some exact zeros."""
    out = []
    for _ in range(n):
        if zeros and rng.random() < 0.2:
            out.append(0.0)
            continue
        ee = min(1012, max(-1074, e + rng.randint(-3, 3)))
        out.append(math.copysign(math.ldexp(rng.uniform(1, 2), ee), rng.random() - 0.5))
    return out


@st.composite
def ag2_cases(draw):
    """Norms anywhere in double's range (the ratio beyond it on either side most of the time), θ zero, ordinary,
    huge, tiny or of Δ's size; one to three tensors, optionally a float32 triple in the same call."""
    e_step = draw(st.sampled_from([-1074, -1070, -1040, -1000, -600, -300, 0, 300, 600, 1000, 1010]))
    e_delta = draw(st.sampled_from([-1074, -1070, -1040, -1000, -600, -300, 0, 300, 600, 1000, 1010]))
    e_theta = draw(st.sampled_from(["zero", 0, -1060, -1000, 1000, "delta"]))
    sizes = draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))
    f32 = draw(st.sampled_from([None, "zero_delta", "small"]))
    return dict(e_step=e_step, e_delta=e_delta, e_theta=e_theta, sizes=sizes, f32=f32, seed=draw(st.integers(0, 2 ** 31)))


def make_lists(c, dev):
    rng = random.Random(c["seed"])
    ps, olds, steps = [], [], []
    for k in c["sizes"]:
        e_t = c["e_delta"] if c["e_theta"] == "delta" else c["e_theta"]
        t = [0.0] * k if e_t == "zero" else _values(rng, k, e_t, True)
        d = _values(rng, k, c["e_delta"], True)
        s = _values(rng, k, c["e_step"], True)
        to64 = lambda v: torch.tensor(v, dtype=torch.float64, device=dev)
        olds.append(to64(t))
        ps.append(to64([x + y for x, y in zip(t, d)]))
        steps.append(to64([x + y for x, y in zip(t, s)]))
    if c["f32"]:
        t = torch.tensor([1.0, -2.0, 0.0], dtype=torch.float32, device=dev)
        olds.append(t)
        ps.append(t.clone() if c["f32"] == "zero_delta" else t + torch.tensor([1e-30, 0.0, -1e-38], device=dev))
        steps.append(t.clone())
    return ps, olds, steps


def _run_case(c, dev, apply):
    ps, olds, steps = make_lists(c, dev)
    want, mag = exact_ag2([p.cpu() for p in ps], [o.cpu() for o in olds], [s.cpu() for s in steps])
    apply(ps, olds, steps)
    n = sum(p.numel() for p in ps)
    check_close([p.cpu() for p in ps], want, mag, n, [p.dtype for p in ps])


def _budget(n, backend="cpu"):
    return max(3, int(n * settings().max_examples / 40 / (5 if interpreted(backend) else 1)))


def test_ag2_ratio_beyond_double_properties(backend):
    dev = backend_device(backend)

    @settings(max_examples=_budget(120, backend))
    @given(c=ag2_cases())
    def prop(c):
        _run_case(c, dev, lambda ps, os_, ss: ak.ag2_rescale_(ps, os_, ss, backend=backend))

    prop()


def test_ag2_ratio_beyond_double_cpu_levels(cpu_level):
    """The C++ CPU kernels at every capability level (the test above runs the active one)."""
    @settings(max_examples=_budget(40))
    @given(c=ag2_cases())
    def prop(c):
        _run_case(c, torch.device("cpu"), lambda ps, os_, ss: ak.ag2_rescale_(ps, os_, ss, backend="cpu"))

    prop()


def test_ag2_ratio_beyond_double_cuda_emulated():
    """The CUDA kernels' code (norms, factors, scale pass) through the host emulation, small chunks."""
    E = hook_ops()
    if E is None:
        pytest.skip("C++ test extension not built")

    @settings(max_examples=_budget(40))
    @given(c=ag2_cases())
    def prop(c):
        _run_case(c, torch.device("cpu"), lambda ps, os_, ss: E.ag2_rescale_cuda_emulated_(ps, os_, ss, 4, 3, 5))

    prop()


@pytest.mark.parametrize("step,delta", [(1e300, 1e-300), (1e-300, 1e300), (1.7e308, 5e-324), (5e-324, 1.7e308),
                                        (3e-310, 1.0), (1e-320, 2e-322)], ids=str)
def test_ag2_ratio_beyond_double_examples(backend, step, delta):
    """The brief's cases, every element against the exact value: one tensor θ = (0, 1, -1e-310) with Δ and θ' − θ
    spread over its elements so that the norms are about ``delta`` and ``step``. Before: ±inf or NaN where the
    ratio overflowed (Δ·inf, 0·inf), θ unchanged where it underflowed to 0."""
    dev = backend_device(backend)
    t = torch.tensor([0.0, 1.0, -1e-310], dtype=torch.float64, device=dev)
    p = t + torch.tensor([delta / 2, -delta / 4, delta / 4], dtype=torch.float64, device=dev)
    s = t + torch.tensor([-step / 3, step / 3, step / 3], dtype=torch.float64, device=dev)
    ps = [p]
    want, mag = exact_ag2([p.cpu()], [t.cpu()], [s.cpu()])
    ak.ag2_rescale_(ps, [t], [s], backend=backend)
    check_close([ps[0].cpu()], want, mag, 3, [torch.float64])


def test_factors_identity():
    """ag2_factors (the reference's, mirrored by every backend): u1·u2·v equals a / b to within two roundings (exact rationals), each factor a
    finite positive double, over exponents across the whole range."""
    rng = random.Random(7)
    checked = 0
    for _ in range(3000):
        a = math.ldexp(rng.uniform(1, 2), rng.randint(-1074, 1023))
        b = math.ldexp(rng.uniform(1, 2), rng.randint(-1074, 1023))
        if math.isinf(a) or math.isinf(b) or a == 0 or b == 0:
            continue
        u1, u2, v = ag2_factors(a, b)
        assert all(0 < f < math.inf for f in (u1, u2, v))
        q = Fraction(a) / Fraction(b)
        got = Fraction(u1) * Fraction(u2) * Fraction(v)
        # one rounding (of v or u1); a subnormal u1 (a / b below 2^-2096) keeps >= 50 bits
        assert abs(got - q) / q <= (2.0 ** -49 if u1 < sys.float_info.min else 2 * EPS), (a, b, u1, u2, v)
        checked += 1
    assert checked > 2500
