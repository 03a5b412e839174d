"""``Consequentialism.report()``: every parameter of the model, preconditioned or not, and why.

Nothing is skipped silently: a parameter is either preconditioned (by the module path or the functional
path, ``_functional``) or listed here with the reason it gets the plain base update (or none at all).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from torch import nn

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm)


@dataclass
class LayerPart:
    """One map a preconditioned parameter takes part in (a q/k/v slice of a packed weight is one each)."""

    layer: str  # the layer's name (a weight name with [start:stop] rows for a slice)
    found: str  # "module (Linear)" or the function the use was found in: "linear", "addmm", "matmul", "conv2d"
    role: str  # "weight" or "bias"
    form: Optional[str]  # "D×D", "D×D (kept factorisation)", "M×M"; None before its first step
    size: Optional[int]  # D for D×D, M for M×M


@dataclass
class ParamEntry:
    """One parameter (``model.named_parameters()`` order; ``aliases``: its other names when tied)."""

    name: str
    shape: tuple
    preconditioned: bool
    group: Optional[int]  # index of the base's param group holding it; None if the base does not
    parts: list = field(default_factory=list)  # LayerPart, when preconditioned
    reason: str = ""  # why not, when not preconditioned
    aliases: tuple = ()

    def __str__(self) -> str:
        head = f"{self.name} {tuple(self.shape)}" + (f" (also {', '.join(self.aliases)})" if self.aliases else "")
        if not self.preconditioned:
            return f"{head}: not preconditioned: {self.reason}"
        def size(p):
            return "" if p.size is None else f" {'D' if p.form.startswith('D') else 'M'}={p.size}"

        parts = "; ".join(f"{p.role} of {p.layer} ({p.found}, {p.form or 'not stepped yet'}{size(p)})"
                          for p in self.parts)
        return f"{head}: preconditioned, group {self.group}: {parts}"


class Report(list):
    """A list of ``ParamEntry``, one per parameter; ``str()`` is a readable table; ``by_name`` a dict."""

    @property
    def by_name(self) -> dict:
        return {e.name: e for e in self}

    def not_preconditioned(self) -> list:
        return [e for e in self if not e.preconditioned]

    def __str__(self) -> str:
        n = sum(e.preconditioned for e in self)
        return "\n".join([f"{n} of {len(self)} parameters preconditioned"] + [str(e) for e in self])


def _kind(model: nn.Module, name: str) -> str:
    """'embedding: ' / 'norm weight: ' ... from the module that registers ``name``."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name) if mod_name else model
    if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding: "
    if isinstance(mod, _NORMS) or type(mod).__name__.lower().endswith("norm"):
        return f"norm {leaf}: "
    return ""


def build_report(opt) -> Report:
    """The report of a ``Consequentialism`` optimizer ``opt`` (see ``Report``)."""
    model, uses, pre = opt.model, opt._uses, opt._preconditioner
    names = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    group_of = {id(p): i for i, g in enumerate(opt.param_groups) for p in g["params"]}
    excluded = {id(p): m for p, m in opt._excluded}
    parts: dict = {}  # id -> [LayerPart]
    for layer in opt._all_layers():
        if not layer.weight.requires_grad:
            continue
        form, size = pre.last_form.get(layer, (None, None))
        found = f"module ({type(layer.module).__name__})" if layer.module is not None else layer.found
        for role, p in (("weight", layer.weight), ("bias", layer.bias if layer.has_bias() else None)):
            if p is not None:
                parts.setdefault(id(p), []).append(LayerPart(layer.name, found, role, form, size))
    blocked_bias = {id(layer.bias): layer.name for layer in uses.layers.values()
                    if layer.bias is not None and not uses.blocked(layer.bias) and uses.blocked(layer.weight)}
    out = Report()
    for n, p in model.named_parameters():
        pid = id(p)
        entry = ParamEntry(n, tuple(p.shape), False, group_of.get(pid), aliases=tuple(names[pid][1:]))
        if pid not in group_of:
            left = opt._left_out.get(pid)
            entry.reason = "not held by the base optimizer" + (f" (layer {left!r} left out)" if left else "")
        elif pid in excluded:
            entry.reason = f"excluded (module {excluded[pid]!r}): plain base update"
        elif not p.requires_grad:
            entry.reason = "frozen (requires_grad=False)"
        elif pid in parts:
            entry.preconditioned, entry.parts = True, parts[pid]
        elif pid in uses.watched:
            why = uses.why_not(pid)
            if why is None and pid in blocked_bias:
                why = f"the bias of {blocked_bias[pid]}, whose weight is not preconditioned"
            if why is None and pid not in uses.seen and p.dim() < 2:
                why = "a vector (1-D): not the weight of a linear map of a layer input"
            if why is None:
                why = ("not used in a recorded forward (no training-mode forward with grad enabled through the "
                       "model since the optimizer was built)") if pid not in uses.seen else \
                    "not used as a linear map of a layer input (only viewed or as a bias of an unwatched weight)"
            entry.reason = _kind(model, n) + why + ": plain base update"
        else:
            entry.reason = "the bias of a layer whose weight is frozen: plain base update"
        out.append(entry)
    return out
