"""AG-1 / AG-2 / AG-3-1 training steps over any torch.optim base optimizer (SPEC §4).

    model = avg_kernels.nn.convert(model)
    opt = avg_kernels.optim.AG(model, torch.optim.RMSprop(model.parameters(), lr=1e-3), mode="ag1")
    for x, y in loader:
        loss = opt.step(lambda: F.cross_entropy(model(x), y))   # the closure never calls backward()

One AG-1 / AG-2 step (papers 000 Alg. 1-2, 002 Alg. 2) on one batch:

1. forward at θ through the closure, on COPIES of the parameters (the graph must survive the base
   optimizer's in-place update), recording one slot per averaged-activation call; backward with the
   graph retained -> g in ``p.grad``;
2. ``base.step()`` -> θ' (the base optimizer's state advances once: s_t -> s_{t+1});
3. forward at θ' without grad, same batch, same training mode, dropout masks replayed (the RNG is
   forked and reset to its state before step 1), buffers (BatchNorm running statistics ...) on a
   scratch copy taken before step 1, so the θ' pass changes no buffer; call k's input fills slot k;
4. second backward over the SAME graph from ℓ(θ): the averaged activations now use s(x, x') -> ḡ;
5. AG-1: ``avg_kernels.ag1_update_new_(θ, θ', ḡ)``: θ_{t+1} written over θ' in the parameters (the copies
   keep θ, for an undo). AG-2: θ'' = the base optimizer's update of θ with ḡ
   from the PRE-step state s_t (saved before step 2, swapped in for this call, then s_{t+1} restored:
   Adam's step count included), then ``avg_kernels.ag2_rescale_(θ'', θ, θ')``.

AG-3-1 (paper 002 Alg. 1, d = 1): forward with graph at θ_t, a no-grad forward at the previous
parameters θ_{t-1} (kept by the optimizer) recording x', ONE backward with the secant slopes, then the
base optimizer's step with ḡ. The first step (no θ_{t-1} yet) is a plain base step.

After ``step``: ``p.grad`` holds the gradient the update used (ḡ; g on a plain step), ``opt.last`` an
``AGStepInfo`` (ℓ(θ), ℓ(θ') or ℓ(θ_{t-1}), optionally ℓ(θ_{t+1}), timings when ``profile=True``).

n-iteration AG (mode "agn", paper 000 Alg. 4) refines AG-1's averaging range over the same graph
(``_agn``); the "Linear" variants (``linear=True``, paper 002 Eq. 11) average the Jacobians of Linear/Conv
layers too (``_linear_avg``).

This file holds the modes and the step orchestration; ``_wrapper`` the shared optimizer wrapper (the base
held as ``.base``), ``_passes`` what running the closure several times needs (parameter/buffer swap, RNG
replay, eager stance, the direct-use detector, the phase timer), ``_base_state`` the base's state set
aside for AG-2.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from .._contract import args
from ..activations import EPS
from ..nn._recording import GRAPH, PLAIN, BACKWARD, Recorder, ReplayComplete
from ..nn._fnmode import ActivationMode
from ..ops import AG1_UPDATE, AG1_UPDATE_NEW, AG2_RESCALE, check_backend
from . import _agn, _amp, _base_state, _distributed
from ._base_state import BaseState
from ._linear_avg import LayerAveraging, report_kept
from ._passes import DirectUse, ParamSites, Phases, RNGReplay, eager
from ._wrapper import NonFiniteError, OptimizerWrapper, nonfinite

MODES = ("ag1", "ag2", "ag3-1", "agn")


@dataclass
class AGStepInfo:
    """What one ``AG.step`` saw. Losses are detached 0-d tensors (read them with ``float()``)."""

    mode: str
    step: int  # 1-based index of this step
    loss: torch.Tensor  # ℓ(θ_t) on the batch (what step() returned)
    # the replay's loss: kept with track_replay_loss (default: track_loss_after) and on the optimizer's first replay;
    # else None (the replay stopped after its last averaged activation)
    loss_new: Optional[torch.Tensor] = None  # ℓ(θ') on the batch: after the base optimizer's own step (ag1/ag2)
    loss_prev: Optional[torch.Tensor] = None  # ℓ(θ_{t-1}) on the batch (ag3-1)
    loss_after: Optional[torch.Tensor] = None  # ℓ(θ_{t+1}) on the batch (track_loss_after=True)
    # times: seconds per phase when profiling; "loss_after" (the extra forward for ℓ(θ_{t+1}), not part of
    # the step's cost) and "loss_after_cpu" (its CPU time, time.process_time) are always recorded when
    # track_loss_after=True
    activation_calls: int = 0  # averaged activations paired in this step (a recognised compound counts once)
    compound_calls: int = 0  # of which hand-written forms averaged as one activation (x*sigmoid(x) ...)
    # share of the averaged elements whose backward fell back to f'(x) because |x' − x| <= eps: measured
    # when an averaged input is bf16/fp16 (autocast: x and x' often round to the same value) or with
    # track_fallback=True; None otherwise and on a plain or skipped step
    fallback_fraction: Optional[float] = None
    loss_iterates: tuple = ()  # agn: ℓ(θ_1), …, ℓ(θ_{n−2}) on the batch (the replays after the one at θ')
    linear_calls: int = 0  # linear=True: Linear/Conv calls whose backward averaged (Eq. 11)
    linear_kept: tuple = ()  # linear=True: "name (Class)" of weight-bearing modules that kept θ's Jacobian
    plain: bool = False  # True for a plain base step (the first AG-3-1 step)
    skipped: bool = False  # True for a step skipped for a non-finite loss or gradient (skip_nonfinite=True)
    times: dict = field(default_factory=dict)  # seconds per phase (profile=True); "loss_after" is extra

    @property
    def reduction(self) -> Optional[float]:
        """ℓ(θ_t) − ℓ(θ_{t+1}): this step's batch-loss reduction (needs track_loss_after=True)."""
        return None if self.loss_after is None else float(self.loss) - float(self.loss_after)

    @property
    def base_reduction(self) -> Optional[float]:
        """ℓ(θ_t) − ℓ(θ'): the base optimizer's own step's batch-loss reduction (ag1/ag2)."""
        return None if self.loss_new is None else float(self.loss) - float(self.loss_new)

    def as_dict(self) -> dict:
        def f(t):
            return None if t is None else float(t)

        return {"mode": self.mode, "step": self.step, "loss": f(self.loss), "loss_new": f(self.loss_new),
                "loss_prev": f(self.loss_prev), "loss_after": f(self.loss_after), "reduction": self.reduction,
                "base_reduction": self.base_reduction, "activation_calls": self.activation_calls,
                "compound_calls": self.compound_calls, "fallback_fraction": self.fallback_fraction,
                "plain": self.plain, "skipped": self.skipped, "times": dict(self.times),
                "loss_iterates": [f(t) for t in self.loss_iterates], "linear_calls": self.linear_calls,
                "linear_kept": list(self.linear_kept)}


