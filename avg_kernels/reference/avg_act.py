"""Reference averaged activation backward (SPEC §1), evaluated in float64."""
from __future__ import annotations

import torch

from ..activations import KernelAct, asymptotic_slopes, forward, is_bounded, native_backward


def avg_act_backward(grad_out: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, k: KernelAct,
                     eps: float) -> torch.Tensor:
    """grad_out * s(x, x_new): the literal secant of PyTorch's f, in float64.

    Where |x_new - x| <= eps, s is PyTorch's own f'(x) (its backward formula, in float64). When
    x or x_new is not finite: NaN -> NaN; one end infinite -> the secant's limit (the asymptotic
    slope at that end); both infinite -> NaN, or 0 for bounded f with ends of opposite sign.
    Returns a contiguous tensor with grad_out's dtype.
    """
    g, a, b = grad_out.double(), x.double(), x_new.double()
    fa, fb = forward(a, k), forward(b, k)
    d = b - a
    s = (fb - fa) / d
    fprime = native_backward(torch.ones_like(a), a, fa, k)
    s = torch.where(d.abs() <= eps, fprime, s)

    pos, neg = asymptotic_slopes(k)
    a_inf, b_inf = a.isinf(), b.isinf()
    inf_end = torch.where(a_inf, a, b)
    s = torch.where(a_inf ^ b_inf, torch.where(inf_end > 0, pos, neg), s)
    both = torch.full_like(s, float("nan"))
    if is_bounded(k):
        both = torch.where(a == b, both, 0.0)
    s = torch.where(a_inf & b_inf, both, s)
    s = torch.where(a.isnan() | b.isnan(), float("nan"), s)
    return (g * s).to(grad_out.dtype).contiguous()
