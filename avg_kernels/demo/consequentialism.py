"""C-methods of the demo (SPEC §7): C-SGD, C-Nesterov and C-Adam (paper 003, ``avg_kernels.optim``).

Registered into ``avg_kernels.demo.REGISTRY`` on import (``avg_kernels.demo`` imports this module).

Defaults (learning rate, λ) come from a sweep on the embedded digits with the default model (depth 4,
batch 64, mean cross-entropy, 30 epochs, seeds 0 and 1; lr in 0.01-30, λ in 1e-3-1): the pairs below
reached the lowest final training loss reliably across both seeds. λ is absolute, added to each layer's
summed input Gram; with the optimizers' default λ = 1e-3 every C-method trained worse here (e.g. C-SGD
best 0.83 final train loss vs 0.20-0.62 with λ = 0.1), because the conv layers' Grams sum over
N·H·W = 4096 positions and the Linear layers' over N = 64 rows, so one absolute λ regularises them very
differently. ``--lr`` overrides the rate; ``Settings.extra["lam"]`` overrides λ.
"""
from __future__ import annotations

from ..optim import CAdam, CSGD
from .methods import Method, Settings, Trainer, register

# name: (help, optimizer class, default lr, default λ, extra optimizer arguments, base method for the time ratio)
DEFAULTS = {
    "csgd": ("C-SGD (paper 003): SGD on the consequentialism gradient G (X Xᵀ + λI)⁻¹, λ = 0.1", CSGD, 1.0, 0.1, {},
             "sgd"),
    "cnesterov": ("C-Nesterov: C-SGD with Nesterov momentum 0.9, λ = 0.3", CSGD, 0.1, 0.3,
                  dict(momentum=0.9, nesterov=True), "sgd"),
    "cadam": ("C-Adam: Adam on the consequentialism gradient, λ = 0.1", CAdam, 3e-3, 0.1, {}, "adam"),
}


def _factory(cls, default_lr, default_lam, kwargs):
    def make(model, settings: Settings) -> Trainer:
        lam = settings.extra.get("lam", default_lam)
        return Trainer(model, cls(model, lr=settings.lr or default_lr, lam=lam, **kwargs))

    return make


for _name, (_help, _cls, _lr, _lam, _kw, _base) in DEFAULTS.items():
    register(Method(_name, _help, _factory(_cls, _lr, _lam, _kw), _lr, base=_base))
