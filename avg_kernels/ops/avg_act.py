"""The averaged activation ops (SPEC §1):

* ``avg_act_backward``: grad_in = grad_out * s(x, x_new);
* ``avg_act``: f(x) whose backward is the averaged one when x_new is given.

Backends of avg_act_backward: "reference" (avg_kernels/reference/avg_act.py), "cpu" (csrc/cpu/avg_act.cpp,
kernels in csrc/cpu/kernels/avg_act.cpp), "triton" (avg_kernels/_triton/avg_act.py), "cuda"
(csrc/cuda/avg_act.cu). Declared through the registry (ops/_registry.py).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from .. import activations, reference
from .._contract import args
from .._contract.outputs import new_output
from ..activations import EPS, KERNEL_ACTS, KernelAct
from ._registry import Autograd, Op, OpSpec


def kernel_act(act, params) -> KernelAct:
    """The kernel-level activation of the ops' (act, params) arguments, validated (direct torch.ops calls
    included): a name in KERNEL_ACTS, two finite numbers, softplus's beta > 0, hardtanh's min_val <= max_val.
    Memoised: every averaged backward of an AG step calls it."""
    try:
        return _kernel_act(act, *params)
    except TypeError:  # an unhashable or wrongly typed argument: the uncached check names it
        return _kernel_act.__wrapped__(act, *params)


@functools.lru_cache(maxsize=256)
def _kernel_act(act, *params) -> KernelAct:
    if act not in KERNEL_ACTS:
        raise ValueError(f"act={act!r} is not a kernel activation; expected one of {list(KERNEL_ACTS)}")
    if len(params) != 2:
        raise ValueError(f"params must hold 2 numbers (p0, p1), got {len(params)}")
    p0, p1 = float(params[0]), float(params[1])
    if not (math.isfinite(p0) and math.isfinite(p1)):
        raise ValueError(f"params={[p0, p1]} of act={act!r} must be finite")
    if act == "softplus" and not p0 > 0:
        raise ValueError(f"beta={p0!r}: softplus needs beta > 0")
    if act == "hardtanh" and not p0 <= p1:
        raise ValueError(f"min_val={p0!r} > max_val={p1!r}: hardtanh needs min_val <= max_val")
    return KernelAct(act, p0, p1)


# ----------------------------------------------------------------------------------------------
# avg_act_backward

class BackwardCall(NamedTuple):
    grad_out: torch.Tensor
    x: torch.Tensor
    x_new: torch.Tensor
    k: KernelAct
    eps: float


def _check_backward(grad_out, x, x_new, act, params, eps, *, fake: bool) -> BackwardCall:
    args.tensor("x", x)
    args.tensor("grad_out", grad_out)
    args.tensor("x_new", x_new)
    args.same_meta("x", x, grad_out=grad_out, x_new=x_new)
    return BackwardCall(grad_out, x, x_new, kernel_act(act, params), args.nonneg_real("eps", eps))


def _compiled(c: BackwardCall):
    out = new_output(c.x.shape, c.x)
    torch.ops.avg_kernels_C.avg_act_backward_out(c.grad_out, c.x, c.x_new, out, c.k.kernel_id, c.k.p0, c.k.p1, c.eps)
    return out


def _triton(c: BackwardCall):
    from .._triton.avg_act import avg_act_backward as triton_avg_act_backward

    return triton_avg_act_backward(c.grad_out, c.x, c.x_new, c.k, c.eps)


AVG_ACT_BACKWARD = Op(OpSpec(
    schema="avg_act_backward(Tensor grad_out, Tensor x, Tensor x_new, str act, float[] params, float eps, "
           "str backend='auto') -> Tensor",
    check=_check_backward,
    fake=lambda c: c.x.new_empty(c.x.shape),
    device=lambda c: c.x.device,
    backends={"reference": lambda c: reference.avg_act_backward(c.grad_out, c.x, c.x_new, c.k, c.eps),
              "cpu": _compiled, "cuda": _compiled, "triton": _triton},
))


# ----------------------------------------------------------------------------------------------
# avg_act

class ForwardCall(NamedTuple):
    x: torch.Tensor
    x_new: Optional[torch.Tensor]
    k: KernelAct
    eps: float


def _check_forward(x, x_new, act, params, eps, *, fake: bool) -> ForwardCall:
    args.tensor("x", x)
    if x_new is not None:
        args.tensor("x_new", x_new)
        args.same_meta("x", x, x_new=x_new)
    return ForwardCall(x, x_new, kernel_act(act, params), args.nonneg_real("eps", eps))


def averaged_backward(grad, x, y, x_new, k: KernelAct, eps: float, backend: str, *, eager: bool = False):
    """The backward of an averaged activation call, for both autograd paths (the ``avg_act`` op, and the AG
    recorder's slots in avg_kernels/nn/_recording.py): PyTorch's own f' formula when ``x_new`` is None
    (bitwise PyTorch's gradient; ``y`` = f(x), which some of those formulas read), else
    ``grad * s(x, x_new)``. ``eager``: through the op's no-autograd fast path."""
    if x_new is None:
        return activations.native_backward(grad, x, y, k)
    op = AVG_ACT_BACKWARD.eager if eager else AVG_ACT_BACKWARD
    return op(grad, x, x_new, k.name, [k.p0, k.p1], eps, backend)


def _setup_context(ctx, inputs, output):
    x, x_new, act, params, eps, backend = inputs
    ctx.save_for_backward(x, x_new, output)
    ctx.k = kernel_act(act, params)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad):
    x, x_new, y = ctx.saved_tensors
    return averaged_backward(grad, x, y, x_new, ctx.k, ctx.eps, ctx.backend), None, None, None, None, None


AVG_ACT = Op(OpSpec(
    schema="avg_act(Tensor x, Tensor? x_new, str act, float[] params, float eps, str backend='auto') -> Tensor",
    check=_check_forward,
    fake=lambda c: c.x.new_empty(c.x.shape),
    run=lambda c, backend: activations.forward(c.x, c.k),  # the backend serves the averaged backward
    autograd=Autograd(_backward, _setup_context),
))


# ----------------------------------------------------------------------------------------------
# Public wrappers

def _eps(eps) -> float:
    """eps as the schema's float: a float passes (the op checks its value), anything else is checked here,
    before the dispatcher would turn True into 1.0 or reject '0.5' with a RuntimeError."""
    return eps if type(eps) is float else args.nonneg_real("eps", eps)


@functools.lru_cache(maxsize=256)
def _resolve_cached(act, params: tuple) -> KernelAct:
    return activations.resolve(act, dict(params))


def _resolve_act(act, params: dict) -> KernelAct:
    """activations.resolve, memoised for hashable arguments (the wrappers' per-call cost)."""
    try:
        return _resolve_cached(act, tuple(sorted(params.items())))
    except TypeError as exc:
        if "unhashable" not in str(exc):
            raise
        return activations.resolve(act, params)  # raises the argument's own error


@AVG_ACT.public
def avg_act(x: torch.Tensor, act: str, x_new: Optional[torch.Tensor] = None, *, eps: float = EPS, **params):
    """f(x) for activation ``act``, differentiable with the averaged backward when ``x_new`` is given.

    Args:
        x: input, any shape, float16/bfloat16/float32/float64.
        act: one of ``avg_kernels.ACTIVATIONS`` (parameters as keywords, e.g. ``negative_slope=0.1``).
        x_new: the same layer input at the candidate parameters (same shape, dtype, device as x);
            never receives a gradient. None: the backward is PyTorch's own (bitwise).
        eps: |x_new - x| <= eps uses f'(x) instead of the secant.
        backend: "reference", "cpu", "triton", "cuda" or None/"auto" (see ``use_backend``).

    Returns f(x), computed by the matching torch.nn.functional op (bitwise PyTorch's forward).
    Its gradient w.r.t. x is ``grad * s(x, x_new)`` (SPEC §1).
    """
    k = _resolve_act(act, params)
    return args.is_tensor("x", x), args.is_tensor("x_new", x_new, optional=True), k.name, [k.p0, k.p1], _eps(eps)


@AVG_ACT_BACKWARD.public
def avg_act_backward(grad_out: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, act: str, *, eps: float = EPS,
                     **params):
    """grad_in = grad_out * s(x, x_new), the averaged activation backward of SPEC §1.

    ``s = (f(x_new) - f(x)) / (x_new - x)`` where ``|x_new - x| > eps``, else ``f'(x)``, computed
    without cancellation (float32 arithmetic for float16/bfloat16/float32, float64 for float64).

    Accuracy (docs/numerics.md), against the exact value of the rounded inputs: elementwise
    ``|grad_in - g*s| <= 1e-5*|g*s| + 1e-6*|g|`` (plus the final rounding for float16/bfloat16); the
    ``|x_new - x| <= eps`` decision is taken on exact values (eps as the exact double given); no NaN where
    the exact value is finite; ``grad_out = ±inf`` gives ``±inf`` with the sign of the exact slope (also
    where it underflows), NaN where the slope is exactly 0.

    Args:
        grad_out, x, x_new: tensors of one shape, dtype and device (any shape, non-contiguous ok).
        act: one of ``avg_kernels.ACTIVATIONS``; its parameters as keywords.
        eps: fallback threshold (>= 0), default ``avg_kernels.EPS``.
        backend: "reference", "cpu", "triton", "cuda" or None/"auto".

    Returns a new contiguous tensor of x's shape and dtype.
    """
    k = _resolve_act(act, params)
    if not (isinstance(grad_out, torch.Tensor) and isinstance(x, torch.Tensor) and isinstance(x_new, torch.Tensor)):
        for name, t in (("grad_out", grad_out), ("x", x), ("x_new", x_new)):
            args.is_tensor(name, t)
    return grad_out, x, x_new, k.name, [k.p0, k.p1], _eps(eps)
