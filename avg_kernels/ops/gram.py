"""Input Grams of im2col layers (SPEC §3):

* ``torch.ops.avg_kernels.im2col_gram``: A = X Xᵀ of a Conv1d/Conv2d/Conv3d input, shape (groups, D, D);
* ``torch.ops.avg_kernels.linear_gram``: A = X Xᵀ of a Linear input, shape (1, D, D).

D = C_in/groups · ∏kernel (+1 with ``bias``: each column u gets a trailing 1), flattened in the order
of ``W.view(C_out, -1)``; summed over every sample and output position; float32 accumulation for
float16/bfloat16/float32 inputs (float32 output), float64 for float64.

Backends: "reference" (avg_kernels/reference/gram.py), "cpu" (csrc/cpu/gram.cpp, kernels in
csrc/cpu/kernels/gram.cpp), "triton" (avg_kernels/_triton/gram.py), "cuda" (csrc/cuda/gram.cu). Declared
through the registry (ops/_registry.py). The compiled and Triton kernels are 2-D; a Conv3d input reaches them
as Conv2d inputs of depth-gathered chunks (``_conv3d_by_depth``); the reference computes Conv3d directly.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import NamedTuple, Sequence, Union

import torch
import torch.nn.functional as F

from .. import reference
from ..reference.gram import unfold3d
from .._contract import args
from .._contract.dtypes import gram_dtype
from .._contract.outputs import new_output
from . import _gram_taps
from ._registry import Autograd, Op, OpSpec

IntOrTuple = Union[int, Sequence[int]]


class ConvGeometry(NamedTuple):
    """Validated conv arguments, one entry per spatial dim (1 for Conv1d, 2 for Conv2d, 3 for Conv3d)."""
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    bias: bool
    out_size: tuple[int, ...]
    dim: int  # D, including the bias row


def _index(op: str, name: str, v) -> int:
    if isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be an int or a tuple of ints, got bool {v!r}")
    try:
        return operator.index(v)
    except TypeError:
        raise TypeError(f"{op}: {name} must be an int or a tuple of ints, got {type(v).__name__} {v!r}") from None


def _bool(op: str, name: str, v) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{op}: {name} must be a bool, got {type(v).__name__}")
    return v


def _tuple(op: str, name: str, v, n: int) -> tuple[int, ...]:
    if isinstance(v, (list, tuple)):
        if len(v) != n:
            raise ValueError(f"{op}: {name}={tuple(v)!r} has {len(v)} entries; a {n}-d conv input needs {n}")
        return tuple(_index(op, name, e) for e in v)
    return (_index(op, name, v),) * n


def conv_geometry(x, kernel_size: IntOrTuple, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                  dilation: IntOrTuple = 1, groups: int = 1, bias: bool = False, *,
                  op: str = "im2col_gram") -> ConvGeometry:
    """Checks the arguments of ``im2col_gram`` (SPEC §6: ValueError/TypeError naming them)."""
    args.tensor("x", x)
    if x.dim() not in (3, 4, 5):
        raise ValueError(f"{op}: x must be a Conv1d input (N, C, L), a Conv2d input (N, C, H, W) or a Conv3d "
                         f"input (N, C, D, H, W); got {x.dim()}-d shape {tuple(x.shape)}")
    n = x.dim() - 2
    k = _tuple(op, "kernel_size", kernel_size, n)
    s = _tuple(op, "stride", stride, n)
    p = _tuple(op, "padding", padding, n)
    d = _tuple(op, "dilation", dilation, n)
    for name, vals, low in (("kernel_size", k, 1), ("stride", s, 1), ("padding", p, 0), ("dilation", d, 1)):
        if any(v < low for v in vals):
            raise ValueError(f"{op}: {name}={vals!r} must be >= {low} (zero padding only)")
    g = _index(op, "groups", groups)
    if g < 1:
        raise ValueError(f"{op}: groups={g} must be >= 1")
    c = x.shape[1]
    if c % g != 0:
        raise ValueError(f"{op}: x has {c} channels, not divisible by groups={g}")
    _bool(op, "bias", bias)
    size = tuple(x.shape[2:])
    out = tuple((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(n))
    if any(o < 1 for o in out):
        raise ValueError(f"{op}: kernel_size={k}, stride={s}, padding={p}, dilation={d} on input spatial size "
                         f"{size} give an empty output (size {out})")
    dim = (c // g) * math.prod(k) + int(bias)
    return ConvGeometry(k, s, p, d, g, bias, out, dim)


def _check_linear(x, bias, op: str = "linear_gram") -> int:
    args.tensor("x", x)
    if x.dim() < 1:
        raise ValueError(f"{op}: x must have at least 1 dim (…, in_features); got a 0-d tensor")
    _bool(op, "bias", bias)
    return x.shape[-1] + int(bias)


# ----------------------------------------------------------------------------------------------
# Backends (each returns the (groups, D, D) result in gram_dtype(x.dtype)).

class ConvCall(NamedTuple):
    """What a backend computes: the Gram of ``x`` under ``geo`` (after ``_trim``), plus ``extra``
    all-padding positions that only the bias count sees; ``x is None``: no position reads the input."""
    x: torch.Tensor | None
    geo: ConvGeometry
    extra: int
    like: torch.Tensor  # the user's x (device, dtype of the result)


class LinearCall(NamedTuple):
    x: torch.Tensor
    bias: bool
    dim: int


def _compiled_conv(c: ConvCall):
    """The C++ kernels: csrc/cpu/gram.cpp on CPU tensors, csrc/cuda/gram.cu on CUDA tensors."""
    geo = c.geo
    out = new_output((geo.groups, geo.dim, geo.dim), c.x, gram_dtype(c.x.dtype))
    torch.ops.avg_kernels_C.im2col_gram_out(c.x, list(geo.kernel_size), list(geo.stride), list(geo.padding),
                                            list(geo.dilation), geo.groups, geo.bias, out)
    return out


def _compiled_linear(c: LinearCall):
    out = new_output((1, c.dim, c.dim), c.x, gram_dtype(c.x.dtype))
    torch.ops.avg_kernels_C.linear_gram_out(c.x, c.bias, out)
    return out


def _triton_conv(c: ConvCall):
    from .._triton import gram as triton_gram

    g = c.geo
    return triton_gram.im2col_gram(c.x, g.kernel_size, g.stride, g.padding, g.dilation, g.groups, g.bias)


def _triton_linear(c: LinearCall):
    from .._triton import gram as triton_gram

    return triton_gram.linear_gram(c.x, c.bias)


# ----------------------------------------------------------------------------------------------
# Conv3d on the 2-D kernels. For output depth od, the Conv3d column u at (od, oh, ow) is the Conv2d column
# at (oh, ow) of the depth-gathered input xg[n, od] = [x[n, c, od·s_d − p_d + kd·δ_d] for c, kd] (zero
# outside 0..D−1): channels in the order (c, kd), which with the Conv2d kernel's (kh, kw) is the order
# (c, kd, kh, kw) of ``W.view(C_out, -1)``; a group's channels stay contiguous (C/groups·Kd of them); (n, od)
# is the batch. So A = Σ over chunks of (n, od) of the Conv2d Gram of the gathered chunk, bias count
# included (one trailing 1 per position). Gathering every od at once would be Kd/s_d times the input, so
# chunks of (n, od) go through one reused buffer of at most _GATHER_ELEMENTS elements (or one (n, od) slice,
# C·Kd·H·W elements, when that is larger). Chunk Grams are summed in float64, so the result is as accurate
# as one call (SPEC §3: 1e-5). Runs after _trim, so depth padding beyond the kernel reach costs nothing.

_GATHER_ELEMENTS = 1 << 24  # 64 MB of float32


def _gather_buffer(numel: int, x: torch.Tensor) -> torch.Tensor:
    """The one gather buffer of a Conv3d call (a function so tests can see its size)."""
    return torch.empty(numel, dtype=x.dtype, device=x.device)


def _conv3d_by_depth(c: ConvCall, kernel) -> torch.Tensor:
    x, geo = c.x, c.geo
    n, ch, depth, h, w = x.shape
    (kd, *k2), (sd, *s2), (pd, *p2), (dd, *d2) = geo.kernel_size, geo.stride, geo.padding, geo.dilation
    od = geo.out_size[0]
    geo2 = geo._replace(kernel_size=tuple(k2), stride=tuple(s2), padding=tuple(p2), dilation=tuple(d2),
                        out_size=geo.out_size[1:])
    if n == 0 or ch == 0:  # no input column: the bias count only
        out = new_output((geo.groups, geo.dim, geo.dim), x, gram_dtype(x.dtype)).zero_()
        if geo.bias:
            out[:, -1, -1] = float(n * math.prod(geo.out_size))
        return out
    unit = ch * kd * h * w  # gathered elements per (sample, output depth)
    per = max(1, _GATHER_ELEMENTS // max(unit, 1))
    ob = min(od, per)  # output depths per chunk
    nb = min(n, per // od) if ob == od else 1  # samples per chunk
    buf = _gather_buffer(nb * ob * unit, x)
    acc = None
    for n0 in range(0, n, nb):
        nn_ = min(nb, n - n0)
        for o0 in range(0, od, ob):
            oo = min(ob, od - o0)
            xg = buf[:nn_ * oo * unit].view(nn_, oo, ch, kd, h, w)
            for j in range(kd):
                z0 = o0 * sd - pd + j * dd  # input depth read by output depth o0 + o: z0 + o·s_d
                lo = min(oo, max(0, -(z0 // sd)))  # first o with z0 + o·s_d >= 0
                hi = min(oo, max(lo, (depth - 1 - z0) // sd + 1))  # past the last o with z0 + o·s_d < depth
                if lo > 0:
                    xg[:, :lo, :, j].zero_()
                if hi < oo:
                    xg[:, hi:, :, j].zero_()
                if hi > lo:
                    src = x[n0:n0 + nn_, :, z0 + lo * sd:z0 + (hi - 1) * sd + 1:sd]  # (nn_, C, hi − lo, H, W)
                    xg[:, lo:hi, :, j].copy_(src.transpose(1, 2))
            x2 = xg.view(nn_ * oo, ch * kd, h, w)
            part = kernel(ConvCall(x2, geo2, 0, x2))
            if nn_ == n and oo == od:
                return part  # one chunk: the kernel's own result
            acc = part.double() if acc is None else acc.add_(part)
    return acc.to(gram_dtype(x.dtype))


def _by_depth(kernel):
    """A 2-D conv backend that takes Conv3d inputs through ``_conv3d_by_depth``."""
    @functools.wraps(kernel)
    def run(c: ConvCall) -> torch.Tensor:
        return _conv3d_by_depth(c, kernel) if len(c.geo.kernel_size) == 3 else kernel(c)
    return run


def _reference_conv(c: ConvCall):
    g = c.geo
    return reference.im2col_gram(c.x, g.kernel_size, g.stride, g.padding, g.dilation, g.groups, g.bias)


# ----------------------------------------------------------------------------------------------
# Geometry trimming (SPEC §6: no geometry asks for more time or memory than its output needs).
#
# An output position whose window lies wholly in the padding contributes a column [0, …, 0, 1]: nothing
# but 1 to the bias count A[:, D-1, D-1]. With padding beyond the kernel's extent (p > dilation·(k-1))
# such positions can outnumber the useful ones without bound (padding=2**20 on a 1×1 input: 2**42
# positions). So every backend gets the smallest equivalent problem: per spatial dim, only the output
# positions whose window overlaps the input ([o_lo, o_hi]), over the slice of x they read, with the
# padding they need on each side; a stride larger than the one remaining window's span is irrelevant and
# becomes that span. The dropped positions are added back to the count exactly (Python ints). Ordinary
# layers (p <= dilation·(k-1), more than one position) pass through unchanged; only a geometry whose two
# sides need different padding costs a padded copy of the slice (at most input + 2·extent per dim).
# Conv3d is trimmed the same way in all three dims.

class _DimPlan(NamedTuple):
    start: int  # slice [start, stop) of the input
    stop: int
    pad_lo: int
    pad_hi: int
    stride: int
    positions: int


def _trim_dim(size: int, k: int, s: int, p: int, d: int, out: int) -> _DimPlan | None:
    """The positions of one spatial dim that read the input; None when none does."""
    ext = d * (k - 1)
    if p <= ext:  # every window overlaps [-p, size + p): nothing to drop
        return _DimPlan(0, size, p, p, s if out > 1 else max(1, size + 2 * p - ext), out)
    o_lo = max(0, -((ext - p) // s))  # first window ending at or after index 0: ceil((p - ext) / s)
    o_hi = min(out - 1, (size - 1 + p) // s)  # last window starting at or before size - 1
    if size == 0 or o_hi < o_lo:
        return None
    a0, a1 = o_lo * s - p, o_hi * s - p  # first and last kept window's start, in input indices
    start, stop = max(0, a0), min(size, a1 + ext + 1)
    pad_lo, pad_hi = max(0, -a0), max(0, a1 + ext + 1 - size)
    n = o_hi - o_lo + 1
    return _DimPlan(start, stop, pad_lo, pad_hi, s if n > 1 else stop - start + pad_lo + pad_hi - ext, n)


def _spatial_slice(t: torch.Tensor, start: Sequence[int], stop: Sequence[int]) -> torch.Tensor:
    """The view ``t[:, :, start[0]:stop[0], start[1]:stop[1], …]``."""
    for i, (a, b) in enumerate(zip(start, stop)):
        t = t.narrow(2 + i, a, b - a)
    return t


def _trim_plans(x: torch.Tensor, geo: ConvGeometry) -> list[_DimPlan | None]:
    size = x.shape[2:]
    return [_trim_dim(size[i], geo.kernel_size[i], geo.stride[i], geo.padding[i], geo.dilation[i],
                      geo.out_size[i]) for i in range(len(size))]


def _trim(x: torch.Tensor, geo: ConvGeometry) -> ConvCall:
    size = x.shape[2:]
    plans = _trim_plans(x, geo)
    count = x.shape[0] * math.prod(geo.out_size)
    if any(pl is None for pl in plans):  # no window reads the input: A holds only the count
        return ConvCall(None, geo, count if geo.bias else 0, x)
    if all(pl.start == 0 and pl.stop == sz and pl.stride == s and pl.positions == o
           for pl, sz, s, o in zip(plans, size, geo.stride, geo.out_size)):
        return ConvCall(x, geo, 0, x)  # the common case: unchanged
    xk = _spatial_slice(x, [pl.start for pl in plans], [pl.stop for pl in plans])
    if all(pl.pad_lo == pl.pad_hi for pl in plans):
        padding = tuple(pl.pad_lo for pl in plans)
    else:  # F.pad's order: last dim first
        xk = F.pad(xk, [v for pl in reversed(plans) for v in (pl.pad_lo, pl.pad_hi)])
        padding = (0,) * len(plans)
    positions = tuple(pl.positions for pl in plans)
    kgeo = geo._replace(stride=tuple(pl.stride for pl in plans), padding=padding, out_size=positions)
    extra = count - x.shape[0] * math.prod(positions) if geo.bias else 0
    return ConvCall(xk, kgeo, extra, x)


def _counted(kernel):
    """A conv backend on the trimmed problem, with the dropped positions added back to the bias count."""
    @functools.wraps(kernel)
    def run(c: ConvCall) -> torch.Tensor:
        if c.x is None:
            out = new_output((c.geo.groups, c.geo.dim, c.geo.dim), c.like, gram_dtype(c.like.dtype)).zero_()
        else:
            out = kernel(c)
        if c.extra:
            out[:, -1, -1] += float(c.extra)  # exact while the count fits the result dtype
        return out
    return run


class _TapCall(NamedTuple):
    """One part of a split geometry (``_gram_taps.TapPart``): its input slice and sub-geometry, and ``rows``,
    the indices in the whole geometry's D of the part's rows (bias row excluded), in the part's order."""
    part: _gram_taps.TapPart
    call: ConvCall
    rows: torch.Tensor


