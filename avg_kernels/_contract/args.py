"""Argument validation shared by the ops: clear ValueError/TypeError naming the argument (SPEC §6),
raised before any kernel runs or any tensor is written."""
from __future__ import annotations

import math

import torch

from .dtypes import FLOAT_DTYPES


def is_tensor(name: str, t, optional: bool = False):
    """``t`` is a tensor (or None when ``optional``): the public wrappers check this before the dispatcher sees
    the argument (it would raise a RuntimeError of its own); the ops validate the rest."""
    if not isinstance(t, torch.Tensor) and not (optional and t is None):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def tensor(name: str, t) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; expected one of float16, bfloat16, float32, float64")
    return t


def same_meta(ref_name: str, ref: torch.Tensor, **others: torch.Tensor) -> None:
    """Every tensor in ``others`` has ref's shape, dtype and device."""
    for name, t in others.items():
        if t.shape != ref.shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)} but {ref_name} has shape {tuple(ref.shape)}")
        if t.dtype != ref.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")
        if t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def nonneg_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"{name}={value!r} must be finite and >= 0")
    return float(value)
