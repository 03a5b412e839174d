"""Training methods of the reproduction studies: plain torch optimizers, C-methods (paper 003) and AG methods
(papers 000/002), each built as a ``Trainer`` for a model and a learning rate.

AG's variants come from ``avg_kernels.optim.AG`` itself: paper 000's n-iteration AG-1 is
``mode="agn", iterations=n`` (Alg. 4); paper 002's Linear variants of AG-1/AG-2 are ``linear=True`` (Eq. 11).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F

from .. import metrics
from ..demo.methods import Trainer
from ..nn import convert
from ..optim import AG, Consequentialism

class StepLength:
    """Mean L1 length ‖θ_{t+1} − θ_t‖₁ of the applied updates (paper 002's "relative avg. step length")."""

    def __init__(self, model: nn.Module):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.total, self.n = 0.0, 0
        self._before: list[torch.Tensor] = []

    def before(self) -> None:
        self._before = [p.detach().clone() for p in self.params]

    def after(self) -> None:
        with torch.no_grad():
            self.total += float(sum((p - q).abs().sum() for p, q in zip(self.params, self._before)))
        self.n += 1

    @property
    def mean(self) -> Optional[float]:
        return self.total / self.n if self.n else None


class PlainTrainer(Trainer):
    """An ordinary forward/backward/step (base optimizers and C-methods), optionally measuring step lengths."""

    def __init__(self, model, optimizer, track_step: bool = False):
        super().__init__(model, optimizer)
        self.steps = StepLength(model) if track_step else None

    def step(self, x, y) -> float:
        if self.steps is not None:
            self.steps.before()
        loss = super().step(x, y)
        if self.steps is not None:
            self.steps.after()
        return loss

    def summary(self) -> dict:
        return {"step_l1": None if self.steps is None else self.steps.mean}


class AGTrainer(Trainer):
    """``avg_kernels.optim.AG`` over a base optimizer; keeps RD (AG-1/AG-2/n-iteration: the AG update's batch-loss
    reduction against the base step's on the same batch and parameters, both at the same L1 step length)."""

    def __init__(self, model, base, mode: str, track_step: bool = False, **ag_kwargs):
        convert(model)
        self.track_rd = mode != "ag3-1"
        super().__init__(model, AG(model, base, mode=mode, track_loss_after=self.track_rd, **ag_kwargs))
        self.rd = metrics.RD()
        self.steps = StepLength(model) if track_step else None

    def step(self, x, y) -> float:
        if self.steps is not None:
            self.steps.before()
        loss = self.optimizer.step(lambda: F.cross_entropy(self.model(x), y))
        if self.steps is not None:
            self.steps.after()
        info = self.optimizer.last
        self.untimed_s = info.times.get("loss_after", 0.0)
        self.untimed_cpu_s = info.times.get("loss_after_cpu", 0.0)
        if self.track_rd:
            self.rd.update_from(info)
        return float(loss)

    def summary(self) -> dict:
        return {"RD": self.rd.value if self.track_rd else None,
                "step_l1": None if self.steps is None else self.steps.mean}


@dataclass(frozen=True)
class Method:
    """One line of a study: ``build(model, lr) -> Trainer``; ``rate`` names the tuned rate it runs at."""

    name: str
    build: Callable[[nn.Module, float], Trainer]
    rate: str  # key of the rates table (e.g. "rmsprop": AG at its base's tuned rate)
    base: Optional[str] = None  # the method it is compared with (RD, sample efficiency)
    tags: dict = field(default_factory=dict)


def groups(model: nn.Module, last_lr_mult: float) -> list[dict]:
    """Parameter groups: everything, with the final module's parameters at ``last_lr_mult`` × the rate
    (``lr_mult`` is read by ``scaled``)."""
    if last_lr_mult == 1.0:
        return [{"params": list(model.parameters()), "lr_mult": 1.0}]
    last = {id(p) for p in model[-1].parameters()}
    return [{"params": [p for p in model.parameters() if id(p) not in last], "lr_mult": 1.0},
            {"params": [p for p in model.parameters() if id(p) in last], "lr_mult": last_lr_mult}]


def scaled(opt: torch.optim.Optimizer, lr: float) -> torch.optim.Optimizer:
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_mult", 1.0)
    return opt


_BASES = {
    "sgd": lambda ps, lr, mom: torch.optim.SGD(ps, lr=lr, momentum=mom),
    "nesterov": lambda ps, lr, mom: torch.optim.SGD(ps, lr=lr, momentum=mom, nesterov=True),
    "adam": lambda ps, lr, mom: torch.optim.Adam(ps, lr=lr),
    "rmsprop": lambda ps, lr, mom: torch.optim.RMSprop(ps, lr=lr),
}


def base_optimizer(kind: str, model: nn.Module, lr: float, momentum: float = 0.0, last_lr_mult: float = 1.0):
    if kind not in _BASES:
        raise ValueError(f"base optimizer {kind!r}: expected one of {list(_BASES)}")
    return scaled(_BASES[kind](groups(model, last_lr_mult), lr, momentum), lr)


def plain(kind: str, momentum: float = 0.0, track_step: bool = False):
    return lambda model, lr: PlainTrainer(model, base_optimizer(kind, model, lr, momentum), track_step)


def consequentialism(kind: str, lam: float, momentum: float = 0.0, last_lr_mult: float = 1.0):
    """C-SGD / C-Nesterov / C-Adam: ``Consequentialism`` over the base (paper 003)."""
    def build(model, lr):
        return PlainTrainer(model, Consequentialism(model, base_optimizer(kind, model, lr, momentum, last_lr_mult),
                                                    lam=lam))
    return build


def ag(mode: str, kind: str, track_step: bool = False, **ag_kwargs):
    return lambda model, lr: AGTrainer(model, base_optimizer(kind, model, lr), mode, track_step, **ag_kwargs)


def ag_methods(base: str, modes: tuple[str, ...], rate: str, *, track_step: bool = False, linear: bool = False,
               agn: Optional[int] = None, suffix: str = "", agn_rate: Optional[str] = None) -> list[Method]:
    """AG methods over ``base`` at rate key ``rate``: each mode in ``modes``; with ``linear`` also the Linear
    variants of AG-1/AG-2 (``linear=True``); with ``agn`` the n-iteration variant (``mode="agn", iterations=agn``),
    at rate key ``agn_rate`` when given (its own tuned rate), else ``rate``."""
    if agn is not None and (isinstance(agn, bool) or not isinstance(agn, int) or agn < 2):
        raise ValueError(f"agn must be an iteration count n >= 2, got {agn!r}")
    out = [Method(f"{m}/{base}{suffix}", ag(m, base, track_step), rate, base) for m in modes]
    if linear:
        out += [Method(f"{m}-linear/{base}{suffix}", ag(m, base, track_step, linear=True), rate, base)
                for m in modes if m in ("ag1", "ag2")]
    if agn is not None:
        out.append(Method(f"ag{agn}-iter/{base}{suffix}", ag("agn", base, track_step, iterations=agn),
                          agn_rate or rate, base))
    return out


def finite_or(v: float, fill: float) -> float:
    return v if math.isfinite(v) else fill