def _tap_calls(c: ConvCall) -> list[_TapCall] | None:
    """The parts of a (trimmed) geometry whose taps never meet in some dim (``_gram_taps.plan``); None when no
    dim is split. Shared by the forward (``_by_taps``) and the backward (``_conv_backward``)."""
    geo = c.geo
    parts = _gram_taps.plan(c.x.shape[2:], geo.kernel_size, geo.stride, geo.padding, geo.dilation, geo.out_size)
    if parts is None:
        return None
    cg = c.x.shape[1] // geo.groups
    rows = torch.arange(cg * math.prod(geo.kernel_size), device=c.x.device).view(cg, *geo.kernel_size)
    calls = []
    for part in parts:
        xs = _spatial_slice(c.x, part.start, part.stop)
        sub = geo._replace(kernel_size=part.kernel_size, stride=part.stride, padding=part.padding,
                           dilation=part.dilation, out_size=part.out_size,
                           dim=cg * math.prod(part.kernel_size) + int(geo.bias))
        idx = rows[(slice(None), *(slice(None) if t is None else t for t in part.taps))].reshape(-1)
        calls.append(_TapCall(part, ConvCall(xs, sub, 0, xs), idx))
    return calls


def _by_taps(kernel):
    """A conv backend that computes a geometry whose taps never meet (dilation >= input extent: most positions
    read nothing) one tap at a time, each over the positions it reads (see ``_gram_taps``); other geometries
    go to ``kernel`` as they are."""
    @functools.wraps(kernel)
    def run(c: ConvCall) -> torch.Tensor:
        geo = c.geo
        calls = _tap_calls(c)
        if calls is None:
            return kernel(c)
        out = new_output((geo.groups, geo.dim, geo.dim), c.x, gram_dtype(c.x.dtype)).zero_()
        for tc in calls:
            a = kernel(tc.call)
            idx = tc.rows
            n = idx.numel()
            out[:, idx[:, None], idx[None, :]] = a[:, :n, :n]  # each row's taps live in exactly one part
            if geo.bias:
                out[:, idx, -1] = a[:, :n, -1]
                out[:, -1, idx] = a[:, -1, :n]
        if geo.bias:  # every position of the geometry, also those that read nothing
            out[:, -1, -1] = float(c.x.shape[0] * math.prod(geo.out_size))
        return out
    return run


