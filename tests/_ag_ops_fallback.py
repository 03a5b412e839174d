"""TEMPORARY test-only float64 stand-ins for avg_kernels.ag1_update_ / ag2_rescale_ (SPEC §2), used only
while those fused ops are not in this branch (they are being implemented on branch ``ag``). The
``ag_ops`` fixture installs them with monkeypatch when avg_kernels lacks the real ops, and does nothing
once they exist. Delete this file when branch ``ag`` is merged.
"""
from __future__ import annotations

import pytest
import torch

import avg_kernels


def _sign(t):
    s = torch.sign(t)
    return torch.where(torch.isnan(t), t, s)


@torch.no_grad()
def ag1_update_(params, params_new, avg_grads, *, backend=None):
    for p, pn, g in zip(params, params_new, avg_grads):
        if g is None:
            continue
        pd = p.double()
        p.copy_((pd - (pn.double() - pd).abs() * _sign(g.double())).to(p.dtype))
    return params


@torch.no_grad()
def ag2_rescale_(params, params_old, params_step, *, backend=None):
    delta = [p.double() - o.double() for p, o in zip(params, params_old)]
    l1_step = sum((s.double() - o.double()).abs().sum() for s, o in zip(params_step, params_old))
    l1_delta = sum(d.abs().sum() for d in delta)
    if float(l1_delta) == 0.0:
        return params
    for p, o, d in zip(params, params_old, delta):
        p.copy_((o.double() + d * (l1_step / l1_delta)).to(p.dtype))
    return params


HAVE_OPS = hasattr(avg_kernels, "ag1_update_") and hasattr(avg_kernels, "ag2_rescale_")


@pytest.fixture
def ag_ops(monkeypatch):
    if not HAVE_OPS:
        monkeypatch.setattr(avg_kernels, "ag1_update_", ag1_update_, raising=False)
        monkeypatch.setattr(avg_kernels, "ag2_rescale_", ag2_rescale_, raising=False)
    return HAVE_OPS
