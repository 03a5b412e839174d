"""The activation registry: names, parameters, PyTorch's own forward and backward for each.

Mirrors ``csrc/include/avg_kernels/activations.h`` (kernel ids) and
``avg_kernels/_triton/avg_act.py``. SPEC §1 defines the math.
"""
from __future__ import annotations

import math
from types import MappingProxyType
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

#: float32 machine epsilon, the papers' epsilon: |x_new - x| <= EPS falls back to f'(x).
EPS = 1.1920929e-07

#: Public names and their parameters with PyTorch's defaults (read-only).
ACTIVATIONS = MappingProxyType({
    "tanh": MappingProxyType({}),
    "sigmoid": MappingProxyType({}),
    "relu": MappingProxyType({}),
    "leaky_relu": MappingProxyType({"negative_slope": 0.01}),
    "elu": MappingProxyType({"alpha": 1.0}),
    "gelu": MappingProxyType({"approximate": "none"}),
    "silu": MappingProxyType({}),
    "softplus": MappingProxyType({"beta": 1.0, "threshold": 20.0}),
})

#: Kernel-level activations, in the order of ``enum class Act`` (gelu is split by ``approximate``).
KERNEL_ACTS = ("tanh", "sigmoid", "relu", "leaky_relu", "elu", "gelu", "gelu_tanh", "silu", "softplus")


class KernelAct(NamedTuple):
    """An activation resolved for the kernels: ``name`` in KERNEL_ACTS and two numeric parameters."""

    name: str
    p0: float = 0.0
    p1: float = 0.0

    @property
    def kernel_id(self) -> int:
        return KERNEL_ACTS.index(self.name)


def resolve(act: str, params: dict) -> KernelAct:
    """Validates ``act`` and its keyword ``params``; returns the kernel-level description.

    Raises ValueError for an unknown name or a bad value, TypeError for an unknown parameter
    or a parameter of the wrong type, each naming the offending argument.
    """
    if not isinstance(act, str):
        raise TypeError(f"act must be a str naming an activation, got {type(act).__name__}")
    if act not in ACTIVATIONS:
        raise ValueError(f"act={act!r} is not a supported activation; expected one of {sorted(ACTIVATIONS)}")
    allowed = ACTIVATIONS[act]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(f"act={act!r} takes parameters {sorted(allowed) or 'none'}; got unexpected {unknown}")
    full = {**allowed, **params}
    for key, value in full.items():
        if key == "approximate":
            if value not in ("none", "tanh"):
                raise ValueError(f"approximate={value!r}: expected 'none' or 'tanh'")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{key}={value!r} must be finite")
    if act == "leaky_relu":
        return KernelAct("leaky_relu", float(full["negative_slope"]))
    if act == "elu":
        return KernelAct("elu", float(full["alpha"]))
    if act == "gelu":
        return KernelAct("gelu_tanh" if full["approximate"] == "tanh" else "gelu")
    if act == "softplus":
        if full["beta"] <= 0:
            raise ValueError(f"beta={full['beta']!r}: softplus needs beta > 0")
        return KernelAct("softplus", float(full["beta"]), float(full["threshold"]))
    return KernelAct(act)


def forward(x: torch.Tensor, k: KernelAct) -> torch.Tensor:
    """f(x) through the matching torch.nn.functional op (bitwise PyTorch's forward)."""
    return _FORWARD[k.name](x, k)


def native_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: KernelAct) -> torch.Tensor:
    """grad * f'(x) exactly as PyTorch's autograd computes it (``y`` = f(x), used by tanh/sigmoid/relu)."""
    return _BACKWARD[k.name](grad, x, y, k)


def asymptotic_slopes(k: KernelAct) -> tuple[float, float]:
    """lim f(x)/x at +inf and -inf: the secant's limit when exactly one end is infinite."""
    if k.name in ("tanh", "sigmoid"):
        return 0.0, 0.0
    return 1.0, (k.p0 if k.name == "leaky_relu" else 0.0)


def is_bounded(k: KernelAct) -> bool:
    return k.name in ("tanh", "sigmoid")


aten = torch.ops.aten
_FORWARD: dict[str, Callable] = {
    "tanh": lambda x, k: torch.tanh(x),
    "sigmoid": lambda x, k: torch.sigmoid(x),
    "relu": lambda x, k: F.relu(x),
    "leaky_relu": lambda x, k: F.leaky_relu(x, k.p0),
    "elu": lambda x, k: F.elu(x, k.p0),
    "gelu": lambda x, k: F.gelu(x),
    "gelu_tanh": lambda x, k: F.gelu(x, approximate="tanh"),
    "silu": lambda x, k: F.silu(x),
    "softplus": lambda x, k: F.softplus(x, k.p0, k.p1),
}
# The formulas derivatives.yaml gives for each forward (so gradients are bitwise PyTorch's).
_BACKWARD: dict[str, Callable] = {
    "tanh": lambda g, x, y, k: aten.tanh_backward(g, y),
    "sigmoid": lambda g, x, y, k: aten.sigmoid_backward(g, y),
    "relu": lambda g, x, y, k: aten.threshold_backward(g, y, 0),
    "leaky_relu": lambda g, x, y, k: aten.leaky_relu_backward(g, x, k.p0, False),
    "elu": lambda g, x, y, k: aten.elu_backward(g, k.p0, 1, 1, False, x),
    "gelu": lambda g, x, y, k: aten.gelu_backward(g, x),
    "gelu_tanh": lambda g, x, y, k: aten.gelu_backward(g, x, approximate="tanh"),
    "silu": lambda g, x, y, k: aten.silu_backward(g, x),
    "softplus": lambda g, x, y, k: aten.softplus_backward(g, x, k.p0, k.p1),
}