def _check_conv(x, kernel_size, stride, padding, dilation, groups, bias, *, fake: bool) -> ConvCall:
    geo = conv_geometry(x, kernel_size, stride, padding, dilation, groups, bias)
    return ConvCall(x, geo, 0, x) if fake else _trim(x, geo)


def _check_linear_call(x, bias, *, fake: bool) -> LinearCall:
    return LinearCall(x, bias, _check_linear(x, bias))


# Autograd: for L = Σ_g <Ḡ_g, A_g>, ∂L/∂U_g = S_g U_g with S_g = Ḡ_g + Ḡ_gᵀ and U_g = [X_g; 1]; the
# gradient w.r.t. x folds ∂L/∂X_g back (col2im). Written with differentiable torch ops (double backward
# works). The unfold materialises the columns, so it runs on the geometry the forward's kernels get (SPEC §6):
# trimmed (``_trim``: the dropped positions read nothing, so their columns of ∂L/∂X_g fold to nothing; the
# count A[-1, -1] does not depend on x) and, where taps never meet, per tap part (``_tap_calls``: L is the sum
# over parts of <S restricted to the part's rows, A_part>, each A_part a function of the slice it reads), the
# parts' gradients added into their slices. Cost: the columns of the positions that read the input.

def _conv_setup(ctx, inputs, output):
    x, kernel_size, stride, padding, dilation, groups, bias, backend = inputs
    ctx.save_for_backward(x)
    ctx.args = (list(kernel_size), list(stride), list(padding), list(dilation), groups, bias)


