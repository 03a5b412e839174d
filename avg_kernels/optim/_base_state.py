"""The base optimizer's state, set aside and put back: AG-2 computes θ'' with the base's step from the
PRE-step state s_t while s_{t+1} (from the step with g) is what persists (SPEC §4, Adam's step count
included)."""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch


@dataclass(eq=False)
class BaseState:
    """A base optimizer's per-parameter state and its groups' hyperparameters."""

    per_param: dict  # parameter -> its state dict (only parameters that have state)
    groups: list  # per param group: its entries except "params"


def snapshot(base: torch.optim.Optimizer, params) -> BaseState:
    """A deep copy of ``base``'s state for ``params`` and of its group hyperparameters (s_t)."""
    per_param = {}
    for p in params:
        st = base.state.get(p)
        if st:
            per_param[p] = {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in st.items()}
    groups = [{k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in base.param_groups]
    return BaseState(per_param, groups)


def install(base: torch.optim.Optimizer, params, state: BaseState) -> BaseState:
    """Puts ``state`` in place as ``base``'s state for ``params``; returns the state it replaced (by
    reference, no copy)."""
    current = BaseState({p: base.state[p] for p in params if p in base.state},
                        [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups])
    for p in params:
        if p in state.per_param:
            base.state[p] = state.per_param[p]
        else:
            base.state.pop(p, None)
    for g, saved in zip(base.param_groups, state.groups):
        g.update(saved)
    return current


@contextlib.contextmanager
def installed(base: torch.optim.Optimizer, params, state: BaseState):
    """Within the block ``base`` has ``state``; afterwards (also on error) the state it had before."""
    current = install(base, params, state)
    try:
        yield
    finally:
        install(base, params, current)
