"""Drop-in averaged activation modules (SPEC §1, §4), one per record of the activation table.

Each class is generated from its record (``avg_kernels.activations.TABLE``): it is named and subclasses
its ``torch.nn`` namesake (so ``isinstance(m, torch.nn.GELU)`` stays true, the constructor takes the
same arguments, the repr and state dict are the same) and overrides ``forward``:

* outside an AG step: the namesake's own ``forward`` (the same ``torch.nn.functional`` call), so outputs
  and gradients are bitwise PyTorch's and ``torch.compile(fullgraph=True)`` traces it like the original;
* inside an AG step: the call goes through the step's recorder (``avg_kernels.nn._recording``), whose
  backward uses the secant slope ``s(x, x')`` once the step has recorded x'.

``inplace=True`` is accepted and converted to an out-of-place call (the averaged backward needs the
input to survive); ``requested_inplace`` remembers what was asked for, ``inplace`` is always False.
Parameters (``negative_slope``, ``alpha``, ``approximate``, ``beta``, ``threshold``, ``min_val``, ``max_val``) are
attributes read at every call, as in torch.nn, so changing them later takes effect (``ReLU6`` has none: it
averages with bounds 0 and 6, as torch.nn.ReLU6 sets them).
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from .. import activations
from ..activations import TABLE, Activation, KernelAct
from . import _recording


class AveragedActivation:
    """Base of the averaged modules (what ``convert`` produces); each subclass sets ``spec``."""

    #: the activation table's record of this module
    spec: Activation
    #: torch.nn class this module replaces
    torch_class: type = nn.Module
    #: name in avg_kernels.ACTIVATIONS
    act: str = ""
    #: where the module sits in its model (set by ``convert``); used in error messages
    _avg_where: str = ""

    def __init__(self, *args, **kwargs):
        # The namesake's arguments, with inplace=True turned into out-of-place.
        sig = self.__signature__
        if "inplace" not in sig.parameters:
            super().__init__(*args, **kwargs)
            return
        bound = sig.bind(*args, **kwargs)
        requested = bound.arguments.pop("inplace", False)
        super().__init__(*bound.args, **bound.kwargs, inplace=False)
        self.requested_inplace = bool(requested)

    def _where(self) -> str:
        return f"'{self._avg_where}' ({type(self).__name__})" if self._avg_where else f"a {type(self).__name__} module"

    def kernel_act(self) -> KernelAct:
        """The activation and its current parameters, validated (``avg_kernels.activations.resolve``)."""
        names = self.spec.params
        if not names:
            return self._fixed_k
        key = tuple(getattr(self, n) for n in names)
        cached = self.__dict__.get("_avg_k")
        if cached is None or cached[0] != key:  # parameters are read at every call, validated once per value
            cached = (key, activations.resolve(self.act, dict(zip(names, key))))
            self.__dict__["_avg_k"] = cached
        return cached[1]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rec = _recording.ACTIVE
        if rec is None:
            return self.torch_class.forward(self, input)  # self.inplace is False
        return rec.call(input, self.kernel_act(), self)


def _module_class(spec: Activation) -> type:
    """The averaged module of one table record: a subclass of ``spec.module`` with its name."""
    torch_class = spec.module
    name = torch_class.__name__
    inplace = " (inplace=True runs out of place)" if spec.inplace else ""
    return type(name, (AveragedActivation, torch_class), {
        "__module__": __name__,
        "__qualname__": name,
        "__doc__": f"``torch.nn.{name}`` whose backward is averaged inside AG steps{inplace}.",
        "__signature__": inspect.signature(torch_class),
        "spec": spec,
        "torch_class": torch_class,
        "act": spec.name,
        "_fixed_k": None if spec.params else spec.resolve({}),
    })


_CLASSES = {spec.module.__name__: _module_class(spec) for spec in TABLE.values()}
globals().update(_CLASSES)

#: torch.nn class -> its averaged replacement (exact types; subclasses are reported, not converted)
REPLACEMENTS: dict[type, type] = {c.torch_class: c for c in _CLASSES.values()}

__all__ = ["AveragedActivation", *_CLASSES]
