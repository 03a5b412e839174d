"""``ActivationMode``: AG averages the activations a forward computes, however it is written.

Converted modules and ``avg_kernels.nn.functional`` call the step's recorder themselves. Everything else
is seen by this ``TorchFunctionMode``, which AG activates only during its own forward passes (the graph
at θ, the replay at θ' or θ_{t-1}, the first AG-3-1 step) and ``avg_kernels.nn.report`` during its
traced forward:

* a **bare** call of a supported activation function -- ``F.gelu``/``F.silu``/``F.relu`` ...,
  ``torch.tanh``/``torch.sigmoid``/``torch.special.expit``/``torch.relu``, ``x.tanh()``/``x.sigmoid()``/
  ``x.relu()``, an attribute holding one of them (``nn.TransformerEncoderLayer.activation = F.relu``),
  HF's ``GELUActivation``/``SiLUActivation`` (which call ``F.gelu``/``F.silu``), an unconverted torch.nn
  module -- goes to the recorder (``Recorder.call``) exactly as a converted module does: same slots,
  same pairing, same ``PairingError``/``CheckpointingError``;
* a **compound**: a hand-written form of ``avg_kernels.nn._compound.FORMS`` (the tanh-GELU of GPT-2's
  ``NewGELUActivation`` and ``FastGELUActivation``, the erf-GELU, ``x * torch.sigmoid(x)``) is averaged
  as ONE activation: the op that completes it gets one slot of the whole function, and its output is a
  tensor with the form's forward VALUES (the user's ops' own result, bitwise) whose backward is the
  averaged one of the whole function; the gradient path through the hand-written ops is dropped. The
  inner ``tanh``/``sigmoid`` call keeps its (bare) slot for the pairing but is marked ``superseded``;
* what cannot be averaged is collected in ``findings`` by name: activation functions without an averaged
  kernel (``F.mish``, ``F.selu``, ``F.celu`` ...), in-place or ``out=`` calls of supported ones
  (the averaged backward needs the input to survive) and recognised forms without a kernel (QuickGELU).

Outside these passes nothing is installed: a converted model computes exactly what the original did.
"""
from __future__ import annotations

import os
import sys
from collections import Counter
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from ..activations import TABLE, Activation
from . import _compound
from ._compound import ANCHORS, ARITHMETIC, Recogniser
from ._recording import GRAPH, REPLAY, Recorder, ReplayComplete

# -- what the mode intercepts, derived from the activation table -----------------------------------------

def _torch_attr(path: str):
    """torch.<path>, e.g. "special.expit" -> torch.special.expit."""
    obj = torch
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _names(spec: Activation) -> set[str]:
    names = {spec.functional.__name__, spec.name}
    for path in spec.torch_functions:
        names |= {path.rsplit(".", 1)[-1], _torch_attr(path).__name__}
    return names


#: dispatch name -> its record (out-of-place calls)
SUPPORTED: dict[str, Activation] = {n: spec for spec in TABLE.values() for n in _names(spec)}
#: dispatch names of the in-place variants (run as written, reported)
SUPPORTED_INPLACE = frozenset(n + "_" for n in SUPPORTED)

#: activation functions without an averaged kernel (dispatch name -> how reports name it)
UNSUPPORTED: dict[str, str] = {}
for _n in ("mish", "selu", "celu", "log_sigmoid", "logsigmoid", "softsign", "tanhshrink",
           "softshrink", "hardshrink", "threshold", "_threshold", "prelu", "rrelu", "glu"):
    UNSUPPORTED[_n] = UNSUPPORTED[_n + "_"] = f"F.{_n.lstrip('_')}"

