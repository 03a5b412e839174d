"""Output allocation for kernel launches.

With AVG_KERNELS_POISON_OUTPUTS=1 (set by the test suite) outputs start NaN-filled instead of
uninitialised, so an element a kernel fails to write shows up in every parity test.
"""
import os

import torch


def poisoning() -> bool:
    return os.environ.get("AVG_KERNELS_POISON_OUTPUTS", "0") == "1"


_POISON = poisoning()  # read once at import (the test suite sets it before importing avg_kernels)


def new_output(shape, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous tensor of ``shape`` on like's device (dtype: like's unless given)."""
    dtype = dtype or like.dtype
    if _POISON:
        return torch.full(shape, float("nan"), dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)
