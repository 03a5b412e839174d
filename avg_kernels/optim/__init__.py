"""Optimizers of avg_kernels.

* ``AG`` (``ag.py``): AG-1 / AG-2 / AG-3-1 average-gradient steps over any torch.optim base (SPEC §4).
* ``CSGD`` (C-SGD; ``nesterov=True``: C-Nesterov) and ``CAdam`` (C-Adam) (``consequentialism.py``): the
  consequentialism optimizers of paper 003 (SPEC §3), torch.optim optimizers over a model's parameters whose
  Linear/Conv1d/Conv2d weight gradients are replaced by ``G (X Xᵀ + λI)⁻¹`` before the base update.
"""
from .ag import AG, MODES, AGStepInfo
from .consequentialism import CAdam, CSGD, UnsupportedLayerError

__all__ = ["AG", "AGStepInfo", "CAdam", "CSGD", "MODES", "UnsupportedLayerError"]
