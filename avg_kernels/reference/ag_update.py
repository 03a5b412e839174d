"""Reference AG-1 update and AG-2 rescale (SPEC §2), evaluated in float64.

Readable first: one tensor at a time, every value widened to float64, one rounding to the
parameter's dtype at the end. Every fast backend is tested against these two functions.
"""
from __future__ import annotations

import math
import sys
from typing import Optional, Sequence

import torch


def numpy_sign(g: torch.Tensor) -> torch.Tensor:
    """sign(g) with numpy's conventions: -1, 0 (for +0 and -0), +1, and NaN for NaN.

    ``torch.sign(nan)`` is 0, which would silently freeze a parameter whose averaged gradient is
    NaN; SPEC §2 wants the NaN to reach the parameter.
    """
    return torch.where(g.isnan(), g, torch.sign(g))


def ag1_update_(params: Sequence[torch.Tensor], params_new: Sequence[torch.Tensor],
                avg_grads: Sequence[Optional[torch.Tensor]]) -> None:
    """θ ← θ − |θ' − θ| ⊙ sign(ḡ), in place on ``params`` (float64 arithmetic).

    * ``avg_grads[i] is None``: ``params[i]`` is skipped.
    * ḡ = 0 (either sign of zero): the parameter keeps its value exactly, whatever θ' is (also
      when θ' is not finite, where the product ``|θ' − θ| · 0`` would be NaN).
    * ḡ = NaN: the element becomes NaN (numpy's ``sign(nan) = nan``).
    """
    for p, p_new, g in zip(params, params_new, avg_grads):
        if g is not None:
            p.detach().copy_(_ag1(p, p_new, g))


def ag1_update_new_(params: Sequence[torch.Tensor], params_new: Sequence[torch.Tensor],
                    avg_grads: Sequence[Optional[torch.Tensor]]) -> None:
    """The same θ_{t+1} as ``ag1_update_``, written over ``params_new`` (θ'); ``params`` is not changed."""
    for p, p_new, g in zip(params, params_new, avg_grads):
        if g is not None:
            p_new.detach().copy_(_ag1(p, p_new, g))


def _ag1(p: torch.Tensor, p_new: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """θ − |θ' − θ| ⊙ sign(ḡ) in float64 (the conventions of ``ag1_update_``)."""
    t = p.detach().double()
    d = (p_new.detach().double() - t).abs()
    g64 = g.detach().double()
    return torch.where(g64 > 0, t - d, torch.where(g64 < 0, t + d, torch.where(g64 == 0, t, g64)))


def l1_norms(params: Sequence[torch.Tensor], params_old: Sequence[torch.Tensor],
             params_step: Sequence[torch.Tensor]) -> tuple[float, float]:
    """(‖θ' − θ‖₁, ‖θ'' − θ‖₁) over all tensors of the call, in float64."""
    step = sum((s.detach().double() - o.detach().double()).abs().sum().item()
               for s, o in zip(params_step, params_old))
    delta = sum((p.detach().double() - o.detach().double()).abs().sum().item()
                for p, o in zip(params, params_old))
    return float(step), float(delta)


def ag2_factors(a: float, b: float) -> tuple[float, float, float]:
    """The AG-2 scale a / b (a = ‖θ' − θ‖₁, b = ‖Δ‖₁) as factors (u1, u2, v), u1·u2·v = a / b up to one rounding,
    that neither overflow nor underflow (csrc/include/avg_kernels/ag2_scale.h explains them; every backend
    computes the same): a / b a normal double → (1, 1, a / b); a / b > DBL_MAX → (2^k1, 2^k2, a / (b·2^k)) with
    b·2^k in [1, 2); 0 < a / b < DBL_MIN → (a·2^j / b, 1, 2^-j). The update is θ + ((Δ·u1)·u2)·v."""
    q = a / b if b != 0 else 0.0
    dmax, dmin = sys.float_info.max, sys.float_info.min
    if not (0 < a <= dmax and 0 < b <= dmax) or dmin <= q <= dmax:
        return 1.0, 1.0, q
    if q > dmax:
        k = -(math.frexp(b)[1] - 1)
        k1 = min(k, 1023)
        u1, u2 = math.ldexp(1.0, k1), math.ldexp(1.0, k - k1)
        return u1, u2, a / (b * u1 * u2)
    j = min(1021 - (math.frexp(a)[1] - 1), 1074)
    j1 = min(j, 1023)
    return a * math.ldexp(1.0, j1) * math.ldexp(1.0, j - j1) / b, 1.0, math.ldexp(1.0, -j)


def ag2_rescale_(params: Sequence[torch.Tensor], params_old: Sequence[torch.Tensor],
                 params_step: Sequence[torch.Tensor]) -> None:
    """θ ← θ + Δ · ‖θ' − θ‖₁ / ‖Δ‖₁ with Δ = θ'' − θ, in place on ``params`` (which hold θ'').

    ``params_old`` holds θ, ``params_step`` θ' (the plain gradient step). Both norms run over all
    tensors of the call. ‖Δ‖₁ = 0: nothing changes. Non-finite values follow the formula: a NaN or
    infinite Δ anywhere makes the scale NaN or 0 for every tensor of the call, like any global norm
    (``torch.nn.utils.clip_grad_norm_`` behaves the same way).
    """
    n_step, n_delta = l1_norms(params, params_old, params_step)
    if n_delta == 0:
        return
    u1, u2, scale = ag2_factors(n_step, n_delta)  # a ratio outside double's range as factors
    for p, o in zip(params, params_old):
        t = o.detach().double()
        d = p.detach().double() - t
        r = t + (d * scale if u1 == u2 == 1.0 else d * u1 * u2 * scale)
        p.detach().copy_(r)
