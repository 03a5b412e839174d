"""``convert(model)``: swap torch.nn activation modules for averaged ones, and say what was not swapped.

A user must never believe AG is active where it is not (SPEC §4). AG steps average every supported
activation the forward computes: converted modules, and through ``avg_kernels.nn._fnmode.ActivationMode``
bare function calls (``F.gelu``, ``torch.tanh``, ``x.sigmoid()``, an attribute holding ``F.relu``, an
unconverted module) and the hand-written forms of ``avg_kernels.nn._compound.FORMS``. ``report`` says
what is averaged and what is not:

* traced (``example_inputs`` given): one forward under that mode, as an AG step's pass at θ runs it,
  lists every averaged call with its kind (module / bare / compound) and every call that is not
  averaged, by name (activations without an averaged kernel: ``F.mish``, ``nn.SELU``, QuickGELU
  ...; in-place calls), attributed to the innermost module that made it. What the traced forward did
  not compute is not reported (a never-taken branch is not a problem);
* static (always): recurrent layers (tanh/sigmoid inside PyTorch's fused RNN kernels, invisible to
  the mode); without a trace also activation modules of unsupported kinds, unsupported or in-place
  activation calls in ``forward`` sources and attributes holding unsupported activation functions.
  Supported calls found in sources (``forward calls F.gelu()``) are listed as ``static_calls``:
  averaged by AG steps when called, not a problem.
"""
from __future__ import annotations

import inspect
import io
import logging
import re
import textwrap
import tokenize
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn
from ..activations import EPS, TABLE
from . import _recording
from ._fnmode import UNSUPPORTED, ActivationMode, _torch_attr
from ._recording import GRAPH, Recorder
from .modules import REPLACEMENTS, AveragedActivation

log = logging.getLogger("avg_kernels.nn")

#: Elementwise nonlinear torch.nn modules that have no averaged kernel (they keep f').
UNSUPPORTED_KINDS = tuple(c for c in (
    getattr(nn, n, None) for n in (
        "SELU", "CELU", "Mish", "LogSigmoid", "Softsign", "Tanhshrink", "Softshrink", "Hardshrink", "Threshold",
        "PReLU", "RReLU", "GLU"))
    if c is not None and c not in REPLACEMENTS)
RECURRENT = (nn.RNNBase, nn.RNNCellBase)


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
# Calls of activation functions without an averaged kernel (F.mish, torch.selu ...).
_UNSUPPORTED_NAMES = sorted({n.lstrip("_").rstrip("_") for n in UNSUPPORTED})
_UNSUPPORTED_PATTERN = re.compile(r"\b(?:(?:F|functional|nn\.functional|torch\.nn\.functional)|torch)\."
                                  + _alternatives(_UNSUPPORTED_NAMES) + r"\s*\(")
_UNSUPPORTED_ATTRS = {id(getattr(F, n)): f"F.{n}" for n in _UNSUPPORTED_NAMES if callable(getattr(F, n, None))}
# Activation functions that a module may hold as an attribute (and call in forward) -> display name.
_FUNCTION_ATTRS = {}
for _spec in TABLE.values():
    _FUNCTION_ATTRS[id(_spec.functional)] = f"F.{_spec.name}"
    for _n in _spec.torch_functions:
        _FUNCTION_ATTRS[id(_torch_attr(_n))] = f"torch.{_n}"



@dataclass
class NotAveraged:
    """One place where an activation is (or may be) computed without averaging."""

    where: str  # qualified module name, "<model>" for the root
    what: str
    why: str

    def __str__(self) -> str:
        return f"{self.where}: {self.what} -- {self.why}"


@dataclass
class AveragedCall:
    """One activation an AG step averages, seen in the traced forward."""

    where: str  # the innermost module that made the call (or file:line)
    what: str
    # "module" (a converted module), "functional" (avg_kernels.nn.functional), "bare" (any other call of a
    # supported activation function) or "compound" (a recognised hand-written form, averaged as one)
    kind: str
    calls: int = 1

    def __str__(self) -> str:
        return f"{self.where}: {self.what} [{self.kind}]" + (f" x{self.calls}" if self.calls > 1 else "")


