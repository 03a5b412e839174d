"""Functional averaged activations: drop-ins for the ``torch.nn.functional`` calls of the same names.

Use these where a model's ``forward`` calls ``F.gelu`` (or ``torch.tanh`` ...) directly, which
``convert`` cannot swap: ``from avg_kernels.nn import functional as AF`` and write ``AF.gelu(x)``.
Outside AG steps each is exactly the PyTorch call (bitwise, ``torch.compile``-friendly); inside an AG
step it is recorded and averaged like the modules. There are no ``inplace`` variants: the averaged
backward needs the input to survive.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .. import activations
from ..activations import KernelAct
from . import _recording

__all__ = ["tanh", "sigmoid", "relu", "leaky_relu", "elu", "gelu", "silu", "softplus"]


class _Caller:
    """Where a functional call came from (formatted only for an error message)."""

    __slots__ = ("name", "file", "line")

    def __init__(self, name: str):
        f = sys._getframe(2)
        self.name, self.file, self.line = name, f.f_code.co_filename, f.f_lineno

    def _where(self) -> str:
        return f"avg_kernels.nn.functional.{self.name} called from {self.file}:{self.line}"


_caller = _Caller


def tanh(input: torch.Tensor) -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return torch.tanh(input)
    return rec.call(input, KernelAct("tanh"), _caller("tanh"))


def sigmoid(input: torch.Tensor) -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return torch.sigmoid(input)
    return rec.call(input, KernelAct("sigmoid"), _caller("sigmoid"))


def relu(input: torch.Tensor) -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return F.relu(input)
    return rec.call(input, KernelAct("relu"), _caller("relu"))


def leaky_relu(input: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return F.leaky_relu(input, negative_slope)
    return rec.call(input, activations.resolve("leaky_relu", {"negative_slope": negative_slope}), _caller("leaky_relu"))


def elu(input: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return F.elu(input, alpha)
    return rec.call(input, activations.resolve("elu", {"alpha": alpha}), _caller("elu"))


def gelu(input: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return F.gelu(input, approximate=approximate)
    return rec.call(input, activations.resolve("gelu", {"approximate": approximate}), _caller("gelu"))


def silu(input: torch.Tensor) -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return F.silu(input)
    return rec.call(input, KernelAct("silu"), _caller("silu"))


def softplus(input: torch.Tensor, beta: float = 1.0, threshold: float = 20.0) -> torch.Tensor:
    rec = _recording.ACTIVE
    if rec is None:
        return F.softplus(input, beta, threshold)
    return rec.call(input, activations.resolve("softplus", {"beta": beta, "threshold": threshold}), _caller("softplus"))
