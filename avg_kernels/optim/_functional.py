"""The functional path of the C-optimizers (SPEC §3: a layer is found by its weight, not its module class).

Every parameter the module path (``_layers.find_layers``) does not hook is *watched*: while the model runs a
training-mode forward with grad enabled, a ``TorchFunctionMode`` (entered by a forward pre-hook on the model,
left by its forward hook) sees every torch function call that receives a watched parameter or a view of one:

* a linear map of a layer input: ``F.linear(x, A, b)``, ``torch.addmm(b, x, B)`` / ``mm`` / ``matmul`` / ``@``
  with ``x @ B`` (A = Bᵀ), ``F.conv1d/2d/3d(x, W, b, ...)``, where A is the parameter, its transpose, or a
  slice of rows of it (``w.chunk(3)`` / ``w.split([E, 2E])`` in ``nn.MultiheadAttention``); HF ``Conv1D`` is
  ``addmm`` with a weight stored (in, out). Each distinct (weight, rows, orientation, bias, geometry) is a
  ``Layer``; every such use feeds the ``Collector`` as a module hook would;
* a view of the parameter (slicing, ``.T``, ``chunk``, metadata such as ``.shape``): not a use;
* anything else (``F.embedding``, a product, an unsupported form of a linear map): a *role* of the
  parameter that is not a linear map of a layer input.

A parameter is preconditioned only while every use seen so far is one linear map role (the same rows used
twice add up, as a module used twice does); a parameter seen in another role too (a tied embedding / output
weight), or used as two overlapping maps, has a *problem* (kept for good) and is left to the base
update, named in ``Consequentialism.report()`` and warned about once.

``F.multi_head_attention_forward`` is a Python function that dispatches itself to the mode as a whole (the
mode is off while it handles a call); it is run here as a copy whose ``has_torch_function`` check is off,
with the mode on, so its inner ``linear`` calls on ``in_proj_weight`` slices and ``out_proj.weight`` are seen.
"""
from __future__ import annotations

import types
import weakref
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from ._collect import Collector
from ._layers import Layer, ManualPad

