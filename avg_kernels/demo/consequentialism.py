"""C-methods of the demo (SPEC §7): C-SGD, C-Nesterov and C-Adam (paper 003, ``avg_kernels.optim``).

Registered into ``avg_kernels.demo.REGISTRY`` on import (``avg_kernels.demo`` imports this module).
Default learning rates were chosen by a sweep on the embedded digits with the default model (depth 4,
batch 64, mean cross-entropy, 30 epochs; see ``DEFAULTS``). λ = 1e-3 (the paper's smallest; absolute,
added to each layer's summed input Gram); ``--lr`` overrides the rate, ``Settings.extra["lam"]`` λ.
"""
from __future__ import annotations

from ..optim import CAdam, CSGD
from .methods import Method, Settings, Trainer, register

LAM = 1e-3

# name: (help, optimizer class, default lr, extra optimizer arguments, base method for the time ratio)
DEFAULTS = {
    "csgd": ("C-SGD (paper 003): SGD on the consequentialism gradient G (X Xᵀ + λI)⁻¹", CSGD, 1.0, {}, "sgd"),
    "cnesterov": ("C-Nesterov: C-SGD with Nesterov momentum 0.9", CSGD, 0.1, dict(momentum=0.9, nesterov=True), "sgd"),
    "cadam": ("C-Adam: Adam on the consequentialism gradient", CAdam, 3e-3, {}, "adam"),
}


def _factory(cls, default_lr, kwargs):
    def make(model, settings: Settings) -> Trainer:
        lam = settings.extra.get("lam", LAM)
        return Trainer(model, cls(model, lr=settings.lr or default_lr, lam=lam, **kwargs))

    return make


for _name, (_help, _cls, _lr, _kw, _base) in DEFAULTS.items():
    register(Method(_name, _help, _factory(_cls, _lr, _kw), _lr, base=_base))
