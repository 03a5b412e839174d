"""The autograd backward of ``im2col_gram`` on the geometry the forward's kernels get (SPEC §6): trimmed, and
split by taps where taps never meet (avg_kernels/ops/gram.py ``_conv_backward``). Against the unfold-based
backward of the whole geometry, gradcheck/gradgradcheck, and geometries of ~2**41 positions whose backward
unfolds only the positions that read the input."""
from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

import avg_kernels as ak
from avg_kernels.ops import gram as gram_ops

from test_gram_taps import HUGE, oracle


def _grad(x, gbar, k, s, p, d, g, b):
    """∂<Ḡ, A>/∂x through the op's autograd (reference backend: the backward is backend-independent)."""
    x = x.detach().requires_grad_()
    (ak.im2col_gram(x, k, s, p, d, g, b, backend="reference") * gbar).sum().backward()
    return x.grad


def _random_case(rng: random.Random, nd: int):
    """A small geometry; one in three pads beyond the kernel's reach (trimmed), one in three has a dilation
    >= some input extent (split by taps), the rest ordinary."""
    g = rng.choice([1, 2])
    c = g * rng.randint(1, 2)
    size = [rng.randint(1, 5) for _ in range(nd)]
    k = [rng.randint(1, 3) for _ in range(nd)]
    s = [rng.randint(1, 3) for _ in range(nd)]
    kind = rng.randrange(3)
    d = [rng.randint(1, 2) if kind != 2 else rng.randint(1, 7) for _ in range(nd)]
    p = [rng.randint(0, d[i] * (k[i] - 1) + (6 if kind == 1 else 0)) for i in range(nd)]
    for i in range(nd):  # a non-empty output
        while size[i] + 2 * p[i] - d[i] * (k[i] - 1) < 1:
            p[i] += 1
    return (rng.randint(1, 2), c, *size), k, s, p, d, g, rng.random() < 0.5


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_backward_matches_the_unfold_of_the_whole_geometry(nd):
    """Random ordinary, trimmed and split geometries: the bounded backward equals the old one (unfold/fold
    over every position of the untrimmed geometry, ``_unfold_backward``) to float64 rounding."""
    rng = random.Random(nd)
    for _ in range(40):
        shape, k, s, p, d, g, b = _random_case(rng, nd)
        x = torch.randn(shape, dtype=torch.float64)
        geo = gram_ops.conv_geometry(x, k, s, p, d, g, b)
        gbar = torch.randn(g, geo.dim, geo.dim, dtype=torch.float64)
        want = gram_ops._unfold_backward(x, gbar + gbar.transpose(1, 2), k, s, p, d, g, b)
        got = _grad(x, gbar, k, s, p, d, g, b)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{shape} {k} {s} {p} {d} "
                                   f"{g} {b}: {m}")


# (input shape, kernel, stride, padding, dilation, groups, bias), small enough for gradgradcheck
SMALL = [
    ((2, 2, 3), (2,), (1,), (5,), (1,), 1, True),  # trimmed: padding beyond the kernel, symmetric
    ((1, 2, 3, 2), (2, 2), (2, 3), (4, 1), (1, 2), 2, True),  # trimmed, sides padded differently (F.pad)
    ((2, 2, 3), (3,), (1,), (4,), (3,), 2, True),  # split: dilation = extent
    ((1, 2, 2, 3), (2, 2), (1, 2), (3, 1), (3, 1), 1, False),  # split in one dim, trimmed in the same one
    ((1, 1, 2, 2, 2), (2, 1, 2), (1, 1, 2), (2, 0, 1), (2, 1, 1), 1, True),  # Conv3d, depth split
]


