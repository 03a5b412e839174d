"""Optimizers of avg_kernels.

* ``CSGD`` (C-SGD; ``nesterov=True``: C-Nesterov) and ``CAdam`` (C-Adam): the consequentialism optimizers of
  paper 003 (SPEC §3), torch.optim optimizers over a model's parameters whose Linear/Conv1d/Conv2d weight
  gradients are replaced by ``G (X Xᵀ + λI)⁻¹`` before the base update.
"""
from .consequentialism import CAdam, CSGD, UnsupportedLayerError

__all__ = ["CAdam", "CSGD", "UnsupportedLayerError"]
