"""The batched ridge solve of SPEC §3: ``torch.ops.avg_kernels.ridge_solve(G, A, lam)`` = ``G (A + λI)⁻¹``.

A is symmetrised; λ > 0 factorises ``A + λI`` by Cholesky and falls back, per batch entry, to an
eigendecomposition with eigenvalues clamped at 0 when Cholesky fails (rank-deficient Grams); λ = 0 is
the pseudoinverse. Definition and error cases: avg_kernels/reference/ridge.py.

Backends: "reference" (float64, avg_kernels/reference/ridge.py), "cpu" and "cuda" (C++ driver
csrc/ridge_driver.cpp around ATen linalg, fused prologue/epilogue kernels in csrc/cpu/kernels/ridge.cpp
and csrc/cuda/ridge.cu), "triton" (the same driver in Python with Triton kernels, avg_kernels/_triton/ridge.py).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .. import reference
from ..reference.ridge import compute_dtype
from . import _backend, _checks, _library

_OP = "ridge_solve"


def _check_args(G, A, lam) -> None:
    _checks.tensor("G", G)
    _checks.tensor("A", A)
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
    if isinstance(lam, bool) or not isinstance(lam, (int, float)):
        raise TypeError(f"ridge_solve: lam must be a real number, got {type(lam).__name__}")
    if not math.isfinite(lam) or lam < 0:
        raise ValueError(f"ridge_solve: lam={lam!r} must be finite and >= 0 (it is added to A's diagonal)")


def _run_reference(G, A, lam):
    return reference.ridge_solve(G, A, lam)


def _run_cpu_or_cuda(G, A, lam):
    return torch.ops.avg_kernels_C.ridge_solve(G, A, lam)


def _run_triton(G, A, lam):
    from .._triton.ridge import ridge_solve as triton_ridge_solve

    return triton_ridge_solve(G, A, lam)


_IMPLS = {"reference": _run_reference, "cpu": _run_cpu_or_cuda, "cuda": _run_cpu_or_cuda, "triton": _run_triton}


def ridge_solve_impl(G, A, lam, backend="auto"):
    """The op's implementation (validation, backend choice, kernel), for internal callers needing no autograd."""
    _check_args(G, A, lam)
    name = _backend.resolve(_OP, backend, G.device)
    if G.numel() == 0 or A.numel() == 0:  # nothing to solve (C, D or a batch dim is 0)
        return torch.zeros(G.shape, dtype=G.dtype, device=G.device)
    return _IMPLS[name](G, A, float(lam))


def _ridge_solve_fake(G, A, lam, backend="auto"):
    _check_args(G, A, lam)
    return G.new_empty(G.shape)


ridge_solve_op = _library.define("ridge_solve(Tensor G, Tensor A, float lam, str backend='auto') -> Tensor",
                                 ridge_solve_impl, _ridge_solve_fake)


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
        grad_g = torch.ops.avg_kernels.ridge_solve(grad.to(ct), A, ctx.lam, ctx.backend)
        if ctx.needs_input_grad[1]:
            ga = -(P.to(ct).mT @ grad_g)
            grad_a = ((ga + ga.mT) / 2).to(a_dtype)
        grad_g = grad_g.to(g_dtype) if ctx.needs_input_grad[0] else None
    return grad_g, grad_a, None, None


torch.library.register_autograd("avg_kernels::ridge_solve", _backward, setup_context=_setup_context)


def ridge_solve(G: torch.Tensor, A: torch.Tensor, lam: float, *, backend: Optional[str] = None) -> torch.Tensor:
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
    _check_args(G, A, lam)
    return torch.ops.avg_kernels.ridge_solve(G, A, float(lam), backend or "auto")
