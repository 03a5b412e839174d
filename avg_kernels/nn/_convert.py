"""``convert(model)``: swap torch.nn activation modules for averaged ones, and say what was not swapped.

A user must never believe AG is active where it is not (SPEC §4), so besides swapping, this module
finds the activations an AG step would NOT average:

* static: activation modules of kinds without an averaged kernel (``nn.Hardtanh``, ``nn.Mish`` ...),
  subclasses of supported kinds with their own ``forward``, recurrent layers (tanh/sigmoid inside the
  fused RNN kernels), ``forward`` methods whose source calls ``F.gelu``/``torch.tanh``/``x.relu()`` ...
  directly, and modules holding such a function as an attribute (``nn.TransformerEncoderLayer``
  stores ``F.relu``/``F.gelu`` in ``self.activation``);
* dynamic (``example_inputs`` given, and on the first step of every ``avg_kernels.optim.AG``): a forward
  under a ``TorchFunctionMode`` counts every call of a supported activation function that does not go
  through ``avg_kernels.nn``, attributed to the innermost module that made it.
"""
from __future__ import annotations

import inspect
import io
import logging
import os
import re
import sys
import textwrap
import tokenize
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..activations import TABLE
from .modules import REPLACEMENTS, AveragedActivation

log = logging.getLogger("avg_kernels.nn")

#: Elementwise nonlinear torch.nn modules that have no averaged kernel (they keep f').
UNSUPPORTED_KINDS = tuple(c for c in (
    getattr(nn, n, None) for n in (
        "ReLU6", "Hardtanh", "SELU", "CELU", "Mish", "LogSigmoid", "Softsign", "Tanhshrink", "Softshrink",
        "Hardshrink", "Threshold", "PReLU", "RReLU", "GLU"))
    if c is not None and c not in REPLACEMENTS)
RECURRENT = (nn.RNNBase, nn.RNNCellBase)


def _torch_attr(path: str):
    obj = torch
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _dispatch_names(spec) -> set[str]:
    """Names under which a __torch_function__ mode sees the activation's functions (in-place: + "_")."""
    names = {spec.functional.__name__}
    for path in spec.torch_functions:
        names |= {path.rsplit(".", 1)[-1], _torch_attr(path).__name__}
    return names | {n + "_" for n in names}


# The lists below derive from the activation table: for each record, F.<name>, the other torch
# functions computing it (Activation.torch_functions) and the Tensor methods among them.
# Function names as torch dispatches them -> activation name.
_FUNC_NAMES = {n: spec.name for spec in TABLE.values() for n in _dispatch_names(spec)}


def _alternatives(names) -> str:
    """A regex group of names, each optionally followed by "_" (longest first, so none shadows another)."""
    return "(" + "|".join(re.escape(n) + "_?" for n in sorted(names, key=len, reverse=True)) + ")"


_METHODS = [n for spec in TABLE.values() for n in spec.torch_functions if "." not in n and hasattr(torch.Tensor, n)]
_SOURCE_PATTERNS = (
    re.compile(r"\b(?:F|functional|nn\.functional|torch\.nn\.functional)\." + _alternatives(TABLE) + r"\s*\("),
    re.compile(r"\btorch\." + _alternatives([n for spec in TABLE.values() for n in spec.torch_functions]) + r"\s*\("),
    re.compile(r"[\w\)\]]+\." + _alternatives(_METHODS) + r"\(\)"),
)
# Activation functions that a module may hold as an attribute (and call in forward) -> display name.
_FUNCTION_ATTRS = {}
for _spec in TABLE.values():
    _FUNCTION_ATTRS[id(_spec.functional)] = f"F.{_spec.name}"
    for _n in _spec.torch_functions:
        _FUNCTION_ATTRS[id(_torch_attr(_n))] = f"torch.{_n}"

_OWN_FILES = {os.path.normcase(os.path.abspath(p)) for p in (
    os.path.join(os.path.dirname(__file__), n) for n in ("modules.py", "functional.py", "_recording.py"))}
_OWN_FILES.add(os.path.normcase(os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "activations.py"))))
_TORCH_DIR = os.path.normcase(os.path.dirname(os.path.abspath(torch.__file__)))


@dataclass
class NotAveraged:
    """One place where an activation is (or may be) computed without averaging."""

    where: str  # qualified module name, "<model>" for the root
    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what} -- {self.why}"