_MATMUL = {torch.mm, torch.Tensor.mm, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_ADDMM = {torch.addmm, torch.Tensor.addmm}
_CONV = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
_MHA = F.multi_head_attention_forward


def _unchecked(fn):
    """A copy of the Python function ``fn`` whose ``has_torch_function`` check answers False (so that, run
    under the mode, its body's torch calls reach the mode instead of the whole call being handed to it)."""
    g = dict(fn.__globals__)
    g["has_torch_function"] = lambda *_: False
    copy = types.FunctionType(fn.__code__, g, fn.__name__, fn.__defaults__, fn.__closure__)
    copy.__kwdefaults__ = fn.__kwdefaults__
    return copy


_MHA_BODY = _unchecked(_MHA)


def _tensors(args, kwargs):
    for a in (*args, *kwargs.values()):
        if isinstance(a, torch.Tensor):
            yield a
        elif isinstance(a, (list, tuple)):
            for b in a:
                if isinstance(b, torch.Tensor):
                    yield b


def _map_rows(shape, stride, offset, p: torch.Tensor) -> Optional[tuple]:
    """How a 2-D map A (shape, stride, storage offset) lies in the 2-D contiguous parameter ``p``:
    ``(transposed, rows)`` with rows None for all of them, or None when A is no such view."""
    if p.dim() != 2 or not p.is_contiguous() or len(shape) != 2:
        return None
    off = offset - p.storage_offset()
    s0 = p.stride(0)
    if tuple(stride) == (s0, 1) and shape[1] == p.shape[1] and off % s0 == 0:  # rows r0:r1 of p
        r0 = off // s0
        rows = (r0, r0 + shape[0])
        return False, (None if rows == (0, p.shape[0]) else rows)
    if tuple(stride) == (1, s0) and shape[1] == p.shape[0] and 0 <= off and off + shape[0] <= p.shape[1]:
        rows = (off, off + shape[0])  # columns of p (stored (in, out)), transposed
        return True, (None if rows == (0, p.shape[1]) else rows)
    return None


class Uses:
    """What the watched parameters were used for in the recorded forwards, and the functional layers.

    Args:
        watched: id -> (name, parameter) of the parameters to watch.
        collector: fed one ``record(layer, x, output)`` per linear-map use.
        on_new_layer: called with each new Layer (the optimizer attaches a loaded factorisation).
    """

    def __init__(self, watched: dict, collector: Collector, on_new_layer=None):
        self.watched = watched
        self.collector = collector
        self.on_new_layer = on_new_layer
        self.layers: dict = {}  # key -> Layer, in discovery order
        self.roles: dict = {}  # id -> {description of a use that is not a linear map: count}
        self.problems: dict = {}  # id -> why the parameter cannot be preconditioned (kept for good)
        self.seen: set = set()  # ids seen in a recorded forward
        self._modes: list = []

    # -- which layers are preconditioned ---------------------------------------------------------------
    def blocked(self, p: Optional[torch.Tensor]) -> bool:
        return p is not None and (id(p) in self.problems or bool(self.roles.get(id(p))))

    def active_layers(self) -> list[Layer]:
        """The functional layers to precondition: neither their weight nor their bias has another role or a
        problem."""
        return [layer for layer in self.layers.values()
                if not self.blocked(layer.weight) and not (layer.bias is not None and self.blocked(layer.bias))]

    def why_not(self, pid: int) -> Optional[str]:
        """Why the watched parameter ``pid`` is not preconditioned (None: nothing against it)."""
        if pid in self.problems:
            return self.problems[pid]
        roles = self.roles.get(pid)
        if roles:
            used = ", ".join(sorted(roles))
            if any(layer.weight is self.watched[pid][1] or layer.bias is self.watched[pid][1]
                   for layer in self.layers.values()):
                return f"used in more than one role: as a linear map of a layer input and by {used} (tied)"
            return f"not a linear map of a layer input (used by {used})"
        return None

    # -- the forward ------------------------------------------------------------------------------------
    def enter(self, module: nn.Module) -> None:
        on = module.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled() \
            and not self.collector._paused
        mode = _UseMode(self) if on and not any(self._modes) else None
        if mode is not None:
            mode.__enter__()
        self._modes.append(mode)

    def exit(self) -> None:
        if self._modes:
            mode = self._modes.pop()
            if mode is not None:
                mode.__exit__(None, None, None)

    def param_of(self, t) -> Optional[torch.Tensor]:
        """The watched parameter ``t`` is or views, else None."""
        if not isinstance(t, torch.Tensor):
            return None
        if id(t) in self.watched:
            return t
        base = t._base
        return base if base is not None and id(base) in self.watched else None

    def add_role(self, p: torch.Tensor, what: str) -> None:
        roles = self.roles.setdefault(id(p), {})
        roles[what] = roles.get(what, 0) + 1

    def problem(self, p: torch.Tensor, why: str) -> None:
        self.problems.setdefault(id(p), why)

    def layer(self, p: torch.Tensor, transposed: bool, rows, pb, bias_rows, found: str,
              conv: tuple = ()) -> Optional[Layer]:
        """The Layer for this use (made on first sight); None when it conflicts with another use of ``p``."""
        key = (id(p), transposed, rows, id(pb) if pb is not None else None, bias_rows, conv)
        layer = self.layers.get(key)
        if layer is not None:
            return layer
        name = self.watched[id(p)][0]
        for other in self.layers.values():
            if other.weight is p and not _disjoint(other, transposed, rows):
                self.problem(p, f"used as two different linear maps of overlapping rows ({other.name} by "
                                f"{other.found}, and by {found}{'' if rows is None else f' rows {rows[0]}:{rows[1]}'})")
                return None
            if pb is not None and other.bias is pb and (bias_rows is None or other.bias_rows is None or not (
                    bias_rows[1] <= other.bias_rows[0] or other.bias_rows[1] <= bias_rows[0])):
                self.problem(pb, f"the bias of two linear maps ({other.name} and {name})")
                return None
        if rows is not None:
            name = f"{name}[{rows[0]}:{rows[1]}]"
        if conv:
            n, groups, k, s, d, pad, manual = conv
            layer = Layer(name, None, p, pb, n, groups, k, s, d, pad, manual, bias_rows=bias_rows, found=found)
        else:
            layer = Layer(name, None, p, pb, 0, transposed=transposed, rows=rows, bias_rows=bias_rows, found=found)
        self.layers[key] = layer
        if self.on_new_layer is not None:
            self.on_new_layer(layer)
        return layer

    # -- DDP: the same functional layers on every rank ------------------------------------------------------
    def shared_state(self) -> tuple:
        """What this rank found, by parameter name (picklable, for the other ranks' ``adopt``): its functional
        layers in discovery order as (weight, transposed, rows, bias, bias_rows, conv, found), and why each
        blocked parameter is not preconditioned."""
        def name(p):
            return None if p is None else self.watched[id(p)][0]
        layers = [(name(layer.weight), key[1], key[2], name(layer.bias), key[4], key[5], layer.found)
                  for key, layer in self.layers.items()]
        blocked = {n: self.why_not(pid) or "not preconditioned" for pid, (n, p) in self.watched.items()
                   if self.blocked(p)}
        return layers, blocked

    def adopt(self, states: list) -> None:
        """Makes this rank's functional layers those of all ranks (``states``: every rank's ``shared_state``, in
        rank order): the union of the layers, ordered as rank 0 found them, then each next rank's new ones; a
        parameter blocked on some rank blocked here too (else one rank would precondition what another left
        to the base). A layer only another rank used counts as seen."""
        by_name = {n: p for n, p in self.watched.values()}
        order = []
        for found, _ in states:
            order += [d for d in found if d not in order]
        keys = []
        for w, transposed, rows, b, bias_rows, conv, found in order:
            p, pb = by_name[w], by_name[b] if b is not None else None
            self.layer(p, transposed, rows, pb, bias_rows, found, conv)
            self.seen.update(id(t) for t in (p, pb) if t is not None)
            keys.append((id(p), transposed, rows, id(pb) if pb is not None else None, bias_rows, conv))
        self.layers = {key: self.layers[key] for key in keys if key in self.layers}
        for r, (_, blocked) in enumerate(states):
            for n, why in blocked.items():
                if not self.blocked(by_name[n]):
                    self.problem(by_name[n], f"{why} (on rank {r})")

    # -- copying ----------------------------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Keyed by id inside; carried by parameter object (a deep copy maps them to the copy's)."""
        by_id = {pid: p for pid, (_, p) in self.watched.items()}
        return {"collector": self.collector, "on_new_layer": self.on_new_layer,
                "watched": list(self.watched.values()), "layers": list(self.layers.items()),
                "roles": [(by_id[k], v) for k, v in self.roles.items()],
                "problems": [(by_id[k], v) for k, v in self.problems.items()],
                "seen": [by_id[k] for k in self.seen]}

    def __setstate__(self, state: dict) -> None:
        self.collector, self.on_new_layer = state["collector"], state["on_new_layer"]
        self.watched = {id(p): (n, p) for n, p in state["watched"]}
        self.layers = {}
        for key, layer in state["layers"]:
            pb = layer.bias
            self.layers[(id(layer.weight), *key[1:3], id(pb) if pb is not None else None, *key[4:])] = layer
        self.roles = {id(p): v for p, v in state["roles"]}
        self.problems = {id(p): v for p, v in state["problems"]}
        self.seen = {id(p) for p in state["seen"]}
        self._modes = []


def _disjoint(other: Layer, transposed: bool, rows) -> bool:
    """Whether a map with (transposed, rows) uses other rows of the weight than ``other`` (a linear layer)."""
    if other.conv_dims or other.transposed != transposed or rows is None or other.rows is None:
        return False
    return rows[1] <= other.rows[0] or other.rows[1] <= rows[0]


class _UseMode(TorchFunctionMode):
    """Sees the torch calls of a recorded forward (see the module docstring)."""

    def __init__(self, uses: Uses):
        super().__init__()
        self.uses = uses

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _MHA:
            with self:
                return _MHA_BODY(*args, **kwargs)
        uses = self.uses
        hits = [t for t in _tensors(args, kwargs) if uses.param_of(t) is not None]
        if not hits:
            return func(*args, **kwargs)
        for t in hits:
            uses.seen.add(id(uses.param_of(t)))
        name = getattr(func, "__name__", str(func))
        if func in _MATMUL or func in _ADDMM or func is F.linear or func in _CONV:
            return self._linear(func, name, args, kwargs, hits)
        out = func(*args, **kwargs)
        results = [out] if isinstance(out, torch.Tensor) else \
            [o for o in out if isinstance(o, torch.Tensor)] if isinstance(out, (list, tuple)) else []
        if not results:  # metadata (.shape, .dim(), .requires_grad ...)
            return out
        for t in hits:
            p = uses.param_of(t)
            if not all(r._base is p or r is p for r in results):  # not a view of p
                uses.add_role(p, name)
        return out

    def _linear(self, func, name, args, kwargs, hits):
        uses = self.uses
        out = func(*args, **kwargs)
        spec = _parse(func, args, kwargs)
        if spec is None:
            for t in hits:
                uses.add_role(uses.param_of(t), f"{name} (a form not preconditioned)")
            return out
        x, w, b, found, conv, scale = spec
        p = uses.param_of(w)
        others = [t for t in hits if t is not w and t is not b]
        for t in others:  # a parameter as the layer input: not a linear map of a layer input
            uses.add_role(uses.param_of(t), f"{name} (as the input)")
        if p is not None and uses.param_of(x) is not None:  # a product of parameters (e.g. a LoRA B @ A)
            uses.add_role(p, f"{name} (applied to a parameter, not to a layer input)")
            return out
        if p is None:
            if b is not None and uses.param_of(b) is not None:
                uses.add_role(uses.param_of(b), f"{name} (as the bias of an unwatched weight)")
            return out
        pb, bias_rows = None, None
        if b is not None and uses.param_of(b) is not None:
            pb = uses.param_of(b)
            bias_rows = _bias_rows(b, pb)
            if bias_rows is False or (isinstance(b, torch.Tensor) and b.shape[-1:] != out.shape[-1:] and not conv):
                uses.problem(pb, f"used by {name} as a bias in a form not preconditioned (shape {tuple(b.shape)})")
                uses.problem(p, f"its bias in {name} is in a form not preconditioned")
                return out
        if scale != 1:
            uses.problem(p, f"used by {name} with alpha/beta != 1")
            return out
        if conv:
            if w is not p or w.dim() != conv[0] + 2:
                uses.problem(p, f"used by {name} through a view (only whole convolution weights are preconditioned)")
                return out
            if bias_rows is not None:
                uses.problem(p, f"used by {name} with a slice of a bias (not preconditioned for convolutions)")
                return out
            layer = uses.layer(p, False, None, pb, bias_rows, name, conv)
        else:
            # the map A (out, in) of z = A u: F.linear's weight, or Bᵀ for x @ B
            if found == "linear":
                shape, stride = tuple(w.shape), w.stride()
            else:
                shape, stride = tuple(w.shape[::-1]), w.stride()[::-1]
            where = _map_rows(shape, stride, w.storage_offset(), p)
            if where is None:
                uses.problem(p, f"used by {name} as a linear map through a view that is not a slice of rows "
                                f"(shape {tuple(w.shape)}, stride {tuple(w.stride())})")
                return out
            layer = uses.layer(p, where[0], where[1], pb, bias_rows, name)
        if layer is not None and not uses.blocked(p):
            uses.collector.record(layer, x, out)
        return out


def _bias_rows(b: torch.Tensor, pb: torch.Tensor):
    """(start, stop) of the bias slice ``b`` of the parameter ``pb`` (None: all of it), False if no slice."""
    if b is pb:
        return None if pb.dim() == 1 else False
    if pb.dim() != 1 or b.dim() != 1 or b.stride() != (1,):
        return False
    off = b.storage_offset() - pb.storage_offset()
    return (off, off + b.shape[0])


def _parse(func, args, kwargs):
    """(x, weight operand, bias operand, found, conv geometry, alpha/beta != 1) of a linear-map call, or None
    for a form not handled (the parameter on the left of a product, batched weights)."""
    def arg(i, key, default=None):
        return args[i] if len(args) > i else kwargs.get(key, default)

    if func is F.linear:
        return arg(0, "input"), arg(1, "weight"), arg(2, "bias"), "linear", (), 1
    if func in _ADDMM:
        b, x, w = arg(0, "input"), arg(1, "mat1"), arg(2, "mat2")
        alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
        if not isinstance(w, torch.Tensor) or w.dim() != 2:
            return None
        return x, w, b, "addmm", (), (1 if alpha == 1 and beta == 1 else 0)
    if func in _MATMUL:
        x, w = arg(0, "input"), arg(1, "other" if func not in (torch.mm, torch.Tensor.mm) else "mat2")
        if not isinstance(w, torch.Tensor) or w.dim() != 2 or not isinstance(x, torch.Tensor):
            return None
        return x, w, None, "matmul" if func is not torch.mm and func is not torch.Tensor.mm else "mm", (), 1
    n = _CONV[func]
    x, w, b = arg(0, "input"), arg(1, "weight"), arg(2, "bias")
    stride, padding = arg(3, "stride", 1), arg(4, "padding", 0)
    dilation, groups = arg(5, "dilation", 1), arg(6, "groups", 1)
    if not isinstance(w, torch.Tensor) or w.dim() != n + 2:
        return None
    k = tuple(w.shape[2:])
    s, d = (tuple(v) if isinstance(v, (tuple, list)) else (v,) * n for v in (stride, dilation))
    manual = None
    if isinstance(padding, str):
        if padding == "valid":
            pad = (0,) * n
        else:  # 'same' (stride 1): total d·(k−1), the smaller half first, as torch pads
            total = [d[i] * (k[i] - 1) for i in range(n)]
            lo = [t // 2 for t in total]
            if all(t % 2 == 0 for t in total):
                pad = tuple(lo)
            else:
                rp = tuple(v for i in reversed(range(n)) for v in (lo[i], total[i] - lo[i]))
                manual, pad = ManualPad(rp, "constant"), (0,) * n
    else:
        pad = tuple(padding) if isinstance(padding, (tuple, list)) else (padding,) * n
    return x, w, b, f"conv{n}d", (n, groups, k, s, d, pad, manual), 1


class RootPreHook:
    """Forward pre-hook on the model: enters the mode (weak reference; inert in a pickled or copied model)."""

    __slots__ = ("_uses", "__weakref__")

    def __init__(self, uses: Uses):
        self._uses = weakref.ref(uses)

    def __call__(self, module, args):
        uses = self._uses()
        if uses is not None:
            uses.enter(module)

    def __reduce__(self):
        from ._collect import InertHook
        return InertHook, ()


class RootPostHook(RootPreHook):
    """Forward hook on the model (always called, also when the forward raises): leaves the mode."""

    __slots__ = ()

    def __call__(self, module, args, output=None):
        uses = self._uses()
        if uses is not None:
            uses.exit()
