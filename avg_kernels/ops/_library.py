"""Defining the public ops: schema, implementation, fake, on one torch.library.Library fragment.

Each op is declared with its full schema (the same declaration TORCH_LIBRARY would make in C++) and
one Python implementation on the CompositeExplicitAutograd key, which chooses the backend itself
(avg_kernels/ops/_backend.py). ``torch.library.custom_op`` would do the same with ~20 us more
Python per call (measured: 28 us vs 8 us for a 1024-element avg_act_backward on this CPU, kernel
3.6 us), which is paid once per activation per AG step, so the hot ops are defined here instead.
"""
from __future__ import annotations

from typing import Callable

import torch

_LIB = torch.library.Library("avg_kernels", "FRAGMENT")


def define(schema: str, impl: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Declares ``avg_kernels::<schema>``, its implementation and its fake; returns the overload."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    _LIB.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"avg_kernels::{name}", fake, lib=_LIB)
    return getattr(torch.ops.avg_kernels, name).default


def internal(op: torch._ops.OpOverload, impl: Callable) -> Callable:
    """A caller of ``op`` for internal code that needs no autograd: in eager mode ``impl`` (the op's
    implementation) directly, skipping ~20 us of dispatcher and autograd-wrapper Python per call; while
    tracing (torch.compile) the op itself, whose fake implementation makes it traceable."""
    def call(*args):
        return op(*args) if torch.compiler.is_compiling() else impl(*args)

    return call
