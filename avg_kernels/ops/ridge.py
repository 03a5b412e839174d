"""The batched ridge solve of SPEC §3: ``torch.ops.avg_kernels.ridge_solve(G, A, lam)`` = ``G (A + λI)⁻¹``.

A is symmetrised; λ > 0 factorises ``A + λI`` by Cholesky and falls back, per batch entry, to an
eigendecomposition with eigenvalues clamped at 0 when Cholesky fails (rank-deficient Grams); λ = 0 is
the pseudoinverse. Definition and error cases: avg_kernels/reference/ridge.py.

Backends: "reference" (float64, avg_kernels/reference/ridge.py), "cpu" and "cuda" (C++ driver
csrc/ridge_driver.cpp around ATen linalg, fused prologue/epilogue kernels in csrc/cpu/kernels/ridge.cpp
and csrc/cuda/ridge.cu), "triton" (the same driver in Python with Triton kernels,
avg_kernels/_triton/ridge.py). Declared through the registry (ops/_registry.py).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from .. import reference
from .._contract import args
from .._contract.dtypes import compute_dtype
from ._registry import Autograd, Op, OpSpec


class RidgeCall(NamedTuple):
    G: torch.Tensor
    A: torch.Tensor
    lam: float


def _check(G, A, lam, *, fake: bool) -> RidgeCall:
    args.tensor("G", G)
    args.tensor("A", A)
    if G.dim() < 2:
        raise ValueError(f"ridge_solve: G must have shape (..., C, D), got {G.dim()}-d shape {tuple(G.shape)}")
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"ridge_solve: A must have shape (..., D, D), got shape {tuple(A.shape)}")
    if G.shape[-1] != A.shape[-1]:
        raise ValueError(f"ridge_solve: G has shape {tuple(G.shape)} (D = {G.shape[-1]}) but A has shape "
                         f"{tuple(A.shape)} (D = {A.shape[-1]})")
    if G.shape[:-2] != A.shape[:-2]:
        raise ValueError(f"ridge_solve: G's batch shape {tuple(G.shape[:-2])} (G: {tuple(G.shape)}) differs from "
                         f"A's batch shape {tuple(A.shape[:-2])} (A: {tuple(A.shape)})")
    if G.device != A.device:
        raise ValueError(f"ridge_solve: G is on {G.device} but A is on {A.device}")
    return RidgeCall(G, A, _lam(lam))


def _lam(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"ridge_solve: lam must be a real number, got {type(lam).__name__}")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"ridge_solve: lam={lam!r} must be finite and >= 0 (it is added to A's diagonal)")
    return float(lam)


def _compiled(c: RidgeCall):
    return torch.ops.avg_kernels_C.ridge_solve(c.G, c.A, c.lam)


def _triton(c: RidgeCall):
    from .._triton.ridge import ridge_solve as triton_ridge_solve

    return triton_ridge_solve(c.G, c.A, c.lam)


# Autograd. With B = sym(A) + λI and P = G B⁻¹ (the Cholesky branch, λ > 0):
#   ∂L/∂G = Ḡ B⁻¹ = ridge_solve(P̄, A, λ),   ∂L/∂A = sym(-Pᵀ ∂L/∂G).
# Where the eigendecomposition fallback clamps eigenvalues, or at λ = 0 (the pseudoinverse is not
# differentiable where the rank changes), these are the gradients of the unclamped formula.

def _setup_context(ctx, inputs, output):
    G, A, lam, backend = inputs
    ctx.save_for_backward(A, output)
    ctx.lam, ctx.backend = lam, backend
    ctx.dtypes = (G.dtype, A.dtype)


def _backward(ctx, grad):
    A, P = ctx.saved_tensors
    g_dtype, a_dtype = ctx.dtypes
    grad_g = grad_a = None
    if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
        ct = compute_dtype(grad.dtype, A.dtype)
        grad_g = RIDGE_SOLVE(grad.to(ct), A, ctx.lam, ctx.backend)
        if ctx.needs_input_grad[1]:
            ga = -(P.to(ct).mT @ grad_g)
            grad_a = ((ga + ga.mT) / 2).to(a_dtype)
        grad_g = grad_g.to(g_dtype) if ctx.needs_input_grad[0] else None
    return grad_g, grad_a, None, None


def _nothing_to_solve(c: RidgeCall) -> torch.Tensor:
    """C = 0 (or D or a batch dim is 0): the result is empty, but A is still checked as every backend
    checks it (finite, a Gram: SPEC §3), so a bad A is reported whatever G's row count."""
    if c.A.numel():
        reference.ridge_solve(c.A.new_zeros((*c.A.shape[:-2], 1, c.A.shape[-1])), c.A, c.lam)
    return torch.zeros(c.G.shape, dtype=c.G.dtype, device=c.G.device)


RIDGE_SOLVE = Op(OpSpec(
    schema="ridge_solve(Tensor G, Tensor A, float lam, str backend='auto') -> Tensor",
    check=_check,
    fake=lambda c: c.G.new_empty(c.G.shape),
    # nothing to solve (C, D or a batch dim is 0): zeros, whatever the backend
    device=lambda c: c.G.device if c.G.numel() and c.A.numel() else None,
    empty=lambda c: _nothing_to_solve(c),
    backends={"reference": lambda c: reference.ridge_solve(c.G, c.A, c.lam), "cpu": _compiled, "cuda": _compiled,
              "triton": _triton},
    autograd=Autograd(_backward, _setup_context),
))


@RIDGE_SOLVE.public
def ridge_solve(G: torch.Tensor, A: torch.Tensor, lam: float):
    """``P = G (A + lam·I)⁻¹``, the consequentialism preconditioned gradient of SPEC §3, batched.

    Args:
        G: (..., C, D), e.g. a layer's weight gradient ``W.grad.view(C_out, -1)`` (bias as the last column).
        A: (..., D, D) with G's leading dims, e.g. the layer's input Gram (``im2col_gram`` / ``linear_gram``).
            Symmetrised before use. Any float dtype; G and A may differ (e.g. bfloat16 G, float32 A).
        lam: λ >= 0, absolute (added to the summed Gram's diagonal).
            λ > 0: Cholesky of ``A + λI``; a batch entry whose factorisation fails (a rank-deficient Gram's
            rounding-level negative eigenvalues exceed λ) is solved through its eigendecomposition with the
            eigenvalues clamped at 0 instead (not an error). λ = 0: ``G pinv(A)`` with
            ``torch.linalg.pinv(hermitian=True)``'s default cutoff at the compute precision.
        backend: "reference", "cpu", "triton", "cuda" or None/"auto" (see ``use_backend``).

    Arithmetic in float32 (float64 when G or A is float64). Returns a new contiguous tensor of G's shape
    and dtype. Raises ValueError naming the batch index when A is not finite or clearly not a Gram
    (an eigenvalue below -1e-3·‖A‖₂), ValueError for λ < 0 or mismatched shapes, TypeError for bad types.
    """
    return args.is_tensor("G", G), args.is_tensor("A", A), _lam(lam)
