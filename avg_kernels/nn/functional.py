"""Functional averaged activations: drop-ins for the ``torch.nn.functional`` calls of the same names.

Use these where a model's ``forward`` calls ``F.gelu`` (or ``torch.tanh`` ...) directly, which
``convert`` cannot swap: ``from avg_kernels.nn import functional as AF`` and write ``AF.gelu(x)``.
There is one per record of the activation table (``avg_kernels.activations.TABLE``), named as the
record and taking its parameters (PyTorch's names and defaults, positional or keyword) after
``input``, e.g. ``gelu(input, approximate="none")``, ``softplus(input, beta=1.0, threshold=20.0)``.
Outside AG steps each is exactly the PyTorch call (bitwise, ``torch.compile``-friendly); inside an AG
step it is recorded and averaged like the modules. There are no ``inplace`` variants: the averaged
backward needs the input to survive.
"""
from __future__ import annotations

import inspect
import sys
from typing import Callable

import torch

from ..activations import TABLE, Activation
from . import _recording


class _Caller:
    """Where a functional call came from (formatted only for an error message)."""

    __slots__ = ("name", "file", "line")

    def __init__(self, name: str):
        f = sys._getframe(2)
        self.name, self.file, self.line = name, f.f_code.co_filename, f.f_lineno

    @property
    def what(self) -> str:
        return f"avg_kernels.nn.functional.{self.name}()"

    def place(self) -> str:
        return f"{self.file.replace(chr(92), '/').rsplit('/', 1)[-1]}:{self.line}"

    def _where(self) -> str:
        return f"avg_kernels.nn.functional.{self.name} called from {self.file}:{self.line}"


_caller = _Caller


def _function(spec: Activation) -> Callable:
    """The functional form of one table record."""
    name, names, torch_fn = spec.name, tuple(spec.params), spec.functional
    fixed = None if names else spec.resolve({})

    def fn(input: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if len(args) > len(names):
            raise TypeError(f"{name}() takes {1 + len(names)} positional arguments but {1 + len(args)} were given")
        params = dict(zip(names, args))
        for key, value in kwargs.items():
            if key not in spec.params or key in params:
                raise TypeError(f"{name}() got an unexpected keyword argument {key!r}" if key not in spec.params
                                else f"{name}() got multiple values for argument {key!r}")
            params[key] = value
        rec = _recording.ACTIVE
        if rec is None:
            return torch_fn(input, **params)
        return rec.call(input, fixed or spec.resolve(params), _caller(name), kind="functional")

    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    fn.__doc__ = (f"``torch.nn.functional.{torch_fn.__name__}`` (no ``inplace``), averaged inside AG steps.")
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter("input", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=torch.Tensor)]
        + [inspect.Parameter(k, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=v) for k, v in spec.params.items()],
        return_annotation=torch.Tensor)
    return fn


globals().update({spec.name: _function(spec) for spec in TABLE.values()})

__all__ = list(TABLE)