def _unfold3d_backward(x, sym, k, s, p, d, g, bias):
    """The Conv3d case of ``_unfold_backward`` (no F.fold for 3-D: the fold is the adjoint of the unfold
    written out, one strided slice per kernel offset)."""
    din = sym.shape[1] - int(bias)
    cols = unfold3d(x.to(sym.dtype), k, s, p, d)  # (N, G·din, L)
    n, _, ncol = cols.shape
    cols = cols.view(n, g, din, ncol)
    dcols = torch.einsum("gij,ngjl->ngil", sym[:, :din, :din], cols)
    if bias:
        dcols = dcols + sym[:, :din, din].view(1, g, din, 1)
    out = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
    dcols = dcols.reshape(n, x.shape[1], k[0], k[1], k[2], *out)
    dx = dcols.new_zeros(n, x.shape[1], *(x.shape[2 + i] + 2 * p[i] for i in range(3)))
    for a in range(k[0]):
        for b in range(k[1]):
            for e in range(k[2]):
                o = (a * d[0], b * d[1], e * d[2])
                dx[:, :, o[0]:o[0] + (out[0] - 1) * s[0] + 1:s[0], o[1]:o[1] + (out[1] - 1) * s[1] + 1:s[1],
                   o[2]:o[2] + (out[2] - 1) * s[2] + 1:s[2]] += dcols[:, :, a, b, e]
    return dx[:, :, p[0]:p[0] + x.shape[2], p[1]:p[1] + x.shape[3], p[2]:p[2] + x.shape[4]]


