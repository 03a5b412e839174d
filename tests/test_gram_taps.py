"""Conv Grams whose kernel taps never meet (dilation >= the input's extent), computed one tap at a time
(avg_kernels/ops/_gram_taps.py): every backend, the Triton launches (interpreted), the CUDA kernel's host
emulation, against an oracle that enumerates (tap, input index) pairs, never the positions."""
from __future__ import annotations

import math

import pytest
import torch

import avg_kernels as ak
from avg_kernels import reference
from avg_kernels.ops import _gram_taps, gram as gram_ops

from conftest import backend_device, hook_ops, interpreted

H = 2 ** 40


def oracle(x, k, s, p, d, groups, bias):
    """float64 A of a Conv1d/2d/3d input from the positions that read the input, found from the other side:
    input index i is read by tap t at position o = (i + p − t·d) / s when that is an integer in [0, out).
    Each dim's useful positions are at most size·k, whatever stride/padding/dilation are; the positions that
    read nothing add only 1 each to the bias count, which is N·∏out."""
    nd = x.dim() - 2
    size = x.shape[2:]
    out = [(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    useful = []
    for i in range(nd):
        pos = set()
        for idx in range(size[i]):
            for t in range(k[i]):
                num = idx + p[i] - t * d[i]
                if num % s[i] == 0 and 0 <= num // s[i] < out[i]:
                    pos.add(num // s[i])
        useful.append(sorted(pos))
    n, c = x.shape[:2]
    cg = c // groups
    dim = cg * math.prod(k) + int(bias)
    a = torch.zeros(groups, dim, dim, dtype=torch.float64)
    if bias:
        a[:, -1, -1] = float(n * math.prod(out))
    if any(not u for u in useful):
        return a
    index, mask = [], torch.ones((), dtype=torch.float64)
    for i in range(nd):
        o = torch.tensor(useful[i], dtype=torch.int64)
        raw = o[None, :] * s[i] + torch.arange(k[i])[:, None] * d[i] - p[i]  # (k_i, P_i): Python-int exact
        ok = (raw >= 0) & (raw < size[i])
        shape = [1] * (2 * nd)
        shape[i], shape[nd + i] = k[i], len(useful[i])
        index.append(torch.where(ok, raw, 0).view(shape))
        mask = mask * ok.to(torch.float64).view(shape)
    u = x.double()[(slice(None), slice(None), *index)] * mask  # (N, C, k..., P...)
    u = u.reshape(n, groups, cg * math.prod(k), -1)
    if bias:
        u = torch.cat([u, torch.ones(n, groups, 1, u.shape[-1], dtype=torch.float64)], dim=2)
    part = torch.einsum("ngim,ngjm->gij", u, u)
    if bias:
        part[:, -1, -1] = 0
    return a + part


# (input shape, kernel, stride, padding, dilation, groups, bias): taps that never meet, in one or more dims.
HUGE = [
    ((2, 3, 5), (3,), (1,), (2 * H,), (H,), 1, True),  # 2**41 + 5 positions, 15 read
    ((2, 3, 5), (3,), (1,), (H,), (H,), 1, True),  # padding 2**40: every position reads, through tap 1
    ((1, 2, 5), (3,), (H,), (2 * H,), (H,), 2, True),  # stride = dilation: one index, read by 3 positions
    ((1, 4, 4, 5), (3, 2), (1, 2), (2 * H, 1), (H, 1), 2, True),  # one dim split, the other ordinary
    ((1, 2, 3, 4), (2, 3), (1, 1), (H, 2 ** 35), (H, 2 ** 35), 1, False),  # both dims split
    ((1, 2, 3, 4, 2), (2, 3, 1), (3, 1, 1), (2 ** 35, 1, 0), (2 ** 35, 1, 1), 1, True),  # Conv3d, depth split
]


def test_oracle_is_the_definition():
    """The oracle against reference.im2col_gram (F.pad + F.unfold over every position) where both can run."""
    gen = torch.Generator().manual_seed(5)
    for shape, k, s, p, d, g, b in [((2, 4, 6), (3,), (2,), (4,), (3,), 2, True), ((1, 2, 3, 5), (2, 3), (1, 2), (3, 1),
                                     (4, 2), 1, False), ((1, 2, 2, 3, 3), (2, 2, 3), (1, 2, 1), (2, 0, 3), (3, 1, 2), 2, True)]:
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        torch.testing.assert_close(oracle(x, k, s, p, d, g, b), reference.im2col_gram(x, k, s, p, d, g, b),
                                   rtol=1e-13, atol=1e-13)


def test_tap_runs_brute_force():
    """tap_runs against enumerating every position of every small 1-D geometry."""
    checked = 0
    for size in range(0, 6):
        for k in range(1, 4):
            for s in range(1, 5):
                for p in range(0, 8):
                    for d in range(1, 8):
                        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
                        if out < 1:
                            continue
                        runs = {r.tap: r for r in _gram_taps.tap_runs(size, k, s, p, d, out)}
                        for t in range(k):
                            want = [o for o in range(out) if 0 <= o * s + t * d - p < size]
                            if not want:
                                assert t not in runs
                                continue
                            r = runs[t]
                            assert (r.o_lo, r.o_hi) == (want[0], want[-1]) and r.positions == len(want)
                            assert [r.start + j * r.stride for j in range(r.positions)] == [o * s + t * d - p for o in want]
                        checked += 1
    assert checked > 2000


def test_unsplit_dims_waste_no_position():
    """The dims the split leaves alone (taps closer than the input is long, d < size): after ops/gram.py's
    trimming every position reads the input through some tap (brute force over small geometries)."""
    checked = 0
    for size in range(1, 7):
        for k in range(1, 4):
            for s in range(1, 5):
                for p in range(0, 10):
                    for d in range(1, size):
                        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
                        if out < 1:
                            continue
                        pl = gram_ops._trim_dim(size, k, s, p, d, out)
                        if pl is None:
                            continue
                        n = pl.stop - pl.start  # the trimmed input, its padding and stride
                        for o in range(pl.positions):
                            reads = [t for t in range(k) if 0 <= o * pl.stride - pl.pad_lo + t * d < n]
                            assert reads, (size, k, s, p, d, o)
                        checked += 1
    assert checked > 500


def test_plan_walks_only_the_positions_that_read():
    """The plan of kernel 3, dilation 2**40, padding 2**41 on 5 inputs: three kernel-1 parts of 5 positions
    (before: one call over 2**41 + 5 positions); with padding 2**40, one part (taps 0 and 2 read nothing)."""
    parts = _gram_taps.plan((5,), (3,), (1,), (2 * H,), (H,), (2 * H + 5,))
    assert [pt.taps for pt in parts] == [(0,), (1,), (2,)]
    assert all(pt.kernel_size == (1,) and pt.padding == (0,) and pt.out_size == (5,) for pt in parts)
    assert _gram_taps.part_positions(parts) == 15
    parts = _gram_taps.plan((5,), (3,), (1,), (H,), (H,), (5,))
    assert [(pt.taps, pt.start, pt.stop, pt.out_size) for pt in parts] == [((1,), (0,), (5,), (5,))]
    # taps that meet: no split (ordinary layers keep their one call)
    assert _gram_taps.plan((8, 8), (3, 3), (1, 1), (1, 1), (1, 1), (8, 8)) is None
    # 2-D, one dim split: the other keeps its kernel, stride, padding
    parts = _gram_taps.plan((4, 5), (3, 2), (1, 2), (2 * H, 1), (H, 1), (2 * H + 4, 3))
    assert [pt.taps for pt in parts] == [(0, None), (1, None), (2, None)]
    assert all(pt.kernel_size == (1, 2) and pt.stride == (1, 2) and pt.padding == (0, 1) for pt in parts)
    assert _gram_taps.part_positions(parts) == 3 * 4 * 3


@pytest.mark.parametrize("case", HUGE, ids=lambda c: f"{len(c[1])}d-k{c[1]}")
def test_huge_dilation_every_backend(backend, case):
    """Every backend on geometries that walked ~2**41 positions (or refused: the CUDA kernel's 32-bit
    offsets, the reference's padded copy): the float64 oracle, exactly up to rounding, the count exactly."""
    shape, k, s, p, d, g, b = case
    if backend == "triton" and len(k) == 3 and interpreted(backend):
        pytest.skip("Conv3d on the interpreter: covered by the 1-D/2-D cases (same parts, by depth)")
    dev = backend_device(backend)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(len(k)), dtype=torch.float64)
    want = oracle(x, k, s, p, d, g, b)
    out = ak.im2col_gram(x.to(dev), k, s, p, d, g, b, backend=backend).cpu()
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    if b:
        assert out[:, -1, -1].tolist() == want[:, -1, -1].tolist()
    out = ak.im2col_gram(x.float().to(dev), k, s, p, d, g, b, backend=backend).cpu()
    assert ((out.double() - oracle(x.float(), k, s, p, d, g, b)).norm() <= 1e-5 * want.norm())


@pytest.mark.parametrize("seed", range(2))
def test_split_geometries_match_the_reference(backend, seed):
    """Random small geometries with d >= size in some dim (so they are split) against reference.im2col_gram
    called directly (the unsplit definition), bias count included."""
    gen = torch.Generator().manual_seed(300 + seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))
    dev = backend_device(backend)
    done = 0
    while done < (4 if interpreted(backend) else 40):
        nd = r(1, 2)
        size = tuple(r(1, 4) for _ in range(nd))
        k = tuple(r(1, 3) for _ in range(nd))
        d = tuple(r(size[i], size[i] + 3) if r(0, 2) else r(1, 2) for i in range(nd))
        s = tuple(r(1, 4) for _ in range(nd))
        p = tuple(r(0, d[i] * (k[i] - 1) + 2) for i in range(nd))
        g, b = r(1, 2), bool(r(0, 1))
        if any((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 < 1 for i in range(nd)):
            continue
        if not any(_gram_taps.split_dims(size, k, s, p, d, [1] * nd)):
            continue
        x = torch.randn((r(1, 2), 2 * g, *size), generator=gen, dtype=torch.float64)
        want = reference.im2col_gram(x, k, s, p, d, g, b)
        out = ak.im2col_gram(x.to(dev), k, s, p, d, g, b, backend=backend).cpu()
        torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12, msg=str((x.shape, k, s, p, d, g, b)))
        done += 1


class _LaunchSpy:
    """Records (grid, M, STEPS) of every launch of the Triton gram kernel, then launches it."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        launch = self.kernel[grid]

        def run(*a, **kw):
            self.launches.append((grid, a[22], a[23]))  # M, STEPS (positional: see gram_kernel's signature)
            return launch(*a, **kw)
        return run


def test_triton_launches_walk_the_useful_positions(monkeypatch):
    """The Triton kernel's loop runs STEPS = ceil(M / BLOCK_M / splits) steps over M positions: here the 30
    positions that read the input (3 parts of 2 samples × 5), where it was M = 2·(2**41 + 5)."""
    from avg_kernels.ops._backend import unavailable_reason

    if unavailable_reason("triton"):
        pytest.skip(unavailable_reason("triton"))
    from avg_kernels._triton import gram as tg

    spy = _LaunchSpy(tg.gram_kernel)
    monkeypatch.setattr(tg, "gram_kernel", spy)
    shape, k, s, p, d, g, b = HUGE[0]
    x = torch.randn(shape, dtype=torch.float64, device=backend_device("triton"))
    out = ak.im2col_gram(x, k, s, p, d, g, b, backend="triton").cpu()
    torch.testing.assert_close(out, oracle(x.cpu(), k, s, p, d, g, b), rtol=1e-12, atol=1e-12)
    assert [m for _, m, _ in spy.launches] == [10, 10, 10]
    block_m = tg._launch(torch.float64, "ieee").block_m
    assert all(grid[2] * steps * block_m < m + block_m * grid[2] for grid, m, steps in spy.launches)


def _emulated_cuda(c):
    """A gram_ops backend that runs the CUDA kernel's host emulation (every block and thread of its launch)
    and records each launch's (tiles, splits, steps, wide)."""
    from avg_kernels._contract.dtypes import gram_dtype

    geo = c.geo
    out = torch.full((geo.groups, geo.dim, geo.dim), math.nan, dtype=gram_dtype(c.x.dtype))
    info = hook_ops().im2col_gram_cuda_emulated(c.x, list(geo.kernel_size), list(geo.stride), list(geo.padding),
                                                list(geo.dilation), geo.groups, geo.bias, out, 0, False, 4)
    _emulated_cuda.launches.append((math.prod(geo.out_size) * c.x.shape[0], *info))
    return out


@pytest.mark.parametrize("case", [c for c in HUGE if len(c[1]) < 3], ids=lambda c: f"{len(c[1])}d-k{c[1]}")
def test_cuda_kernel_emulated_on_the_parts(case):
    """The CUDA backend's path (trim, split by taps, the kernel per part) with the kernel's host emulation:
    each launch walks its part's positions (steps·16 per split, about M), the result is the oracle's. Without
    the split the CUDA op refused these (offsets past 32 bits) or walked 2**41 positions."""
    if hook_ops() is None:
        pytest.skip("C++ test extension not built")
    shape, k, s, p, d, g, b = case
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _emulated_cuda.launches = []
    run = gram_ops._counted(gram_ops._by_taps(_emulated_cuda))
    out = run(gram_ops._check_conv(x, k, s, p, d, g, b, fake=False))
    torch.testing.assert_close(out, oracle(x, k, s, p, d, g, b), rtol=1e-12, atol=1e-12)
    assert _emulated_cuda.launches
    for m, tiles, splits, steps, wide in _emulated_cuda.launches:
        assert m <= 2 * 5 * 5 * 3 and splits * steps * 16 < m + 16 * splits and not wide
