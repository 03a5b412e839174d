"""Backend choice for every op (SPEC §5), kept in this one place.

"auto" resolves at run time: the innermost ``use_backend`` context, else the device default
(CPU -> "cpu"; CUDA -> the op's preferred GPU backend that is available). Asking for a backend
that cannot run raises BackendUnavailableError saying why; the reference is never chosen silently.
"""
from __future__ import annotations

import contextlib
import functools
import threading

import torch

from .. import _build

BACKENDS = ("reference", "cpu", "triton", "cuda")

# Preferred GPU backend per op on CUDA devices, fastest first. Unmeasured on a GPU so far: CUDA C++
# first because it needs no JIT compile on first call; bench/gpu_check.sh measures both.
_CUDA_PREFERENCE: dict[str, tuple[str, ...]] = {}
_DEFAULT_CUDA_PREFERENCE = ("cuda", "triton")

_local = threading.local()


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not importable ({exc}); pip install triton"
    if torch.cuda.is_available() or _build.triton_interpret():
        return None
    return "no CUDA device is present and TRITON_INTERPRET=1 is not set"


def unavailable_reason(name: str) -> str | None:
    """None when backend ``name`` can run in this process, else a sentence saying why not."""
    _check_name(name)
    if name == "reference":
        return None
    if name == "triton":
        return _triton_reason()
    err = _build.extension_error()
    if err is not None:
        return err
    if name == "cuda":
        if not _build.cuda_built():
            return "avg_kernels._C was built without CUDA kernels (see README: building with CUDA)"
        if not torch.cuda.is_available():
            return "no CUDA device is present"
    return None


def available_backends() -> list[str]:
    """Backends usable now, in the order reference, cpu, triton, cuda."""
    return [b for b in BACKENDS if unavailable_reason(b) is None]


def _check_name(name: str) -> None:
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is not a backend; expected one of {list(BACKENDS)} or 'auto'")


def check_backend(name) -> str:
    """``name`` when it is "auto" or a backend's name; else TypeError/ValueError naming ``backend``."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a str (or None), got {type(name).__name__} {name!r}")
    if name != "auto":
        _check_name(name)
    return name


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, ops called with backend="auto" (the default) use backend ``name``.

    Contexts nest; the innermost wins. Thread-local. Example::

        with avg_kernels.use_backend("reference"):
            g = avg_kernels.avg_act_backward(grad, x, x_new, "tanh")
    """
    _check_name(name)
    stack = _stack()
    stack.append(name)
    try:
        yield name
    finally:
        stack.pop()


def current_backend() -> str | None:
    """The innermost ``use_backend`` name, or None outside any."""
    stack = _stack()
    return stack[-1] if stack else None


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The backend that runs ``op`` on ``device`` for the requested ``backend`` ("auto" or a name)."""
    if backend != "auto":
        check_backend(backend)
        return _resolve(op, backend, device.type)
    return _resolve(op, current_backend(), device.type)


@functools.lru_cache(maxsize=None)
def _resolve(op: str, name: str | None, device_type: str) -> str:
    # Cached: what can run does not change within a process (successes only; errors re-raise each
    # call). Saves ~3 us per op call, which AG steps pay once per activation.
    device = torch.device(device_type)
    if name is None:
        if device.type == "cpu":
            name = "cpu"
        elif device.type == "cuda":
            prefs = _CUDA_PREFERENCE.get(op, _DEFAULT_CUDA_PREFERENCE)
            name = next((b for b in prefs if unavailable_reason(b) is None), prefs[0])
        else:
            raise BackendUnavailableError(f"{op}: no backend runs on device type {device.type!r}")
    _check_name(name)
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailableError(f"{op}: backend {name!r} is unavailable: {reason}")
    runs_on = {
        "reference": True,
        "cpu": device.type == "cpu",
        "cuda": device.type == "cuda",
        "triton": device.type == "cuda" or (device.type == "cpu" and _build.triton_interpret()),
    }[name]
    if not runs_on:
        hint = " (Triton runs on CPU tensors only with TRITON_INTERPRET=1)" if name == "triton" else ""
        raise BackendUnavailableError(f"{op}: backend {name!r} cannot run on {device.type} tensors{hint}")
    return name
