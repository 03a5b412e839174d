"""The CPU kernels at the edges of the float32 range, at every capability level: subnormal grad_out, x,
x_new and d, and |x| near FLT_MAX, against the float64 reference (SPEC §1). The kernels run with the
caller's floating-point mode (no flush-to-zero / denormals-are-zero): a subnormal operand is a value, and
the speed that flushing would buy is had in the math instead (vec_ops.h: exp_nonpos never returns a
subnormal)."""
from __future__ import annotations

import pytest
import torch

import avg_kernels as ak
from avg_kernels import EPS, reference

from _accuracy import CONFIGS, config_id, fp32_rounding_tol, kernel_act, slope_errors

TINY = torch.finfo(torch.float32).tiny  # FLT_MIN, 1.18e-38
SUB_ULP = 2.0 ** -149  # the spacing of float32's subnormals
# Ordinary (x, x_new) pairs: secant and fallback lanes, both signs, the tails where e^{-x^2/2}, e^{-|x|}
# and their products cross FLT_MIN (gelu near |x| = 13, gelu_tanh near 10, sigmoid/silu/elu near 87).
PAIRS = [(0.3, 0.7), (-1.5, 2.0), (2.0, 2.0), (-0.4, -0.4), (5.0, 4.0), (-3.0, -2.5), (-13.0, -13.1),
         (-13.2, -12.9), (13.0, 13.3), (-10.0, -9.8), (-12.5, 12.5), (-87.0, -86.5), (-88.0, -87.0),
         (-90.0, 1.0), (-100.0, -99.0), (40.0, -40.0)]


def _run(g, x, xn, cfg, **kw):
    return ak.avg_act_backward(g, x, xn, cfg[0], backend="cpu", **cfg[1], **kw)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_subnormal_grad_out_is_not_flushed(cpu_level, cfg):
    """grad_out subnormal (down to the smallest, 1.4e-45): grad_in = g s rounded to float32's subnormal
    grid, as the reference gives it (never 0 where the reference is at least two subnormal ulps)."""
    k = kernel_act(cfg)
    x = torch.tensor([p[0] for p in PAIRS]).repeat(4)
    xn = torch.tensor([p[1] for p in PAIRS]).repeat(4)
    g = torch.tensor([1e-40, -3e-42, SUB_ULP, 1e-38]).repeat_interleave(len(PAIRS))
    assert (g.abs() < TINY).all() and (g != 0).all()
    out = _run(g, x, xn, cfg)
    ref = reference.avg_act_backward(g.double(), x.double(), xn.double(), k, EPS)
    s_ref = ref / g.double()
    # the SPEC bar on s, times |g|, plus half a subnormal ulp for rounding g s onto the grid; the fallback
    # lanes (d = 0) to PyTorch's float32 f' rounding.
    tol = (1e-5 * s_ref.abs() + 1e-6) * g.double().abs() + SUB_ULP / 2
    tol = tol + fp32_rounding_tol(ref, g.double(), x.double())
    bad = (out.double() - ref).abs() > tol
    assert not bad.any(), f"x={x[bad]}, x_new={xn[bad]}, g={g[bad]}: {out[bad]} vs {ref[bad]}"
    assert (out[ref.abs() >= 2 * SUB_ULP] != 0).all()


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_subnormal_x_and_d(cpu_level, cfg):
    """x, x_new and d subnormal: with the default eps the fallback f'(x) at a subnormal x (e.g. relu's
    f'(1e-40) = 1, not f'(0) = 0); with eps = 0 the secant over a subnormal step, which equals f'(x) to
    within 1e-38 relative (the float64 reference's literal secant cancels to 0 there, so it is compared
    with f'(x))."""
    k = kernel_act(cfg)
    x = torch.tensor([1e-40, -1e-40, 3e-39, -5e-39, 1e-44, 1e-40, -2e-39, 1e-39])
    xn = torch.tensor([3e-40, -2e-40, 1e-39, -1e-39, 3e-44, 0.5, 0.25, -1.0])
    g = torch.tensor([1.0, -2.0, 0.5, 3.0, 1.0, 1.0, -1.0, 2.0])
    tiny_d = (xn.double() - x.double()).abs() < 1e-30
    fprime = reference.avg_act_backward(g.double(), x.double(), xn.double(), k, EPS)
    for eps in (EPS, 0.0):
        out = _run(g, x, xn, cfg, eps=eps)
        ref = torch.where(tiny_d, fprime, reference.avg_act_backward(g.double(), x.double(), xn.double(), k, eps))
        tol = (1e-5 * (ref / g.double()).abs() + 1e-6) * g.double().abs() + fp32_rounding_tol(ref, g.double(), x.double())
        bad = (out.double() - ref).abs() > tol
        assert not bad.any(), f"eps={eps}, x={x[bad]}, x_new={xn[bad]}: {out[bad]} vs {ref[bad]}"
    if cfg[0] == "relu":
        assert _run(g[:1], x[:1], xn[:1], cfg).item() == 1.0  # f'(1e-40) = 1: x was not read as 0


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_near_float_max(cpu_level, cfg):
    """|x| and |x_new| near FLT_MAX = 3.4e38, including d = x_new - x overflowing to +-inf (the secant is
    then below 1e-38 for bounded f, and the asymptotic slope for the others)."""
    k = kernel_act(cfg)
    pairs = [(3e38, 2.9e38), (-3e38, -2.9e38), (3e38, -3e38), (-3e38, 3e38), (1e38, -3e38), (3e38, 3e38),
             (-3e38, -3e38), (3.4e38, 1.0), (-1.0, -3.4e38), (2e38, 2e38 * (1 + 2e-7))]
    x = torch.tensor([p[0] for p in pairs])
    xn = torch.tensor([p[1] for p in pairs])
    assert torch.isfinite(x).all() and torch.isfinite(xn).all()
    g = torch.ones_like(x)
    out = _run(g, x, xn, cfg)
    ref = reference.avg_act_backward(g.double(), x.double(), xn.double(), k, EPS)
    assert torch.isfinite(out).all()
    mask, bad, _, _ = slope_errors(out, g, x, xn, k)
    assert not bad.any(), f"x={x[bad]}, x_new={xn[bad]}: {out[bad]} vs {ref[bad]}"
    fb = ~mask  # x == x_new: PyTorch's f'(x), to float32 rounding
    assert ((out.double() - ref)[fb].abs() <= 1e-6 + fp32_rounding_tol(ref, g.double(), torch.zeros_like(ref))[fb]).all()


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] in ("sigmoid", "tanh", "gelu", "silu", "elu", "softplus")],
                         ids=config_id)
