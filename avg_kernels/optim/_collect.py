"""What the C-optimizers collect between two steps (SPEC §3).

* ``LayerStats``: what the uses of one layer since the last step left: their summed input Gram (D × D
  form) or, while the layer has seen fewer positions M than D, the inputs themselves (references, no
  copy) and the gradients w.r.t. the outputs (M × M form).
* ``Collector``: the ``LayerStats`` of every layer, fed by ``record(layer, x, output)`` once per use of a
  layer's weight, by either way of finding uses (``ModuleHooks`` here, ``_functional.Uses`` for weights
  found by their use in torch functions). It decides whether a use counts (grad enabled, not paused, the
  layer wants statistics this step) and is consumed by ``take()``. It does not know how uses are found.
* ``ModuleHooks``: finds uses through forward hooks on each layer's module (training-mode forwards):
  ``LayerHook`` objects, picklable, with weak references; a pickled or deep-copied model carries an
  ``InertHook`` in their place.

Several uses add up (gradient accumulation, a layer used twice). A use whose output gradient never
arrives counts with ΔZ = 0, which is what the D × D form does with it too.
"""
from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..ops import IM2COL_GRAM, LINEAR_GRAM
from ._layers import Layer


@dataclass(eq=False)  # holds tensors: compared by identity
class LayerStats:
    """What the uses of one layer since the last step recorded."""

    gram: Optional[torch.Tensor] = None  # (groups, D, D) float32/float64, D × D form
    xs: list = field(default_factory=list)  # kept prepared inputs, M × M form
    dzs: list = field(default_factory=list)  # their output gradients (None until the backward)
    m: int = 0  # positions seen
    bias: bool = False  # the Gram/inputs include the trailing 1
    # M × M form of several ranks (DDP, _distributed.Replicas.global_stats): X (groups, D, M) and ΔZ
    # (groups, C_out/groups, M) of all ranks, already unfolded, in place of xs / dzs
    X: Optional[torch.Tensor] = None
    dz: Optional[torch.Tensor] = None
    eps: float = 0.0  # unit roundoff of the lowest precision a use computed in (autocast: its output dtype)


