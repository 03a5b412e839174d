"""The "Linear" variants of AG-1 / AG-2 (``AG(..., linear=True)``; paper 002 Eq. 11, Alg. 2 lines 10-15).

In the averaged backward of the plain variants, Linear/Conv layers keep their Jacobians at θ (paper 002
Eq. 10). The Linear variants average them over the two ends of the segment:

    ∂ℓ/∂x ≈ ½ (J_x(θ) + J_x(θ'))ᵀ G,     ∂ℓ/∂W ≈ ½ (J_W(θ) + J_W(θ'))ᵀ G        (Eq. 11)

A layer y = B(x, W) + b is bilinear in (x, W): J_x depends on W only and J_W on x only, so the mean of the two
Jacobians IS the Jacobian at the midpoint: the averaged backward is the layer's ordinary backward evaluated
with W̄ = (W + W')/2 for the input gradient and x̄ = (x + x')/2 for the weight gradient (the bias gradient,
Σ G, has a constant Jacobian). That is one ordinary layer backward plus two elementwise means, not the two
backwards of the paper's implementation (its Appendix F counts "two times slower" averaged backprop).

How the step gets W' and x': for the duration of an AG step, every ``nn.Linear`` / ``nn.Conv1d/2d/3d`` of the
model (the class's own ``forward``; a subclass that overrides it is left alone and reported) runs through
``LayerAveraging._call``:

* graph pass at θ: the layer registers a ``LayerSlot`` (in call order, like the activation slots of
  ``avg_kernels.nn._recording``) and runs ``_AvgLinear`` / ``_AvgConv``, whose backward reads the slot when it
  runs: empty -> the ordinary backward (the gradient g); filled -> the midpoint backward above;
* replay at the segment's other end (no grad): call k checks that it matches slot k and stores its input
  (after padding) as x' and its weight as W' (the parameter itself: it holds θ' until the update);
* AG-2 Linear (``rescale=True``): the first backward also records, per layer call, ‖∂ℓ/∂x‖₂ (the layer input's
  gradient) and ‖(∂ℓ/∂W, ∂ℓ/∂b)‖₂ (the layer's parameters as one vector); the averaged backward rescales its
  input gradient and its parameter gradient to those norms (a zero averaged norm is left as is). The input
  gradient is rescaled before it propagates further, so every earlier layer sees the rescaled one (Alg. 2
  line 15 runs inside the backward loop).

Every weight-bearing module whose parameters got a gradient but that did not run through these layers (a
LayerNorm, an Embedding with ``max_norm``, an ``nn.MultiheadAttention`` whose ``out_proj`` weight is used via ``F.linear``, a
ConvTranspose, a Linear subclass with its own forward ...) keeps θ's Jacobian: ``kept`` names them, the step
reports them in ``AGStepInfo.linear_kept`` and warns once per optimizer about new ones. A plain ``nn.Embedding``
is not reported: its Jacobians do not depend on θ, so the mean of Eq. 11 is exactly θ's.
"""
from __future__ import annotations

import functools
import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..nn import _recording
from ..nn._recording import BACKWARD, GRAPH, PLAIN, REPLAY, CheckpointingError, PairingError

_CONV = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_CONV_FN = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _stock_kind(m: nn.Module) -> Optional[int]:
    """0 for a Linear, 1/2/3 for a ConvNd whose forward is the class's own; None for anything else."""
    cls = type(m)
    if "forward" in m.__dict__:  # already patched on the instance by someone else: not ours to replace
        return None
    if isinstance(m, nn.Linear) and cls.forward is nn.Linear.forward:
        return 0
    for base, dims in _CONV.items():
        if isinstance(m, base) and cls.forward is base.forward and cls._conv_forward is base._conv_forward:
            return dims
    return None


def _exact(m: nn.Module) -> bool:
    """A module whose Jacobians do not depend on θ, so Eq. 11's mean equals them: an ``nn.Embedding`` (a row
    lookup: no input gradient, and ∂y/∂W selects rows) without ``max_norm`` (which renormalises W in place)."""
    return type(m) is nn.Embedding and m.max_norm is None