@dataclass
class ConvertReport:
    """What ``convert`` swapped and what an AG step would still not average."""

    swapped: dict[str, int] = field(default_factory=dict)  # torch.nn class name -> modules swapped now
    averaged: dict[str, int] = field(default_factory=dict)  # averaged modules in the model, by class
    made_out_of_place: list[str] = field(default_factory=list)  # modules that had inplace=True
    not_averaged: list[NotAveraged] = field(default_factory=list)
    dynamic_checked: bool = False  # whether a forward was traced (example inputs)

    @property
    def complete(self) -> bool:
        """True when nothing was found that an AG step would leave un-averaged."""
        return not self.not_averaged

    def __str__(self) -> str:
        def counts(d):
            return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "none"

        lines = [f"avg_kernels.nn.convert: swapped {counts(self.swapped)}; averaged modules now: {counts(self.averaged)}"]
        if self.made_out_of_place:
            lines.append(f"  inplace=True made out-of-place in: {', '.join(self.made_out_of_place)}")
        if self.not_averaged:
            lines.append(f"  NOT averaged ({len(self.not_averaged)} found"
                         + ("" if self.dynamic_checked else "; static inspection only, pass example_inputs to trace a forward")
                         + "):")
            lines += [f"    {n}" for n in self.not_averaged]
        else:
            lines.append("  nothing un-averaged found" + ("" if self.dynamic_checked else
                                                          " (static inspection only; pass example_inputs to trace a forward)"))
        return "\n".join(lines)


