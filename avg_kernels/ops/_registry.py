"""The op registry: each public op is declared once, as an ``OpSpec`` in its own file (ops/<op>.py), and
``Op`` derives everything else from it (SPEC §5):

* the ``torch.library`` op ``torch.ops.avg_kernels.<name>``: its schema, one implementation on the
  CompositeExplicitAutograd key (``spec.check``, then the chosen backend's kernel), the fake (``spec.check``,
  then the output's metadata) and, when the spec has one, the autograd formula;
* ``Op.__call__``: the op through the dispatcher (autograd, ``torch.compile``);
* ``Op.eager``: the fast path for internal callers that need no autograd (the AG recorder's backward, the
  C-optimizers' Grams and solves): the implementation itself in eager mode, without the dispatcher and
  autograd-wrapper Python of a dispatched call, and the op while ``torch.compile`` traces;
* ``Op.public``: the user-facing wrapper around an adapter that turns the user's arguments (activation
  keywords, ints or tuples, iterables) into the schema's, with a validated ``backend`` keyword.

Validation happens once on every path (wrapper, ``torch.ops`` call, fast path), in ``spec.check``, before any
kernel runs or any tensor is written. ``torch.library.custom_op`` would generate much of this too, at
several times the Python per call (docs/kernel_choices.md), which AG steps pay once per activation; so the
ops are defined on a ``torch.library.Library`` fragment directly.

Adding an op: its file declares the spec and ``Op(spec)``; ops/__init__.py lists it in ``OPS``.
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import torch

from . import _backend

_LIB = torch.library.Library("avg_kernels", "FRAGMENT")


@dataclass(frozen=True)
class Autograd:
    """``torch.library.register_autograd``'s two functions."""

    backward: Callable
    setup_context: Callable


@dataclass(frozen=True)
class OpSpec:
    """One op, declared once.

    ``schema``: the full torch.library schema, ending in ``str backend='auto'``.
    ``check(*args, fake)``: validates the op's arguments (all but ``backend``; ``fake`` is True for fake
        tensors, which have no memory to inspect) and returns the normalised call every other function gets.
    ``fake(call)``: outputs with the right metadata (shapes, dtypes) for ``torch.compile``.
    ``backends``: backend name -> ``kernel(call)`` for "reference", "cpu", "triton" and "cuda".
    ``device(call)``: the device that chooses the backend; None when there is nothing to compute, and then
        ``empty(call)`` gives the result (a bad ``backend`` name is still an error).
    ``run(call, backend)``: instead of ``backends``, for an op whose forward needs no backend of its own
        (``avg_act`` computes f(x) with PyTorch; its backend serves the averaged backward).
    """

    schema: str
    check: Callable[..., Any]
    fake: Callable[[Any], Any]
    backends: Optional[Mapping[str, Callable[[Any], Any]]] = None
    device: Callable[[Any], Optional[torch.device]] = lambda call: None
    empty: Callable[[Any], Any] = lambda call: None
    run: Optional[Callable[[Any, str], Any]] = None
    autograd: Optional[Autograd] = None

    @property
    def name(self) -> str:
        return self.schema.split("(", 1)[0]


class Op:
    """A registered op (see the module docstring). ``overload`` is ``torch.ops.avg_kernels.<name>.default``."""

    def __init__(self, spec: OpSpec):
        if (spec.backends is None) == (spec.run is None):
            raise ValueError(f"{spec.name}: an OpSpec has either backends or run")
        if spec.backends is not None and set(spec.backends) != set(_backend.BACKENDS):
            raise ValueError(f"{spec.name}: backends must be exactly {_backend.BACKENDS}, got {sorted(spec.backends)}")
        if not spec.schema.rstrip().split("->")[0].rstrip().endswith("str backend='auto')"):
            raise ValueError(f"{spec.name}: the schema's last argument must be str backend='auto'")
        self.spec = spec
        self.name = spec.name
        # arguments before ``backend``; the dispatcher may pass a defaulted backend by keyword, or not at all
        self._n_args = len(torch._C.parse_schema(f"avg_kernels::{spec.schema}").arguments) - 1
        _LIB.define(spec.schema)
        _LIB.impl(self.name, self.impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"avg_kernels::{self.name}", self._fake, lib=_LIB)
        if spec.autograd is not None:
            torch.library.register_autograd(f"avg_kernels::{self.name}", spec.autograd.backward,
                                            setup_context=spec.autograd.setup_context, lib=_LIB)
        self.overload = getattr(torch.ops.avg_kernels, self.name).default

    def _split(self, args, kwargs) -> tuple[tuple, str]:
        n = self._n_args
        return args[:n], kwargs.get("backend", args[n] if len(args) > n else "auto")

    def impl(self, *args, **kwargs):
        """The op's implementation: validation, backend choice, kernel (no autograd)."""
        if len(args) == self._n_args + 1 and not kwargs:  # the common call: every argument positional
            backend = args[-1]
            args = args[:-1]
        else:
            args, backend = self._split(args, kwargs)
        spec = self.spec
        call = spec.check(*args, fake=False)
        if spec.run is not None:
            _backend.check_backend(backend)
            return spec.run(call, backend)
        device = spec.device(call)
        if device is None:
            _backend.check_backend(backend)
            return spec.empty(call)
        return spec.backends[_backend.resolve(self.name, backend, device)](call)

    def _fake(self, *args, **kwargs):
        args, _ = self._split(args, kwargs)
        return self.spec.fake(self.spec.check(*args, fake=True))

    def __call__(self, *args):
        return self.overload(*args)

    def eager(self, *args):
        """The op for internal callers that need no autograd: its implementation directly in eager mode, the op
        itself (traceable through its fake) while torch.compile traces."""
        return self.overload(*args) if torch.compiler.is_compiling() else self.impl(*args)

    def public(self, adapter: Callable) -> Callable:
        """Decorator making the user-facing function from ``adapter``, which takes the user's arguments (the
        public signature, without ``backend``) and returns the op's arguments (without ``backend``). The
        function gets the adapter's name, docstring and signature, plus a keyword ``backend=None`` (None or
        "auto": the innermost ``use_backend``, else the device default), validated before the op runs."""
        @functools.wraps(adapter)
        def wrapper(*args, backend: Optional[str] = None, **kwargs):
            name = "auto" if backend is None else _backend.check_backend(backend)
            return self.overload(*adapter(*args, **kwargs), name)

        sig = inspect.signature(adapter)
        params = list(sig.parameters.values())
        kw = inspect.Parameter("backend", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Optional[str])
        at = next((i for i, p in enumerate(params) if p.kind == inspect.Parameter.VAR_KEYWORD), len(params))
        wrapper.__signature__ = sig.replace(parameters=[*params[:at], kw, *params[at:]])
        return wrapper

    def __repr__(self) -> str:
        return f"Op(torch.ops.avg_kernels.{self.name})"
