"""Loads the compiled extension and chooses its CPU capability level; says clearly why when it cannot.

``avg_kernels._C`` holds the ops (registration, checks, drivers; the CUDA kernels when built with them).
The C++ CPU kernels live in one module per capability level, ``avg_kernels._cpu_<level>`` (see
``_cpu_levels``). At import the best level that is built and that this CPU supports is installed into
``_C`` (``AVG_KERNELS_CPU_CAPABILITY=default|avx2|avx512`` forces a lower one; a level the CPU lacks is an
error). A level's module is imported only on a CPU that supports it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import threading

from . import _cpu_levels

_C = None
_ERROR: str | None = None
_LEVEL: str | None = None
_TESTING = None
_lock = threading.Lock()


class CpuCapabilityError(RuntimeError):
    """AVG_KERNELS_CPU_CAPABILITY asks for a level this build or this CPU cannot run."""


def built_levels() -> list[str]:
    """The capability levels whose kernel modules this installation has, ascending."""
    return [lvl for lvl in _cpu_levels.LEVELS if importlib.util.find_spec(_cpu_levels.module_name(lvl)) is not None]


def cpu_features() -> dict[str, bool]:
    """What the running CPU and OS support (cpuid, xgetbv), as the compiled extension reads it."""
    ext = extension()
    return dict(ext.cpu_features()) if ext is not None else {}


def supported_levels() -> list[str]:
    """The levels that are built and that this CPU can run, ascending."""
    return _cpu_levels.supported(cpu_features(), built_levels())


def _install(level: str) -> None:
    table = importlib.import_module(_cpu_levels.module_name(level)).kernels
    _C.set_cpu_kernels(table)
    if _TESTING is not None:
        _TESTING.set_cpu_kernels(table)


def _load():
    global _C, _ERROR, _LEVEL
    if _C is not None or _ERROR is not None:
        return
    with _lock:
        if _C is not None or _ERROR is not None:
            return
        try:
            mod = importlib.import_module("avg_kernels._C")
        except ImportError as exc:
            _ERROR = (f"the compiled extension avg_kernels._C is not importable ({exc}); build it with "
                      "`pip install --no-build-isolation -e .` from the repository root")
            return
        built = built_levels()
        if "default" not in built:
            _ERROR = (f"the CPU kernel module {_cpu_levels.module_name('default')} is missing (built: {built}); "
                      "rebuild with `pip install --no-build-isolation -e .`")
            return
        try:
            level = _cpu_levels.choose(dict(mod.cpu_features()), built, os.environ.get(_cpu_levels.ENV))
        except ValueError as exc:  # an explicit request that cannot be honoured: never run other code silently
            raise CpuCapabilityError(str(exc)) from None
        _C = mod
        _install(level)
        _LEVEL = level


def extension():
    """The loaded avg_kernels._C module, or None (see ``extension_error()``)."""
    _load()
    return _C


def extension_error() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    _load()
    return _ERROR


def cpu_capability() -> str | None:
    """The capability level of the C++ CPU kernels in use: "default", "avx2" or "avx512" (None when the
    extension is not built). Chosen at import: the best level this CPU supports, or
    ``AVG_KERNELS_CPU_CAPABILITY``."""
    _load()
    return _LEVEL


def set_cpu_capability(level: str) -> str:
    """Switches the CPU kernels to ``level`` in this process (for tests and benchmarks; not thread-safe
    against ops running concurrently) and returns the previous level. ValueError when the level is not
    built or this CPU lacks it."""
    global _LEVEL
    if extension() is None:
        raise RuntimeError(f"no CPU kernels to switch: {_ERROR}")
    if level not in _cpu_levels.LEVELS:
        raise ValueError(f"level={level!r} is not a CPU capability level; expected one of {list(_cpu_levels.LEVELS)}")
    chosen = _cpu_levels.choose(cpu_features(), built_levels(), level)
    with _lock:
        previous = _LEVEL
        _install(chosen)
        _LEVEL = chosen
    return previous


def testing_extension():
    """avg_kernels._C_testing (test hooks, ops torch.ops.avg_kernels_testing.*) with the active level's CPU
    kernels installed; imported only by the test suite. None when the extension is not built."""
    global _TESTING
    if extension() is None:
        return None
    with _lock:
        if _TESTING is None:
            _TESTING = importlib.import_module("avg_kernels._C_testing")
            _TESTING.set_cpu_kernels(importlib.import_module(_cpu_levels.module_name(_LEVEL)).kernels)
    return _TESTING


def cuda_built() -> bool:
    ext = extension()
    return bool(ext is not None and ext.built_with_cuda())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
