"""Training-step orchestration over torch.optim base optimizers.

* ``AG`` (``avg_kernels/optim/ag.py``): AG-1 / AG-2 / AG-3-1 average-gradient steps (SPEC §4).
"""
from .ag import AG, MODES, AGStepInfo

__all__ = ["AG", "AGStepInfo", "MODES"]
