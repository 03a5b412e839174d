"""Loss scaling for AG steps: ``AG.step(closure, scaler=torch.amp.GradScaler(...))``.

``GradScaler.step(optimizer, closure)`` refuses closures, and an AG step runs its own backward passes, so
the step takes the scaler itself. Each backward of the step back-propagates ``scaler.scale(loss)``; the
gradients are then unscaled as ``GradScaler.unscale_`` does:

* the FIRST gradient of the step (g for AG-1/AG-2, ḡ for AG-3-1) through ``scaler.unscale_(base)``, which
  also records the step's inf check for ``scaler.update()``;
* AG-1/AG-2's ḡ (the second backward) by the same reciprocal; a non-finite ḡ is added to the recorded
  inf check, so ``scaler.update()`` backs off as it would for a non-finite g.

A non-finite gradient skips the step, as ``GradScaler.step`` does (the parameters, buffers and base
state stay as before; ``opt.last.skipped``). ``scaler.update()`` stays the caller's, once per step.
"""
from __future__ import annotations

from typing import Optional

import torch


def check(scaler) -> Optional[object]:
    """The scaler to use (None when not given or disabled); TypeError for something else."""
    if scaler is None:
        return None
    needed = ("scale", "unscale_", "update", "is_enabled", "get_scale")
    if not all(callable(getattr(scaler, n, None)) for n in needed):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    return scaler if scaler.is_enabled() else None


def unscale_recorded(scaler, base: torch.optim.Optimizer, params: list, grads) -> tuple:
    """Unscales ``grads`` (the scaled gradients of ``params``) through ``scaler.unscale_(base)``, which
    records the inf check for ``scaler.update()``; returns them unscaled (also left in ``p.grad``)."""
    for p, g in zip(params, grads):
        p.grad = g
    scaler.unscale_(base)
    return tuple(p.grad for p in params)


def unscale(scaler, grads) -> tuple:
    """``grads`` divided by the scale, as ``unscale_`` does (times the float32 reciprocal of the scale)."""
    inv = float(torch.tensor(scaler.get_scale(), dtype=torch.float64).reciprocal().float())
    return tuple(None if g is None else g * inv for g in grads)


def record_inf(scaler, base: torch.optim.Optimizer) -> None:
    """Adds a non-finite gradient found after ``unscale_`` to the scaler's inf check of this step, so
    ``scaler.update()`` backs off (GradScaler keeps it per optimizer, per device)."""
    for found in scaler._found_inf_per_device(base).values():
        found.fill_(1.0)
