"""Input generators and SPEC §1 accuracy bars shared by the averaged-activation tests."""
from __future__ import annotations

import math

import torch

from avg_kernels import EPS, reference
from avg_kernels.activations import KernelAct, forward, resolve

# Every activation and parameter setting the tests sweep: (public name, params). It covers every
# kernel-level activation of the table (tests/test_activation_table.py checks).
CONFIGS = [
    ("tanh", {}),
    ("sigmoid", {}),
    ("relu", {}),
    ("leaky_relu", {}),
    ("leaky_relu", {"negative_slope": 0.2}),
    ("elu", {}),
    ("elu", {"alpha": 0.5}),
    ("gelu", {}),
    ("gelu", {"approximate": "tanh"}),
    ("silu", {}),
    ("softplus", {}),
    ("softplus", {"beta": 2.0, "threshold": 10.0}),
    ("hardswish", {}),
    ("hardsigmoid", {}),
    ("hardtanh", {}),
    ("relu6", {}),
    # float32 values: the helpers below hand float32 data to the reference as float64, where bounds like -0.3
    # would not be rounded to float32 as PyTorch's f on float32 tensors has them (test_avg_act and the
    # property tests cover such bounds)
    ("hardtanh", {"min_val": -0.5, "max_val": 2.5}),
]
# Activations whose literal float32 secant misses SPEC §1's bar: f(x) is rounded, then f(b) - f(a) cancels
# (relu, leaky_relu and hardtanh are exact: their f is x, a·x or a bound).
CANCELLING = {"tanh", "sigmoid", "elu", "gelu", "silu", "softplus", "hardswish", "hardsigmoid"}


def config_id(cfg) -> str:
    act, params = cfg
    return act + "".join(f"-{k}={v}" for k, v in params.items())


def spec_inputs(n: int, dtype=torch.float32, device="cpu", generator=None):
    """(grad_out, x, x_new) as SPEC §1 prescribes: x spans saturation (|x| <= 30, half of them
    within |x| <= 3), d = x_new - x log-uniform in [1e-7, 10] with random sign."""
    kw = dict(dtype=torch.float64, generator=generator)
    x = (torch.rand(n, **kw) * 2 - 1) * 30
    x = torch.where(torch.rand(n, **kw) < 0.5, x, x / 10)
    d = torch.empty(n, dtype=torch.float64).uniform_(math.log(1e-7), math.log(10), generator=generator).exp()
    d = d * torch.where(torch.rand(n, **kw) < 0.5, -1.0, 1.0)
    g = torch.randn(n, **kw)
    return tuple(t.to(dtype=dtype, device=device) for t in (g, x, x + d))


def slope_errors(out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, k: KernelAct,
                 eps: float = EPS):
    """Compares grad_in = ``out`` with the float64 reference on the same inputs.

    Returns (mask of elements with |d| > eps, elementwise bar violations among them, normwise
    relative error over them, reference grad_in in float64).
    """
    ref = reference.avg_act_backward(g.double(), x.double(), x_new.double(), k, eps)
    d = (x_new.double() - x.double()).abs()
    mask = d > eps
    s_ref = ref / g.double()
    s = out.double() / g.double()
    violations = ((s - s_ref).abs() > 1e-5 * s_ref.abs() + 1e-6) & mask & (g != 0)
    normwise = ((out.double() - ref)[mask].norm() / ref[mask].norm()).item()
    return mask, violations, normwise, ref


def reduced_precision_violations(out: torch.Tensor, g: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 grad_in (``out``) against the float64 reference ``ref``: arithmetic in float32, so
    the only extra error allowed is rounding grad_in once (half an ulp of the dtype). True where violated."""
    tiny = torch.finfo(out.dtype).tiny
    ulp = torch.finfo(out.dtype).eps * ref.abs().clamp(min=tiny)  # spacing of dtype just above |ref|
    err = (out.cpu().double() - ref).abs()
    fp32_err = 1e-5 * ref.abs() + 1e-6 * g.cpu().double().abs()
    return err > 0.5 * ulp + fp32_err + tiny


def float64_violations(out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, k: KernelAct,
                       eps: float = EPS) -> torch.Tensor:
    """float64 grad_in against the reference, to the reference's own rounding error (PyTorch's float64 f is
    accurate to ~eps (|f(x)| + |x|): e.g. gelu's 1 + erf(x) cancels) over |d|, plus 1e-12 relative. True
    where violated."""
    ref = reference.avg_act_backward(g, x, x_new, k, eps)
    e64 = torch.finfo(torch.float64).eps
    ref_err = 4 * e64 * (forward(x, k).abs() + forward(x_new, k).abs() + x.abs() + x_new.abs()) / (
        x_new - x).abs().clamp(min=eps)
    tol = (1e-12 * (ref / g).abs() + ref_err + 1e-300) * g.abs()
    return (out - ref).abs() > tol


def literal_float32(g, x, x_new, k: KernelAct, eps: float = EPS):
    """The naive secant in float32, as the papers evaluate it (fails SPEC's bar for smooth f)."""
    d = x_new - x
    s = (forward(x_new, k) - forward(x, k)) / d
    return g * s


def kernel_act(cfg) -> KernelAct:
    return resolve(*cfg)


def fp32_rounding_tol(value: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, ulps: float = 8.0) -> torch.Tensor:
    """'Equal to float32 rounding': a few float32 ulps of |value| plus the absolute rounding that
    PyTorch's own float32 backward formulas make, |grad| (1 + |x|) ulps (e.g. 1 - tanh^2, or
    x (1 - sigmoid(x)) in silu's, whose error grows with |x|)."""
    e32 = torch.finfo(torch.float32).eps
    return ulps * e32 * (value.abs() + grad.abs() * (1 + x.abs()))


def non_finite_inputs():
    """(grad_out, x, x_new), float32: NaN/±inf in each argument and in pairs, huge and ordinary pairs, and
    NaN/±inf in grad_out (the last three elements), for the elementwise-propagation tests."""
    inf, nan = math.inf, math.nan
    pairs = [(0.3, nan), (nan, 0.3), (nan, nan), (0.3, inf), (0.3, -inf), (inf, 0.3), (-inf, 0.3),
             (inf, inf), (-inf, -inf), (inf, -inf), (-inf, inf), (-50.0, inf), (50.0, -inf), (0.0, 0.0),
             (1e30, -1e30), (-1e30, 2e30), (1e6, 1e6 + 1), (-1e4, -1e4 + 2), (1.0, 1.5), (-2.0, 3.0)]
    x = torch.tensor([p[0] for p in pairs] + [0.5, 0.5, 0.5])
    xn = torch.tensor([p[1] for p in pairs] + [0.7, 0.7, 0.7])
    g = torch.ones_like(x)
    g[-3], g[-2], g[-1] = nan, inf, -inf
    return g, x, xn
