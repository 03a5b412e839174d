"""K = XᵀX of a convolution's im2col columns from its input's pixel Gram (avg_kernels/optim/_column_gram.py, the
M × M form's Gram): against XᵀX of an independently unfolded X on random 1-D/2-D/3-D geometries (float64 and
float32); its cost model; and C-SGD steps through it against the float64 implementation."""
from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels as ak
from avg_kernels.optim import _column_gram, _precondition
from avg_kernels.optim._layers import Layer
from avg_kernels.reference.gram import unfold3d

from test_coptim import Reference, _ce_sum, _max_rel, _run_ours


def columns(x, k, s, p, d, groups, bias):
    """X (groups, D, M) in float64, columns ordered (output position, image) with the image fastest: F.unfold
    (Conv3d: unfold3d), written out here, not Layer.unfold's."""
    x = x.to(torch.float64)
    nd = x.dim() - 2
    if nd == 3:
        u = unfold3d(x, k, s, p, d)
    elif nd == 2:
        u = F.unfold(x, k, dilation=d, padding=p, stride=s)
    else:
        u = F.unfold(x.unsqueeze(2), (1, k[0]), dilation=(1, d[0]), padding=(0, p[0]), stride=(1, s[0]))
    n, _, L = u.shape
    cols = u.view(n, groups, -1, L).permute(1, 2, 3, 0).reshape(groups, -1, L * n)
    if bias:
        cols = torch.cat([cols, cols.new_ones(groups, 1, L * n)], dim=1)
    return cols


def random_geometry(rng: random.Random):
    """(x shape, kernel, stride, padding, dilation, groups) with at least one output position; paddings
    up to beyond the kernel's reach (taps that read only padding), strides and dilations up to 3."""
    while True:
        nd = rng.choice([1, 2, 3])
        k = [rng.randint(1, 4) for _ in range(nd)]
        s = [rng.randint(1, 3) for _ in range(nd)]
        d = [rng.randint(1, 3) for _ in range(nd)]
        p = [rng.randint(0, 4) for _ in range(nd)]
        groups = rng.choice([1, 2, 3])
        size = [rng.randint(1, 7) for _ in range(nd)]
        if all(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1 >= 0 for i in range(nd)):
            shape = (rng.randint(1, 3), groups * rng.randint(1, 3), *size)
            return shape, k, s, p, d, groups


def test_equals_xtx_of_the_unfolded_columns_float64():
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    for _ in range(150):
        shape, k, s, p, d, groups = random_geometry(rng)
        bias = rng.random() < 0.5
        x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(rng.randrange(2 ** 31)))
        X = columns(x, k, s, p, d, groups, bias)
        want = X.mT @ X
        got = _column_gram.pixel_column_gram(x, k, s, p, d, groups, bias)
        assert got.shape == want.shape and got.dtype == torch.float64
        err = (got - want).abs().max().item() / max(1.0, want.abs().max().item())
        assert err <= 1e-13, (seed, shape, k, s, p, d, groups, bias, err)


def test_implicit_columns_equal_the_unfolded_ones_float64():
    """``ImplicitColumns`` (X never built): its probe Xᵀv and its S Xᵀ through the convolution's weight-gradient
    kernel equal those of an independently unfolded X on random geometries; ``materialize`` is that X."""
    seed = random.randrange(2 ** 31)
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(rng.randrange(2 ** 31))
    for _ in range(60):
        shape, k, s, p, d, groups = random_geometry(rng)
        bias = rng.random() < 0.5
        x = torch.randn(shape, dtype=torch.float64, generator=gen)
        X = columns(x, k, s, p, d, groups, bias)
        imp = _column_gram.ImplicitColumns(x, k, s, p, d, groups, bias)
        assert imp.shape == X.shape and imp.dtype == X.dtype
        assert torch.equal(imp.materialize(), X)
        v = torch.randn(X.shape[1], 1, dtype=torch.float64, generator=gen)
        torch.testing.assert_close(imp.mT_matmul(v), X.mT @ v, rtol=1e-12, atol=1e-12, msg=lambda m: f"{seed}: {m}")
        S = torch.randn(groups, rng.randint(1, 3), X.shape[2], dtype=torch.float64, generator=gen)
        w, b = imp.times_t(S)
        want = S @ X.mT
        torch.testing.assert_close(w, want[..., :imp.d_in], rtol=1e-12, atol=1e-12, msg=lambda m: f"{seed}: {m}")
        if bias:
            torch.testing.assert_close(b, want[..., -1], rtol=1e-12, atol=1e-12)
        else:
            assert b is None