def _unfold_backward(x, sym, k, s, p, d, g, bias):
    """∂L/∂x (in sym's dtype) for S = ``sym`` (G, D, D) on the geometry as given: every one of its positions
    is unfolded (``_conv_backward`` gives it only the positions that read the input)."""
    k, s, p, d = list(k), list(s), list(p), list(d)
    if x.dim() == 5:
        return _unfold3d_backward(x, sym, k, s, p, d, g, bias)
    one_d = x.dim() == 3
    x4 = x.unsqueeze(2) if one_d else x
    if one_d:
        k, s, p, d = [1, *k], [1, *s], [0, *p], [1, *d]
    din = sym.shape[1] - int(bias)
    cols = F.unfold(x4.to(sym.dtype), k, dilation=d, padding=p, stride=s)  # (N, G·din, L)
    n, _, ncol = cols.shape
    cols = cols.view(n, g, din, ncol)
    dcols = torch.einsum("gij,ngjl->ngil", sym[:, :din, :din], cols)
    if bias:
        dcols = dcols + sym[:, :din, din].view(1, g, din, 1)
    dx = F.fold(dcols.reshape(n, g * din, ncol), x4.shape[2:], k, dilation=d, padding=p, stride=s)
    return dx.squeeze(2) if one_d else dx


def _call_backward(c: ConvCall, sym: torch.Tensor) -> torch.Tensor:
    """∂L/∂c.x (sym's dtype) of a trimmed call: split by taps where the forward splits it."""
    geo = c.geo
    calls = _tap_calls(c)
    if calls is None:
        return _unfold_backward(c.x, sym, geo.kernel_size, geo.stride, geo.padding, geo.dilation, geo.groups,
                                geo.bias)
    dx = c.x.new_zeros(c.x.shape, dtype=sym.dtype)
    for tc in calls:
        idx = torch.cat([tc.rows, tc.rows.new_full((1,), geo.dim - 1)]) if geo.bias else tc.rows
        sub = tc.call.geo
        dxs = _unfold_backward(tc.call.x, sym[:, idx[:, None], idx[None, :]], sub.kernel_size, sub.stride,
                               sub.padding, sub.dilation, sub.groups, sub.bias)
        _spatial_slice(dx, tc.part.start, tc.part.stop).add_(dxs)  # parts of different taps may read the same inputs
    return dx


