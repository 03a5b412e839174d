"""Triton kernel of the im2col / Linear input Gram (SPEC §3): A = X Xᵀ as an implicit GEMM.

ONE kernel, ``gram_kernel``: each program owns a BLOCK_D × BLOCK_D tile (bi <= bj, from a tile table) of
one group's Gram and one split of the M positions; it walks the positions BLOCK_M at a time, loading
both tiles of the unfolded matrix straight from x (im2col addresses computed in the kernel, zero
padding by masks, the bias row as ones), and accumulates ``tl.dot(a, bᵀ)`` in float32 (float64 for
float64 inputs). Nothing of X is materialised. It stores its tile at (bi, bj) and the transpose at
(bj, bi), so one triangle of tiles is computed. With more than one split, the programs write
per-split partial Grams to a workspace of (splits, G, D, D) floats that ``torch.sum`` reduces (a
deterministic reduction; the split count is chosen so the workspace holds ~4 × SM-count tiles,
independent of the batch size).

Precision: float32 inputs use ``input_precision="ieee"`` (SPEC §3: TF32 off) unless
``torch.backends.cuda.matmul.allow_tf32`` is set (then "tf32", SPEC §3 allows 2e-3); float16/bfloat16
products are exact in the float32 accumulator; float64 is float64 throughout.

Indexing: every address is int64 (x may exceed 2^31 elements; M = N·∏out may too).
A Linear input (…, F) runs as a Conv1d input (M, F, 1) with a 1-wide kernel.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .._contract.outputs import new_output
from . import aot

BLOCK_D = 64
_MIN_STEPS_PER_SPLIT = 8


class Launch(NamedTuple):
    block_m: int
    num_warps: int
    num_stages: int


# Triton 3.7 (the release torch 2.13 pins) allocates registers differently from 3.8/3.9: there float32 with
# bias and 3 stages spills 8 bytes on sm_80, while on 3.8/3.9 2 stages spill.
_TRITON_3_7 = tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 8)

# Per input dtype. Chosen with the AOT check (sm_80 and sm_90, triton 3.7-3.9): these compile without
# stack/local memory for every (bias, wide) variant; e.g. BLOCK_M=32 spills on sm_90 for fp64 with bias,
# 4 warps run at 254 registers.
_LAUNCH = {
    torch.float16: Launch(32, 8, 2),
    torch.bfloat16: Launch(32, 8, 2),
    torch.float32: Launch(16, 8, 2 if _TRITON_3_7 else 3),
    torch.float64: Launch(16, 8, 3),
}
_TF32_LAUNCH = Launch(16, 8, 2)  # float32 with TF32: 3 stages spill 8 bytes on sm_80 (with bias)


def _launch(dtype: torch.dtype, precision: str | None) -> Launch:
    return _TF32_LAUNCH if precision == "tf32" else _LAUNCH[dtype]


@triton.jit
def gram_kernel(x_ptr, out_ptr, tiles_ptr,
                C_G, H, W, OH, OW, sN, sC, sH, sW,
                KW, SH, SW, PH, PW, DH, DW,
                K2, D_IN, D, M, STEPS,
                BIAS: tl.constexpr, WIDE: tl.constexpr, DOT_T: tl.constexpr, ACC_T: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    g = tl.program_id(1).to(tl.int64)
    split = tl.program_id(2).to(tl.int64)
    n_groups = tl.num_programs(1).to(tl.int64)
    bi = tl.load(tiles_ptr + 2 * pid)
    bj = tl.load(tiles_ptr + (2 * pid + 1))
    rows_i = bi * BLOCK_D + tl.arange(0, BLOCK_D)
    rows_j = bj * BLOCK_D + tl.arange(0, BLOCK_D)

    # Row d of the unfolded matrix: channel c, kernel offset (kh, kw); d == D_IN is the bias row.
    # Its address is x_g + row_off[d] + col_off[m]; the zero padding is a mask on (ih, iw) (int32).
    c_i = rows_i // K2
    kh_i = (rows_i % K2) // KW
    kw_i = rows_i % K2 - kh_i * KW
    c_j = rows_j // K2
    kh_j = (rows_j % K2) // KW
    kw_j = rows_j % K2 - kh_j * KW
    dh_i = kh_i * DH - PH
    dw_i = kw_i * DW - PW
    dh_j = kh_j * DH - PH
    dw_j = kw_j * DW - PW
    row_i = (g * C_G + c_i) * sC + dh_i.to(tl.int64) * sH + dw_i.to(tl.int64) * sW
    row_j = (g * C_G + c_j) * sC + dh_j.to(tl.int64) * sH + dw_j.to(tl.int64) * sW
    # A row outside D_IN (the bias row, the tile's rows past D) gets an impossible height window, so its mask is
    # all false: no position starts at hs >= 2^31 - 1. (Not H: hs runs over the padded height, up to H + 2·PH - 1,
    # and with dh < 0 the window [H, H - dh) let such rows load past the end of their channels.)
    lo_i = tl.where(rows_i < D_IN, -dh_i, 2147483647)
    lo_j = tl.where(rows_j < D_IN, -dh_j, 2147483647)

    acc = tl.zeros((BLOCK_D, BLOCK_D), dtype=ACC_T)
    m_start = split * STEPS * BLOCK_M
    for step in range(0, STEPS):
        m = m_start + step * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        m_ok = m < M
        if WIDE:  # M >= 2^31: int64 division (a call into a division routine, so only when needed)
            q = m // OW
            ow = m - q * OW
            n = q // OH
            oh = q - n * OH
        else:
            m32 = m.to(tl.int32)
            q32 = m32 // OW
            ow = (m32 - q32 * OW).to(tl.int64)
            n = (q32 // OH).to(tl.int64)
            oh = (q32 - (q32 // OH) * OH).to(tl.int64)
        col = n * sN + oh * (SH * sH) + ow * (SW * sW)
        hs = tl.where(m_ok, (oh * SH).to(tl.int32), -(1 << 30))  # a column past M matches no window
        ws = (ow * SW).to(tl.int32)
        ok = ((hs[None, :] >= lo_i[:, None]) & (hs[None, :] < H - dh_i[:, None])
              & (ws[None, :] >= -dw_i[:, None]) & (ws[None, :] < W - dw_i[:, None]))
        a = tl.load(x_ptr + (row_i[:, None] + col[None, :]), mask=ok, other=0.0).to(DOT_T)
        ok = ((hs[None, :] >= lo_j[:, None]) & (hs[None, :] < H - dh_j[:, None])
              & (ws[None, :] >= -dw_j[:, None]) & (ws[None, :] < W - dw_j[:, None]))
        b = tl.load(x_ptr + (row_j[:, None] + col[None, :]), mask=ok, other=0.0).to(DOT_T)
        if BIAS:
            a = tl.where((rows_i == D_IN)[:, None] & m_ok[None, :], 1.0, a).to(DOT_T)
            b = tl.where((rows_j == D_IN)[:, None] & m_ok[None, :], 1.0, b).to(DOT_T)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=PRECISION, out_dtype=ACC_T)

    out = out_ptr + (split * n_groups + g) * D * D
    ok = (rows_i < D)[:, None] & (rows_j < D)[None, :]
    ri = rows_i.to(tl.int64)
    rj = rows_j.to(tl.int64)
    tl.store(out + ri[:, None] * D + rj[None, :], acc, mask=ok)
    # The transpose only for off-diagonal tiles. Written as a select, not `ok & (bi != bj)`: Triton's interpreter
    # broadcasts a scalar comparison as an int32 array (its handle keeps the operands' dtype), and from Triton 3.9
    # on it rejects such a mask ("mask has unsupported dtype"). Compiled, both forms give the same PTX.
    tl.store(out + rj[None, :] * D + ri[:, None], acc, mask=tl.where(bi != bj, ok, False))


_DOT_T = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
          torch.float64: tl.float64}


def _precision(dtype: torch.dtype, device: torch.device) -> str | None:
    if dtype in (torch.float16, torch.bfloat16):
        return None  # tensor-core products of 16-bit floats are exact in the float32 accumulator
    if dtype == torch.float32 and device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _tile_table(n_tiles: int, device) -> torch.Tensor:
    """(bi, bj) for bi <= bj, row-major, as int32 pairs."""
    idx = torch.triu_indices(n_tiles, n_tiles)
    return idx.T.contiguous().to(device=device, dtype=torch.int32)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: few splits, but splits all the same


def choose_splits(n_programs: int, m: int, block_m: int, device: torch.device) -> int:
    """Splits of the M positions so that about 4 programs per SM run, each with >= 8 steps."""
    steps = max(1, -(-m // block_m))
    want = max(1, -(-4 * _sm_count(device) // max(n_programs, 1)))
    return max(1, min(want, steps // _MIN_STEPS_PER_SPLIT))


def im2col_gram(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int, bias: bool,
                splits: int | None = None, wide: bool | None = None) -> torch.Tensor:
    """(groups, D, D) Gram of a validated Conv1d/Conv2d input (see avg_kernels.ops.gram).

    ``splits`` (of the M positions) and ``wide`` (int64 position arithmetic, needed from M = 2^31 on)
    are chosen automatically; tests force them.
    """
    if x.dim() == 3:
        x4 = x.unsqueeze(2)
        k, s, p, d = (1, kernel_size[0]), (1, stride[0]), (0, padding[0]), (1, dilation[0])
    else:
        x4, k, s, p, d = x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)
    n, c, h, w = x4.shape
    cg = c // groups
    oh = (h + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    ow = (w + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    k2 = k[0] * k[1]
    d_in = cg * k2
    dim = d_in + int(bias)
    m = n * oh * ow
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = new_output((groups, dim, dim), x, acc_dtype)
    if dim == 0:
        return out
    n_tiles = -(-dim // BLOCK_D)
    tiles = _tile_table(n_tiles, x.device)
    precision = _precision(x.dtype, x.device)
    launch = _launch(x.dtype, precision)
    n_prog = tiles.shape[0] * groups
    if splits is None:
        splits = choose_splits(n_prog, m, launch.block_m, x.device)
    steps_total = -(-m // launch.block_m)
    steps = -(-steps_total // splits)
    splits = max(1, -(-steps_total // steps)) if steps_total else 1
    if groups > 65535 or splits > 65535:  # CUDA's grid.y / grid.z limits
        raise ValueError(f"im2col_gram (triton): groups={groups} or splits={splits} exceeds the launch grid's 65535")
    ws = out if splits == 1 else new_output((splits, groups, dim, dim), x, acc_dtype)
    grid = (tiles.shape[0], groups, splits)
    gram_kernel[grid](
        x4, ws, tiles, cg, h, w, oh, ow, *x4.stride(), k[1], s[0], s[1], p[0], p[1], d[0], d[1],
        k2, d_in, dim, m, steps if m else 0,
        BIAS=bool(bias), WIDE=bool(wide) if wide is not None else m + launch.block_m * splits >= 2**31, DOT_T=_DOT_T[x.dtype], ACC_T=tl.float64 if x.dtype == torch.float64 else tl.float32,
        PRECISION=precision,
        BLOCK_D=BLOCK_D, BLOCK_M=launch.block_m, num_warps=launch.num_warps, num_stages=launch.num_stages)
    if splits > 1:
        torch.sum(ws, dim=0, out=out)
    return out


def linear_gram(x: torch.Tensor, bias: bool, splits: int | None = None, wide: bool | None = None) -> torch.Tensor:
    """(1, D, D) Gram of a Linear input (…, F): the Conv1d input (M, F, 1) with a 1-wide kernel."""
    f = x.shape[-1]
    rows = x.reshape(math.prod(x.shape[:-1]), f)
    return im2col_gram(rows.unsqueeze(2), (1,), (1,), (0,), (1,), 1, bias, splits, wide)


_TRITON_T = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}


def _register_aot() -> None:
    """The production configurations (``_LAUNCH``) for the AOT compile check (aot.py): every dtype,
    with/without bias, int32/int64 positions; float32 also with TF32 (when torch allows it)."""
    int_args = ("C_G", "H", "W", "OH", "OW", "sN", "sC", "sH", "sW", "KW", "SH", "SW", "PH", "PW", "DH", "DW",
                "K2", "D_IN", "D", "M", "STEPS")
    for dtype in _LAUNCH:
        t = _TRITON_T[dtype]
        precisions = [_precision(dtype, torch.device("cpu"))] + (["tf32"] if dtype == torch.float32 else [])
        for precision in precisions:
            launch = _launch(dtype, precision)
            for bias, wide in ((False, False), (True, False), (True, True)):
                sig = {"x_ptr": f"*{t}", "out_ptr": "*fp64" if dtype == torch.float64 else "*fp32", "tiles_ptr": "*i32"}
                # the launcher's int arguments: i32 (Triton's specialisation below 2^31); in the wide
                # configuration the sizes that reach 2^31 first are i64
                sig.update({a: ("i64" if wide and a in ("sN", "sC", "M") else "i32") for a in int_args})
                sig.update({c: "constexpr" for c in ("BIAS", "WIDE", "DOT_T", "ACC_T", "PRECISION", "BLOCK_D",
                                                     "BLOCK_M")})
                name = f"im2col_gram[{t},{'bias' if bias else 'nobias'}{',wide' if wide else ''}"
                name += ",tf32]" if precision == "tf32" else "]"
                aot.register(aot.KernelConfig(
                    name=name, kernel=f"{__name__}:gram_kernel", signature=sig,
                    constexprs={"BIAS": bias, "WIDE": wide, "DOT_T": _DOT_T[dtype],
                                "ACC_T": tl.float64 if dtype == torch.float64 else tl.float32,
                                "PRECISION": precision, "BLOCK_D": BLOCK_D, "BLOCK_M": launch.block_m},
                    aligned=("x_ptr", "out_ptr", "tiles_ptr"), num_warps=launch.num_warps,
                    num_stages=launch.num_stages))


_register_aot()