class _Skip(Exception):
    """Internal: a non-finite value with ``skip_nonfinite=True``; the step is undone and skipped."""


@dataclass
class _Segment:
    """The averaging segment [θ, θ'] of an AG-1/AG-2 step once ḡ is known (steps 1-4 done)."""

    params: list  # the parameters; they hold θ' (the base optimizer's step with g)
    live: list  # p.detach() of each: what the update writes θ_{t+1} into
    theta: list  # detached copies holding θ (the graph of step 1 was built on them)
    gbar: tuple  # ḡ per parameter (None where the loss does not depend on it)
    pre_step: Optional[BaseState]  # AG-2: the base optimizer's state s_t before its step with g


class AG(OptimizerWrapper):
    """Average-gradient training over a base optimizer: AG-1, AG-2 or AG-3-1 (SPEC §4).

    Args:
        model: the ``nn.Module`` the closure runs. Every activation of ``avg_kernels.activations.TABLE`` its
            forward computes is averaged: converted modules (``avg_kernels.nn.convert(model)``), function
            calls (``F.gelu``, ``torch.tanh`` ...) and the hand-written forms of
            ``avg_kernels.nn._compound.FORMS`` (see docs/ag_training.md, "What AG averages").
            A ``DistributedDataParallel`` model: the passes run under ``no_sync()`` and g and ḡ are averaged over
            the ranks (``_distributed``); its plain ``.module`` run through the DDP is refused at the first step.
        base: any ``torch.optim.Optimizer`` over parameters of ``model`` (SGD, RMSprop, Adam, ...). It is
            stepped exactly once per batch; LR schedulers may be attached to it or to this object
            (``param_groups`` is shared).
        mode: "ag1" (sign of ḡ, magnitude |θ' − θ|), "ag2" (base step with ḡ from the pre-step
            state, rescaled to the L1 length of θ' − θ), "ag3-1" (segment [θ_{t-1}, θ_t], one backward) or
            "agn" (n-iteration AG-1, paper 000 Alg. 4: ``iterations`` backwards, each refining the averaging
            range [θ, θ_{k-1}]; see ``_agn``).
        iterations: mode="agn" only: n >= 2 (n = 2 is AG-1). Other modes refuse it (ValueError).
        linear: the "Linear" variants (paper 002 Eq. 11; ag1, ag2, agn): Linear/Conv1d/2d/3d layers back-propagate
            with the mean of their Jacobians at both ends of the segment; with ag2 also rescaled per layer to the
            ordinary gradients' norms (Alg. 2 line 15). Other weight-bearing modules keep θ's Jacobian and are
            named in ``last.linear_kept`` (and warned about once). See ``_linear_avg``.
        eps: |x' − x| <= eps uses f'(x) (SPEC §1).
        backend: backend of the averaged backward and the update ops (None: "auto", see
            ``avg_kernels.use_backend``).
        track_replay_loss: the replay (the no-grad pass at the segment's other end) runs the closure to its end and
            its loss is kept: ``last.loss_new`` ℓ(θ') (ag1, ag2, agn) or ``last.loss_prev`` ℓ(θ_{t-1}) (ag3-1).
            False: after the optimizer's first replay, the replay stops at the model's first torch call after its
            last averaged activation (nothing after it feeds ḡ: a language model's head and loss; bench/models.py,
            1 thread: GPT-2's replay 41.7 → 35.7 ms, Llama's 29.3 → 23.6 ms) and that loss is None. Default (None): ``track_loss_after``
            (``metrics.RD`` reads ℓ(θ') with ℓ(θ_{t+1})). A DDP model's replays and those with ``linear=True``
            (its Linear layers need their inputs at the other end too; refused with False) run to the end.
        track_loss_after: also evaluate ℓ(θ_{t+1}) on the batch (one more no-grad forward, same
            dropout masks, no buffer change) into ``last.loss_after``; needed for RD. Its time is
            reported separately (``last.times["loss_after"]`` when profiling) and is not part of the step.
        profile: record per-phase times in ``last.times`` (synchronises CUDA between phases): True for wall
            time, or a clock function returning seconds (e.g. ``time.process_time``: CPU time, robust to other
            processes on a shared machine).
        require_activations: raise when a step's forward at θ makes no averaged-activation call, from the
            first step on (AG-3-1's plain first step included): AG would silently be the base optimizer with
            a sign/rescale step.
        check_unaveraged: on the first step, warn about the activation calls the step cannot average (no
            averaged kernel: ``F.mish``, QuickGELU ...; in-place calls), by module.
        skip_nonfinite: a NaN/infinity in ℓ(θ), g or ḡ skips the step (``last.skipped``, counted in
            ``skipped_steps``) instead of raising ``NonFiniteError``.
        track_fallback: measure ``last.fallback_fraction`` in every step (four elementwise passes over each
            averaged input); without it, only where an averaged input is bf16/fp16 (autocast).

    A step that raises (or is skipped) leaves the parameters and buffers as before the step and is not
    counted; the exception note says what became of the base's state (see ``_undo``). A failure in the
    ℓ(θ_{t+1}) pass of ``track_loss_after`` comes after the step: the update stays applied and counted.
    ``copy.deepcopy`` / pickle copy the optimizer with its model and base.

    The closure runs the forward on one fixed batch and returns the loss; it must not call
    ``backward()`` (the step raises if gradients appear) and is called two (``iterations`` with "agn"; one
    more with ``track_loss_after``) times per step, so it must not draw a new batch or have other side effects.

    ``state_dict()``: the base's state dict plus ``"ag"``: mode, eps, step count and θ_{t-1} (AG-3-1).
    ``load_state_dict`` also takes the older layout ``{"base": ..., "ag": ...}``.
    """

    state_key = "ag"
    step_needs_closure = True

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, mode: str = "ag1", eps: float = EPS, *,
                 backend: Optional[str] = None, track_replay_loss: Optional[bool] = None,
                 track_loss_after: bool = False, profile: bool = False,
                 require_activations: bool = True, check_unaveraged: bool = True, skip_nonfinite: bool = False,
                 iterations: Optional[int] = None, linear: bool = False, track_fallback: bool = False):
        if isinstance(base, AG):
            raise TypeError("base is already an AG optimizer; AG wraps a plain base optimizer")
        super().__init__(model, base, who="the model the closure runs", skip_nonfinite=skip_nonfinite)
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}: expected one of {list(MODES)}")
        self.iterations = _agn.check_iterations(mode, iterations)
        if not isinstance(linear, bool):
            raise TypeError(f"linear must be a bool, got {type(linear).__name__}")
        if linear and mode == "ag3-1":
            raise ValueError("linear=True (paper 002 Eq. 11) is defined for the forward-looking modes ag1, ag2 and "
                             "agn; mode='ag3-1' averages activations only")
        self.linear = linear
        args.nonneg_real("eps", eps)
        if backend is not None:
            check_backend(backend)
        params = self._params()
        if mode == "ag2" and len({p.device for p in params}) > 1:
            raise ValueError(f"mode='ag2' rescales the step by a global L1 norm over all parameters, which must then "
                             f"be on one device; the base optimizer's parameters are on {sorted(map(str, {p.device for p in params}))}")
        devs = {p.device.type for p in params} | {b.device.type for b in model.buffers()}
        if devs - {"cpu", "cuda"}:
            raise ValueError(f"AG steps replay dropout masks on CPU and CUDA only; model has tensors on {sorted(devs)}")
        self.mode = mode
        self.eps, self.backend = float(eps), backend
        if track_replay_loss is not None and not isinstance(track_replay_loss, bool):
            raise TypeError(f"track_replay_loss must be a bool or None, got {type(track_replay_loss).__name__}")
        if track_replay_loss is False and linear:
            raise ValueError("track_replay_loss=False stops the replay after the last averaged activation, but "
                             "linear=True needs every Linear/Conv layer's input at θ' from it: use one or the other")
        self.track_loss_after = bool(track_loss_after)
        self.track_replay_loss = self.track_loss_after if track_replay_loss is None else track_replay_loss
        if not (isinstance(profile, bool) or callable(profile)):
            raise TypeError(f"profile must be a bool or a clock function, got {type(profile).__name__}")
        self.profile = profile
        self.require_activations, self.check_unaveraged = bool(require_activations), bool(check_unaveraged)
        self.track_fallback = bool(track_fallback)
        self.last: Optional[AGStepInfo] = None
        self._theta: list[torch.Tensor] = []  # AG-1/2: leaf copies of θ the graph is built on
        self._theta_for: list[int] = []
        self._spare: list[torch.Tensor] = []  # AG-2: θ' while θ'' is computed
        self._prev: Optional[list[torch.Tensor]] = None  # AG-3-1: θ_{t-1}
        self._prev_for: list[int] = []
        self._checked = False
        # DDP: g and ḡ averaged over the ranks, passes under no_sync (None for a plain model; _distributed)
        self._replicas = _distributed.replicas_of(model, "AG", own_backward=True)
        self._ddp_checked = self._replicas is not None
        self._warned = False  # the first forward warned about what is not averaged
        self._scaler = None  # the GradScaler of the step in progress

    # -- the wrapper's hooks -----------------------------------------------------------------------
    def _check_params(self, params, what: str) -> None:
        """θ' comes from a forward of the model: every parameter must be one of its (initialised) parameters."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        for i, p in enumerate(params):
            if id(p) not in names:
                raise ValueError(
                    f"{what} {i} (shape {tuple(p.shape)}) is not a parameter of model: AG needs θ' from a forward of "
                    "the model, so the base optimizer must optimize the model's parameters")
            if isinstance(p, nn.parameter.UninitializedParameter):
                raise ValueError(f"parameter {names[id(p)]!r} is uninitialized (lazy module): run one forward before "
                                 "creating the optimizer")

    def _repr_fields(self) -> list[str]:
        return ([f"mode={self.mode!r}"] + ([f"iterations={self.iterations}"] if self.iterations else [])
                + (["linear=True"] if self.linear else []) + [f"eps={self.eps:g}"])

    def _own_state(self) -> dict:
        params = self._params()
        prev = None
        if self._prev is not None:
            by_id = dict(zip(self._prev_for, self._prev))
            prev = [by_id.get(id(p)) for p in params]
            prev = [None if t is None else t.detach().clone() for t in prev]
        return {"mode": self.mode, "eps": self.eps, **super()._own_state(), "prev": prev}

    def _split_state(self, state_dict: dict):
        if isinstance(state_dict, dict) and "base" in state_dict and "ag" in state_dict:
            return state_dict["base"], state_dict["ag"]  # the layout before the shared wrapper
        base, own = super()._split_state(state_dict)
        if own is None:
            raise ValueError("state_dict: expected a dict from AG.state_dict() (the base optimizer's state dict "
                             "plus the key 'ag'); this one has no 'ag' entry")
        return base, own

    def _check_own_state(self, own: dict) -> None:
        if own.get("mode") != self.mode:
            raise ValueError(f"state_dict was saved by an AG optimizer with mode={own.get('mode')!r}, this one has "
                             f"mode={self.mode!r}")
        params = self._params()
        prev = own.get("prev")
        if prev is None:
            return
        if len(prev) != len(params):
            raise ValueError(f"state_dict holds θ_(t-1) for {len(prev)} parameters, this optimizer has {len(params)}")
        for i, (p, t) in enumerate(zip(params, prev)):
            if t is not None and tuple(t.shape) != tuple(p.shape):
                raise ValueError(f"state_dict θ_(t-1) of parameter {i} has shape {tuple(t.shape)}, the "
                                 f"parameter has shape {tuple(p.shape)}")

    def _load_own_state(self, own: dict) -> None:
        super()._load_own_state(own)
        prev = own.get("prev")
        if prev is None:
            self._prev, self._prev_for = None, []
        else:
            kept = [(p, t) for p, t in zip(self._params(), prev) if t is not None]
            self._prev = [t.detach().to(device=p.device, dtype=p.dtype).clone() for p, t in kept]
            self._prev_for = [id(p) for p, _ in kept]

    # -- copying and pickling ----------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """As the wrapper's (the model and base included); θ_{t-1} is keyed by parameter, not by id (ids do
        not survive a copy), and the scratch copies of θ are not carried."""
        state = super().__getstate__()
        by_id = {id(p): p for p in self._params()}
        state["_prev_for"] = [by_id.get(i) for i in self._prev_for]
        state.update(_theta=[], _theta_for=[], _spare=[], _scaler=None)
        return state

    def __setstate__(self, state: dict) -> None:
        state["_prev_for"] = [id(p) if p is not None else None for p in state["_prev_for"]]
        state.setdefault("_warned", state.get("_checked", False))
        state.setdefault("_scaler", None)
        super().__setstate__(state)

    # -- the step ----------------------------------------------------------------------------------
    def step(self, closure: Callable[[], torch.Tensor], scaler=None) -> torch.Tensor:  # type: ignore[override]
        """One AG step on the batch the closure evaluates; returns ℓ(θ_t) (detached).

        ``scaler``: a ``torch.amp.GradScaler`` for fp16 training (``GradScaler.step`` refuses closures, so
        the step takes it): every backward of the step scales the loss, the gradients are unscaled, and a
        non-finite gradient skips the step (``last.skipped``) and backs the scale off at the caller's
        ``scaler.update()``, which stays the caller's, once per step (see ``avg_kernels/optim/_amp.py``)."""
        if closure is None or not callable(closure):
            raise TypeError("AG.step(closure): the closure (running the forward, returning the loss, no "
                            "backward) is required")
        self._scaler = _amp.check(scaler)
        params = [p for p in self._params() if p.requires_grad]
        cuda = sorted({p.device.index or 0 for p in params if p.device.type == "cuda"}
                      | {b.device.index or 0 for b in self.model.buffers() if b.device.type == "cuda"})
        ph = Phases(self.profile, bool(cuda))
        run = {"ag1": self._step_ag1, "ag2": self._step_ag2, "ag3-1": self._step_ag3, "agn": self._step_ag1}[self.mode]
        with self._distributed():
            info = run(closure, params, cuda, ph)
        return info.loss

    @contextlib.contextmanager
    def _distributed(self):
        """DDP model: DDP's checks, rank 0's buffers broadcast, the passes under ``no_sync``. Plain model: on
        the first step, a forward through a DDP around it raises (``ddp.module`` was passed)."""
        if self._replicas is not None:
            self._replicas.check_usable()
            self._replicas.broadcast_buffers()
            with self._replicas.no_sync():
                yield
        elif not self._ddp_checked:
            with _distributed.refusing_outer_ddp(self.model, "AG"):
                yield
            self._ddp_checked = True
        else:
            yield

    def _mean_over_ranks(self, grads, params, ph: Phases, loss=None):
        """DDP: ``grads`` averaged over the ranks, and ``loss`` NaN where any rank's loss is not finite (every
        rank then decides alike); a plain model: as given."""
        if self._replicas is None:
            return grads, loss
        grads, loss = self._replicas.mean_grads(grads, params, loss)
        ph.mark("all_reduce")
        return tuple(grads), loss

    def _done(self, info: AGStepInfo, ph: Phases) -> None:
        """The step's update is in place: count it and publish ``last`` (before the ℓ(θ_{t+1}) pass)."""
        if not info.skipped:
            self.steps += 1
        info.step, info.times = self.steps, ph.times
        self.last = info

    def _check_finite(self, named: list, grad: str) -> None:
        """Raises ``NonFiniteError`` (``_Skip`` with ``skip_nonfinite=True``; counted) where one of the
        ``(name or parameter, tensor)`` entries has a NaN or infinity; ``grad`` names a parameter's tensor."""
        bad = nonfinite(named)
        if bad is None:
            return
        if self.skip_nonfinite or self._scaler is not None:  # with a scaler: skip, as GradScaler.step does
            self.skipped_steps += 1
            raise _Skip()
        if isinstance(bad, torch.Tensor):
            bad = f"{grad} of parameter {self._param_name(bad)!r}"
        raise NonFiniteError(f"AG step ({self.mode}): {bad} has a NaN or infinity. Pass skip_nonfinite=True "
                             f"to skip such steps (counted in opt.skipped_steps), as torch.amp.GradScaler does")

    def _loss_after_done(self, info: AGStepInfo, closure, sites, buffers, rng, rec, ph) -> None:
        """The optional ℓ(θ_{t+1}) pass, after ``_done``: if it fails, the step's update stays applied and
        counted (said in the exception note)."""
        try:
            info.loss_after = self._loss_after(closure, sites, buffers, rng, rec, ph)
        except BaseException as exc:
            if hasattr(exc, "add_note"):
                exc.add_note(f"avg_kernels AG step: this failure is in the extra ℓ(θ_(t+1)) pass of "
                             f"track_loss_after=True, after the step: the update was applied and counted "
                             f"(opt.steps = {self.steps}, opt.last.loss_after is None); the buffers are unchanged "
                             f"by that pass")
            raise

    def _step_ag1(self, closure, params, cuda, ph: Phases) -> AGStepInfo:
        """AG-1 (paper 000 Alg. 2): θ_{t+1} = θ − |θ' − θ| ⊙ sign(ḡ)."""
        return self._segment_step(closure, params, cuda, ph, self._update_ag1, keep_pre_step_state=False)

    def _update_ag1(self, seg: _Segment, ph: Phases) -> None:
        with torch.no_grad():  # θ_{t+1} written over θ' in the parameters (the copies keep θ for an undo)
            _ag1_by_device(seg.theta, seg.live, list(seg.gbar), self.backend, into_new=True)
            unused = [i for i, gi in enumerate(seg.gbar) if gi is None]  # the loss does not reach them: they keep θ
            if unused:
                torch._foreach_copy_([seg.live[i] for i in unused], [seg.theta[i] for i in unused])
            ph.mark("update")

    def _step_ag2(self, closure, params, cuda, ph: Phases) -> AGStepInfo:
        """AG-2 (paper 002 Alg. 2 lines 25-27): θ'' = the base step of θ with ḡ from the pre-step state
        s_t, then θ_{t+1} = θ + (θ'' − θ) · ‖θ' − θ‖₁ / ‖θ'' − θ‖₁."""
        return self._segment_step(closure, params, cuda, ph, self._update_ag2, keep_pre_step_state=True)

    def _update_ag2(self, seg: _Segment, ph: Phases) -> None:
        with torch.no_grad():
            if len(self._spare) != len(seg.params):
                self._spare = [torch.empty_like(p, memory_format=torch.preserve_format) for p in seg.params]
            spare = self._spare
            torch._foreach_copy_(spare, seg.live)  # θ'
            torch._foreach_copy_(seg.live, seg.theta)  # back to θ
            ph.mark("copies")
            for p, gi in zip(seg.params, seg.gbar):
                p.grad = gi
            with _base_state.installed(self.base, seg.params, seg.pre_step):  # s_t in, s_{t+1} back after
                self.base.step()  # θ'' from s_t and ḡ
            AG2_RESCALE.eager(seg.live, seg.theta, spare, self.backend or "auto")
            ph.mark("update")

    def _segment_step(self, closure, params, cuda, ph: Phases, update: Callable[[_Segment, Phases], None],
                      keep_pre_step_state: bool) -> AGStepInfo:
        """Steps 1-4 of AG-1/AG-2 (module docstring), then ``update`` (step 5) writes θ_{t+1} into the
        parameters. A step that fails or meets a non-finite loss/gradient leaves the parameters and buffers as
        they were and is not counted; once the base has stepped (steps 3-5) its state is put back to s_t
        (AG-2, failures before the update) or has advanced by one step (AG-1; said in the exception note)."""
        theta = self._theta_copies(params)
        theta_data = [t.detach() for t in theta]
        sites = ParamSites(self.model)
        with torch.no_grad():
            torch._foreach_copy_(theta_data, [p.detach() for p in params]) if params else None
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        rng = RNGReplay(cuda)
        ph.mark("copies")
        stepped, pre_step, updating, loss = False, None, False, None
        # with a scaler a non-finite ḡ skips the step: keep s_t to put back (AG-1 too)
        keep_pre_step_state = keep_pre_step_state or self._scaler is not None
        with Recorder(self.eps, self.backend) as rec, self._layer_averaging(rec) as lin:
            try:
                # 1. forward at θ on the copies (graph kept), backward -> g
                loss = self._graph_pass(closure, params, rec,
                                        sites.swapped({id(p): t for p, t in zip(params, theta)}), swapped_params=True)
                ph.mark("forward_graph")
                rec.phase = BACKWARD
                g = self._grads(loss, theta, retain_graph=True)
                if self._scaler is not None:
                    g = _amp.unscale_recorded(self._scaler, self.base, params, g)
                ph.mark("backward_grad")
                g, loss_seen = self._mean_over_ranks(g, params, ph, loss)
                self._check_finite([("the loss ℓ(θ)", loss_seen), *zip(params, g)], "the gradient g at θ")
                for p, gi in zip(params, g):
                    p.grad = gi
                # 2. the base step with g -> θ' (s_t -> s_{t+1})
                pre_step = _base_state.snapshot(self.base, params) if keep_pre_step_state else None
                ph.mark("copies")
                stepped = True
                self.base.step()
                ph.mark("base_step")
                # 3. no-grad forward at θ' fills the slots; 4. second backward over the same graph -> ḡ
                loss_new = self._replay(closure, sites, self._buffer_stand_ins(buffers), rng, rec, "θ'", params,
                                        swapped_params=False)
                ph.mark("forward_replay")
                rec.check_unmodified()
                rec.phase = BACKWARD
                gbar = self._grads(loss, theta, retain_graph=self.mode == "agn" and self.iterations > 2)
                if self._scaler is not None:
                    gbar = _amp.unscale(self._scaler, gbar)
                    if nonfinite(list(zip(params, gbar))) is not None:
                        _amp.record_inf(self._scaler, self.base)
                ph.mark("backward_avg")
                gbar, _ = self._mean_over_ranks(gbar, params, ph)
                self._check_finite(list(zip(params, gbar)), "the averaged gradient ḡ (after the pass at θ')")
                iterates = ()
                if self.mode == "agn":  # iterations 2 … n − 1 over the same graph (paper 000 Alg. 4)
                    def grad_k(loss_, inputs, retain_graph=False):  # every ḡ_k unscaled and averaged as ḡ
                        gk = self._grads(loss_, inputs, retain_graph)
                        if self._scaler is not None:
                            gk = _amp.unscale(self._scaler, gk)
                            if nonfinite(list(zip(params, gk))) is not None:
                                _amp.record_inf(self._scaler, self.base)
                        return self._mean_over_ranks(gk, params, ph)[0]

                    gbar, iterates = _agn.refine(self, closure, params, sites, buffers, rng, rec, loss, theta, gbar,
                                                 ph, grad_k)
                # 5. the update
                updating = True
                update(_Segment(params, [p.detach() for p in params], theta_data, gbar, pre_step), ph)
            except BaseException as exc:
                skipped = self._failed(exc, self._undo(params, theta_data if stepped else None, buffers,
                                                       pre_step if stepped and not updating else None), rec, loss, ph)
                if skipped is None:
                    raise
                return skipped
            for p, gi in zip(params, gbar):
                p.grad = gi
            info = AGStepInfo(self.mode, self.steps, loss.detach(), loss_new=loss_new,
                              **_counts(rec, self.track_fallback))
            rec.clear()
            info.loss_iterates = iterates
            if lin is not None:
                info.linear_calls, info.linear_kept = lin.calls, lin.kept(params)
                report_kept(self, info.linear_kept, _user_stacklevel() + 1)
            self._done(info, ph)
            if self.track_loss_after:
                self._loss_after_done(info, closure, sites, buffers, rng, rec, ph)
        return info

    def _undo(self, params, theta: Optional[list], buffers, pre_step: Optional[BaseState]) -> str:
        """After a failed step: the buffers (and, where the base has stepped, the parameters from ``theta``
        and the base's state from ``pre_step`` where given) as before the step; ``.grad`` cleared. Returns
        the exception note saying so."""
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
            if theta is not None:
                torch._foreach_copy_([p.detach() for p in params], theta) if params else None
        for p in params:
            p.grad = None
        if pre_step is not None:
            _base_state.install(self.base, params, pre_step)
        if theta is None:
            base = "the base optimizer was not stepped"
        elif pre_step is not None:
            base = "the base optimizer's state was put back to s_t"
        else:
            base = "the base optimizer's state has advanced by one step (its step with g ran)"
        return (f"avg_kernels AG step: the parameters and buffers are as they were before the step, {base}, "
                f"and the step is not counted (opt.steps = {self.steps}); .grad is cleared.")

    def _failed(self, exc: BaseException, note: str, rec, loss, ph: Phases) -> Optional[AGStepInfo]:
        """After ``_undo``: the slots emptied; a skip (``skip_nonfinite``) gives its record, any other
        failure gets ``note`` and None (the caller re-raises it)."""
        rec.clear()
        if isinstance(exc, _Skip):
            return self._skipped(loss, ph)
        if hasattr(exc, "add_note"):
            exc.add_note(note)
        return None

    def _skipped(self, loss, ph: Phases) -> AGStepInfo:
        """The record of a step skipped for a non-finite value (``skip_nonfinite=True``)."""
        nan = torch.tensor(float("nan"))
        info = AGStepInfo(self.mode, self.steps, nan if loss is None else loss.detach().reshape(()), skipped=True)
        self._done(info, ph)
        return info

    def _step_ag3(self, closure, params, cuda, ph: Phases) -> AGStepInfo:
        """AG-3-1 (paper 002 Alg. 1, d = 1): segment [θ_{t-1}, θ_t], one backward, base step with ḡ. The
        first step (no θ_{t-1} yet, or other parameters than last time) is a plain base step. A step that
        fails or meets a non-finite loss/gradient (all before the base step) changes nothing but ``.grad``."""
        ids = [id(p) for p in params]
        plain = self._prev is None or ids != self._prev_for
        sites = ParamSites(self.model)
        buffers = [(b, b.detach().clone()) for b in self.model.buffers()]
        rng = RNGReplay(cuda)
        ph.mark("copies")
        loss = None
        with Recorder(self.eps, self.backend) as rec:
            try:
                if plain:
                    loss, g = self._plain_gradient(closure, params, rec, ph)
                    loss_prev, counts = None, {}
                else:
                    loss = self._graph_pass(closure, params, rec, contextlib.nullcontext(), swapped_params=False)
                    ph.mark("forward_graph")
                    repl = {id(p): t for p, t in zip(params, self._prev)}
                    repl.update(self._buffer_stand_ins(buffers))
                    loss_prev = self._replay(closure, sites, repl, rng, rec, "θ_(t-1)", params, swapped_params=True)
                    ph.mark("forward_replay")
                    rec.check_unmodified()
                    rec.phase = BACKWARD
                    g = self._grads(loss, params)
                    if self._scaler is not None:
                        g = _amp.unscale_recorded(self._scaler, self.base, params, g)
                    ph.mark("backward_avg")
                    counts = _counts(rec, self.track_fallback)
                g, loss_seen = self._mean_over_ranks(g, params, ph, loss)
                self._check_finite([("the loss ℓ(θ_t)", loss_seen), *zip(params, g)],
                                   "the gradient at θ_t" if plain
                                   else "the averaged gradient ḡ (segment [θ_(t-1), θ_t])")
            except BaseException as exc:
                skipped = self._failed(exc, self._undo(params, None, buffers, None), rec, loss, ph)
                if skipped is None:
                    raise
                return skipped
            rec.clear()
            with torch.no_grad():  # θ_t is the next step's θ_{t-1}
                if plain:
                    self._prev = [p.detach().clone() for p in params]
                    self._prev_for = ids
                else:
                    torch._foreach_copy_(self._prev, [p.detach() for p in params])
            ph.mark("copies")
            for p, gi in zip(params, g):
                p.grad = gi
            self.base.step()
            ph.mark("base_step")
            info = AGStepInfo(self.mode, self.steps, loss.detach(), loss_prev=loss_prev, plain=plain, **counts)
            self._done(info, ph)
            if self.track_loss_after:
                self._loss_after_done(info, closure, sites, buffers, rng, rec, ph)
        return info

    # -- the passes --------------------------------------------------------------------------------
    def _theta_copies(self, params) -> list[torch.Tensor]:
        """The leaf copies the graph at θ is built on (reused while the parameter list is the same)."""
        ids = [id(p) for p in params]
        if ids != self._theta_for:
            self._theta = [torch.empty_like(p, memory_format=torch.preserve_format).requires_grad_() for p in params]
            self._theta_for = ids
            self._spare = []
        for t in self._theta:
            t.grad = None
        return self._theta

    def _layer_averaging(self, rec: Recorder):
        """linear=True: the Linear/Conv layers average their Jacobians for this step (``_linear_avg``)."""
        return LayerAveraging(self.model, rec, rescale=self.mode == "ag2") if self.linear else contextlib.nullcontext()

    def _buffer_stand_ins(self, buffers) -> dict:
        """Buffer id -> a copy of its pre-step snapshot, for a replay pass (the snapshot itself stays as it
        was: a failed step restores the buffers from it, the loss-after pass starts from it)."""
        return {id(b): s.clone() for b, s in buffers}

    def _direct_use_check(self, params):
        """On the first step: a detector of real parameters used while swapped out (else a no-op)."""
        if self._checked:
            return contextlib.nullcontext()
        names = {id(p): n for n, p in self.model.named_parameters() if any(p is q for q in params)}
        return DirectUse(names)

    def _plain_gradient(self, closure, params, rec: Recorder, ph: Phases):
        """An ordinary forward and backward (nothing recorded): (ℓ(θ), g)."""
        rec.phase = PLAIN
        rec.plain_calls = 0
        for p in params:
            p.grad = None
        mode = self._mode(rec)
        with eager(), mode:
            loss = closure()
        _check_plain_loss(loss, params)
        self._first_pass_checks(rec, mode, rec.plain_calls)
        ph.mark("forward_graph")
        rec.phase = BACKWARD
        g = self._grads(loss, params)
        if self._scaler is not None:
            g = _amp.unscale_recorded(self._scaler, self.base, params, g)
        ph.mark("backward_avg")
        return loss, g

    def _graph_pass(self, closure, params, rec: Recorder, swap, swapped_params: bool) -> torch.Tensor:
        """The forward at θ that builds the graph (one slot per averaged-activation call); checks the loss."""
        for p in params:
            p.grad = None
        rec.phase = GRAPH
        detector = self._direct_use_check(params) if swapped_params else contextlib.nullcontext()
        mode = self._mode(rec)
        with swap, eager(), detector, mode:
            loss = closure()
        if isinstance(detector, DirectUse):
            detector.check("θ (graph on copies of the parameters)")
        if not isinstance(loss, torch.Tensor):
            raise TypeError(f"the closure must return the loss as a tensor, got {type(loss).__name__}")
        if loss.numel() != 1:
            raise ValueError(f"the closure must return a scalar loss, got shape {tuple(loss.shape)}")
        if not loss.requires_grad:
            raise ValueError("the loss returned by the closure does not require grad (was the forward run "
                             "under torch.no_grad, or are all parameters frozen?)")
        if any(p.grad is not None for p in params) or any(t.grad is not None for t in self._theta):
            raise RuntimeError("the closure called backward(): an AG step owns the backward passes (it needs the "
                               "graph at θ twice); return the loss without calling backward()")
        self._first_pass_checks(rec, mode, len(rec.slots))
        return loss

    def _mode(self, rec: Recorder) -> ActivationMode:
        """The function mode of a pass: activation calls that bypass avg_kernels.nn go to ``rec`` (bare calls
        and recognised hand-written forms, avg_kernels/nn/_fnmode.py); on the first step calls are
        attributed to the model's modules (for the warning about what is not averaged)."""
        return ActivationMode(rec, None if self._warned else self.model)

    def _first_pass_checks(self, rec: Recorder, mode: ActivationMode, n_calls: int) -> None:
        """After the forward at θ (or the first AG-3-1 step's plain forward): no averaged activation at all
        is an error (``require_activations``); on the first step, what is not averaged is warned about."""
        if self.require_activations and not n_calls:
            found = "".join(f"\n  {where}: {what} -- {why}" for where, what, why in mode.findings)
            raise RuntimeError(
                "the pass at θ made no averaged-activation call, so AG would average nothing (the model computes "
                "no activation of avg_kernels.activations.TABLE, as a module, a function call or a recognised "
                "hand-written form)" + (f"; not averaged:{found}" if found else "") +
                ". Pass require_activations=False to allow this")
        if not self._warned:
            self._warned = True
            if self.check_unaveraged and mode.findings:
                lines = [f"{where}: {n} call(s) of {what} -- {why}"
                         for (where, what, why), n in sorted(mode.findings.items())]
                warnings.warn("AG step: these activation calls are NOT averaged:\n  " + "\n  ".join(lines),
                              UserWarning, stacklevel=_user_stacklevel())

    def _grads(self, loss, inputs, retain_graph=False):
        """The gradient of the loss (scaled by the step's GradScaler, if any: the caller unscales)."""
        return _grad(loss if self._scaler is None else self._scaler.scale(loss), inputs, retain_graph=retain_graph)

    @torch.no_grad()
    def _no_grad_pass(self, closure, sites: ParamSites, repl: dict, rng: RNGReplay,
                      mode=None) -> Optional[torch.Tensor]:
        """The closure at the parameters ``repl``, no graph; None when the replay stopped after its last averaged
        activation (``track_replay_loss=False``)."""
        try:
            with sites.swapped(repl), rng.replay(), eager(), (mode if mode is not None else contextlib.nullcontext()):
                loss = closure()
        except ReplayComplete:
            return None
        return _loss_value(loss)

    def _replay(self, closure, sites, repl, rng, rec: Recorder, label: str, params, swapped_params: bool):
        """The no-grad forward at the segment's other end (``label``): call k's input fills slot k. On the
        first step it also looks for unaveraged activation calls and parameters used while swapped out. Returns
        its loss, or None where it stopped after the last slot's partner (``track_replay_loss``)."""
        first = not self._checked
        # the first replay runs to the end: it checks for unaveraged calls and parameters used while swapped out
        rec.start_replay(label, stop_after_last=not (first or self.track_replay_loss or self.linear
                                                     or self._replicas is not None))
        detector = self._direct_use_check(params) if (first and swapped_params) else contextlib.nullcontext()
        with detector:
            loss = self._no_grad_pass(closure, sites, repl, rng, ActivationMode(rec))
        if isinstance(detector, DirectUse):
            detector.check(label)
        rec.finish_replay()
        self._checked = True
        return loss

    def _loss_after(self, closure, sites, buffers, rng, rec: Recorder, ph: Phases) -> torch.Tensor:
        """ℓ(θ_{t+1}) on the batch; its time is always recorded in ``times["loss_after"]`` (not part of
        the step's cost: callers that time steps subtract it)."""
        t0, c0 = ph.now(), time.process_time()
        repl = {id(b): s.clone() for b, s in buffers}
        rec.phase = PLAIN
        loss = self._no_grad_pass(closure, sites, repl, rng)
        ph.times["loss_after"] = ph.now() - t0
        ph.times["loss_after_cpu"] = time.process_time() - c0
        ph.restart()
        return loss


