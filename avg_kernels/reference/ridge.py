"""Reference ridge solve ``P = G (A + λI)⁻¹`` of SPEC §3, evaluated in float64.

Readable first, fast never. Every fast backend ("cpu", "triton", "cuda") is tested against this.

Definition (SPEC §3), per batch entry ``b`` with ``S = (A + Aᵀ)/2``:

* A not finite, or "clearly not a Gram" (an eigenvalue of S below ``-1e-3·‖S‖₂``): ValueError naming b.
* λ > 0: ``G (S + λI)⁻¹`` through a Cholesky factorisation of ``S + λI``; when that factorisation fails
  (S has a negative eigenvalue at or below -λ, as rank-deficient Grams do at rounding level), the
  eigendecomposition ``S = V diag(w) Vᵀ`` with the eigenvalues clamped at 0:
  ``G V diag(1 / (max(w, 0) + λ)) Vᵀ``. That is not an error.
* λ = 0: ``G pinv(S)`` with ``torch.linalg.pinv(S, hermitian=True)``'s default cutoff, taken at the
  precision the fast backends compute in (``rtol = eps · D`` with eps of float32 for float16/bfloat16/
  float32 inputs and of float64 for float64, SPEC §0): eigenvalues with ``|w| <= rtol · max|w|`` are
  dropped. (The float64 eps would keep rounding-level eigenvalues of a float32 Gram and invert them.)

The fast backends decide "Cholesky failed" in their compute precision, so near the boundary
(an eigenvalue of S within rounding of -λ) the two may legitimately differ; tests stay away from it.
"""
from __future__ import annotations

import math

import torch

from .._contract.dtypes import compute_dtype
from .._contract.ridge import GRAM_TOL, nonfinite_message, not_gram_message, pinv_rtol

def ridge_solve(G: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
    """``G (sym(A) + lam·I)⁻¹`` (lam > 0) or ``G pinv(sym(A))`` (lam = 0), batched over leading dims.

    G: (..., C, D); A: (..., D, D) with the same leading dims (validated by the caller). Computed in
    float64; returns a contiguous tensor of G's shape and dtype. Raises ValueError naming the batch
    index for a non-finite A or one that is clearly not a Gram.
    """
    batch_shape = A.shape[:-2]
    d = A.shape[-1]
    c = G.shape[-2]
    nb = math.prod(batch_shape)
    a = A.to(torch.float64).reshape(nb, d, d)
    g = G.to(torch.float64).reshape(nb, c, d)
    s = (a + a.mT) / 2
    for b in range(nb):
        if not torch.isfinite(a[b]).all():
            raise ValueError(nonfinite_message(b, batch_shape))
    if nb and d:
        w_all = torch.linalg.eigvalsh(s)
        for b in range(nb):
            norm = w_all[b].abs().max().item()
            if w_all[b].min().item() < -GRAM_TOL * norm:
                raise ValueError(not_gram_message(b, batch_shape, w_all[b].min().item(), norm))
    out = torch.empty(nb, c, d, dtype=torch.float64, device=G.device)
    eye = torch.eye(d, dtype=torch.float64, device=G.device)
    for b in range(nb):
        if lam > 0:
            chol, info = torch.linalg.cholesky_ex(s[b] + lam * eye)
            if info.item() == 0:
                out[b] = torch.cholesky_solve(g[b].mT, chol).mT
            else:
                w, v = torch.linalg.eigh(s[b])
                out[b] = (g[b] @ v) / (w.clamp_min(0) + lam) @ v.mT
        else:
            out[b] = g[b] @ torch.linalg.pinv(s[b], hermitian=True, rtol=pinv_rtol(d, G.dtype, A.dtype))
    return out.reshape(G.shape).to(G.dtype)