def _conv_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    k, s, p, d, g, bias = ctx.args
    sym = grad + grad.transpose(1, 2)
    if not all(isinstance(v, int) for v in x.shape):  # symbolic sizes (torch.compile, dynamic): no trimming
        return _unfold_backward(x, sym, k, s, p, d, g, bias).to(x.dtype), None, None, None, None, None, None, None
    geo = conv_geometry(x, k, s, p, d, g, bias)
    c = _trim(x, geo)
    if c.x is None:  # no position reads the input
        dx = x.new_zeros(x.shape)
    elif c.x is x:
        dx = _call_backward(c, sym)
    else:  # c.x = x's slice [start, stop) per dim, padded by (pad_lo, pad_hi) unless the geometry pads it
        dk = _call_backward(c, sym)
        plans = _trim_plans(x, geo)
        if not all(pl.pad_lo == pl.pad_hi for pl in plans):  # _trim's F.pad
            dk = _spatial_slice(dk, [pl.pad_lo for pl in plans], [pl.pad_lo + pl.stop - pl.start for pl in plans])
        dx = F.pad(dk, [v for pl, n in zip(reversed(plans), reversed(x.shape[2:])) for v in (pl.start, n - pl.stop)])
    return dx.to(x.dtype), None, None, None, None, None, None, None


