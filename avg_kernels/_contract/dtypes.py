"""Dtype rules (SPEC §0, §3)."""
from __future__ import annotations

import torch

#: The floating dtypes every op accepts.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
FLOAT_DTYPES_TEXT = "float16, bfloat16, float32 or float64"


def compute_dtype(*dtypes: torch.dtype) -> torch.dtype:
    """float64 when any operand is float64, else float32 (SPEC §0)."""
    return torch.float64 if torch.float64 in dtypes else torch.float32


def gram_dtype(dtype: torch.dtype) -> torch.dtype:
    """The Gram's dtype for an input dtype: float64 for float64, else float32 (SPEC §3)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
