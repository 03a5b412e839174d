"""Drop-in averaged activation modules (SPEC §1, §4).

Each class subclasses its ``torch.nn`` namesake (so ``isinstance(m, torch.nn.GELU)`` stays true, the
constructor takes the same arguments, the repr and state dict are the same) and overrides ``forward``:

* outside an AG step: the same ``torch.nn.functional`` call the namesake makes, so outputs and gradients
  are bitwise PyTorch's and ``torch.compile(fullgraph=True)`` traces it like the original;
* inside an AG step: the call goes through the step's recorder (``avg_kernels.nn._recording``), whose
  backward uses the secant slope ``s(x, x')`` once the step has recorded x'.

``inplace=True`` is accepted and converted to an out-of-place call (the averaged backward needs the
input to survive); ``requested_inplace`` remembers what was asked for, ``inplace`` is always False.
Attributes (``negative_slope``, ``alpha``, ``approximate``, ``beta``, ``threshold``) are read at every
call, as in torch.nn, so changing them later takes effect.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import activations
from ..activations import KernelAct
from . import _recording

_TANH, _SIGMOID, _RELU, _SILU = KernelAct("tanh"), KernelAct("sigmoid"), KernelAct("relu"), KernelAct("silu")


class AveragedActivation:
    """Mixin marking a module as an averaged activation (what ``convert`` produces)."""

    #: torch.nn class this module replaces
    torch_class: type = nn.Module
    #: name in avg_kernels.ACTIVATIONS
    act: str = ""
    #: where the module sits in its model (set by ``convert``); used in error messages
    _avg_where: str = ""

    def _where(self) -> str:
        return f"'{self._avg_where}' ({type(self).__name__})" if self._avg_where else f"a {type(self).__name__} module"

    def kernel_act(self) -> KernelAct:
        """The activation and its current parameters, validated (``avg_kernels.activations.resolve``)."""
        params = self._act_params()
        key = tuple(params.values())
        cached = self.__dict__.get("_avg_k")
        if cached is None or cached[0] != key:  # parameters are read at every call, validated once per value
            cached = (key, activations.resolve(self.act, params))
            self.__dict__["_avg_k"] = cached
        return cached[1]

    def _act_params(self) -> dict:
        return {}


class Tanh(AveragedActivation, nn.Tanh):
    """``torch.nn.Tanh`` whose backward is averaged inside AG steps."""

    torch_class, act = nn.Tanh, "tanh"

    def kernel_act(self) -> KernelAct:
        return _TANH

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return torch.tanh(input)
        return rec.call(input, _TANH, self)


class Sigmoid(AveragedActivation, nn.Sigmoid):
    """``torch.nn.Sigmoid`` whose backward is averaged inside AG steps."""

    torch_class, act = nn.Sigmoid, "sigmoid"

    def kernel_act(self) -> KernelAct:
        return _SIGMOID

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return torch.sigmoid(input)
        return rec.call(input, _SIGMOID, self)


class ReLU(AveragedActivation, nn.ReLU):
    """``torch.nn.ReLU(inplace=False)`` whose backward is averaged inside AG steps (inplace=True -> out of place)."""

    torch_class, act = nn.ReLU, "relu"

    def __init__(self, inplace: bool = False):
        super().__init__(inplace=False)
        self.requested_inplace = bool(inplace)

    def kernel_act(self) -> KernelAct:
        return _RELU

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return F.relu(input)
        return rec.call(input, _RELU, self)


class LeakyReLU(AveragedActivation, nn.LeakyReLU):
    """``torch.nn.LeakyReLU(negative_slope=0.01, inplace=False)`` averaged inside AG steps."""

    torch_class, act = nn.LeakyReLU, "leaky_relu"

    def __init__(self, negative_slope: float = 1e-2, inplace: bool = False):
        super().__init__(negative_slope, inplace=False)
        self.requested_inplace = bool(inplace)

    def _act_params(self) -> dict:
        return {"negative_slope": self.negative_slope}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return F.leaky_relu(input, self.negative_slope)
        return rec.call(input, self.kernel_act(), self)


class ELU(AveragedActivation, nn.ELU):
    """``torch.nn.ELU(alpha=1.0, inplace=False)`` averaged inside AG steps."""

    torch_class, act = nn.ELU, "elu"

    def __init__(self, alpha: float = 1.0, inplace: bool = False):
        super().__init__(alpha, inplace=False)
        self.requested_inplace = bool(inplace)

    def _act_params(self) -> dict:
        return {"alpha": self.alpha}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return F.elu(input, self.alpha)
        return rec.call(input, self.kernel_act(), self)


class GELU(AveragedActivation, nn.GELU):
    """``torch.nn.GELU(approximate='none')`` averaged inside AG steps."""

    torch_class, act = nn.GELU, "gelu"

    def _act_params(self) -> dict:
        return {"approximate": self.approximate}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return F.gelu(input, approximate=self.approximate)
        return rec.call(input, self.kernel_act(), self)


class SiLU(AveragedActivation, nn.SiLU):
    """``torch.nn.SiLU(inplace=False)`` averaged inside AG steps (inplace=True -> out of place)."""

    torch_class, act = nn.SiLU, "silu"

    def __init__(self, inplace: bool = False):
        super().__init__(inplace=False)
        self.requested_inplace = bool(inplace)

    def kernel_act(self) -> KernelAct:
        return _SILU

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return F.silu(input)
        return rec.call(input, _SILU, self)


class Softplus(AveragedActivation, nn.Softplus):
    """``torch.nn.Softplus(beta=1.0, threshold=20.0)`` averaged inside AG steps."""

    torch_class, act = nn.Softplus, "softplus"

    def _act_params(self) -> dict:
        return {"beta": self.beta, "threshold": self.threshold}

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return F.softplus(input, self.beta, self.threshold)
        return rec.call(input, self.kernel_act(), self)


#: torch.nn class -> its averaged replacement (exact types; subclasses are reported, not converted)
REPLACEMENTS: dict[type, type] = {c.torch_class: c for c in (Tanh, Sigmoid, ReLU, LeakyReLU, ELU, GELU, SiLU, Softplus)}
