"""Consequentialism optimizers (paper 003, SPEC §3): ``Consequentialism(model, base)`` over any
torch.optim optimizer, and its constructors C-SGD / C-Nesterov (``CSGD(nesterov=True)``) and C-Adam (``CAdam``).

Every weight used as a linear map z = W u of a layer input (found by the weight, not the module class: SPEC
§3) has its gradient (the bias as a trailing column) replaced by the preconditioned gradient

    P = G (X Xᵀ + λI)⁻¹             (D × D form, G = ΔZ Xᵀ the ordinary gradient, from ``.grad``)
      = ΔZ (XᵀX + λI)⁻¹ Xᵀ          (M × M form, used when the layer saw fewer positions M than D)

before the base optimizer's own, unchanged step (momentum, Nesterov, weight decay added to P, maximize,
...). Other parameters pass through unchanged; ``report()`` lists every parameter and why.

What is a layer: ``nn.Linear`` / ``nn.Conv1d/2d/3d`` modules (exactly these classes, parameters not tied) are
hooked per module (the *module path*); every other parameter the base holds is watched during the model's
forward (the *functional path*, ``_functional``): ``F.linear`` / ``F.conv*`` / ``addmm`` / ``mm`` / ``matmul`` / ``@``
on it, its transpose or a slice of its rows is a layer (``nn.MultiheadAttention``'s packed ``in_proj_weight``,
one Gram per q/k/v slice, and its functional ``out_proj``; HF ``Conv1D``; Linear/Conv subclasses). A
parameter used in another role as well (GPT-2's tied ``wte`` / ``lm_head``: an embedding and a linear map), or
as two overlapping maps, is left to the plain base update, warned about once and reported: its gradient mixes
the roles, and ``G (A + λI)⁻¹`` with the head's Gram alone would precondition the embedding's share with the
head's statistics; preconditioning only the head's share would need that share ``ΔZ Xᵀ`` computed apart
every step (a second vocabulary-sized product) and would give the base one parameter whose entries are
on two different scales.

The parts: ``_layers`` (what a layer is, the module path), ``_functional`` (the functional path), ``_collect``
(statistics of every use of a layer between two steps, fed by either path), ``_precondition`` (the two forms,
batched solves, the uniform-factor probe), ``_report`` (``report()``). What is collected: every forward of a
layer made in training mode with grad enabled adds to its statistics (several add up: gradient accumulation, a
layer used twice); eval-mode, no-grad and ``paused()`` forwards are ignored; ``step()`` consumes and clears.

``refresh_every = k > 1``: the D × D factorisation is refreshed on steps 0, k, 2k, ... only (Grams are
collected only for those steps) and ``(A + λI)⁻¹`` is kept and reused in between, as K-FAC libraries
reuse their inverses. Layers in the M × M form recompute every step (their X is the batch's own).

Non-finite values: ``step()`` first checks the closure's loss, every ``.grad`` of the base's parameters and
the collected statistics; a NaN or infinity raises ``NonFiniteError`` naming the parameter or layer, with
the parameters, the base's state and ``steps`` unchanged and the statistics dropped (``skip_nonfinite=True``:
the same, without the error, counted in ``skipped_steps``).

DistributedDataParallel (build the optimizer on the DDP model): DDP averages the gradients; the statistics of
all ranks are combined in ``step()`` (``_distributed.Replicas.global_stats``: D × D Grams summed, M × M X and ΔZ
gathered, the form chosen on the global M), so every rank computes the same P.

Mixed precision: under ``torch.autocast`` (bf16, fp16) the Grams accumulate in float32 and the M × M
form's consistency check judges at the precision the layer computed in. ``torch.amp.GradScaler``:
``scaler.step(opt)`` hands the scale and its inf check to ``step()`` (``_step_supports_amp_scaling``), which
unscales the gradients and the collected ΔZ, and drops the statistics of a step the scaler skips.

Copies: the forward hooks are picklable objects holding weak references (``_collect.LayerHook``); a pickled
or deep-copied model carries inert stand-ins, so ``torch.save(model)`` works and a copy of the model never
feeds this optimizer. ``copy.deepcopy(opt)`` / pickle copy the optimizer with its model and hook the copy's
layers (statistics collected since the last step are not carried: their output gradients arrive at the
original).
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterable, Optional, Union

import torch
from torch import nn

from ..ops import check_backend
import warnings

from . import _distributed
from ._collect import Collector, ModuleHooks, remove_inert_hooks
from ._functional import RootPostHook, RootPreHook, Uses
from ._layers import Layer, UnsupportedLayerError, find_layers
from ._report import Report, build_report
from ._precondition import Preconditioner
from ._wrapper import NonFiniteError, OptimizerWrapper, check_model, nonfinite

__all__ = ["CAdam", "CSGD", "Consequentialism", "NonFiniteError", "UnsupportedLayerError"]

_WHO = "the C-optimizers hook its layers"


class Consequentialism(OptimizerWrapper):
    """Consequentialism preconditioning (paper 003, SPEC §3) in front of any torch.optim optimizer.

    ``step()`` replaces the weight (and bias) gradient of every layer of ``model`` that ``base`` optimises
    by ``P = G (X Xᵀ + λI)⁻¹`` (or the equal M × M form), then runs ``base.step()``.

        opt = avg_kernels.optim.Consequentialism(model, torch.optim.RMSprop(model.parameters(), lr=1e-3), lam=0.1)
        loss_fn(model(x), y).backward(); opt.step()      # an ordinary training loop

    Args:
        model: the module whose layers are preconditioned: nn.Linear / nn.ConvNd modules (stride, padding incl.
            'same' and non-zero padding modes, dilation, groups, bias) and every other weight its forward uses
            as a linear map (see the module docstring; ``report()`` says what was found). Layers none of whose
            parameters ``base`` optimises are left alone; a layer ``base`` optimises only partly raises, and so
            does a module that cannot be preconditioned (ConvTranspose, weight norm, lazy): exclude it.
        base: any ``torch.optim.Optimizer`` whose ``step()`` needs no closure (not LBFGS, not AG). Weight
            decay in it is added to the preconditioned gradient. ``param_groups``, ``state`` and ``defaults``
            are shared with it: LR schedulers may be attached to either object.
        lam: λ >= 0, absolute, added to each layer's summed input Gram (the paper uses 1e-3 ... 0.03).
            Stored as ``param_groups[i]["lam"]``; the first group's value is used.
        refresh_every: k >= 1; refresh the D × D factorisations every k steps only (k = 1: the paper's method).
        exclude: modules (or their names in ``model.named_modules()``) left to the plain base update.
        backend: backend of the Gram and ridge_solve ops (None: "auto").
        skip_nonfinite: a NaN/infinity in the closure's loss, a gradient or the collected statistics skips
            the step (counted in ``skipped_steps``, statistics dropped) instead of raising ``NonFiniteError``.

    ``state_dict()``: the base's state dict plus ``"consequentialism"``: the step and skip counts and the
    kept factorisations by layer name. ``copy.deepcopy(opt)`` and pickle copy the optimizer with its model
    (``copy.deepcopy((model, opt))`` keeps the pair); ``torch.save(model)`` works with the hooks attached.
    """

    state_key = "consequentialism"
    #: ``torch.amp.GradScaler.step`` hands the scale and the inf check to ``step()`` instead of unscaling and
    #: skipping by itself: a skipped step must drop its statistics too
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, lam: float = 1e-3, *, refresh_every: int = 1,
                 exclude: Iterable[Union[nn.Module, str]] = (), backend: Optional[str] = None,
                 skip_nonfinite: bool = False):
        if isinstance(base, Consequentialism):
            raise TypeError("base is already a Consequentialism optimizer; it wraps a plain base optimizer")
        super().__init__(model, base, who=_WHO, skip_nonfinite=skip_nonfinite)
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam={lam!r} must be a finite number >= 0")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every={refresh_every!r} must be an int >= 1")
        if backend is not None:
            check_backend(backend)
        for group in self.param_groups:
            group.setdefault("lam", float(lam))
            group.setdefault("refresh_every", refresh_every)
        self.defaults.update(lam=float(lam), refresh_every=refresh_every)
        self.backend = backend
        found = find_layers(model, exclude, {id(p) for p in self._params()})
        self._layers: list[Layer] = found.layers  # the module path
        self._left_out: dict[int, str] = found.left_out
        self._excluded: list = [(p, name) for name, mod in model.named_modules() for p in mod.parameters(recurse=False)
                                if id(p) in found.excluded]
        self._collector = Collector(backend or "auto", self._needs_statistics)
        self._preconditioner = Preconditioner(backend or "auto")
        self._hooks = ModuleHooks(self._layers, self._collector)
        # DDP: statistics of all ranks (_distributed); a plain model called through a DDP is refused
        self._replicas = _distributed.replicas_of(model, type(self).__name__)
        if self._replicas is None:
            self._collector.guard = _distributed.OuterDDPGuard(model, type(self).__name__)
        else:
            self._preconditioner.probe = self._replicas.probe_generator
        self._pending_inverses: dict[str, torch.Tensor] = {}  # loaded factorisations of layers not seen yet
        self._warned: set = set()  # names of parameters warned about
        self._uses = Uses(found.watched, self._collector, self._new_functional_layer)
        self._root_handles = self._hook_root()

    def _hook_root(self) -> list:
        """The forward pre-hook and (always called) forward hook on the model that run the functional path
        during its forwards; none when no watched parameter can be the weight of a linear map (all are
        vectors: BatchNorm/LayerNorm weights, biases), so a plain Linear/Conv model runs as before."""
        if not any(p.dim() >= 2 for _, p in self._uses.watched.values()):
            return []
        return [self.model.register_forward_pre_hook(RootPreHook(self._uses)),
                self.model.register_forward_hook(RootPostHook(self._uses), always_call=True)]

    def _new_functional_layer(self, layer: Layer) -> None:
        inv = self._pending_inverses.pop(layer.name, None)
        if inv is not None:
            self._preconditioner.inverses[layer] = inv.to(device=layer.weight.device)

    def _all_layers(self) -> list[Layer]:
        """The layers preconditioned now: the module path's, then the functional path's that are active."""
        return self._layers + self._uses.active_layers()

    def _needs_statistics(self, layer: Layer) -> bool:
        """Statistics are collected on refresh steps, and always for a layer without a kept factorisation."""
        k = self.param_groups[0]["refresh_every"]
        return self.steps % k == 0 or layer not in self._preconditioner.inverses

    # -- the wrapper's hooks -----------------------------------------------------------------------
    def _check_params(self, params, what: str) -> None:
        """A parameter of a layer left out at construction (the base did not hold it) would be trained
        without preconditioning: rejected."""
        left_out = getattr(self, "_left_out", {})
        for i, p in enumerate(params):
            if id(p) in left_out:
                raise ValueError(
                    f"{what} {i} (shape {tuple(p.shape)}) belongs to layer {left_out[id(p)]!r}, which this optimizer "
                    f"does not precondition (the base optimizer did not hold it when the optimizer was built): "
                    f"build the optimizer after adding it to the base, or exclude the layer")

    def _params_added(self, params) -> None:
        """Parameters given to the base later are watched by the functional path like the others."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        on_module_path = {id(p) for layer in self._layers for p in (layer.weight, layer.bias) if p is not None}
        excluded = {id(p) for p, _ in self._excluded}
        for p in params:
            if id(p) in names and id(p) not in on_module_path and id(p) not in excluded:
                self._uses.watched.setdefault(id(p), (names[id(p)], p))
        if not self._root_handles and self._hooks.attached:
            self._root_handles = self._hook_root()

    def _repr_fields(self) -> list[str]:
        group = self.param_groups[0]
        return [f"lam={group['lam']:g}", f"refresh_every={group['refresh_every']}"]

    def _own_state(self) -> dict:
        return {**super()._own_state(),
                "inverses": {layer.name: v for layer, v in self._preconditioner.inverses.items()}}

    def _check_own_state(self, own) -> None:
        if own is None:
            return
        names = {layer.name for layer in self._all_layers()}
        watched = {n for n, _ in self._uses.watched.values()}
        for name in own.get("inverses", {}):
            if name not in names and name.split("[")[0] not in watched:
                raise ValueError(f"load_state_dict: the saved state has a factorisation for layer {name!r}, "
                                 f"which this optimizer does not precondition")

    def _load_own_state(self, own) -> None:
        inverses = {}
        super()._load_own_state(own)
        self._pending_inverses = {}
        if own is not None:
            by_name = {layer.name: layer for layer in self._all_layers()}
            for name, v in own.get("inverses", {}).items():
                layer = by_name.get(name)
                if layer is None:  # a functional layer this optimizer has not seen used yet
                    self._pending_inverses[name] = v
                else:
                    inverses[layer] = v.to(device=layer.weight.device)
        self._preconditioner.inverses = inverses
        self.clear_statistics()

    # -- copying and pickling ----------------------------------------------------------------------
    def __getstate__(self) -> dict:
        state = super().__getstate__()
        state["_hooks"] = self._hooks.attached  # the copy hooks its own layers (__setstate__)
        state["_root_handles"] = bool(self._root_handles)
        state["_left_out"] = sorted(set(self._left_out.values()))  # ids do not survive a copy: by name
        return state

    def __setstate__(self, state: dict) -> None:
        attached = state.pop("_hooks")
        left_out = state.pop("_left_out")
        super().__setstate__(state)
        modules = dict(self.model.named_modules())
        self._left_out = {id(p): name for name in left_out for p in modules[name].parameters()}
        for layer in self._layers:  # the stand-ins the original's hooks became in this copy of the model
            remove_inert_hooks(layer.module)
        remove_inert_hooks(self.model)
        self._hooks = ModuleHooks(self._layers if attached else [], self._collector)
        self._hooks.attached = attached
        self._root_handles = self._hook_root() if self._root_handles else []

    # -- collection --------------------------------------------------------------------------------
    def clear_statistics(self) -> None:
        """Forgets what the forwards since the last step recorded (step() does this itself)."""
        self._collector.clear()

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside the block are not recorded (like eval mode, without changing the model)."""
        with self._collector.paused():
            yield self

    def remove_hooks(self) -> None:
        """Removes the forward hooks from the model (step() then raises: nothing can be collected)."""
        self._hooks.remove()
        for h in self._root_handles:
            h.remove()
        self._root_handles = []
        self.clear_statistics()

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def precondition_(self, dz_scale: float = 1.0) -> None:
        """Replaces the weight (and bias) gradients of the hooked layers by P and clears the statistics.
        Called by step(); public for inspection (a second call without new forwards raises). ``dz_scale``:
        the factor from the output gradients collected to ``.grad`` (1 / the loss scale after unscaling)."""
        self._apply(self._statistics(None)[0], dz_scale)

    @torch.no_grad()
    def _statistics(self, bad: Optional[str]):
        """(the statistics since the last step, taken: with DDP those of all ranks, or None where some rank met
        a non-finite value; what holds it (``bad``, or on which rank) or None). The collector starts afresh."""
        if not self._hooks.attached:
            raise RuntimeError("remove_hooks() was called: this optimizer can no longer collect statistics")
        stats = self._collector.take()
        if self._replicas is None:
            return stats, bad
        self._replicas.check_usable()
        return self._replicas.global_stats(self._all_layers(), stats, self._collector.gram, bad,
                                           align=self._align_functional_layers)

    def _align_functional_layers(self) -> list[Layer]:
        """DDP: every rank takes the functional layers any rank found, in one order, and leaves to the base a
        parameter any rank left to it (``Uses.adopt``); returns the layers now (equal on every rank)."""
        self._uses.adopt(self._replicas.gather_objects(self._uses.shared_state()))
        return self._all_layers()

    @torch.no_grad()
    def _apply(self, stats, dz_scale: float = 1.0) -> None:
        group = self.param_groups[0]
        layers = self._all_layers()
        active = set(layers)
        for layer in [k for k in self._preconditioner.inverses if k not in active]:  # blocked since kept
            del self._preconditioner.inverses[layer]
        self._warn_not_preconditioned()
        self._preconditioner.apply(layers, stats, float(group["lam"]), int(group["refresh_every"]),
                                   dz_scale)

    def _warn_not_preconditioned(self) -> None:
        """Warns once per parameter that has a gradient and is left to the base update although it was used
        as a linear map (a tied or otherwise multi-role weight, a form not preconditioned), or was never seen
        in a recorded forward (see ``report()``)."""
        uses = self._uses
        if not uses.watched:
            return
        for pid, (name, p) in uses.watched.items():
            if p.grad is None or name in self._warned:
                continue
            why = uses.problems.get(pid)
            if why is None and uses.roles.get(pid) and any(
                    layer.weight is p or layer.bias is p for layer in uses.layers.values()):
                why = uses.why_not(pid)
            if why is None and pid not in uses.seen and self._root_handles:
                why = ("it has a gradient but was never passed to a torch function in a recorded forward of the "
                       "model (a forward that bypasses the model's own forward?)")
            if why is not None:
                self._warned.add(name)
                warnings.warn(f"{type(self).__name__}: parameter {name!r} is not preconditioned (plain base "
                              f"update): {why}. opt.report() lists every parameter", stacklevel=4)

    def report(self) -> Report:
        """Every parameter of the model: preconditioned (how it was found, the form D×D or M×M of its last
        step with D or M, its param group) or not, and why (see ``_report.Report``)."""
        return build_report(self)

    def step(self, closure=None):
        """Evaluates ``closure`` (forward and backward) if given, preconditions, steps the base; returns
        the closure's loss (None without one).

        A NaN or infinity in the loss, a gradient of the base's parameters or the collected statistics
        raises ``NonFiniteError`` (``skip_nonfinite=True``: skips) before anything changes; either way the
        statistics are dropped and the step is not counted.

        ``torch.amp.GradScaler``: ``scaler.step(opt)`` calls this with ``opt.grad_scale`` (the scale, None
        when ``scaler.unscale_(opt)`` ran already) and ``opt.found_inf`` set (``_step_supports_amp_scaling``):
        a step the scaler skips (an inf found) drops the statistics collected for it and counts in
        ``skipped_steps``; otherwise the gradients are unscaled here, and the M × M form's probe finds the
        scale left in the captured ΔZ as its uniform factor."""
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if found_inf is not None and bool(found_inf.sum() > 0):
            self.clear_statistics()
            self.skipped_steps += 1
            return loss
        dz_scale = 1.0
        if grad_scale is not None:
            inv = grad_scale.double().reciprocal().float()
            dz_scale = float(inv)
            by_device: dict = {}
            for p in self._params():
                if p.grad is not None:
                    by_device.setdefault(p.grad.device, []).append(p.grad)
            for device, grads in by_device.items():
                torch._foreach_mul_(grads, inv.to(device))
        bad = self._nonfinite(loss)
        stats = None
        if self._replicas is not None:  # every rank decides alike: one collective carries each rank's verdict
            stats, bad = self._statistics(bad)
        if bad is not None:
            self.clear_statistics()
            if self.skip_nonfinite:
                self.skipped_steps += 1
                return loss
            raise NonFiniteError(
                f"{type(self).__name__}.step(): {bad} has a NaN or infinity; nothing was changed (parameters, "
                f"the base optimizer's state, opt.steps = {self.steps}) and the statistics collected since the "
                f"last step were dropped. Pass skip_nonfinite=True to skip such steps (counted in "
                f"opt.skipped_steps), as torch.amp.GradScaler does")
        if stats is None:
            self.precondition_(dz_scale)
        else:
            self._apply(stats, dz_scale)
        self.base.step()
        self.steps += 1
        return loss

    def _nonfinite(self, loss) -> Optional[str]:
        """What holds a NaN or infinity (the loss, a parameter's gradient, a layer's statistics), or None."""
        named = [("the loss", loss if isinstance(loss, torch.Tensor) else None)]
        grads = [p for p in self._params() if p.grad is not None]
        named += [(p, p.grad) for p in grads]
        for layer, st in self._collector.stats.items():
            named += [(f"the input statistics of layer {layer.name!r}", t) for t in [st.gram, *st.xs]]
            named += [(f"the output gradient of layer {layer.name!r}", t) for t in st.dzs]
        bad = nonfinite(named)
        if isinstance(bad, torch.Tensor):
            return f"the gradient of parameter {self._param_name(bad)!r}"
        return bad


class CSGD(Consequentialism):
    """C-SGD / C-Nesterov (paper 003): ``Consequentialism`` over ``torch.optim.SGD`` (SPEC §3).

    Args:
        model: the module whose parameters are optimised (all of them, by the SGD base ``.base``).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as torch.optim.SGD
            (``nesterov=True`` is C-Nesterov; weight decay is added to the preconditioned gradient).
        lam, refresh_every, exclude, backend, skip_nonfinite: as ``Consequentialism``.
    """

    def __init__(self, model: nn.Module, lr: float, lam: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *, refresh_every: int = 1,
                 exclude: Iterable[Union[nn.Module, str]] = (), backend: Optional[str] = None, maximize: bool = False,
                 foreach: Optional[bool] = None, skip_nonfinite: bool = False):
        check_model(model, _WHO)
        base = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                               weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, foreach=foreach)
        super().__init__(model, base, lam, refresh_every=refresh_every, exclude=exclude, backend=backend,
                         skip_nonfinite=skip_nonfinite)


class CAdam(Consequentialism):
    """C-Adam (paper 003): ``Consequentialism`` over ``torch.optim.Adam`` (SPEC §3).

    Args:
        model: the module whose parameters are optimised (all of them, by the Adam base ``.base``).
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach: as torch.optim.Adam (L2 weight decay,
            added to the preconditioned gradient).
        lam, refresh_every, exclude, backend, skip_nonfinite: as ``Consequentialism``.
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, lam: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, amsgrad: bool = False, refresh_every: int = 1,
                 exclude: Iterable[Union[nn.Module, str]] = (), backend: Optional[str] = None, maximize: bool = False,
                 foreach: Optional[bool] = None, skip_nonfinite: bool = False):
        check_model(model, _WHO)
        base = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                amsgrad=amsgrad, maximize=maximize, foreach=foreach)
        super().__init__(model, base, lam, refresh_every=refresh_every, exclude=exclude, backend=backend,
                         skip_nonfinite=skip_nonfinite)
