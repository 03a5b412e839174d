"""The shared base of avg_kernels' optimizers: a ``torch.optim.Optimizer`` that wraps another one.

AG and Consequentialism both drive a plain torch.optim optimizer, the *base*, and add to its step. The
wrapper holds it as ``.base`` and forwards ``param_groups``, ``state`` and ``defaults`` to it (properties,
not copies: the base's ``load_state_dict`` replaces those objects, and a scheduler must keep acting on the
live ones), so LR schedulers, ``zero_grad`` and ``add_param_group`` on either object act on the base.

State dict layout (both families): the base's own state dict, plus one key (``state_key``) holding the
wrapper's state, so tools that read ``"state"`` / ``"param_groups"`` see the base's.

Copying: ``copy.deepcopy`` and pickle copy the whole wrapper, its model and base included (a deep copy of
the optimizer alone is a new optimizer over a new copy of the model; copy them together, e.g.
``copy.deepcopy((model, opt))``, to keep the pair). Non-finite values: ``nonfinite`` finds them with one
norm per tensor and one device-to-host copy; both families raise ``NonFiniteError`` (a
``FloatingPointError``) before anything changes, or skip the step with ``skip_nonfinite=True`` (counted in
``skipped_steps``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn


class NonFiniteError(FloatingPointError):
    """A step met a non-finite loss or gradient (see the message: which parameter or layer, and what the
    step left unchanged). ``skip_nonfinite=True`` skips such steps instead, as ``torch.amp.GradScaler`` does."""


def nonfinite(named: list) -> Optional[str]:
    """The name (whatever object the caller gave, e.g. a parameter to look up) of the first ``(name, tensor)``
    entry with a NaN or an infinity, first by device; None where all are finite (None and empty tensors are
    skipped).

    Fast path: one ``_foreach_norm`` (L2; NaN or inf wherever the tensor has one) per device and one
    device-to-host copy; only a tensor whose norm is not finite is then checked element by element (its
    norm may have overflowed with finite elements). The max-|x| norm would need no second look but costs
    17x more on CPU (_foreach_norm(ord=inf) has no fast kernel there: 470 vs 27 us for a 3-layer MLP's
    gradients)."""
    by_device: dict = {}
    for name, t in named:
        if t is None or t.numel() == 0:
            continue
        if t.is_sparse:
            t = t.coalesce().values()
        by_device.setdefault(t.device, []).append((name, t.detach()))
    for entries in by_device.values():
        norms = torch._foreach_norm([t for _, t in entries])
        same = len({n.dtype for n in norms}) == 1
        ok = torch.stack(norms if same else [n.double() for n in norms]).isfinite().cpu()
        if bool(ok.all()):
            continue
        for i in (~ok).nonzero().flatten().tolist():
            if not bool(entries[i][1].isfinite().all()):
                return entries[i][0]
    return None


def check_model(model, who: str) -> nn.Module:
    """``model`` is an ``nn.Module`` (checked before anything calls ``model.parameters()``)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module ({who}), got {type(model).__name__}")
    return model


def as_param_list(params) -> list[torch.Tensor]:
    """A param group's ``"params"`` entry (one tensor or an iterable of them) as a list."""
    return [params] if isinstance(params, torch.Tensor) else list(params)