def test_layer_unfold_and_output_grads_use_the_same_column_order():
    """The order is the contract between K and the X / ΔZ of the M × M form: Layer.unfold gives the columns
    above, and output_grads orders ΔZ (N, C, *out) the same way (position, image)."""
    rng = random.Random(random.randrange(2 ** 31))
    for nd, cls in ((1, nn.Conv1d), (2, nn.Conv2d), (3, nn.Conv3d)):
        conv = cls(6, 4, 3, stride=2, padding=1, dilation=1, groups=2).double()
        layer = Layer("c", conv, conv.weight, conv.bias, nd, 2, conv.kernel_size, conv.stride, conv.dilation,
                      conv.padding)
        x = torch.randn(3, 6, *[rng.randint(3, 6) for _ in range(nd)], dtype=torch.float64)
        X = layer.unfold([x], True, torch.float64)
        assert torch.equal(X, columns(x, conv.kernel_size, conv.stride, conv.padding, conv.dilation, 2, True))
        gz = torch.randn_like(conv(x))
        conv(x).backward(gz)
        dz = layer.output_grads([x], [gz], torch.float64)
        assert torch.equal(dz, gz.reshape(3, 2, 2, -1).permute(1, 2, 3, 0).reshape(2, 2, -1))
        # ΔZ Xᵀ is the weight (and bias) gradient: the two orders agree column by column
        G = torch.cat([conv.weight.grad.reshape(2, 2, -1), conv.bias.grad.reshape(2, 2, 1)], dim=2)
        assert torch.allclose(dz @ X.mT, G, rtol=1e-12, atol=1e-12)


def test_float32_within_spec_gram_bar():
    """SPEC §3's Gram accuracy, 1e-5 relative Frobenius against float64 on the same inputs."""
    rng = random.Random(random.randrange(2 ** 31))
    for _ in range(20):
        shape, k, s, p, d, groups = random_geometry(rng)
        x = torch.randn(shape)
        X = columns(x, k, s, p, d, groups, True)
        want = X.mT @ X
        got = _column_gram.pixel_column_gram(x, k, s, p, d, groups, True)
        assert got.dtype == torch.float32
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= 1e-5, (shape, k, s, p, d, groups, err)


def test_route_cost_model():
    conv = dict(kernel_size=[3, 3], stride=[1, 1], padding=[1, 1], dilation=[1, 1], groups=1)
    # ResNet-18's layer2 / layer3 convolutions at 64 x 64, batch 16: M = P, ∏k = 9 fewer multiply-adds
    assert _column_gram.pixel_route((16, 128, 8, 8), *conv.values())
    assert _column_gram.pixel_route((16, 256, 4, 4), *conv.values())
    # stride 2: P = 4M pixels, Q costs more than XᵀX (and is 16x K's size)
    assert not _column_gram.pixel_route((16, 128, 8, 8), [3, 3], [2, 2], [1, 1], [1, 1], 1)
    # 1 x 1: nothing shared between taps
    assert not _column_gram.pixel_route((16, 512, 4, 4), [1, 1], [1, 1], [0, 0], [1, 1], 1)
    # tiny: the per-call costs dominate
    assert not _column_gram.pixel_route((2, 32, 6, 6), *conv.values())
    # empty output
    assert not _column_gram.pixel_route((0, 32, 6, 6), *conv.values())


def _spy_route(monkeypatch, force=None):
    """Records the layers' input shapes for which the M × M form took the pixel route; ``force`` overrides it."""
    taken = []
    real = _column_gram.pixel_route

    def route(shape, *args):
        r = real(shape, *args) if force is None else force
        if r:
            taken.append(tuple(shape))
        return r

    monkeypatch.setattr(_precondition, "pixel_route", route)
    return taken


