"""Optimizers of avg_kernels: each wraps a base ``torch.optim.Optimizer`` (``.base``, sharing its
``param_groups``, ``state`` and ``defaults``; ``_wrapper.py``).

* ``AG`` (``ag.py``): AG-1 / AG-2 / AG-3-1 average-gradient steps over any torch.optim base (SPEC §4).
* ``Consequentialism`` (``consequentialism.py``): the consequentialism preconditioning of paper 003 (SPEC §3)
  over any torch.optim base: the gradient of each weight used as a linear map of a layer input (Linear,
  ConvNd, attention projections, HF Conv1D, ...; found by the weight) is replaced by
  ``G (X Xᵀ + λI)⁻¹`` before the base's step; ``opt.report()`` lists every parameter and why it is or is
  not preconditioned. ``CSGD`` (C-SGD; ``nesterov=True``: C-Nesterov) and ``CAdam`` (C-Adam) build it
  over torch.optim.SGD / Adam.

Both raise ``NonFiniteError`` (a ``FloatingPointError``) for a NaN/infinity in a step's loss or gradients
before anything changes, or skip such steps with ``skip_nonfinite=True``. ``copy.deepcopy`` and pickle copy
an optimizer together with its model.
"""
from .ag import AG, MODES, AGStepInfo
from ._wrapper import NonFiniteError
from .consequentialism import CAdam, CSGD, Consequentialism, UnsupportedLayerError

__all__ = ["AG", "AGStepInfo", "CAdam", "CSGD", "Consequentialism", "MODES", "NonFiniteError",
           "UnsupportedLayerError"]
