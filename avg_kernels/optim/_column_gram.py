"""K = XᵀX of a convolution's im2col columns (the M × M form's Gram, SPEC §3) from the Gram of its input pixels.

A column u of X (one output position o of one image) holds the input pixels under the kernel's taps t, so

    K[(o, n), (o', n')] = Σ_t Σ_c x[n, c, o·s + t·d − p] · x[n', c, o'·s + t·d − p]
                        = Σ_t Q[(o·s + t·d − p, n), (o'·s + t·d − p, n')]

with Q the Gram of the input pixels over the channels (pixel × pixel; zero where an index falls in the
padding). Q costs P²·C/groups multiply-adds (P = N·∏spatial input pixels, a GEMM) where XᵀX costs M²·D/2 =
M²·C/groups·∏k/2 (one triangle): ∏k/2 times fewer for a stride-1 convolution. Q is one GEMM (torch's), not the
``linear_gram`` op: with few rows (C/groups) against the Gram's size (P) that op's D × D fixed costs dominate
(128 rows, P = 1024: 5.7 ms against the GEMM's 3.2 ms; it wins from about 2·rows >= P, never the case here).
The tap sum is separable (Σ over a 3 × 3 kernel's taps = Σ_rows Σ_cols), so it runs one spatial dim after the
other: per dim, one strided add per tap (the taps' output ranges from ``_gram_taps.tap_runs``).
Measured (1 thread): ResNet-18's layer2 convolutions at 64 × 64 images, batch 16 (M = P = 1024, D = 1152)
17.3 → 6.8 ms; layer3's (M = 256, D = 2304) 2.1 → 0.56 ms; a stride-2 layer (P = 4M) would cost more, and keeps
XᵀX (``pixel_route``).

For those layers X itself is not needed when M is large enough (``ImplicitColumns``, ``MIN_IMPLICIT_M``): P = S Xᵀ
is the convolution's weight gradient for the output gradient S, and the probe's Xᵀv a convolution of x with v.

Column order: (output position, image) with the image index fastest, so that each add runs over contiguous runs
of N·(kept positions) elements; ``Layer.unfold`` and ``Layer.output_grads`` order X's and ΔZ's columns the same way.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..ops._gram_taps import tap_runs
from ._layers import conv_columns, conv_out_sizes

#: one element of a strided tap add costs about this many multiply-adds of a GEMM (1 thread, AVX-512: ~0.8 ns
#: against ~0.028 ns per multiply-add of the Gram kernel's triangle, ~0.024 of a GEMM); per torch call ~10 µs
ADD_COST = 28
CALL_COST = 400_000
#: Q (P × P) is kept only while it is at most this many times K's size (a strided layer's P = ∏stride · M)
MAX_Q_OVER_K = 4


def pixel_route(x_shape, kernel_size, stride, padding, dilation, groups) -> bool:
    """Whether K from the pixel Gram is estimated cheaper than XᵀX for a prepared input of shape ``x_shape``
    (N, C, *spatial), and Q stays within MAX_Q_OVER_K times K's memory."""
    n, c = x_shape[0], x_shape[1]
    spatial = list(x_shape[2:])
    outs = conv_out_sizes(spatial, kernel_size, stride, padding, dilation)
    m = n * math.prod(outs)
    p = n * math.prod(spatial)
    if m == 0 or p * p > MAX_Q_OVER_K * m * m:
        return False
    cg = c // groups
    direct = m * m * cg * math.prod(kernel_size) / 2
    pixel = p * p * cg
    shape = spatial + [n]  # one side of the running sum's layout; the other side is the same
    for j in range(len(spatial)):
        shape[j] = outs[j]
        pixel += ADD_COST * kernel_size[j] * math.prod(shape) ** 2 + CALL_COST * kernel_size[j]
    return groups * pixel < groups * direct


