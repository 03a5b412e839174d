"""Reference input Grams of im2col layers (SPEC §3), evaluated in float64.

``A[g] = X_g X_gᵀ`` where ``X_g`` (D × M) holds the unfolded inputs of group g as columns, in the
order of ``W.view(C_out, -1)`` (F.unfold's order: channel, then kernel offsets row-major), summed over
every sample and output position. With ``bias`` each column gets a trailing 1, so the last row and
column of A hold the column sums of X and ``A[g, D-1, D-1] = M``.

Readable first: this is F.unfold + matmul (Conv3d: F.pad + ``Tensor.unfold`` on each spatial dim, which
F.unfold lacks), chunked over the batch only to keep test memory sane.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._contract.dtypes import gram_dtype

_CHUNK_ELEMENTS = 1 << 24  # unfolded elements per batch chunk (128 MB in float64)


def unfold3d(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """F.unfold for a Conv3d input (N, C, D, H, W): (N, C·kd·kh·kw, od·oh·ow), rows in the order of
    ``W.view(C_out, -1)`` (channel, then kernel offsets row-major). Zero padding; differentiable."""
    p = padding
    u = F.pad(x, (p[2], p[2], p[1], p[1], p[0], p[0]))
    for i in range(3):  # each unfold replaces dim 2+i by the window starts and appends the window
        u = u.unfold(2 + i, dilation[i] * (kernel_size[i] - 1) + 1, stride[i])[..., ::dilation[i]]
    n, c, od, oh, ow = u.shape[:5]
    return u.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(n, c * math.prod(kernel_size), od * oh * ow)


def _im2col_gram_3d(x: torch.Tensor, k, s, p, d, groups: int, bias: bool) -> torch.Tensor:
    n, c = x.shape[:2]
    d_in = c // groups * math.prod(k)
    dim = d_in + int(bias)
    acc = torch.zeros(groups, dim, dim, dtype=torch.float64, device=x.device)
    out = [(x.shape[2 + i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(3)]
    if n > 0 and d_in > 0:
        step = max(1, _CHUNK_ELEMENTS // max(c * math.prod(k) * math.prod(out), 1))
        for i in range(0, n, step):
            cols = unfold3d(x[i:i + step].to(torch.float64), k, s, p, d)  # (n_i, C·K, L)
            cols = cols.view(cols.shape[0], groups, d_in, -1).permute(1, 2, 0, 3).reshape(groups, d_in, -1)
            if bias:
                cols = torch.cat([cols, cols.new_ones(groups, 1, cols.shape[2])], dim=1)
            acc += cols @ cols.transpose(1, 2)
    elif bias:
        acc[:, -1, -1] = n * math.prod(out)  # only the count: no input columns
    return acc.to(gram_dtype(x.dtype))


def _as_2d(x: torch.Tensor, kernel_size, stride, padding, dilation):
    """Conv1d arguments as the Conv2d case with a height-1 input and kernel."""
    if x.dim() == 3:
        return (x.unsqueeze(2), (1, kernel_size[0]), (1, stride[0]), (0, padding[0]), (1, dilation[0]))
    return x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation)


def im2col_gram(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int, bias: bool) -> torch.Tensor:
    """(groups, D, D) Gram of the unfolded Conv1d (N, C, L) / Conv2d (N, C, H, W) / Conv3d (N, C, D, H, W)
    input ``x``.

    ``kernel_size``, ``stride``, ``padding``, ``dilation``: sequences with one entry per spatial dim
    (already validated). Computed in float64; returned in ``gram_dtype(x.dtype)``.
    """
    if x.dim() == 5:
        return _im2col_gram_3d(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), groups, bias)
    x4, k, s, p, d = _as_2d(x, kernel_size, stride, padding, dilation)
    n, c = x4.shape[:2]
    cg = c // groups
    d_in = cg * k[0] * k[1]
    dim = d_in + int(bias)
    acc = torch.zeros(groups, dim, dim, dtype=torch.float64, device=x.device)
    h_out = (x4.shape[2] + 2 * p[0] - d[0] * (k[0] - 1) - 1) // s[0] + 1
    w_out = (x4.shape[3] + 2 * p[1] - d[1] * (k[1] - 1) - 1) // s[1] + 1
    if n > 0 and d_in > 0:
        # explicit zero padding: F.unfold rejects zero-size spatial dims even when padding fills them
        x64 = F.pad(x4.to(torch.float64), (p[1], p[1], p[0], p[0]))
        per_sample = c * k[0] * k[1] * h_out * w_out
        step = max(1, _CHUNK_ELEMENTS // max(per_sample, 1))
        for i in range(0, n, step):
            cols = F.unfold(x64[i:i + step], k, dilation=d, stride=s)  # (n_i, C·K, L)
            cols = cols.view(cols.shape[0], groups, d_in, -1).permute(1, 2, 0, 3).reshape(groups, d_in, -1)
            if bias:
                cols = torch.cat([cols, cols.new_ones(groups, 1, cols.shape[2])], dim=1)
            acc += cols @ cols.transpose(1, 2)
    elif bias:
        acc[:, -1, -1] = n * h_out * w_out  # only the count: no input columns
    return acc.to(gram_dtype(x.dtype))


def linear_gram(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """(1, D, D) Gram ``Σ u uᵀ`` over the rows u of ``x.reshape(-1, in_features)`` (+ trailing 1 with bias)."""
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1]).to(torch.float64)  # (-1 is ambiguous for 0 features)
    if bias:
        rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
    return (rows.T @ rows).unsqueeze(0).to(gram_dtype(x.dtype))