def convert(model: nn.Module, *, example_inputs: Any = None, warn: bool = True, return_report: bool = False):
    """Swaps every ``torch.nn`` module of the activation table (``nn.ReLU``, ``nn.GELU`` ...:
    ``avg_kernels.activations.TABLE``) in ``model`` (recursively, ``model`` itself included) for its
    ``avg_kernels.nn`` counterpart, in place.

    The swap changes the module's class in place (same object: hooks, attributes, sharing between
    parents and the training flag are kept); ``inplace=True`` becomes out-of-place. Exact types only:
    a user subclass with its own ``forward`` is reported, not converted. Everything else is left alone.

    Outside AG steps the converted model computes exactly what the original did, forward and backward.

    Args:
        model: any ``nn.Module``.
        example_inputs: optional positional input (a tensor, or a tuple of arguments) for one traced
            forward that finds activation functions called directly (e.g. ``F.gelu`` in a forward);
            it runs under ``torch.no_grad`` with the RNG and all buffers restored afterwards.
        warn: emit a ``UserWarning`` listing what will not be averaged, when something is found.
        return_report: return ``(model, ConvertReport)`` instead of ``model``.

    Returns ``model`` (the same object), or ``(model, report)``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    swapped: Counter = Counter()
    made_out_of_place = []
    for name, m in model.named_modules():
        cls = REPLACEMENTS.get(type(m))
        if cls is None:
            continue
        m.__class__ = cls
        m._avg_where = name or "<model>"
        if getattr(m, "inplace", False):
            m.inplace = False
            made_out_of_place.append(name or "<model>")
            m.requested_inplace = True
        elif cls.spec.inplace:
            m.requested_inplace = False
        swapped[cls.torch_class.__name__] += 1
    rep = report(model, example_inputs=example_inputs)
    rep.swapped, rep.made_out_of_place = dict(swapped), made_out_of_place
    log.info("%s", rep)
    if warn and rep.not_averaged:
        warnings.warn(str(rep), UserWarning, stacklevel=2)
    return (model, rep) if return_report else model


def revert(model: nn.Module) -> nn.Module:
    """Undoes ``convert``: every averaged module becomes its torch.nn namesake again (in place)."""
    for m in model.modules():
        if isinstance(m, AveragedActivation):
            inplace = getattr(m, "requested_inplace", False)
            m.__class__ = m.torch_class
            if "requested_inplace" in m.__dict__:
                del m.requested_inplace
                m.inplace = inplace
            m.__dict__.pop("_avg_where", None)
    return model


def report(model: nn.Module, *, example_inputs: Any = None) -> ConvertReport:
    """What an AG step on ``model`` would average, and what it would not (see the module docstring)."""
    rep = ConvertReport()
    averaged: Counter = Counter()
    source_cache: dict[type, list[str]] = {}
    for name, m in model.named_modules():
        where = name or "<model>"
        cls = type(m)
        if isinstance(m, AveragedActivation):
            averaged[cls.__name__] += 1
            continue
        if cls in REPLACEMENTS:
            rep.not_averaged.append(NotAveraged(where, f"nn.{cls.__name__} module", "not converted (call convert(model))"))
            continue
        sup = next((k for k in REPLACEMENTS if isinstance(m, k)), None)
        if sup is not None:
            rep.not_averaged.append(NotAveraged(
                where, f"{cls.__qualname__} (a subclass of nn.{sup.__name__})",
                "subclasses may change forward, so convert leaves them alone; use an avg_kernels.nn module or "
                "avg_kernels.nn.functional in its forward"))
            continue
        if isinstance(m, UNSUPPORTED_KINDS):
            rep.not_averaged.append(NotAveraged(where, f"nn.{cls.__name__} module",
                                                "no averaged kernel for this activation; it keeps f'"))
            continue
        if isinstance(m, RECURRENT):
            rep.not_averaged.append(NotAveraged(where, f"nn.{cls.__name__}",
                                                "its tanh/sigmoid run inside PyTorch's fused recurrent kernel; not averaged"))
            continue
        for attr, value in vars(m).items():
            fn = getattr(value, "func", value)  # functools.partial
            if id(fn) in _FUNCTION_ATTRS:
                rep.not_averaged.append(NotAveraged(
                    where, f"{cls.__name__}.{attr} = {_FUNCTION_ATTRS[id(fn)]}",
                    "an activation function held as an attribute and called by forward; not averaged"))
        if cls not in source_cache:
            source_cache[cls] = _scan_forward(cls)
        for call in source_cache[cls]:
            rep.not_averaged.append(NotAveraged(
                where, f"{cls.__qualname__}.forward calls {call}",
                "a direct call is not averaged; use avg_kernels.nn.functional or a module"))
    rep.averaged = dict(averaged)
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        rep.not_averaged += _traced(model, args)
        rep.dynamic_checked = True
    return rep


def _scan_forward(cls: type) -> list[str]:
    """Direct activation-function calls in the source of ``cls.forward`` (comments and strings ignored)."""
    fwd = getattr(cls, "forward", None)
    if fwd is None or getattr(fwd, "__module__", "") == "torch.nn.modules.module":
        return []
    try:
        src = inspect.getsource(fwd)
    except (OSError, TypeError):
        return []
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(textwrap.dedent(src)).readline))
    except (tokenize.TokenError, IndentationError, SyntaxError):
        toks = []
    if toks:
        kept = []
        for t in toks:
            if t.type == tokenize.COMMENT:
                continue
            kept.append("''" if t.type == tokenize.STRING else t.string)
        code = " ".join(kept)
        code = re.sub(r"\s*\.\s*", ".", code)
        code = re.sub(r"\s*\(\s*", "(", code)
        code = re.sub(r"\(\s*\)", "()", code)
    else:
        code = src
    found = []
    for pat in _SOURCE_PATTERNS:
        for mt in pat.finditer(code):
            text = mt.group(0).rstrip("(").strip()
            text = text + ("()" if not text.endswith(")") else "")
            if text not in found:
                found.append(text)
    return found


class UnaveragedCallCounter(TorchFunctionMode):
    """Counts supported-activation function calls that bypass avg_kernels.nn, per innermost module.

    Used as a context manager around a forward, with ``attach(model)`` called first so module
    boundaries are known. Calls made from avg_kernels' own files are ignored.
    """

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()
        self._stack: list[str] = []
        self._handles: list = []

    def attach(self, model: nn.Module) -> "UnaveragedCallCounter":
        for name, m in model.named_modules():
            where = name or "<model>"
            self._handles.append(m.register_forward_pre_hook(lambda mod, args, w=where: self._stack.append(w)))
            self._handles.append(m.register_forward_hook(lambda mod, args, out: self._pop(), always_call=True))
        return self

    def _pop(self) -> None:
        if self._stack:
            self._stack.pop()

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        act = _FUNC_NAMES.get(getattr(func, "__name__", ""))
        if act is not None and not _called_from_avg_kernels():
            self.counts[(self._stack[-1] if self._stack else "<outside any module>", act)] += 1
        return func(*args, **(kwargs or {}))

    def findings(self) -> list[NotAveraged]:
        return [NotAveraged(where, f"{n} call(s) of {act} during the forward",
                            "a direct call is not averaged; use avg_kernels.nn.functional or a module")
                for (where, act), n in sorted(self.counts.items())]


def _called_from_avg_kernels() -> bool:
    """Whether the torch function being dispatched was called by avg_kernels' own activation code
    (skipping torch's frames and other modes' ``__torch_function__`` frames in between)."""
    f = sys._getframe(2)
    while f is not None:
        fn = os.path.normcase(os.path.abspath(f.f_code.co_filename))
        if fn in _OWN_FILES:
            return True
        if not (fn.startswith(_TORCH_DIR) or f.f_code.co_name == "__torch_function__"):
            return False
        f = f.f_back
    return False


def _traced(model: nn.Module, args: tuple) -> list[NotAveraged]:
    """One no-grad forward with every buffer and the RNG restored afterwards."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index for b in list(model.parameters()) + list(model.buffers())
                      if b.device.type == "cuda" and b.device.index is not None})
    counter = UnaveragedCallCounter().attach(model)
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad(), counter:
            model(*args)
    finally:
        counter.detach()
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return counter.findings()