def pixel_column_gram(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int,
                      bias: bool) -> torch.Tensor:
    """K = XᵀX of the im2col columns of ``x`` through its pixel Gram.

    Args:
        x: (N, C, *spatial) prepared input (zero padding still to apply), float32 or float64 (the compute dtype).
        kernel_size, stride, padding, dilation: per spatial dim.
        groups: the convolution's groups (one K per group, over that group's channels).
        bias: X has a trailing row of ones (K + 1).

    Returns:
        (groups, M, M) in x's dtype, M = ∏out · N, columns ordered (output position, image), image fastest.
    """
    n, c = x.shape[0], x.shape[1]
    spatial = list(x.shape[2:])
    nd = len(spatial)
    outs = conv_out_sizes(spatial, kernel_size, stride, padding, dilation)
    pixels = x.permute(1, *range(2, 2 + nd), 0).reshape(groups, c // groups, -1)  # pixels ordered (position, n)
    ks = []
    for g in range(groups):
        R = (pixels[g].mT @ pixels[g]).view(*spatial, n, *spatial, n)
        for j in range(nd):
            R = _tap_sum(R, j, nd, spatial[j], outs[j], kernel_size[j], stride[j], padding[j], dilation[j])
        ks.append(R.reshape(1, n * math.prod(outs), -1))
    K = torch.cat(ks) if groups > 1 else ks[0]
    return K.add_(1) if bias else K


def _tap_sum(R: torch.Tensor, j: int, nd: int, size: int, out: int, k: int, s: int, p: int, d: int) -> torch.Tensor:
    """Σ over the taps of spatial dim j: R's dims j and nd + 1 + j (input extent ``size``) become output
    positions (extent ``out``); other dims as they are."""
    shape = list(R.shape)
    shape[j] = shape[nd + 1 + j] = out
    runs = sorted(tap_runs(size, k, s, p, d, out), key=lambda r: r.positions < out)  # a full tap first
    acc = None
    for r in runs:
        src = [slice(None)] * R.dim()
        src[j] = src[nd + 1 + j] = slice(r.start, r.start + (r.positions - 1) * s + 1, s)
        if acc is None:
            if r.positions == out:  # a tap that covers every output starts the sum (no zero fill)
                acc = R[tuple(src)].clone(memory_format=torch.contiguous_format)
                continue
            acc = R.new_zeros(shape)
        dst = [slice(None)] * R.dim()
        dst[j] = dst[nd + 1 + j] = slice(r.o_lo, r.o_hi + 1)
        acc[tuple(dst)] += R[tuple(src)]
    return acc if acc is not None else R.new_zeros(shape)


#: P = S Xᵀ through the convolution's weight-gradient kernel (``ImplicitColumns.times_t``) from this many columns
#: M on (1 thread, ResNet-18 at 64 × 64, batch 16; X's copy + the GEMM against the kernel): M = 1024 4.13 → 2.86
#: ms, M = 256 3.91 → 3.22 ms, M = 64 4.04 → 5.41 ms (slower: X is built there)
MIN_IMPLICIT_M = 256


class ImplicitColumns:
    """X of one convolution input (``conv_columns``'s (groups, D, M), bias row last where ``bias``) without
    building it, for the layers whose K comes from the pixel Gram: X is then only needed for P = S Xᵀ, which the
    convolution's own weight-gradient kernel computes from x (``times_t``), and for the uniform-factor probe
    Xᵀv, a convolution of x with v (``mT_matmul``). ``materialize()`` builds X for everything else."""

    def __init__(self, x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int, bias: bool):
        self.x, self.bias = x, bias
        self.kernel_size, self.stride, self.padding, self.dilation = (list(kernel_size), list(stride), list(padding),
                                                                       list(dilation))
        self.groups = groups
        self.outs = conv_out_sizes(list(x.shape[2:]), kernel_size, stride, padding, dilation)
        self.d_in = x.shape[1] // groups * math.prod(kernel_size)
        self.shape = torch.Size((groups, self.d_in + int(bias), math.prod(self.outs) * x.shape[0]))
        self.device, self.dtype = x.device, x.dtype

    def materialize(self) -> torch.Tensor:
        X = conv_columns(self.x, self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
        return torch.cat([X, X.new_ones(X.shape[0], 1, X.shape[2])], dim=1) if self.bias else X

    def mT_matmul(self, v: torch.Tensor) -> torch.Tensor:
        """Xᵀ v for v (D, 1): (groups, M, 1), columns in X's order."""
        nd = len(self.outs)
        cg = self.x.shape[1] // self.groups
        w = v[:self.d_in, 0].reshape(1, cg, *self.kernel_size).expand(self.groups, -1, *self.kernel_size)
        conv = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
        with torch.autocast(self.device.type, enabled=False):  # in x's dtype even if step() runs under autocast
            y = conv(self.x, w.contiguous(), None, self.stride, self.padding, self.dilation, self.groups)  # (N, g, *o)
        y = y.movedim(0, -1).reshape(self.groups, -1, 1)  # (groups, ∏outs · N, 1): position, image fastest
        return y + v[self.d_in] if self.bias else y

    def times_t(self, s: torch.Tensor) -> tuple:
        """(S Xᵀ's weight part (groups, C_out/groups, D_in), its bias column (groups, C_out/groups) or None) for S
        (groups, C_out/groups, M)."""
        g, co = s.shape[0], s.shape[1]
        n, nd = self.x.shape[0], len(self.outs)
        grad_out = s.reshape(g * co, *self.outs, n).movedim(-1, 0)  # (N, C_out, *outs)
        weight = self.x.new_empty(g * co, self.x.shape[1] // self.groups, *self.kernel_size)
        _, dw, _ = torch.ops.aten.convolution_backward(grad_out, self.x, weight, None, self.stride, self.padding,
                                                        self.dilation, False, [0] * nd, self.groups,
                                                        [False, True, False])
        return dw.reshape(g, co, self.d_in), (s.sum(-1) if self.bias else None)