_OWN_DIR = os.path.normcase(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
_TORCH_DIR = os.path.normcase(os.path.dirname(os.path.abspath(torch.__file__)))
_file_cache: dict[str, bool] = {}


def _internal(filename: str) -> bool:
    v = _file_cache.get(filename)
    if v is None:
        f = os.path.normcase(os.path.abspath(filename))
        v = _file_cache[filename] = f.startswith(_TORCH_DIR) or f.startswith(_OWN_DIR)
    return v


def _caller() -> tuple[str, int]:
    """File and line of the first frame outside torch and avg_kernels (the model's code)."""
    f = sys._getframe(2)
    while f is not None and _internal(f.f_code.co_filename):
        f = f.f_back
    return ("?", 0) if f is None else (f.f_code.co_filename, f.f_lineno)


class Where:
    """Where a call intercepted by the mode came from (formatted only for messages and reports)."""

    __slots__ = ("what", "module", "file", "line")

    def __init__(self, what: str, module: Optional[str]):
        self.what, self.module = what, module
        self.file, self.line = _caller()

    def place(self) -> str:
        return self.module if self.module is not None else f"{os.path.basename(self.file)}:{self.line}"

    def _where(self) -> str:
        mod = f" in {self.module}" if self.module is not None else ""
        return f"{self.what}{mod} called from {self.file}:{self.line}"


def _bind(spec: Activation, args: tuple, kwargs: dict):
    """(x, params, inplace, out) of a call of one of the record's functions (F.<name> signature: input, the
    record's parameters, then ``inplace`` where the module takes it)."""
    x = args[0] if args else kwargs.get("input")
    names = list(spec.params)
    params = dict(zip(names, args[1:1 + len(names)]))
    rest = args[1 + len(names):]
    inplace = bool(rest[0]) if rest else False
    for key, value in kwargs.items():
        if key in spec.params:
            params[key] = value
        elif key == "inplace":
            inplace = bool(value)
    return x, params, inplace, kwargs.get("out") is not None


#: torch function -> True where the mode has nothing to do with it (most calls of a forward: matmuls,
#: views, norms ...), decided once per function by its name
_PLAIN: dict = {}


def _is_plain(func) -> bool:
    try:
        plain = _PLAIN.get(func)
    except TypeError:  # an unhashable callable: decided each time
        plain = None
    if plain is None:
        name = getattr(func, "__name__", None)
        plain = name is None or not (
            name in ARITHMETIC or name in SUPPORTED or name in SUPPORTED_INPLACE or name in UNSUPPORTED
            or name in ANCHORS or name.endswith("_"))
        if len(_PLAIN) < 4096:
            try:
                _PLAIN[func] = plain
            except TypeError:
                pass
    return plain


class ActivationMode(TorchFunctionMode):
    """Routes the activation calls of one forward pass through ``rec`` (see the module docstring).

    ``model``: when given, calls are attributed to the innermost of its modules running (forward hooks on
    each module for the pass, so only for the first step and reports).
    """

    def __init__(self, rec: Recorder, model: Optional[torch.nn.Module] = None):
        super().__init__()
        self.rec = rec
        self.recog = Recogniser()
        self.findings: Counter = Counter()  # (place, what, why) -> calls
        self._model = model
        self._stack: list[str] = []
        self._hooks: list = []

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self):
        if self._model is not None:
            for name, m in self._model.named_modules():
                label = f"'{name or '<model>'}' ({type(m).__name__})"
                self._hooks.append(m.register_forward_pre_hook(lambda mod, args, w=label: self._stack.append(w)))
                self._hooks.append(m.register_forward_hook(self._pop, always_call=True))
        return super().__enter__()

    def __exit__(self, *exc):
        try:
            return super().__exit__(*exc)
        finally:
            for h in self._hooks:
                h.remove()
            self._hooks = []
            self._stack = []
            self.recog.clear()

    def _pop(self, mod, args, out) -> None:
        if self._stack:
            self._stack.pop()

    def _module(self) -> Optional[str]:
        return self._stack[-1] if self._stack else None

    def _find(self, what: str, why: str) -> None:
        where = Where(what, self._module())
        self.findings[(where.place(), what, why)] += 1

    # -- the dispatch ------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        rec = self.rec
        if rec.busy:
            return func(*args, **kwargs)
        if rec.replay_complete:  # a replay told to stop after its last averaged activation: this is the tail
            raise ReplayComplete(getattr(func, "__name__", str(func)))
        if _is_plain(func):
            return func(*args, **kwargs)
        name = func.__name__
        if name in ARITHMETIC:
            out = func(*args, **kwargs)
            done = self.recog.arithmetic(args, out)
            return out if done is None else self._compound(done, out)
        spec = SUPPORTED.get(name)
        if spec is not None:
            return self._activation(func, name, spec, args, kwargs)
        if name in SUPPORTED_INPLACE:
            self._find(f"{name}() (in place)", "in-place activation calls run as written, not averaged (the "
                                                 "averaged backward needs the input); call it out of place")
        elif name in UNSUPPORTED:
            self._find(UNSUPPORTED[name], "no averaged kernel for this activation; it keeps f'")
        elif name.endswith("_") and args and isinstance(args[0], torch.Tensor):
            self.recog.forget(args[0])  # modified in place: its provenance no longer holds
        out = func(*args, **kwargs)
        if name in ANCHORS and args:
            self.recog.anchor(name, args[0], out, None)
        return out

    def _activation(self, func, name, spec: Activation, args, kwargs):
        x, params, inplace, out_arg = _bind(spec, args, kwargs)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or type(x) not in (torch.Tensor,
                                                                                              torch.nn.Parameter):
            return func(*args, **kwargs)
        if inplace or out_arg:
            self._find(f"{name}({'inplace=True' if inplace else 'out=...'})",
                       "in-place activation calls run as written, not averaged (the averaged backward needs the "
                       "input); call it out of place")
            return func(*args, **kwargs)
        try:
            k = spec.resolve(params)
        except (TypeError, ValueError):  # e.g. a tensor-valued negative_slope: the call runs as written
            self._find(f"{name}() with parameters {params}", "parameters the averaged kernel does not take; not "
                                                              "averaged")
            return func(*args, **kwargs)
        rec = self.rec
        out = rec.call(x, k, Where(f"{name}()", self._module()), kind="bare")
        if k.name in ANCHORS:
            token = len(rec.slots) - 1 if rec.phase == GRAPH else (rec.cursor - 1 if rec.phase == REPLAY else None)
            self.recog.anchor(k.name, x, out, token)
        return out

    def _compound(self, cand, out):
        form: _compound.Form = cand.form
        if form.act is None:
            self._find(f"{form.name} written as {form.written}",
                       f"no averaged kernel for this activation; its {form.anchor} is averaged as a bare call")
            return out
        rec = self.rec
        if rec.phase == GRAPH and cand.token is not None:
            rec.slots[cand.token].superseded = True
        k = TABLE[form.act].resolve(dict(form.params))
        return rec.call(cand.x, k, Where(f"{form.name} written as {form.written}", self._module()), value=out,
                        kind="compound")