def test_tails_below_flt_min(cpu_level, cfg, fresh_seed):
    """Where e^{-y} (or erfc) falls below FLT_MIN the kernels use 0 for it: s meets SPEC's bar there, and
    the normwise bar holds over a sweep through those tails."""
    k = kernel_act(cfg)
    x = torch.cat([torch.linspace(-110, -5, 20001), torch.linspace(5, 110, 2001)])
    d = torch.empty_like(x).uniform_(-12, 1).exp() * torch.where(torch.rand_like(x) < 0.5, -1.0, 1.0)
    g = torch.randn_like(x)
    out = _run(g, x, x + d, cfg)
    mask, bad, normwise, ref = slope_errors(out, g, x, x + d, k)
    assert not bad.any(), f"x={x[bad][:4]}, x_new={(x + d)[bad][:4]}: {out[bad][:4]} vs {ref[bad][:4]}"
    assert normwise <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [0.5, 1e-10])
def test_softplus_step_below_beta_underflow(cpu_level, dtype, beta):
    """softplus with beta < 1 over a subnormal step: beta·|d| underflows to 0 (or to a few subnormal ulps)
    although d does not, so delta / (beta |d|) was 0 / 0 = NaN (found by the property tests: x = 0,
    x_new = -5e-324, beta = 0.5). The slope is sigma(beta x) to within beta |d|."""
    tiny = torch.finfo(dtype).smallest_normal * torch.finfo(dtype).eps  # the smallest subnormal
    x = torch.tensor([0.0, 0.0, -3.0, 2.0], dtype=dtype)
    xn = x - torch.tensor([tiny, 3 * tiny, 5 * tiny, 7 * tiny], dtype=dtype)
    g = torch.ones_like(x)
    want = torch.sigmoid(beta * x.double())
    for backend in ("reference", "cpu"):
        got = ak.avg_act_backward(g, x, xn, "softplus", beta=beta, threshold=20.0, eps=0.0, backend=backend)
        assert torch.isfinite(got).all(), (backend, got)
        torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0, msg=lambda m: f"{backend}: {m}")
