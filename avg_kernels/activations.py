"""The activation table: one record per activation, from which every layer of the package derives.

``TABLE`` holds one ``Activation`` per public name (``avg_act(act=...)``): its parameters with
PyTorch's defaults, the ``torch.nn`` module and ``torch.nn.functional`` function it stands for,
the kernel-level activations it resolves to, PyTorch's own forward and backward formulas, and its
asymptotic slopes. Derived from it:

* ``ACTIVATIONS``, ``KERNEL_ACTS``, ``KERNEL_IDS``, ``resolve``, ``forward``, ``native_backward``
  (here) and the float64 reference (``avg_kernels/reference/avg_act.py``);
* the modules of ``avg_kernels.nn`` (generated, one per record), ``avg_kernels.nn.functional`` and the
  swap/scan tables of ``avg_kernels.nn.convert``;
* the Triton activation ids (``avg_kernels/_triton/avg_act.py``).

The C++ side has the same table as an X-macro, ``AVG_KERNELS_ACTIVATIONS`` in
``csrc/include/avg_kernels/activations.h`` (enum, dispatch switch, CUDA instantiations);
``tests/test_activation_table.py`` checks that the two agree (names, ids, order, boundedness).
Adding an activation: a record here, a row of the X-macro, and its math (the header's
``avg_slope``/``act_value`` and the Triton mirror). SPEC §1 defines the math.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

#: float32 machine epsilon, the papers' epsilon: |x_new - x| <= EPS falls back to f'(x).
EPS = 1.1920929e-07


class KernelAct(NamedTuple):
    """An activation resolved for the kernels: ``name`` in KERNEL_ACTS and two numeric parameters."""

    name: str
    p0: float = 0.0
    p1: float = 0.0

    @property
    def kernel_id(self) -> int:
        return KERNEL_IDS[self.name]


@dataclass(frozen=True)
class Activation:
    """One row of the activation table (see the module docstring for what derives from it)."""

    #: public name: ``avg_act(act=name)``, ``avg_kernels.nn.functional.<name>``
    name: str
    #: the torch.nn module it replaces; ``avg_kernels.nn.<module.__name__>`` subclasses it
    module: type
    #: the torch.nn.functional function (what the module and the functional form call outside AG steps)
    functional: Callable
    #: kernel-level names it resolves to, in the order of the header's X-macro (their ids follow the
    #: table's order); usually just ``(name,)``
    kernels: tuple[str, ...]
    #: PyTorch's f for a resolved KernelAct: the torch.nn.functional call, so bitwise PyTorch's
    forward: Callable[[torch.Tensor, KernelAct], torch.Tensor]
    #: grad * f'(x) by the formula derivatives.yaml gives (bitwise PyTorch's gradient);
    #: arguments (grad, x, y = f(x), k)
    backward: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KernelAct], torch.Tensor]
    #: parameters with PyTorch's defaults; the keys are also the module's attribute names and the
    #: functional's keyword names
    params: Mapping[str, Any] = field(default_factory=dict)
    #: validated parameters (defaults filled in) -> KernelAct; None: ``kernels[0]`` with the numeric
    #: parameters, in order, as p0 and p1
    to_kernel: Optional[Callable[[dict], KernelAct]] = None
    #: f bounded at both ends (then its asymptotic slopes are 0); the header's X-macro says the same
    bounded: bool = False
    #: (lim f(x)/x at +inf, at -inf) for a KernelAct: the secant's limit when one end is infinite;
    #: None: (0, 0) when bounded, else (1, 0)
    slopes: Optional[Callable[[KernelAct], tuple[float, float]]] = None
    #: other torch functions computing f, as dotted paths under ``torch`` (``torch.sigmoid``,
    #: ``torch.special.expit``); ``convert``'s report looks for direct calls of them too
    torch_functions: tuple[str, ...] = ()
    #: ``backward`` as a differentiable composite, used when the gradient is itself differentiated
    #: (grad mode on during the backward: ``create_graph=True``), where ``backward``'s aten op has no
    #: derivative; the same switch derivatives.yaml makes for silu. None: ``backward`` is differentiable.
    graph_backward: Optional[Callable[[torch.Tensor, torch.Tensor, torch.Tensor, KernelAct], torch.Tensor]] = None

    def __post_init__(self):
        object.__setattr__(self, "params", MappingProxyType(dict(self.params)))

    @property
    def inplace(self) -> bool:
        """Whether the torch.nn module takes ``inplace`` (the averaged one then runs out of place)."""
        return "inplace" in inspect.signature(self.module).parameters

    def resolve(self, params: Mapping[str, Any]) -> KernelAct:
        """KernelAct of this activation for keyword ``params`` (validated; see ``resolve``)."""
        unknown = sorted(set(params) - set(self.params))
        if unknown:
            raise TypeError(f"act={self.name!r} takes parameters {sorted(self.params) or 'none'}; got unexpected {unknown}")
        full = {**self.params, **params}
        for key, value in full.items():
            if isinstance(self.params[key], str):
                continue  # a choice among names: checked by to_kernel
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{key} must be a real number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{key}={value!r} must be finite")
        if self.to_kernel is not None:
            return self.to_kernel(full)
        return KernelAct(self.kernels[0], *(float(v) for v in full.values()))

    def asymptotic_slopes(self, k: KernelAct) -> tuple[float, float]:
        if self.slopes is not None:
            return self.slopes(k)
        return (0.0, 0.0) if self.bounded else (1.0, 0.0)


aten = torch.ops.aten


def _gelu_kernel(p: dict) -> KernelAct:
    if p["approximate"] not in ("none", "tanh"):
        raise ValueError(f"approximate={p['approximate']!r}: expected 'none' or 'tanh'")
    return KernelAct("gelu_tanh" if p["approximate"] == "tanh" else "gelu")


def _gelu_approximate(k: KernelAct) -> str:
    return "tanh" if k.name == "gelu_tanh" else "none"


def _softplus_kernel(p: dict) -> KernelAct:
    if p["beta"] <= 0:
        raise ValueError(f"beta={p['beta']!r}: softplus needs beta > 0")
    return KernelAct("softplus", float(p["beta"]), float(p["threshold"]))


def _hardtanh_kernel(p: dict) -> KernelAct:
    # F.hardtanh's own rule (min_val == max_val is allowed there: f constant, slope 0)
    if p["min_val"] > p["max_val"]:
        raise ValueError(f"min_val={p['min_val']!r} > max_val={p['max_val']!r}: hardtanh needs min_val <= max_val")
    return KernelAct("hardtanh", float(p["min_val"]), float(p["max_val"]))


def _silu_graph_backward(grad: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """PyTorch's infinitely_differentiable_silu_backward, op for op (what autograd runs under create_graph)."""
    s = torch.sigmoid(x)
    return grad * s * (1.0 + x * (1.0 - s))