@pytest.mark.parametrize("case", SMALL, ids=lambda c: f"{len(c[1])}d-k{c[1]}-p{c[3]}-d{c[4]}")
def test_gradcheck_trimmed_and_split(case):
    shape, k, s, p, d, g, b = case
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x0 = x.detach()
    geo = gram_ops.conv_geometry(x0, k, s, p, d, g, b)
    c = gram_ops._trim(x0, geo)
    assert c.x is not x0 or gram_ops._tap_calls(c) is not None  # the case exercises trimming or splitting
    f = lambda x: ak.im2col_gram(x, k, s, p, d, g, b, backend="reference")  # noqa: E731
    torch.autograd.gradcheck(f, (x,))
    torch.autograd.gradgradcheck(f, (x,))


def test_backward_of_a_geometry_that_reads_nothing():
    """Every window in the padding (kernel 1, padding 3, stride 2 on 1 input: indices -3, -1, 1, 3): A holds
    only the count, dx = 0."""
    x = torch.randn(1, 2, 1, dtype=torch.float64)
    assert gram_ops._trim(x, gram_ops.conv_geometry(x, 1, 2, 3, 1, 1, True)).x is None
    dx = _grad(x, torch.randn(1, 3, 3, dtype=torch.float64), (1,), (2,), (3,), (1,), 1, True)
    assert dx.shape == x.shape and not dx.any()


class _Spy:
    """Records the input and output shapes of F.unfold / unfold3d (what the backward materialises)."""

    def __init__(self, fn):
        self.fn, self.shapes = fn, []

    def __call__(self, x, *a, **kw):
        out = self.fn(x, *a, **kw)
        self.shapes.append((tuple(x.shape), tuple(out.shape)))
        return out


def _oracle_grad(x, gbar, k, s, p, d, g, b):
    x = x.detach().requires_grad_()
    (oracle(x, k, s, p, d, g, b) * gbar).sum().backward()
    return x.grad


HUGE_BACKWARD = HUGE + [
    ((2, 3, 1, 1), (3, 3), (1, 1), (2 ** 20, 2 ** 20), (1, 1), 1, True),  # 2**42 positions, 9 read
    ((1, 2, 1, 1, 1), (2, 1, 3), (1, 1, 1), (2 ** 20, 3, 2 ** 20), (1, 1, 1), 2, True),
]


@pytest.mark.parametrize("case", HUGE_BACKWARD, ids=lambda c: f"{len(c[1])}d-k{c[1]}-p{c[3]}")
def test_huge_geometry_backward_unfolds_what_reads(case, monkeypatch):
    """Padding 2**20 on a 1×1 input, dilation 2**40 (positions ~2**41, the unfold of the whole geometry asked
    for terabytes): dx equals the oracle's gradient and every unfold sees at most the useful positions."""
    shape, k, s, p, d, g, b = case
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    geo = gram_ops.conv_geometry(x, k, s, p, d, g, b)
    gbar = torch.randn(g, geo.dim, geo.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    xg = x.clone().requires_grad_()
    loss = (ak.im2col_gram(xg, k, s, p, d, g, b, backend="reference") * gbar).sum()
    spy2, spy3 = _Spy(F.unfold), _Spy(gram_ops.unfold3d)  # on the backward only
    monkeypatch.setattr(gram_ops.F, "unfold", spy2)
    monkeypatch.setattr(gram_ops, "unfold3d", spy3)
    loss.backward()
    monkeypatch.undo()
    got = xg.grad
    torch.testing.assert_close(got, _oracle_grad(x, gbar, k, s, p, d, g, b), rtol=1e-12, atol=1e-12)
    shapes = spy2.shapes + spy3.shapes
    assert shapes  # the backward did unfold (the spies see it)
    # each dim: the positions that read the input are at most size·k; the input slices at most the input
    # plus the padding the kept windows need (the kernel's extent on each side, which is 0 for a split dim)
    bound = x.shape[0] * x.shape[1] * math.prod(k) * math.prod(sz * kk for sz, kk in zip(x.shape[2:], k))
    for inp, out in shapes:
        assert math.prod(out) <= bound, (inp, out)
        assert math.prod(inp) <= x.numel() * 3 ** len(k) * math.prod(k), (inp, out)