IM2COL_GRAM = Op(OpSpec(
    schema="im2col_gram(Tensor x, int[] kernel_size, int[] stride, int[] padding, int[] dilation, int groups, "
           "bool bias, str backend='auto') -> Tensor",
    check=_check_conv,
    fake=lambda c: c.like.new_empty((c.geo.groups, c.geo.dim, c.geo.dim), dtype=gram_dtype(c.like.dtype)),
    device=lambda c: c.like.device,
    backends={"reference": _counted(_by_taps(_reference_conv)), "cpu": _counted(_by_taps(_by_depth(_compiled_conv))),
              "cuda": _counted(_by_taps(_by_depth(_compiled_conv))),
              "triton": _counted(_by_taps(_by_depth(_triton_conv)))},
    autograd=Autograd(_conv_backward, _conv_setup),
))


def _linear_setup(ctx, inputs, output):
    x, bias, backend = inputs
    ctx.save_for_backward(x)
    ctx.bias = bias


def _linear_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    sym = (grad + grad.transpose(1, 2))[0]
    din = x.shape[-1]
    dx = x.to(sym.dtype) @ sym[:din, :din]
    if ctx.bias:
        dx = dx + sym[:din, din]
    return dx.to(x.dtype), None, None


LINEAR_GRAM = Op(OpSpec(
    schema="linear_gram(Tensor x, bool bias, str backend='auto') -> Tensor",
    check=_check_linear_call,
    fake=lambda c: c.x.new_empty((1, c.dim, c.dim), dtype=gram_dtype(c.x.dtype)),
    device=lambda c: c.x.device,
    backends={"reference": lambda c: reference.linear_gram(c.x, c.bias), "cpu": _compiled_linear,
              "cuda": _compiled_linear, "triton": _triton_linear},
    autograd=Autograd(_linear_backward, _linear_setup),
))


# ----------------------------------------------------------------------------------------------
# Python wrappers (the adapters of Op.public).

@IM2COL_GRAM.public
def im2col_gram(x: torch.Tensor, kernel_size: IntOrTuple, stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                dilation: IntOrTuple = 1, groups: int = 1, bias: bool = False):
    """Input Gram ``A = X Xᵀ`` of a Conv1d/Conv2d/Conv3d layer without materialising the unfolded X (SPEC §3).

    Args:
        x: the layer input, (N, C, L) for Conv1d, (N, C, H, W) for Conv2d or (N, C, D, H, W) for Conv3d;
            float16/bfloat16/float32/float64; any strides.
        kernel_size, stride, padding, dilation, groups: as for ``torch.nn.Conv1d/Conv2d/Conv3d`` (an int or
            a tuple with one entry per spatial dim; zero padding only).
        bias: append a constant 1 to every unfolded column (the layer has a bias): the last row/column
            of A then hold the column sums and ``A[:, -1, -1] = M``.
        backend: "reference", "cpu", "triton", "cuda" or None/"auto" (see ``use_backend``).

    Returns a (groups, D, D) tensor, D = C/groups·∏kernel_size (+1 with bias), rows/columns in the order
    of ``weight.view(C_out, -1)``, summed (not averaged) over the N·∏out positions M; float32 (float32
    accumulation) for float16/bfloat16/float32 inputs, float64 for float64.

    Memory: besides x and the result, the 2-D kernels need O(D²); Conv3d on the "cpu", "cuda" and "triton"
    backends also gathers chunks of input depth slices into one buffer of at most max(2**24, C·kd·H·W)
    elements of x's dtype (see ``_conv3d_by_depth``), never the unfolded X. The autograd backward unfolds
    only the columns of the positions that read the input (``_conv_backward``).
    """
    # ints or tuples -> one entry per spatial dim, as the schema takes them; the op validates the rest
    n = x.dim() - 2 if isinstance(x, torch.Tensor) and x.dim() in (3, 4, 5) else 1
    op = "im2col_gram"
    return (args.is_tensor("x", x), *(list(_tuple(op, name, v, n)) for name, v in (("kernel_size", kernel_size), ("stride", stride),
                                                             ("padding", padding), ("dilation", dilation))),
            _index(op, "groups", groups), _bool(op, "bias", bias))


@LINEAR_GRAM.public
def linear_gram(x: torch.Tensor, bias: bool = False):
    """Input Gram ``A = Σ u uᵀ`` of a Linear layer over the rows u of ``x`` (…, in_features) (SPEC §3).

    With ``bias`` each row gets a trailing 1. Returns (1, D, D), D = in_features (+1), float32 (float64
    for float64 input); ``backend`` as for ``im2col_gram``.
    """
    return args.is_tensor("x", x), _bool("linear_gram", "bias", bias)
