"""The ridge solve's data checks (SPEC §3): the tolerance and the messages every backend raises with
(csrc/ridge_driver.cpp words them identically; tests/test_ridge.py compares)."""
from __future__ import annotations

import torch

from .dtypes import compute_dtype

#: An eigenvalue below -GRAM_TOL · ‖S‖₂ means "clearly not a Gram" (SPEC §3).
GRAM_TOL = 1e-3


def pinv_rtol(d: int, *dtypes: torch.dtype) -> float:
    """The default relative cutoff of torch.linalg.pinv at the compute precision: eps · D."""
    return torch.finfo(compute_dtype(*dtypes)).eps * d


def batch_name(index: int, batch_shape) -> str:
    """``A[1, 2] (batch index 5 of batch shape (2, 3))`` for a flat batch index."""
    batch_shape = tuple(batch_shape)
    if not batch_shape:
        return "A"
    multi, rest = [], index
    for size in reversed(batch_shape):
        multi.append(rest % size)
        rest //= size
    idx = ", ".join(str(i) for i in reversed(multi))
    return f"A[{idx}] (batch index {index} of batch shape {batch_shape})"


def nonfinite_message(index: int, batch_shape) -> str:
    return f"ridge_solve: {batch_name(index, batch_shape)} is not finite (it contains NaN or inf)"


def not_gram_message(index: int, batch_shape, w_min: float, norm: float) -> str:
    return (f"ridge_solve: {batch_name(index, batch_shape)} is not a Gram matrix: its smallest eigenvalue "
            f"{w_min:.6g} is below -{GRAM_TOL:g}·‖A‖₂ = {-GRAM_TOL * norm:.6g}")
