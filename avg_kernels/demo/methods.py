"""The demo's method registry (SPEC §7): base optimizers here; AG and C-methods register themselves.

A method makes a Trainer for a model. ``Trainer.step(x, y)`` performs one update on a batch and
returns the batch loss at the parameters before the update; ``Trainer.summary()`` may add columns
(e.g. RD for AG methods) to the demo's table.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn
import torch.nn.functional as F


@dataclass
class Settings:
    """What a method may use to build its optimizer."""

    lr: Optional[float] = None  # None: the method's default
    extra: dict = field(default_factory=dict)


class Trainer:
    """A torch.optim optimizer driven by an ordinary forward/backward (base methods, C-methods)."""

    #: seconds of the last ``step()`` spent on evaluation that is not the method's cost (excluded from
    #: the demo's time per step; e.g. AG's opt-in ℓ(θ_{t+1}) forward for RD)
    untimed_s: float = 0.0
    untimed_cpu_s: float = 0.0  # the same in CPU time (time.process_time)

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.model, self.optimizer = model, optimizer

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def summary(self) -> dict:
        return {}


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    make: Callable[[nn.Module, Settings], Trainer]
    default_lr: float
    base: Optional[str] = None  # the base method it is compared against (time per step, efficiency)


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"demo method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def _torch_method(name, help, cls, default_lr, **kw):
    def make(model, settings):
        return Trainer(model, cls(model.parameters(), lr=settings.lr or default_lr, **kw))

    return register(Method(name, help, make, default_lr))


_torch_method("sgd", "SGD with momentum 0.9", torch.optim.SGD, 0.05, momentum=0.9)
# Learning rates tuned for the default run (Model B depth 4, 30 epochs, batch 64, digits; best final train
# loss over a grid, seeds 0-2; docs/ag_training.md "Demo"): RMSProp 1e-3 ends at train loss 1.0 there.
_torch_method("adam", "Adam", torch.optim.Adam, 1e-2)
_torch_method("rmsprop", "RMSProp (the papers' base optimizer)", torch.optim.RMSprop, 5e-3)
