"""AG methods for the demo registry (SPEC §7): ag1, ag2, ag3-1 over a base optimizer.

``ag1`` and ``ag3-1`` run over RMSProp (the papers' base), ``ag2`` over Adam (paper 002's AG-2 runs
over Adam and SOAP); ``<mode>/<base>`` picks another base (e.g. ``ag1/adam``, ``ag3-1/sgd``).
Each AG method is compared with its base method: time per step, relative sample efficiency and, for
AG-1/AG-2, RD (the batch-loss reduction of the AG update against the base step's own, on the same
batch and parameters; it costs one extra no-grad forward per step, which is not timed).
"""
from __future__ import annotations

import torch.nn.functional as F

from .. import metrics
from ..nn import convert
from ..optim import AG
from .methods import REGISTRY, Method, Trainer, register

#: default base per AG mode
DEFAULT_BASE = {"ag1": "rmsprop", "ag2": "adam", "ag3-1": "rmsprop"}


class AGTrainer(Trainer):
    """Drives ``avg_kernels.optim.AG``; keeps RD for AG-1/AG-2."""

    def __init__(self, model, base_optimizer, mode: str):
        convert(model)
        self.mode = mode
        self.track_rd = mode in ("ag1", "ag2")
        super().__init__(model, AG(model, base_optimizer, mode=mode, track_loss_after=self.track_rd))
        self.rd = metrics.RD()

    def step(self, x, y) -> float:
        loss = self.optimizer.step(lambda: F.cross_entropy(self.model(x), y))
        info = self.optimizer.last
        self.untimed_s = info.times.get("loss_after", 0.0)
        self.untimed_cpu_s = info.times.get("loss_after_cpu", 0.0)
        if self.track_rd:
            self.rd.update_from(info)
        return loss.item()

    def summary(self) -> dict:
        return {"RD": self.rd.value if self.track_rd else None}


def _ag_method(mode: str, base_name: str, name: str):
    base = REGISTRY[base_name]
    # The base's own tuned learning rate (paper 002's protocol: AG runs at the rate tuned for the gradient);
    # docs/ag_training.md "Demo" shows the grid it came from.
    lr_default = base.default_lr

    def make(model, settings):
        lr = settings.lr or lr_default
        base_opt = base.make(model, type(settings)(lr=lr)).optimizer
        return AGTrainer(model, base_opt, mode)

    what = {"ag1": "AG-1 (sign of the averaged gradient, |step| of the base)",
            "ag2": "AG-2 (base step from the averaged gradient, L1-rescaled)",
            "ag3-1": "AG-3-1 (averaged over the last update, one backward)"}[mode]
    return register(Method(name, f"{what} over {base_name}", make, lr_default, base=base_name))


for _mode in ("ag1", "ag2", "ag3-1"):
    _ag_method(_mode, DEFAULT_BASE[_mode], _mode)
    for _base in ("sgd", "adam", "rmsprop"):
        _ag_method(_mode, _base, f"{_mode}/{_base}")