_INTERNAL = (os.path.dirname(os.path.abspath(__file__)), os.path.dirname(os.path.abspath(torch.optim.__file__)))


def _user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, from its caller, of the first frame outside avg_kernels.optim and
    torch.optim (the user's ``step`` call)."""
    level, frame = 1, sys._getframe(1)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_INTERNAL):
        frame, level = frame.f_back, level + 1
    return level


def _ag1_by_device(params, params_new, avg_grads, backend, into_new: bool = False) -> None:
    """``ag1_update_`` (``ag1_update_new_`` with ``into_new``: θ_{t+1} written over ``params_new``) once per
    device (the op takes one device per call; AG-1 is elementwise)."""
    op = AG1_UPDATE_NEW if into_new else AG1_UPDATE
    devices = {t.device for t in params}
    if len(devices) <= 1:
        op.eager(params, params_new, avg_grads, backend or "auto")
        return
    for dev in devices:
        idx = [i for i, t in enumerate(params) if t.device == dev]
        op.eager([params[i] for i in idx], [params_new[i] for i in idx], [avg_grads[i] for i in idx],
                 backend or "auto")


def _grad(loss, inputs, retain_graph=False):
    try:
        return torch.autograd.grad(loss, inputs, retain_graph=retain_graph, allow_unused=True)
    except RuntimeError as exc:
        if "modified by an inplace operation" in str(exc) and hasattr(exc, "add_note"):
            exc.add_note("avg_kernels AG step: the graph at θ is built on copies of the parameters, found through "
                         "the modules' registered parameters. A parameter read through another reference (e.g. "
                         "kept in a list or a closure instead of Module._parameters) stays in the graph itself and "
                         "is then changed in place by the base optimizer's step. Read parameters through their "
                         "module.")
        raise


def _counts(rec: Recorder, every_dtype: bool) -> dict:
    """AGStepInfo's activation counts and fallback share, after the replay paired the slots."""
    averaged = rec.averaged()
    fb = rec.fallback_counts(every_dtype)
    return {"activation_calls": len(averaged), "compound_calls": sum(s.kind == "compound" for s in averaged),
            "fallback_fraction": fb[0] / fb[1] if fb is not None and fb[1] else None}


def _loss_value(loss) -> torch.Tensor:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("the closure must return a scalar loss tensor")
    return loss.detach().reshape(())


def _check_plain_loss(loss, params) -> None:
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise TypeError("the closure must return a scalar loss tensor")
    if not loss.requires_grad:
        raise ValueError("the loss returned by the closure does not require grad")
    if any(p.grad is not None for p in params):
        raise RuntimeError("the closure called backward(): an AG step owns the backward passes; return the loss "
                           "without calling backward()")
