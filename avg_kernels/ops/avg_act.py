"""The averaged activation ops (SPEC §1):

* ``torch.ops.avg_kernels.avg_act_backward``: grad_in = grad_out * s(x, x_new);
* ``torch.ops.avg_kernels.avg_act``: f(x) whose backward is the averaged one when x_new is given.

Backends: "reference" (avg_kernels/reference/avg_act.py), "cpu" (csrc/cpu/avg_act.cpp, kernels
in csrc/cpu/kernels/avg_act.cpp),
"triton" (avg_kernels/_triton/avg_act.py), "cuda" (csrc/cuda/avg_act.cu).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from .. import activations, reference
from ..activations import EPS, KERNEL_ACTS, KernelAct
from . import _backend, _checks, _library
from ._alloc import new_output

_OP = "avg_act_backward"


def _kernel_act(act: str, params: list[float]) -> KernelAct:
    if act not in KERNEL_ACTS:
        raise ValueError(f"act={act!r} is not a kernel activation; expected one of {list(KERNEL_ACTS)}")
    if len(params) != 2:
        raise ValueError(f"params must hold 2 numbers (p0, p1), got {len(params)}")
    return KernelAct(act, float(params[0]), float(params[1]))


def _check_backward_args(grad_out, x, x_new, eps) -> None:
    _checks.tensor("x", x)
    _checks.tensor("grad_out", grad_out)
    _checks.tensor("x_new", x_new)
    _checks.same_meta("x", x, grad_out=grad_out, x_new=x_new)
    _checks.nonneg_real("eps", eps)


def _run_cpu_or_cuda(grad_out, x, x_new, k: KernelAct, eps):
    out = new_output(x.shape, x)
    torch.ops.avg_kernels_C.avg_act_backward_out(grad_out, x, x_new, out, k.kernel_id, k.p0, k.p1, eps)
    return out


def _run_triton(grad_out, x, x_new, k: KernelAct, eps):
    from .._triton.avg_act import avg_act_backward as triton_avg_act_backward

    return triton_avg_act_backward(grad_out, x, x_new, k, eps)


_IMPLS = {
    "reference": reference.avg_act_backward,
    "cpu": _run_cpu_or_cuda,
    "cuda": _run_cpu_or_cuda,
    "triton": _run_triton,
}


def backward_kernel(grad_out, x, x_new, k: KernelAct, eps: float, backend: str = "auto") -> torch.Tensor:
    """avg_act_backward for an already parsed activation, below the op's dispatcher layer: for internal
    eager callers (the AG recorder's backward, once per activation per step), ~20 us less per call."""
    _check_backward_args(grad_out, x, x_new, eps)
    return _IMPLS[_backend.resolve(_OP, backend, x.device)](grad_out, x, x_new, k, eps)


def _avg_act_backward_impl(grad_out, x, x_new, act, params, eps, backend="auto"):
    return backward_kernel(grad_out, x, x_new, _kernel_act(act, params), eps, backend)


def _avg_act_backward_fake(grad_out, x, x_new, act, params, eps, backend="auto"):
    _check_backward_args(grad_out, x, x_new, eps)
    _kernel_act(act, params)
    return x.new_empty(x.shape)


avg_act_backward_op = _library.define(
    "avg_act_backward(Tensor grad_out, Tensor x, Tensor x_new, str act, float[] params, float eps, "
    "str backend='auto') -> Tensor", _avg_act_backward_impl, _avg_act_backward_fake)


def _avg_act_impl(x, x_new, act, params, eps, backend="auto"):
    return activations.forward(x, _kernel_act(act, params))


def _avg_act_fake(x, x_new, act, params, eps, backend="auto"):
    _kernel_act(act, params)
    return x.new_empty(x.shape)


avg_act_op = _library.define(
    "avg_act(Tensor x, Tensor? x_new, str act, float[] params, float eps, str backend='auto') -> Tensor",
    _avg_act_impl, _avg_act_fake)


def _setup_context(ctx, inputs, output):
    x, x_new, act, params, eps, backend = inputs
    ctx.save_for_backward(x, x_new, output)
    ctx.k = _kernel_act(act, params)
    ctx.eps, ctx.backend = eps, backend


def _backward(ctx, grad):
    x, x_new, y = ctx.saved_tensors
    k = ctx.k
    if x_new is None:
        gx = activations.native_backward(grad, x, y, k)
    else:
        gx = torch.ops.avg_kernels.avg_act_backward(grad, x, x_new, k.name, [k.p0, k.p1], ctx.eps, ctx.backend)
    return gx, None, None, None, None, None


torch.library.register_autograd("avg_kernels::avg_act", _backward, setup_context=_setup_context)


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


def _check_forward_args(x, x_new, eps) -> None:
    _checks.tensor("x", x)
    if x_new is not None:
        _checks.tensor("x_new", x_new)
        _checks.same_meta("x", x, x_new=x_new)
    _checks.nonneg_real("eps", eps)


def avg_act(x: torch.Tensor, act: str, x_new: Optional[torch.Tensor] = None, *, eps: float = EPS,
            backend: Optional[str] = None, **params) -> torch.Tensor:
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
    k = activations.resolve(act, params)
    _check_forward_args(x, x_new, eps)
    return torch.ops.avg_kernels.avg_act(x, x_new, k.name, [k.p0, k.p1], float(eps), backend or "auto")


def avg_act_backward(grad_out: torch.Tensor, x: torch.Tensor, x_new: torch.Tensor, act: str, *,
                     eps: float = EPS, backend: Optional[str] = None, **params) -> torch.Tensor:
    """grad_in = grad_out * s(x, x_new), the averaged activation backward of SPEC §1.

    ``s = (f(x_new) - f(x)) / (x_new - x)`` where ``|x_new - x| > eps``, else ``f'(x)``, computed
    without cancellation (float32 arithmetic for float16/bfloat16/float32, float64 for float64).

    Args:
        grad_out, x, x_new: tensors of one shape, dtype and device (any shape, non-contiguous ok).
        act: one of ``avg_kernels.ACTIVATIONS``; its parameters as keywords.
        eps: fallback threshold (>= 0), default ``avg_kernels.EPS``.
        backend: "reference", "cpu", "triton", "cuda" or None/"auto".

    Returns a new contiguous tensor of x's shape and dtype.
    """
    k = _resolve_act(act, params)
    for name, t in (("grad_out", grad_out), ("x", x), ("x_new", x_new)):
        if not isinstance(t, torch.Tensor):  # the rest is validated inside the op
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return torch.ops.avg_kernels.avg_act_backward(grad_out, x, x_new, k.name, [k.p0, k.p1], float(eps),
                                                  backend or "auto")
