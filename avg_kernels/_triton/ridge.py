"""Triton backend of the ridge solve (SPEC §3): P = G (sym(A) + λI)⁻¹.

The same driver as the C++ one (csrc/ridge_driver.cpp, whose header comment explains the steps), written
with torch.linalg, around two Triton kernels:

* ``ridge_prologue_kernel``: one pass over A, tile by tile (BLOCK x BLOCK, the tile and its transposed
  partner loaded together): S + λI in the compute dtype, and per program a non-finite flag and the
  largest |A_ii| of its diagonal (one two-value reduction in the program; reduced per batch entry with
  one small amax afterwards: no atomics);
* ``ridge_scale_kernel``: the epilogue of the eigendecomposition path, Y[b, c, j] *= r(w[b, j]) with
  r = 1/(max(w, 0) + λ) (λ > 0) or pinv's cutoff (λ = 0), as csrc/include/avg_kernels/ridge.h.

Host synchronisation: one device-to-host copy per call (the flags, max |A_ii| and the Cholesky info of
every entry, packed in one tensor) decides errors and which entries need the eigendecomposition; more
copies happen only when an entry needs the fallback or a Gram certificate.

Indexing is int64 throughout (the program id is widened first). On a machine without a GPU the kernels
run in Triton's interpreter (TRITON_INTERPRET=1, CPU tensors).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._contract.ridge import GRAM_TOL, batch_name, nonfinite_message, not_gram_message
from . import aot


@triton.jit
def _max_and_nan_max(m_a, n_a, m_b, n_b):  # combine of (max |A_ii|, non-finite marker) pairs
    return tl.maximum(m_a, m_b), tl.maximum(n_a, n_b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def ridge_prologue_kernel(a_ptr, out_ptr, part_ptr, prm_ptr, sb, si, sj, D, n_tiles,
                          BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lam = tl.load(prm_ptr)  # λ in the compute dtype (a Python float argument would be rounded to fp32)
    per_entry = n_tiles * n_tiles
    b = pid // per_entry
    rem = pid % per_entry
    ti = rem // n_tiles
    tj = rem % n_tiles
    i = ti * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    j = tj * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = (i[:, None] < D) & (j[None, :] < D)
    base = a_ptr + b * sb
    aij = tl.load(base + (i[:, None] * si + j[None, :] * sj), mask=mask, other=0.0).to(COMPUTE)
    aji = tl.load(base + (j[None, :] * si + i[:, None] * sj), mask=mask, other=0.0).to(COMPUTE)
    s = tl.where(aij == aji, aij, 0.5 * aij + 0.5 * aji)
    diag = (i[:, None] == j[None, :]) & mask
    s = tl.where(diag, s + lam, s)
    tl.store(out_ptr + (b * D * D + i[:, None] * D + j[None, :]), s, mask=mask)
    # One reduction for both statistics: max |a_ii| over the diagonal, and a NaN-propagating max of a - a, which is
    # 0 for finite a (and for masked-off elements, loaded as 0) and NaN for ±inf/NaN. Not a max over 0/1 flags:
    # LLVM 24 (Triton 3.9) folds that into a bitcast of an <8 x i1> vector, which the NVPTX backend lowers through
    # a stack slot (an 8-byte stack frame on sm_90 for fp64).
    maxdiag, nonfinite = tl.reduce((tl.where(diag, tl.abs(aij), 0.0), aij - aij), 1, _max_and_nan_max)
    maxdiag, nonfinite = tl.reduce((maxdiag, nonfinite), 0, _max_and_nan_max)
    bad = nonfinite != 0  # NaN != 0
    tl.store(part_ptr + pid * 2, bad.to(COMPUTE))
    tl.store(part_ptr + (pid * 2 + 1), maxdiag)


@triton.jit
def _div(a, b, C: tl.constexpr):  # IEEE division (float32 "/" is the approximate div.full.f32 in Triton)
    if C == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def ridge_scale_kernel(y_ptr, w_ptr, prm_ptr, n, row_len, D, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    lam = tl.load(prm_ptr)  # [λ, rtol] in the compute dtype
    rtol = tl.load(prm_ptr + tl.full([], 1, tl.int64))
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    b = offs // row_len
    j = offs % D
    w = tl.load(w_ptr + (b * D + j), mask=mask, other=1.0).to(COMPUTE)
    w_first = tl.abs(tl.load(w_ptr + b * D, mask=mask, other=1.0).to(COMPUTE))
    w_last = tl.abs(tl.load(w_ptr + (b * D + (D - 1)), mask=mask, other=1.0).to(COMPUTE))
    cutoff = rtol * tl.maximum(w_first, w_last)
    one = tl.full([BLOCK], 1.0, COMPUTE)
    lam_c = tl.full([BLOCK], lam, COMPUTE)
    clamped = _div(one, tl.maximum(w, 0.0) + lam_c, COMPUTE)
    pinv = tl.where(tl.abs(w) > cutoff, _div(one, w, COMPUTE), 0.0)
    r = tl.where(lam_c > 0, clamped, pinv)
    y = tl.load(y_ptr + offs, mask=mask, other=0.0)
    tl.store(y_ptr + offs, y * r, mask=mask)


# ---------------------------------------------------------------------------------------------
# Launch configuration (production): the one place it is chosen.
# ---------------------------------------------------------------------------------------------
class Launch(NamedTuple):
    block: int
    num_warps: int


# Prologue: 32 x 32 tiles, 4 warps (8 elements per thread per tile, two loads each). The transposed
# load is the strided one; at D^2 bytes per entry it is a small cost next to the O(D^3) factorisation.
PROLOGUE = Launch(block=32, num_warps=4)
# Scale: elementwise over (nb, C, D), 1024 elements per program (8 per thread).
SCALE = Launch(block=1024, num_warps=4)

_TL = {torch.float32: tl.float32, torch.float64: tl.float64}


def _launch(kernel, grid, args, meta, device):
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
    else:
        kernel[grid](*args, **meta)


def prologue(A3: torch.Tensor, lam: float, ct: torch.dtype):
    """(Bm, stats): Bm = sym(A3) + λI (contiguous, ct), stats (nb, 2) = [non-finite flag, max |A_ii|]."""
    nb, d = A3.shape[0], A3.shape[1]
    nt = triton.cdiv(d, PROLOGUE.block)
    bm = torch.empty(nb, d, d, dtype=ct, device=A3.device)
    part = torch.empty(nb * nt * nt, 2, dtype=ct, device=A3.device)
    prm = torch.tensor([lam], dtype=ct, device=A3.device)
    args = (A3, bm, part, prm, A3.stride(0), A3.stride(1), A3.stride(2), d, nt)
    _launch(ridge_prologue_kernel, (nb * nt * nt,), args,
            dict(BLOCK=PROLOGUE.block, COMPUTE=_TL[ct], num_warps=PROLOGUE.num_warps), A3.device)
    return bm, part.view(nb, nt * nt, 2).amax(1)


def scale_(Y: torch.Tensor, w: torch.Tensor, lam: float, rtol: float) -> torch.Tensor:
    """Y[b, c, j] *= r(w[b, j]) in place (Y contiguous (nb, C, D), w contiguous (nb, D), one dtype)."""
    n = Y.numel()
    if n:
        prm = torch.tensor([lam, rtol], dtype=Y.dtype, device=Y.device)
        args = (Y, w, prm, n, Y.shape[1] * Y.shape[2], Y.shape[2])
        _launch(ridge_scale_kernel, (triton.cdiv(n, SCALE.block),), args,
                dict(BLOCK=SCALE.block, COMPUTE=_TL[Y.dtype], num_warps=SCALE.num_warps), Y.device)
    return Y


def _gram_violation(w: torch.Tensor, indices: list[int]):
    """(index, w_min, norm) of the first entry whose eigenvalues show it is clearly not a Gram, or None."""
    if not indices:
        return None
    first, last = w[:, 0], w[:, -1]
    host = torch.stack([first, torch.maximum(first.abs(), last.abs())]).double().cpu().tolist()
    bad = [(b, wm, nm) for b, wm, nm in zip(indices, host[0], host[1]) if wm < -GRAM_TOL * nm]
    return min(bad) if bad else None


def ridge_solve(G: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
    """G (sym(A) + λI)⁻¹ or G pinv(sym(A)); arguments validated by the public op, none empty."""
    batch_shape = tuple(A.shape[:-2])
    d, c = A.shape[-1], G.shape[-2]
    nb = math.prod(batch_shape)
    ct = torch.float64 if torch.float64 in (G.dtype, A.dtype) else torch.float32
    dev = A.device
    A3 = A.reshape(nb, d, d)
    G3 = G.reshape(nb, c, d).to(ct)
    bm, stats = prologue(A3, lam, ct)
    if lam > 0:
        chol, info = torch.linalg.cholesky_ex(bm)
        host = torch.cat([stats.reshape(-1), info.to(ct)]).double().cpu().tolist()
    else:
        host = stats.reshape(-1).double().cpu().tolist()
    for b in range(nb):
        if host[2 * b] != 0:
            raise ValueError(nonfinite_message(b, batch_shape))

    def sym_plus(entries, shift):
        s = bm[torch.tensor(entries, device=dev)]
        if shift != lam:
            s.diagonal(0, -2, -1).add_(shift - lam)
        return s

    violations = []
    if lam > 0:
        P = torch.cholesky_solve(G3.mT, chol).mT
        failed, cert, shifts = [], [], []
        for b in range(nb):
            tau = GRAM_TOL * host[2 * b + 1]
            if host[2 * nb + b] != 0:
                failed.append(b)
            elif lam > tau:
                cert.append(b)
                shifts.append(lam - tau)
        if cert:
            s = bm[torch.tensor(cert, device=dev)]
            s.diagonal(0, -2, -1).sub_(torch.tensor(shifts, dtype=ct, device=dev).unsqueeze(-1))
            info2 = torch.linalg.cholesky_ex(s)[1].cpu().tolist()
            doubt = [b for b, i2 in zip(cert, info2) if i2 != 0]
            if doubt:
                violations.append(_gram_violation(torch.linalg.eigvalsh(sym_plus(doubt, 0.0)), doubt))
        if failed:
            w, v = torch.linalg.eigh(sym_plus(failed, 0.0))
            violations.append(_gram_violation(w, failed))
            if not any(violations):
                idx = torch.tensor(failed, device=dev)
                y = scale_((G3[idx] @ v).contiguous(), w.contiguous(), lam, 0.0)
                P = P.contiguous()
                P[idx] = y @ v.mT
    else:
        w, v = torch.linalg.eigh(bm)
        violations.append(_gram_violation(w, list(range(nb))))
        if not any(violations):
            rtol = d * torch.finfo(ct).eps
            P = scale_((G3 @ v).contiguous(), w.contiguous(), 0.0, rtol) @ v.mT
    found = [v for v in violations if v]
    if found:
        b, w_min, norm = min(found)
        raise ValueError(not_gram_message(b, batch_shape, w_min, norm))
    return P.to(G.dtype).contiguous().reshape(G.shape)


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile checks: the production configurations.
# ---------------------------------------------------------------------------------------------
_TL_NAME = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _register_aot() -> None:
    combos = [(torch.float16, torch.float32), (torch.bfloat16, torch.float32), (torch.float32, torch.float32),
              (torch.float64, torch.float64), (torch.float32, torch.float64)]
    # Run-time specialisations Triton compiles separately: a contiguous A (sj == 1 is specialised to the
    # constant 1) with D % 16 == 0 (si divisible by 16), the common case; and any strides.
    variants = (("", {"sj": 1}, ("sb", "si", "D")), (",strided", {}, ()))
    for a_dtype, ct in combos:
        t, c = _TL_NAME[a_dtype], _TL_NAME[ct]
        for suffix, consts, aligned in variants:
            sig = {"a_ptr": f"*{t}", "out_ptr": f"*{c}", "part_ptr": f"*{c}", "prm_ptr": f"*{c}", "sb": "i32",
                   "si": "i32", "sj": "i32", "D": "i32", "n_tiles": "i32", "BLOCK": "constexpr", "COMPUTE": "constexpr"}
            sig.update({k: "constexpr" for k in consts})
            aot.register(aot.KernelConfig(
                name=f"ridge_prologue[{t}->{c}{suffix}]",
                kernel=f"{__name__}:ridge_prologue_kernel",
                signature=sig,
                constexprs={"BLOCK": PROLOGUE.block, "COMPUTE": _TL[ct], **consts},
                aligned=("a_ptr", "out_ptr", "part_ptr", "prm_ptr") + aligned,
                num_warps=PROLOGUE.num_warps,
            ))
    for ct in (torch.float32, torch.float64):
        c = _TL_NAME[ct]
        aot.register(aot.KernelConfig(
            name=f"ridge_scale[{c}]",
            kernel=f"{__name__}:ridge_scale_kernel",
            signature={"y_ptr": f"*{c}", "w_ptr": f"*{c}", "prm_ptr": f"*{c}", "n": "i32", "row_len": "i32",
                       "D": "i32", "BLOCK": "constexpr", "COMPUTE": "constexpr"},
            constexprs={"BLOCK": SCALE.block, "COMPUTE": _TL[ct]},
            aligned=("y_ptr", "w_ptr", "prm_ptr"),
            num_warps=SCALE.num_warps,
        ))


_register_aot()