class Collector:
    """Per-layer statistics of the uses since the last ``take()``.

    Args:
        backend: backend of the Gram ops ("auto" or a name).
        wanted: whether a layer needs statistics for the coming step (False between refreshes of a layer
            whose factorisation is reused).
    """

    def __init__(self, backend: str, wanted: Callable[[Layer], bool]):
        self.backend = backend
        self.wanted = wanted
        self.stats: dict[Layer, LayerStats] = {}
        self._paused = 0
        self.guard: Optional[Callable[[], None]] = None  # called at each counted use (raises to refuse it)

    def __getstate__(self) -> dict:
        """A copy starts with no statistics (the output gradients of the uses so far arrive here) and not
        paused."""
        return {**self.__dict__, "stats": {}, "_paused": 0}

    def counts(self, layer: Layer) -> bool:
        """Whether a use of ``layer`` made now adds to its statistics."""
        return not self._paused and torch.is_grad_enabled() and self.wanted(layer)

    def record(self, layer: Layer, x: torch.Tensor, output) -> None:
        """One use of ``layer``: ``x`` its input as the layer takes it (Linear (..., in_features), ConvNd
        (N, C_in, *spatial)), ``output`` its result z, whose gradient (ΔZ) a tensor hook catches when the
        M × M form needs it. Ignored unless ``counts(layer)`` and both weight and output require grad."""
        if not self.counts(layer):
            return
        if self.guard is not None:
            self.guard()
        if not layer.weight.requires_grad or not isinstance(output, torch.Tensor) or not output.requires_grad:
            return
        st = self.stats.get(layer)
        if st is None:
            st = self.stats[layer] = LayerStats()
        bias = layer.has_bias()
        if st.m and st.bias != bias:
            raise RuntimeError(f"layer {layer.name}: its bias changed requires_grad between two forwards of one step")
        st.bias = bias
        st.eps = max(st.eps, _eps(x.dtype), _eps(output.dtype))
        x = layer.prepare_input(x.detach())
        m = layer.positions(x)
        if st.gram is None and st.m + m < layer.dim():  # M × M form (so far): keep x, catch ΔZ
            slot = len(st.dzs)
            st.xs.append(x)
            st.dzs.append(None)
            output.register_hook(_output_grad_hook(st, slot))
        else:
            gram = self.gram(layer, x, bias)
            for old in st.xs:  # switch this step to the D × D form
                gram = gram + self.gram(layer, old, bias)
            st.xs.clear()
            st.dzs.clear()
            st.gram = gram if st.gram is None else st.gram.add_(gram)
        st.m += m

    def gram(self, layer: Layer, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """The Gram X Xᵀ of a prepared input: (groups, D, D), float32 (float64 for float64 input)."""
        if layer.conv_dims == 0:
            return LINEAR_GRAM.eager(x, bias, self.backend)
        return IM2COL_GRAM.eager(x, *layer.gram_args, bias, self.backend)

    def take(self) -> dict[Layer, LayerStats]:
        """The statistics so far (layers without a counted use absent); the collector starts afresh."""
        stats, self.stats = self.stats, {}
        return stats

    def clear(self) -> None:
        self.stats = {}

    @contextlib.contextmanager
    def paused(self):
        """Uses inside the block are not recorded."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def _output_grad_hook(st: LayerStats, slot: int):
    xs = st.xs  # the list of this step: a hook firing after take() or a switch to D × D finds another state

    def hook(grad):
        if st.xs is xs and slot < len(st.dzs):
            st.dzs[slot] = grad if st.dzs[slot] is None else st.dzs[slot] + grad
        return None

    return hook


class ModuleHooks:
    """Feeds a ``Collector`` from a forward hook on each layer's module: every forward of the module in
    training mode is a use (eval-mode forwards are ignored).

    The hooks are ``LayerHook`` objects (picklable, weak references): ``torch.save(model)`` and
    ``copy.deepcopy(model)`` carry an inert stand-in instead, so a copy of the model never feeds this
    collector."""

    def __init__(self, layers: list[Layer], collector: Collector):
        self._handles = [layer.module.register_forward_hook(LayerHook(layer, collector)) for layer in layers]
        self.attached = True

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.attached = False


class InertHook:
    """What a ``LayerHook`` becomes in a pickled or deep-copied model: does nothing. (A module-level class
    so that ``torch.save(model)`` / ``torch.load`` work; ``Consequentialism`` removes these from the modules
    it hooks when it is itself copied or unpickled.)"""

    def __call__(self, *args):  # a forward hook (module, inputs, output) or pre-hook (module, inputs)
        return None

    def __repr__(self) -> str:
        return "InertHook()"


def remove_inert_hooks(module) -> None:
    """Removes the ``InertHook`` stand-ins from ``module``'s forward hooks and pre-hooks."""
    for hooks in (module._forward_hooks, module._forward_pre_hooks):
        for key in [k for k, h in hooks.items() if isinstance(h, InertHook)]:
            del hooks[key]
            module._forward_hooks_always_called.pop(key, None)


class LayerHook:
    """The forward hook on one layer's module. It holds weak references to the layer and the collector
    (a dropped optimizer's hooks do nothing) and records only forwards that use the layer's own weight (a
    module sharing the hook dict with another weight, e.g. a shallow copy given a new weight, is ignored; a
    shallow copy with the same weight is a use of the layer). Pickled or deep-copied it becomes an
    ``InertHook``: a copy of the model must not feed the original optimizer."""

    __slots__ = ("_layer", "_collector", "__weakref__")

    def __init__(self, layer: Layer, collector: Collector):
        self._layer = weakref.ref(layer)
        self._collector = weakref.ref(collector)

    def __call__(self, module, inputs, output):
        if not module.training:
            return None
        layer, collector = self._layer(), self._collector()
        if layer is None or collector is None or getattr(module, "weight", None) is not layer.weight:
            return None
        collector.record(layer, inputs[0], output)
        return None

    def __reduce__(self):
        return InertHook, ()

    def __repr__(self) -> str:
        layer = self._layer()
        return f"LayerHook({layer.name if layer is not None else '<dropped>'!r})"