class _HardsigmoidBackward(torch.autograd.Function):
    """aten.hardsigmoid_backward with its derivative (linear in grad; zero in x, as for relu's)."""

    @staticmethod
    def forward(ctx, grad, x):
        ctx.save_for_backward(x)
        return aten.hardsigmoid_backward(grad, x)

    @staticmethod
    def backward(ctx, gg):
        (x,) = ctx.saved_tensors
        return aten.hardsigmoid_backward(gg, x), torch.zeros_like(x)


# The table. Order matters: KERNEL_ACTS (and so the kernel ids) is the concatenation of ``kernels``
# in this order, and must equal the header's AVG_KERNELS_ACTIVATIONS.
_RECORDS = (
    Activation("tanh", nn.Tanh, F.tanh, ("tanh",),
               forward=lambda x, k: torch.tanh(x),
               backward=lambda g, x, y, k: aten.tanh_backward(g, y),
               bounded=True, torch_functions=("tanh",)),
    Activation("sigmoid", nn.Sigmoid, F.sigmoid, ("sigmoid",),
               forward=lambda x, k: torch.sigmoid(x),
               backward=lambda g, x, y, k: aten.sigmoid_backward(g, y),
               bounded=True, torch_functions=("sigmoid", "special.expit")),
    Activation("relu", nn.ReLU, F.relu, ("relu",),
               forward=lambda x, k: F.relu(x),
               backward=lambda g, x, y, k: aten.threshold_backward(g, y, 0),
               torch_functions=("relu",)),
    Activation("leaky_relu", nn.LeakyReLU, F.leaky_relu, ("leaky_relu",),
               forward=lambda x, k: F.leaky_relu(x, k.p0),
               backward=lambda g, x, y, k: aten.leaky_relu_backward(g, x, k.p0, False),
               params={"negative_slope": 0.01}, slopes=lambda k: (1.0, k.p0)),
    Activation("elu", nn.ELU, F.elu, ("elu",),
               forward=lambda x, k: F.elu(x, k.p0),
               backward=lambda g, x, y, k: aten.elu_backward(g, k.p0, 1, 1, False, x),
               params={"alpha": 1.0}),
    Activation("gelu", nn.GELU, F.gelu, ("gelu", "gelu_tanh"),
               forward=lambda x, k: F.gelu(x, approximate=_gelu_approximate(k)),
               backward=lambda g, x, y, k: aten.gelu_backward(g, x, approximate=_gelu_approximate(k)),
               params={"approximate": "none"}, to_kernel=_gelu_kernel),
    Activation("silu", nn.SiLU, F.silu, ("silu",),
               forward=lambda x, k: F.silu(x),
               backward=lambda g, x, y, k: aten.silu_backward(g, x),
               graph_backward=lambda g, x, y, k: _silu_graph_backward(g, x)),
    Activation("softplus", nn.Softplus, F.softplus, ("softplus",),
               forward=lambda x, k: F.softplus(x, k.p0, k.p1),
               backward=lambda g, x, y, k: aten.softplus_backward(g, x, k.p0, k.p1),
               params={"beta": 1.0, "threshold": 20.0}, to_kernel=_softplus_kernel),
    Activation("hardswish", nn.Hardswish, F.hardswish, ("hardswish",),
               forward=lambda x, k: F.hardswish(x),
               backward=lambda g, x, y, k: aten.hardswish_backward(g, x)),
    Activation("hardsigmoid", nn.Hardsigmoid, F.hardsigmoid, ("hardsigmoid",),
               forward=lambda x, k: F.hardsigmoid(x),
               backward=lambda g, x, y, k: aten.hardsigmoid_backward(g, x),
               graph_backward=lambda g, x, y, k: _HardsigmoidBackward.apply(g, x),
               bounded=True),
    Activation("hardtanh", nn.Hardtanh, F.hardtanh, ("hardtanh",),
               forward=lambda x, k: F.hardtanh(x, k.p0, k.p1),
               backward=lambda g, x, y, k: aten.hardtanh_backward(g, x, k.p0, k.p1),
               params={"min_val": -1.0, "max_val": 1.0}, to_kernel=_hardtanh_kernel, bounded=True),
    # relu6 = hardtanh(x, 0, 6) (PyTorch computes it so: nn.ReLU6 subclasses nn.Hardtanh, F.relu6 is aten's
    # hardtanh(x, 0, 6)); it shares hardtanh's kernel, as gelu(approximate="tanh") resolves to gelu_tanh's
    Activation("relu6", nn.ReLU6, F.relu6, ("hardtanh",),
               forward=lambda x, k: F.relu6(x),
               backward=lambda g, x, y, k: aten.hardtanh_backward(g, x, 0.0, 6.0),
               to_kernel=lambda p: KernelAct("hardtanh", 0.0, 6.0), bounded=True),
)