class LayerSlot:
    """One Linear/Conv call of the graph pass; x' and W' once a replay filled it."""

    __slots__ = ("index", "name", "module", "shape", "dtype", "device", "read", "filled", "x_new", "x_ver",
                 "w_new", "w_ver", "norm_x", "norm_p", "owner")

    def __init__(self, index: int, name: str, module: nn.Module, x: torch.Tensor, owner: "LayerAveraging"):
        self.index, self.name, self.module, self.owner = index, name, module, owner
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.read = False
        self.filled = 0  # the replay count of the recorder when this slot was last filled
        self.x_new = self.w_new = None
        self.x_ver = self.w_ver = 0
        self.norm_x = self.norm_p = None  # AG-2 Linear: the ordinary gradients' norms at θ

    def describe(self) -> str:
        return f"{type(self.module).__name__} {self.name!r}"

    def averaged(self) -> bool:
        """Whether this backward is an averaged one (a replay ran): then x', W' must be this replay's."""
        rec = self.owner.rec
        if rec.replays == 0:
            return False
        if self.filled != rec.replays:
            raise PairingError(
                f"AG step (linear=True): layer call {self.index} ({self.describe()}, input shape "
                f"{tuple(self.shape)}) was not reached by the pass at {rec.replay_label}. Calls are paired by order: "
                "the closure must run the same computation on the same batch in both passes.")
        if self.x_new._version != self.x_ver or self.w_new._version != self.w_ver:
            raise RuntimeError(f"AG step (linear=True): the input or weight of layer call {self.index} "
                               f"({self.describe()}) in the pass at {rec.replay_label} was modified in place after "
                               "the layer read it; the averaged backward needs it unchanged")
        return True


def _norm(*ts) -> torch.Tensor:
    """‖(t_1, t_2, ...)‖₂ of the non-None tensors as one vector, in at least float32 (0-d tensor)."""
    ts = [t for t in ts if t is not None]
    dt = torch.promote_types(ts[0].dtype, torch.float32)
    if len(ts) == 1:
        return torch.linalg.vector_norm(ts[0], dtype=dt)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=dt) for t in ts]))


def _scale_to(ref: torch.Tensor, *ts):
    """The tensors (fresh gradients, scaled in place) times ‖ref‖/‖ts‖, unchanged where ‖ts‖ = 0. No host sync."""
    n = _norm(*ts)
    s = torch.where(n > 0, ref / n, torch.ones_like(n))  # ref / 0 is only in the branch not taken
    return [None if t is None else t.mul_(s) for t in ts]


def _as(t: Optional[torch.Tensor], dt: torch.dtype) -> Optional[torch.Tensor]:
    """``t`` in dtype ``dt`` (no call when it already is: these run per layer and backward)."""
    return t if t is None or t.dtype == dt else t.to(dt)


def _ends(slot: LayerSlot, x, w, need_x: bool, need_w: bool):
    """The (x, W) the backward uses: θ's, or the midpoints x̄ (for the weight gradient) and W̄ (input gradient)."""
    if not slot.averaged():
        return x, w, False
    xa = torch.lerp(x, slot.x_new, 0.5) if need_w else x
    wa = torch.lerp(w, slot.w_new, 0.5) if need_x else w
    return xa, wa, True


def _finish(slot: LayerSlot, averaged: bool, gx, gw, gb):
    """AG-2 Linear: record the ordinary gradients' norms (first backward) / rescale to them (averaged one)."""
    if not slot.owner.rescale:
        return gx, gw, gb
    if not averaged:
        slot.norm_x = None if gx is None else _norm(gx)
        slot.norm_p = None if gw is None and gb is None else _norm(gw, gb)
        return gx, gw, gb
    if gx is not None:
        (gx,) = _scale_to(slot.norm_x, gx)
    if gw is not None or gb is not None:
        gw, gb = _scale_to(slot.norm_p, gw, gb)
    return gx, gw, gb