@dataclass
class ConvertReport:
    """What ``convert`` swapped, what an AG step averages and what it would not average."""

    swapped: dict[str, int] = field(default_factory=dict)  # torch.nn class name -> modules swapped now
    averaged: dict[str, int] = field(default_factory=dict)  # averaged modules in the model, by class
    made_out_of_place: list[str] = field(default_factory=list)  # modules that had inplace=True
    not_averaged: list[NotAveraged] = field(default_factory=list)
    dynamic_checked: bool = False  # whether a forward was traced (example inputs)
    calls: list[AveragedCall] = field(default_factory=list)  # traced: every averaged activation, by kind
    # supported activation calls found in forward sources / attributes: averaged by AG steps when called
    static_calls: list[NotAveraged] = field(default_factory=list)

    def kinds(self) -> dict[str, int]:
        """Traced averaged calls per kind: {"module": n, "bare": n, "compound": n}."""
        out: Counter = Counter()
        for c in self.calls:
            out[c.kind] += c.calls
        return dict(out)

    @property
    def complete(self) -> bool:
        """True when nothing was found that an AG step would leave un-averaged."""
        return not self.not_averaged

    def __str__(self) -> str:
        def counts(d):
            return ", ".join(f"{k} x{v}" for k, v in sorted(d.items())) or "none"

        lines = [f"avg_kernels.nn.convert: swapped {counts(self.swapped)}; averaged modules now: {counts(self.averaged)}"]
        if self.dynamic_checked:
            lines.append(f"  averaged in the traced forward ({counts(self.kinds())}):")
            lines += [f"    {c}" for c in self.calls]
        elif self.static_calls:
            lines.append("  activation calls in forward sources/attributes (averaged by AG steps when called):")
            lines += [f"    {n.where}: {n.what}" for n in self.static_calls]
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
    """What an AG step on ``model`` would average, and what it would not (see the module docstring).

    ``example_inputs``: a tensor or a tuple of positional arguments for one traced forward (under
    ``torch.no_grad``; the RNG and every buffer are restored afterwards)."""
    rep = ConvertReport()
    averaged: Counter = Counter()
    always, static = [], []  # problems reported in any case / only without a trace
    source_cache: dict[type, list[str]] = {}
    for name, m in model.named_modules():
        where = name or "<model>"
        cls = type(m)
        if isinstance(m, AveragedActivation):
            averaged[cls.__name__] += 1
            continue
        if cls in REPLACEMENTS:
            rep.static_calls.append(NotAveraged(where, f"nn.{cls.__name__} module (not converted)",
                                                f"averaged as a bare F.{REPLACEMENTS[cls].act} call"))
            continue
        sup = next((k for k in REPLACEMENTS if isinstance(m, k)), None)
        if sup is not None:
            rep.static_calls.append(NotAveraged(where, f"{cls.__qualname__} (a subclass of nn.{sup.__name__})",
                                                "left alone by convert; the activation calls of its forward are "
                                                "averaged as bare calls"))
        elif isinstance(m, UNSUPPORTED_KINDS):
            static.append(NotAveraged(where, f"nn.{cls.__name__} module",
                                      "no averaged kernel for this activation; it keeps f'"))
            continue
        if isinstance(m, RECURRENT):
            always.append(NotAveraged(where, f"nn.{cls.__name__}",
                                      "its tanh/sigmoid run inside PyTorch's fused recurrent kernel; not averaged"))
            continue
        for attr, value in vars(m).items():
            fn = getattr(value, "func", value)  # functools.partial
            if id(fn) in _FUNCTION_ATTRS:
                rep.static_calls.append(NotAveraged(where, f"{cls.__name__}.{attr} = {_FUNCTION_ATTRS[id(fn)]}",
                                                    "an activation function held as an attribute"))
            elif id(fn) in _UNSUPPORTED_ATTRS:
                static.append(NotAveraged(where, f"{cls.__name__}.{attr} = {_UNSUPPORTED_ATTRS[id(fn)]}",
                                          "an activation function without an averaged kernel; it keeps f'"))
        if cls not in source_cache:
            source_cache[cls] = _scan_forward(cls)
        for call, ok in source_cache[cls]:
            text = f"{cls.__qualname__}.forward calls {call}"
            if ok:
                rep.static_calls.append(NotAveraged(where, text, "averaged by AG steps when called"))
            else:
                static.append(NotAveraged(where, text,
                                          "in place or without an averaged kernel: not averaged if called"))
    rep.averaged = dict(averaged)
    if example_inputs is not None:
        args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        rep.calls, found = _traced(model, args)
        rep.not_averaged = always + found  # what the forward computed; a never-taken branch is no problem
        rep.dynamic_checked = True
    else:
        rep.not_averaged = always + static
    return rep


def _scan_forward(cls: type) -> list[tuple[str, bool]]:
    """Activation-function calls in the source of ``cls.forward`` (comments and strings ignored), each with
    whether an AG step averages it (a supported, out-of-place call)."""
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
    for pat in (*_SOURCE_PATTERNS, _UNSUPPORTED_PATTERN):
        for mt in pat.finditer(code):
            text = mt.group(0).rstrip("(").strip()
            text = text + ("()" if not text.endswith(")") else "")
            ok = pat is not _UNSUPPORTED_PATTERN and not text.rstrip("()").endswith("_")
            if (text, ok) not in found:
                found.append((text, ok))
    return found


def _traced(model: nn.Module, args: tuple) -> tuple[list[AveragedCall], list[NotAveraged]]:
    """One no-grad forward under the activation mode, as an AG step's pass at θ runs it (a throw-away
    recorder), with every buffer and the RNG restored afterwards: (averaged calls, not averaged)."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = sorted({b.device.index for b in list(model.parameters()) + list(model.buffers())
                      if b.device.type == "cuda" and b.device.index is not None})
    try:
        with Recorder(EPS, None) as rec:
            rec.phase = GRAPH
            mode = ActivationMode(rec, model)
            with torch.random.fork_rng(devices=devices), torch.no_grad(), mode:
                model(*args)
            calls: Counter = Counter()
            for slot in rec.averaged():
                if isinstance(slot.where, AveragedActivation):
                    key = (f"'{slot.where._avg_where or '?'}' ({type(slot.where).__name__})",
                           f"{_recording.activations_name(slot.k)} module", "module")
                else:
                    key = (slot.where.place(), slot.where.what, slot.kind)
                calls[key] += 1
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    averaged = [AveragedCall(w, what, kind, n) for (w, what, kind), n in calls.items()]
    found = [NotAveraged(where, f"{n} call(s) of {what} during the forward", why)
             for (where, what, why), n in sorted(mode.findings.items())]
    return averaged, found