class OptimizerWrapper(torch.optim.Optimizer):
    """A torch.optim optimizer over ``base``'s parameters whose ``step`` wraps ``base.step()``.

    Subclasses set ``state_key`` and implement ``step``, ``_own_state`` / ``_load_own_state`` (their part of
    the state dict) and, where they restrict what the base may optimise, ``_check_params``.

    Attributes:
        model: the ``nn.Module`` whose forward the subclass observes.
        base: the wrapped optimizer; stepped by the subclass, never with a closure.
        steps: number of completed ``step()`` calls (restored by ``load_state_dict``); a step that raised
            or was skipped is not counted.
        skip_nonfinite: a non-finite loss or gradient skips the step (True) or raises ``NonFiniteError``.
        skipped_steps: number of steps skipped for a non-finite loss or gradient.
    """

    #: key of the wrapper's own state in ``state_dict()``
    state_key: str = "wrapper"
    #: whether ``step()`` needs a closure; such an optimizer cannot be another wrapper's base
    step_needs_closure: bool = False

    def __init__(self, model: nn.Module, base: torch.optim.Optimizer, *, who: str, skip_nonfinite: bool = False):
        check_model(model, who)
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"base must be a torch.optim.Optimizer, got {type(base).__name__}")
        if isinstance(base, torch.optim.LBFGS) or getattr(base, "step_needs_closure", False):
            raise TypeError(f"base={type(base).__name__} needs a closure in its own step(); {type(self).__name__} "
                            f"steps its base without one")
        self.model, self.base = model, base
        self._ready = False
        # Optimizer.__init__ sets up the hook tables and the step profiling; the groups, state and defaults
        # it would create are the base's (the property setters ignore its writes until _ready)
        super().__init__(base.param_groups, {})
        self._ready = True
        self.steps = 0
        if not isinstance(skip_nonfinite, bool):
            raise TypeError(f"skip_nonfinite must be a bool, got {type(skip_nonfinite).__name__}")
        self.skip_nonfinite = skip_nonfinite
        self.skipped_steps = 0
        self._check_params(self._params(), "base optimizer parameter")

    # -- what the base holds, shared ---------------------------------------------------------------
    @property
    def param_groups(self) -> list[dict]:
        return self.base.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        if getattr(self, "_ready", False):
            self.base.param_groups = value

    @property
    def state(self):
        return self.base.state

    @state.setter
    def state(self, value) -> None:
        if getattr(self, "_ready", False):
            self.base.state = value

    @property
    def defaults(self) -> dict:
        return self.base.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        if getattr(self, "_ready", False):
            self.base.defaults = value

    # -- copying and pickling ----------------------------------------------------------------------
    def __getstate__(self) -> dict:
        """Everything, the model and the base included (torch.optim.Optimizer's own ``__getstate__`` keeps
        only defaults/state/param_groups, which are the base's here: a copy lost ``base``)."""
        return dict(self.__dict__)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # Optimizer's: the hook tables and the step profiling

    def _param_name(self, p: torch.Tensor) -> str:
        """``p``'s name in the model (for messages)."""
        for name, q in self.model.named_parameters(remove_duplicate=False):
            if q is p:
                return name
        return f"(a parameter of shape {tuple(p.shape)})"

    def _params(self) -> list[torch.Tensor]:
        """The base's parameters, group by group."""
        return [p for g in self.base.param_groups for p in g["params"]]

    def _check_params(self, params: list[torch.Tensor], what: str) -> None:
        """Raises when the wrapper cannot work with one of ``params`` (at construction and in
        ``add_param_group``); ``what`` names them in messages. Default: any parameter."""

    def _params_added(self, params: list[torch.Tensor]) -> None:
        """Called after ``add_param_group`` gave ``params`` to the base."""

    def add_param_group(self, param_group: dict) -> None:
        """Checks the new parameters (``_check_params``) and adds the group to the base."""
        if not getattr(self, "_ready", False):  # Optimizer.__init__ registering groups the base already holds
            return
        params = as_param_list(param_group["params"])
        self._check_params(params, "add_param_group: parameter")
        self.base.add_param_group(param_group)
        self._params_added(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base.zero_grad(set_to_none)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join([*self._repr_fields(), f'base={self.base!r}'])})"

    def _repr_fields(self) -> list[str]:
        """``name=value`` texts of the wrapper's own settings, for ``repr``."""
        return []

    # -- state dict ----------------------------------------------------------------------------------
    def _own_state(self) -> dict:
        """The wrapper's part of the state dict."""
        return {"steps": self.steps, "skipped_steps": self.skipped_steps}

    def _split_state(self, state_dict: dict) -> tuple[dict, Optional[dict]]:
        """(the base's state dict, the wrapper's part or None) of a state dict to load; subclasses accept
        older layouts here."""
        if not isinstance(state_dict, dict) or "state" not in state_dict or "param_groups" not in state_dict:
            raise ValueError(f"state_dict: expected a dict from {type(self).__name__}.state_dict() (the base "
                             f"optimizer's state dict plus the key {self.state_key!r})")
        base = {k: v for k, v in state_dict.items() if k != self.state_key}
        return base, state_dict.get(self.state_key)

    def _check_own_state(self, own: Optional[dict]) -> None:
        """Raises when ``own`` does not fit this optimizer (before anything is loaded)."""

    def _load_own_state(self, own: Optional[dict]) -> None:
        if own is not None:
            self.steps = int(own.get("steps", 0))
            self.skipped_steps = int(own.get("skipped_steps", 0))

    def state_dict(self) -> dict:
        """The base's state dict plus ``{state_key: the wrapper's state}``; state-dict hooks registered on
        this object run as on any torch.optim optimizer."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        state_dict = self.base.state_dict()
        state_dict[self.state_key] = self._own_state()
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            out = post_hook(self, state_dict)
            if out is not None:
                state_dict = out
        return state_dict

    def load_state_dict(self, state_dict: dict) -> None:
        """Loads a ``state_dict()`` of this class (or an older layout ``_split_state`` accepts); the
        wrapper's part is checked before the base's state is loaded."""
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            out = pre_hook(self, state_dict)
            if out is not None:
                state_dict = out
        base, own = self._split_state(state_dict)
        self._check_own_state(own)
        self.base.load_state_dict(base)
        self._load_own_state(own)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)