class _AvgLinear(torch.autograd.Function):
    """F.linear whose backward reads its slot (module docstring)."""

    @staticmethod
    def forward(ctx, x, w, b, slot):  # noqa: D401 - autograd signature
        ctx.save_for_backward(x, w)
        ctx.slot = slot
        return F.linear(x, w, b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xa, wa, averaged = _ends(ctx.slot, x, w, need_x, need_w)
        cd = g.dtype  # the forward's compute dtype (autocast may have lowered it)
        gx = _as(g @ _as(wa, cd), x.dtype) if need_x else None
        g2 = g.reshape(-1, g.shape[-1])
        gw = _as(g2.t() @ _as(xa, cd).reshape(-1, x.shape[-1]), w.dtype) if need_w else None
        gb = g2.sum(0) if need_b else None
        gx, gw, gb = _finish(ctx.slot, averaged, gx, gw, gb)
        return gx, gw, gb, None


class _AvgConv(torch.autograd.Function):
    """F.conv{1,2,3}d (explicit symmetric padding) whose backward reads its slot (module docstring)."""

    @staticmethod
    def forward(ctx, x, w, b, slot, geom):  # noqa: D401 - autograd signature
        stride, padding, dilation, groups = geom
        ctx.save_for_backward(x, w)
        ctx.slot, ctx.geom, ctx.has_bias = slot, geom, b is not None
        return _CONV_FN[len(stride)](x, w, b, stride, padding, dilation, groups)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.geom
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        xa, wa, averaged = _ends(ctx.slot, x, w, need_x, need_w)
        cd = g.dtype
        # one aten call, as autograd's own ConvolutionBackward: the input gradient reads only the weight, the
        # weight gradient only the input, so passing (x̄, W̄) gives both averaged gradients at once
        gx, gw, gb = torch.ops.aten.convolution_backward(
            g, _as(xa, cd), _as(wa, cd), [w.shape[0]] if ctx.has_bias else None, list(stride), list(padding),
            list(dilation), False, [0] * len(stride), groups, [need_x, need_w, need_b])
        gx, gw = _as(gx, x.dtype), _as(gw, w.dtype)
        gx, gw, gb = _finish(ctx.slot, averaged, gx, gw, gb)
        return gx, gw, gb, None, None


def _conv_geometry(m: nn.Module, x: torch.Tensor, dims: int):
    """(x padded where the conv's padding is not symmetric zeros, (stride, padding, dilation, groups))."""
    k, dil = m.kernel_size, m.dilation
    if m.padding_mode != "zeros":
        x = F.pad(x, m._reversed_padding_repeated_twice, mode=m.padding_mode)
        pad = (0,) * dims
    elif isinstance(m.padding, str):
        if m.padding == "valid":
            pad = (0,) * dims
        else:  # "same": total dilation·(k−1) per dimension, the extra element on the right (as PyTorch does)
            tot = [d * (kk - 1) for d, kk in zip(dil, k)]
            if all(t % 2 == 0 for t in tot):
                pad = tuple(t // 2 for t in tot)
            else:
                lr = []
                for t in reversed(tot):
                    lr += [t // 2, t - t // 2]
                x = F.pad(x, lr)
                pad = (0,) * dims
    else:
        pad = tuple(m.padding)
    return x, (tuple(m.stride), pad, tuple(dil), m.groups)


class LayerAveraging:
    """The Linear/Conv layers of one AG step (module docstring). A context manager: on entry every stock
    Linear/ConvNd module of ``model`` routes its forward through ``_call``; on exit they are as before."""

    def __init__(self, model: nn.Module, rec: "_recording.Recorder", rescale: bool):
        self.model, self.rec, self.rescale = model, rec, bool(rescale)
        self.slots: list[LayerSlot] = []
        self.cursor, self.replay_seen = 0, 0
        self.averaged_modules: set[int] = set()
        self._installed: list[nn.Module] = []

    def __enter__(self) -> "LayerAveraging":
        try:
            for name, m in self.model.named_modules():
                kind = _stock_kind(m)
                if kind is not None:
                    m.forward = functools.partial(self._call, m, name or type(m).__name__, kind)
                    self._installed.append(m)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for m in self._installed:
            m.__dict__.pop("forward", None)
        self._installed = []
        for s in self.slots:
            s.x_new = s.w_new = None
        self.slots = []

    @property
    def calls(self) -> int:
        """Layer calls of the graph pass whose backward averages."""
        return sum(s.read for s in self.slots)

    def kept(self, params) -> tuple:
        """'name (Class)' of every module that owns a parameter with a gradient (``.grad`` not None) and did not
        run through an averaged layer: its backward keeps θ's Jacobian."""
        with_grad = {id(p) for p in params if p.grad is not None}
        out = []
        for name, m in self.model.named_modules():
            if id(m) in self.averaged_modules or _exact(m):
                continue
            if any(p is not None and id(p) in with_grad for p in m._parameters.values()):
                out.append(f"{name or '<model>'} ({type(m).__name__})")
        return tuple(out)

    # -- the layer call ----------------------------------------------------------------------------
    def _call(self, m: nn.Module, name: str, kind: int, x: torch.Tensor) -> torch.Tensor:
        rec = self.rec
        phase = rec.phase if _recording.ACTIVE is rec else PLAIN
        if phase == PLAIN:
            return type(m).forward(m, x)
        if phase == BACKWARD:
            raise CheckpointingError(
                f"AG step: layer {name!r} ({type(m).__name__}) ran during the backward pass (activation "
                "checkpointing?), which breaks the pairing of the passes; AG steps reject it")
        unbatched = kind > 0 and x.dim() == kind + 1
        xin = x.unsqueeze(0) if unbatched else x
        geom = None
        if kind > 0:
            xin, geom = _conv_geometry(m, xin, kind)
        w, b = m.weight, m.bias
        if phase == GRAPH:
            y = self._graph(m, name, kind, xin, w, b, geom)
        else:
            y = self._replay(m, name, xin, w, b, kind, geom)
        return y.squeeze(0) if unbatched else y

    def _plain(self, kind, xin, w, b, geom):
        return F.linear(xin, w, b) if kind == 0 else _CONV_FN[kind](xin, w, b, *geom)

    def _graph(self, m, name, kind, xin, w, b, geom):
        slot = LayerSlot(len(self.slots), name, m, xin, self)
        self.slots.append(slot)
        needs = xin.requires_grad or w.requires_grad or (b is not None and b.requires_grad)
        if torch.is_grad_enabled() and needs:
            slot.read = True
            self.averaged_modules.add(id(m))
            return _AvgLinear.apply(xin, w, b, slot) if kind == 0 else _AvgConv.apply(xin, w, b, slot, geom)
        if not torch.is_grad_enabled() and _recording._inside_checkpoint():
            raise CheckpointingError(
                f"AG step: layer call {slot.index} ({slot.describe()}) runs inside torch.utils.checkpoint, which "
                "recomputes the forward during backward and breaks the pairing of the passes; AG steps reject it")
        return self._plain(kind, xin, w, b, geom)  # no backward reaches it: paired, never read

    def _replay(self, m, name, xin, w, b, kind, geom):
        rec = self.rec
        if rec.replays != self.replay_seen:
            self.cursor, self.replay_seen = 0, rec.replays
        i = self.cursor
        if i >= len(self.slots):
            raise PairingError(
                f"AG step (linear=True): layer call {i} ({type(m).__name__} {name!r}, input shape "
                f"{tuple(xin.shape)}) in the pass at {rec.replay_label} has no partner: the pass at θ made only "
                f"{len(self.slots)} layer calls. Calls are paired by order: the closure must run the same "
                "computation on the same batch in both passes.")
        s = self.slots[i]
        if s.module is not m or xin.shape != s.shape or xin.dtype != s.dtype or xin.device != s.device:
            raise PairingError(
                f"AG step (linear=True): layer call {i} is {type(m).__name__} {name!r} with input shape "
                f"{tuple(xin.shape)} ({xin.dtype}) in the pass at {rec.replay_label} but {s.describe()} with input "
                f"shape {tuple(s.shape)} ({s.dtype}) in the pass at θ. Calls are paired by order: the closure must "
                "run the same computation on the same batch in both passes.")
        if s.read:
            s.x_new, s.w_new = xin.detach(), w.detach()
            s.x_ver, s.w_ver = s.x_new._version, s.w_new._version
            s.filled = rec.replays
        self.cursor = i + 1
        return self._plain(kind, xin, w, b, geom)


def report_kept(ag, kept: tuple, stacklevel: int) -> None:
    """Warns (once per optimizer and module) that these weight-bearing modules keep θ's Jacobian."""
    seen = ag.__dict__.setdefault("_linear_reported", set())
    new = [k for k in kept if k not in seen]
    if new:
        seen.update(new)
        warnings.warn("AG step (linear=True): these weight-bearing modules did not run as averaged Linear/Conv1d/2d/3d "
                      "layers (another class, their own forward, or a weight used without calling the module) and "
                      "keep θ's Jacobian in the averaged backward (also in opt.last.linear_kept):\n  " + "\n  ".join(new), UserWarning, stacklevel=stacklevel)