#: Public name -> its record (read-only, in table order).
TABLE: Mapping[str, Activation] = MappingProxyType({r.name: r for r in _RECORDS})

#: Public names and their parameters with PyTorch's defaults (read-only).
ACTIVATIONS = MappingProxyType({r.name: r.params for r in _RECORDS})

#: Kernel-level activations, in the order of ``enum class Act`` (gelu is split by ``approximate``; a
#: kernel two records resolve to, hardtanh for relu6, is listed once, where it first appears).
KERNEL_ACTS: tuple[str, ...] = tuple(dict.fromkeys(kn for r in _RECORDS for kn in r.kernels))

#: Kernel-level name -> kernel id (the value of ``enum class Act``).
KERNEL_IDS: Mapping[str, int] = MappingProxyType({kn: i for i, kn in enumerate(KERNEL_ACTS)})

# Kernel-level name -> the record that owns it (the first that lists it: hardtanh's, not relu6's).
_BY_KERNEL: dict[str, Activation] = {}
for _r in _RECORDS:
    for _kn in _r.kernels:
        _BY_KERNEL.setdefault(_kn, _r)


def record_of(k: KernelAct) -> Activation:
    """The table record a resolved activation belongs to."""
    return _BY_KERNEL[k.name]


def resolve(act: str, params: dict) -> KernelAct:
    """Validates ``act`` and its keyword ``params``; returns the kernel-level description.

    Raises ValueError for an unknown name or a bad value, TypeError for an unknown parameter
    or a parameter of the wrong type, each naming the offending argument.
    """
    if not isinstance(act, str):
        raise TypeError(f"act must be a str naming an activation, got {type(act).__name__}")
    rec = TABLE.get(act)
    if rec is None:
        raise ValueError(f"act={act!r} is not a supported activation; expected one of {sorted(TABLE)}")
    return rec.resolve(params)


def forward(x: torch.Tensor, k: KernelAct) -> torch.Tensor:
    """f(x) through the matching torch.nn.functional op (bitwise PyTorch's forward)."""
    return _BY_KERNEL[k.name].forward(x, k)


def native_backward(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor, k: KernelAct) -> torch.Tensor:
    """grad * f'(x) exactly as PyTorch's autograd computes it (``y`` = f(x), used by tanh/sigmoid/relu);
    differentiable again when grad mode is on (double backward)."""
    rec = _BY_KERNEL[k.name]
    if rec.graph_backward is not None and torch.is_grad_enabled():
        return rec.graph_backward(grad, x, y, k)
    return rec.backward(grad, x, y, k)


def asymptotic_slopes(k: KernelAct) -> tuple[float, float]:
    """lim f(x)/x at +inf and -inf: the secant's limit when exactly one end is infinite."""
    return _BY_KERNEL[k.name].asymptotic_slopes(k)


def is_bounded(k: KernelAct) -> bool:
    return _BY_KERNEL[k.name].bounded
