"""Hand-written activations recognised as ONE activation inside AG passes (the table ``FORMS``).

Transformers libraries write some activations out of elementary ops, e.g. GPT-2's tanh-GELU
``0.5 * x * (1 + torch.tanh(sqrt(2/pi) * (x + 0.044715 * torch.pow(x, 3))))``. Averaging its inner
``tanh`` alone would give the secant of tanh, not of GELU; the averaged backward of such a form is the
secant of the WHOLE function (our ``gelu_tanh`` kernel). ``Recogniser`` finds these forms from the
provenance of the tensors a forward computes (it is fed by ``avg_kernels.nn._fnmode.ActivationMode``):

* every elementwise arithmetic op (``add``, ``mul``, ``pow`` ... with Python-number or one-element
  constants) records the *cuts* of its result r: the tensors every path from r back to its inputs goes
  through (r is a function of each cut alone; computed incrementally: {r} ∪ the intersection of the
  operands' cuts), nearest first;
* a call of a form's *anchor* (``tanh``, ``sigmoid``, ``erf``) on ``u`` opens a candidate for the
  nearest live cut ``x`` of ``u`` with ``u == inner(x)`` (or ``x = u`` for ``x * sigmoid(x)``), checked
  numerically (as below);
* an arithmetic result that is a function of x and the anchor's output a alone (each operand has x or a
  among its cuts, or is itself such a function), made from two of them, and whose values are
  ``outer(x, a)`` (to 8 ulps of the lowest precision involved, at least 1e-6 relative; on every element
  up to 512, else on 512 evenly strided ones: the arithmetic is elementwise with scalar constants, so
  every element goes through the same ops) completes the form: that result is the activation of ``x``.

The check is structural (the cuts) AND numeric (the values), so a form is only recognised where the
ops really compute it; other arrangements of the same arithmetic (``x * 0.5 * (1 + t)``,
``t * x``, ...) are recognised too. A form whose ``act`` is None (QuickGELU) has no averaged kernel:
it is recognised only to be reported by name. Adding a form: one ``Form`` record below.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class Form:
    """One recognised hand-written activation."""

    #: how reports name it
    name: str
    #: how it is written (for reports and docs)
    written: str
    #: the torch function the form is built around (its ``__name__`` as a TorchFunctionMode sees it)
    anchor: str
    #: x -> the anchor's argument u
    inner: Callable[[torch.Tensor], torch.Tensor]
    #: (x, a) -> the form's value, where a = anchor(u)
    outer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    #: the table activation it computes and its parameters; None: no averaged kernel (reported)
    act: Optional[str] = None
    params: tuple = ()
    #: u is x itself (the anchor is applied to the input directly)
    identity_inner: bool = False


FORMS: tuple[Form, ...] = (
    Form("gelu(approximate='tanh')", "0.5*x*(1+tanh(sqrt(2/pi)*(x+0.044715*x^3)))  (HF NewGELU, FastGELU, gelu_new)",
         "tanh", inner=lambda x: _SQRT_2_OVER_PI * (x + 0.044715 * x * x * x), outer=lambda x, a: 0.5 * x * (1.0 + a),
         act="gelu", params=(("approximate", "tanh"),)),
    Form("gelu", "0.5*x*(1+erf(x/sqrt(2)))  (HF gelu_python)", "erf",
         inner=lambda x: x * (1.0 / math.sqrt(2.0)), outer=lambda x, a: 0.5 * x * (1.0 + a), act="gelu"),
    Form("silu", "x*sigmoid(x)", "sigmoid", inner=lambda x: x, outer=lambda x, a: x * a, act="silu",
         identity_inner=True),
    Form("quick_gelu", "x*sigmoid(1.702*x)  (HF QuickGELU)", "sigmoid", inner=lambda x: 1.702 * x,
         outer=lambda x, a: x * a),
)

#: anchor name -> the forms built around it
ANCHORS: dict[str, tuple[Form, ...]] = {}
for _f in FORMS:
    ANCHORS[_f.anchor] = ANCHORS.get(_f.anchor, ()) + (_f,)

#: elementwise arithmetic whose results are tracked (names as a TorchFunctionMode sees them)
ARITHMETIC = frozenset({
    "add", "sub", "mul", "div", "true_divide", "pow", "neg", "square", "rsub",
    "__add__", "__radd__", "__sub__", "__rsub__", "__mul__", "__rmul__", "__truediv__", "__rtruediv__",
    "__div__", "__rdiv__", "__pow__", "__rpow__", "__neg__"})

_MAX_CHECKS = 4  # outer checks per candidate (other arrangements of the same product)
# Values are checked on at most _SAMPLE evenly strided elements: the ops are elementwise with scalar
# constants (operands with more than one element must themselves be functions of x and a), so every
# element goes through the same arithmetic; the sample confirms the constants and the arrangement.
_SAMPLE = 512
_MAX_OPEN = 8  # anchors awaiting their form's last op (a form completes within a few ops of its anchor)


def _tol(*ts: torch.Tensor) -> float:
    return max(max(8.0 * torch.finfo(t.dtype).eps for t in ts), 1e-6)


def _sample(*ts: torch.Tensor) -> list[np.ndarray]:
    """The same at most ``_SAMPLE`` evenly strided elements of each (equally shaped) tensor, as float64 NumPy
    arrays (the form's reference values are computed in float64: only the model's own rounding is compared).
    One stack, one conversion and one host copy for all; the check itself is NumPy: on a few thousand
    elements torch's per-op overhead dominated (about 20 ops, 0.15 ms per check, 8 checks per GPT-2 pass)."""
    n = ts[0].numel()
    step = -(-n // _SAMPLE)
    flat = [(t.reshape(-1)[::step] if step > 1 else t.reshape(-1)).detach() for t in ts]
    return list(torch.stack(flat).to(torch.float64).cpu().numpy())


def _values(fn: Callable, *args: np.ndarray) -> np.ndarray:
    """A form's reference values on float64 samples (overflow to inf is compared as the model's own)."""
    with np.errstate(all="ignore"):
        return fn(*args)


def _matches(got: np.ndarray, want: np.ndarray, x: np.ndarray, tol: float, got_dtype: torch.dtype) -> bool:
    """Every element of ``got`` is ``want`` to ``tol`` relative to |got| + |want| + |x| (float64 samples;
    NaN = NaN; an infinity where ``want`` is beyond ``got_dtype``'s range is the model's own overflow)."""
    with np.errstate(all="ignore"):
        ok = (np.abs(got - want) <= tol * (np.abs(got) + np.abs(want) + np.abs(x))) | (got == want)
        ok |= np.isnan(got) & np.isnan(want)
        ok |= np.isinf(got) & (np.abs(want) > torch.finfo(got_dtype).max) & (np.sign(got) == np.sign(want))
    return bool(ok.all())


class _Candidate:
    """An anchor call that may be part of ``form``. It holds x and a (a is usually a temporary the
    form's next op frees); at most ``_MAX_OPEN`` anchors stay open, so a no-grad pass keeps only a few
    activation-sized tensors alive for longer."""

    __slots__ = ("form", "x", "a", "token", "checks")

    def __init__(self, form: Form, x: torch.Tensor, a: torch.Tensor, token):
        self.form, self.x, self.a, self.token, self.checks = form, x, a, token, 0


class Recogniser:
    """Tracks one forward pass (see the module docstring). ``token``: what the caller wants back on
    completion (the anchor's slot, if any). Tensors are referred to by id, checked against a weak
    reference (an id can be reused once its tensor is freed)."""

    def __init__(self):
        self._info: dict[int, tuple] = {}  # id(r) -> (weakref(r), cuts: tuple of ids nearest first, P: frozenset)
        self._refs: dict[int, weakref.ref] = {}  # id -> weakref of every tensor named in a cut
        self._open: dict[int, list[_Candidate]] = {}  # id(anchor output) -> its candidates

    def clear(self) -> None:
        self._info.clear()
        self._refs.clear()
        self._open.clear()

    def forget(self, t: torch.Tensor) -> None:
        """``t`` was modified in place: its provenance no longer holds."""
        self._info.pop(id(t), None)
        self._open.pop(id(t), None)

    def _ref(self, t: torch.Tensor) -> None:
        ref = self._refs.get(id(t))
        if ref is None or ref() is not t:
            self._refs[id(t)] = weakref.ref(t)

    def _live(self, i: int) -> Optional[torch.Tensor]:
        ref = self._refs.get(i)
        return None if ref is None else ref()

    def _cuts(self, t: torch.Tensor) -> tuple[tuple, frozenset]:
        """(cuts, P) of an operand: P = ids of the open anchors a such that t is a function of a and its x."""
        info = self._info.get(id(t))
        if info is not None and info[0]() is t:
            return info[1], info[2]
        self._ref(t)
        return (id(t),), frozenset()

    def arithmetic(self, args, out) -> Optional[_Candidate]:
        """After an elementwise arithmetic op: records the cuts of ``out``; returns the candidate it
        completes, if any (its form computed by that op)."""
        if not isinstance(out, torch.Tensor) or not out.is_floating_point():
            return None
        ops = [a for a in args if isinstance(a, torch.Tensor) and (a.numel() != 1 or id(a) in self._info)]
        if not ops:
            return None
        cuts, ps = None, []
        for a in ops:
            c, p = self._cuts(a)
            cuts = c if cuts is None else tuple(i for i in cuts if i in c)
            ps.append((c, p))
        within = frozenset()
        if self._open:
            within = frozenset(ai for ai, cands in self._open.items()
                               if all(ai in c or ai in p or any(id(k.x) in c for k in cands) for c, p in ps))
        self._ref(out)
        self._info[id(out)] = (weakref.ref(out), ((id(out),) + cuts)[:8], within)
        for ai in within:
            # a function of x and a only: check the values once both take part (two operands, or one
            # operand that already combines them)
            if len(ops) < 2 and not any(ai in p for _, p in ps):
                continue
            for cand in self._open[ai]:
                x, a = cand.x, cand.a
                if cand.checks >= _MAX_CHECKS or out.shape != x.shape:
                    continue
                cand.checks += 1
                o, xs, as_ = _sample(out, x, a)
                if _matches(o, _values(cand.form.outer, xs, as_), xs, _tol(out, x, a), out.dtype):
                    del self._open[ai]
                    return cand
        return None

    def anchor(self, name: str, u, a, token) -> None:
        """After a call of an anchor function: ``a = name(u)``; opens the candidates whose inner matches."""
        forms = ANCHORS.get(name)
        if not forms or not isinstance(u, torch.Tensor) or not isinstance(a, torch.Tensor):
            return
        if not u.is_floating_point() or a.shape != u.shape:
            return
        cuts, _ = self._cuts(u)
        xs = [t for t in (self._live(i) for i in cuts[1:4]) if t is not None and t.shape == u.shape]
        cands = []
        for form in forms:
            if form.identity_inner:
                cands.append(_Candidate(form, u, a, token))
                continue
            for x in xs:
                us, xs_ = _sample(u, x)
                if _matches(us, _values(form.inner, xs_), xs_, _tol(u, x), u.dtype):
                    cands.append(_Candidate(form, x, a, token))
                    break
        if cands:
            self._ref(a)
            self._open[id(a)] = cands
            if len(self._open) > _MAX_OPEN:
                del self._open[next(iter(self._open))]
