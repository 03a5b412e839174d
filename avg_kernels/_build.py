"""Finds the compiled extension avg_kernels._C and says clearly why it is missing when it is."""
from __future__ import annotations

import importlib
import os

_C = None
_ERROR: str | None = None

_ISA_RANK = {"default": 0, "avx2": 1, "avx512": 2}


def _load():
    global _C, _ERROR
    if _C is not None or _ERROR is not None:
        return
    try:
        mod = importlib.import_module("avg_kernels._C")
    except ImportError as exc:
        _ERROR = (f"the compiled extension avg_kernels._C is not importable ({exc}); build it with "
                  "`pip install --no-build-isolation -e .` from the repository root")
        return
    import torch

    have = torch.backends.cpu.get_cpu_capability().lower()
    built = mod.cpu_isa()
    if _ISA_RANK.get(built, 0) > _ISA_RANK.get(have, 0):
        _ERROR = (f"avg_kernels._C was compiled for {built} but this CPU supports {have}; rebuild here "
                  "(AVG_KERNELS_CPU_ISA=auto picks this machine's level)")
        return
    _C = mod


def extension():
    """The loaded avg_kernels._C module, or None (see ``extension_error()``)."""
    _load()
    return _C


def extension_error() -> str | None:
    """Why the extension is unavailable, or None when it loaded."""
    _load()
    return _ERROR


def cuda_built() -> bool:
    ext = extension()
    return bool(ext is not None and ext.built_with_cuda())


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