class Net(nn.Module):
    """Two stride-1 convolutions in the M × M form (M = N·36 < D = 288, 144 + 1), one strided, a classifier."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(32, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.c3 = nn.Conv2d(16, 8, 3, stride=2, padding=1, groups=2)
        self.fc = nn.Linear(8 * 9, 5)

    def forward(self, x):
        return self.fc(torch.tanh(self.c3(torch.tanh(self.c2(torch.tanh(self.c1(x)))))).flatten(1))


def _spy_implicit(monkeypatch, min_m):
    """Counts P computed through ``ImplicitColumns.times_t``, with the column threshold set to ``min_m``."""
    calls = []
    real = _column_gram.ImplicitColumns.times_t
    monkeypatch.setattr(_precondition, "MIN_IMPLICIT_M", min_m)
    monkeypatch.setattr(_column_gram.ImplicitColumns, "times_t", lambda self, s: calls.append(1) or real(self, s))
    return calls


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("micro_batches", [[2], [1, 2], [2, 1, 1]])
def test_csgd_through_the_pixel_route_equals_the_float64_implementation(monkeypatch, micro_batches, implicit):
    """Forced onto the pixel route (these small layers would take XᵀX), C-SGD steps in float64 equal the
    reference; several micro-batches of one shape are merged into one batch (one pixel Gram). ``implicit``: X is
    never built (P through the convolution's weight-gradient kernel, the probe by a convolution)."""
    taken = _spy_route(monkeypatch, force=True)
    implicit_calls = _spy_implicit(monkeypatch, 0 if implicit else 10 ** 9)
    torch.manual_seed(random.randrange(2 ** 31))
    ours = Net().double()
    ref_model = Net().double()
    ref_model.load_state_dict(ours.state_dict())
    opt = ak.optim.CSGD(ours, lr=0.1, lam=1e-2, weight_decay=1e-2)
    ref = Reference(ref_model, kind="sgd", lr=0.1, lam=1e-2, weight_decay=1e-2)
    for _ in range(2):
        batches = [(torch.randn(n, 32, 6, 6, dtype=torch.float64), torch.randint(0, 5, (n,))) for n in micro_batches]
        _run_ours(opt, ours, batches)
        ref.step(batches, _ce_sum)
        assert _max_rel(ours, ref_model) < 1e-9
    assert {s[1:] for s in taken} >= {(32, 6, 6), (16, 6, 6)}
    assert all(s[0] == sum(micro_batches) for s in taken)  # merged uses
    assert (len(implicit_calls) == len(taken)) if implicit else not implicit_calls  # every routed layer


def test_uses_of_different_shapes_are_not_merged(monkeypatch):
    taken = _spy_route(monkeypatch)
    torch.manual_seed(random.randrange(2 ** 31))
    conv = nn.Conv2d(32, 4, 3, padding=1).double()
    model = nn.Sequential(conv, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    ref_model = nn.Sequential(nn.Conv2d(32, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                              nn.Linear(4, 3)).double()
    ref_model.load_state_dict(model.state_dict())
    opt = ak.optim.CSGD(model, lr=0.1, lam=1e-2)
    ref = Reference(ref_model, kind="sgd", lr=0.1, lam=1e-2)
    batches = [(torch.randn(1, 32, 5, 5, dtype=torch.float64), torch.randint(0, 3, (1,))),
               (torch.randn(1, 32, 6, 6, dtype=torch.float64), torch.randint(0, 3, (1,)))]
    _run_ours(opt, model, batches)
    ref.step(batches, _ce_sum)
    assert _max_rel(model, ref_model) < 1e-9
    assert taken == []  # two shapes: XᵀX of the concatenated columns


def test_resnet_layer_takes_the_pixel_route_and_matches_xtx(monkeypatch):
    """A float32 layer of ResNet-18's layer2 shape (M = 1024 < D = 1152) takes the route by the cost model; its
    step equals the XᵀX route's to float32 rounding."""
    torch.manual_seed(random.randrange(2 ** 31))
    x = torch.randn(16, 128, 8, 8)
    y = torch.randint(0, 10, (16,))
    models, taken = [], []
    implicit_calls = _spy_implicit(monkeypatch, _column_gram.MIN_IMPLICIT_M)  # M = 1024: X is never built
    for force in (None, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(128, 32, 3, padding=1, bias=False), nn.Flatten(), nn.Linear(32 * 64, 10))
        t = _spy_route(monkeypatch, force=force)
        opt = ak.optim.CSGD(model, lr=0.1, lam=1e-1)
        _run_ours(opt, model, [(x, y)])
        models.append(model)
        taken.append(t)
    assert taken[0] == [(16, 128, 8, 8)] and taken[1] == [] and len(implicit_calls) == 1
    P = [m[0].weight.grad for m in models]  # the preconditioned gradient the base step used
    assert ((P[0] - P[1]).norm() / P[1].norm()).item() < 1e-4
