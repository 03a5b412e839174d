"""Input Grams of im2col layers (SPEC §3): every backend vs the float64 reference, the reference vs an
independent definition through torch's own convolution, dtypes, layouts, opcheck, torch.compile, autograd
and bad input (SPEC §6)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import avg_kernels as ak
from avg_kernels import reference

from conftest import backend_device, interpreted, hook_ops

TOL = 1e-5  # SPEC §3: relative Frobenius error vs the float64 reference


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    den = torch.linalg.norm(ref)
    return float(torch.linalg.norm(a - ref) / (den if den > 0 else 1.0))


def ref_gram(x, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=False):
    """float64 truth for the (already rounded) input x."""
    return ak.im2col_gram(x.double(), kernel_size, stride, padding, dilation, groups, bias, backend="reference")


# (input shape, kernel_size, stride, padding, dilation, groups, bias)
CONV_CONFIGS = [
    ((2, 3, 17), 3, 1, 0, 1, 1, False),
    ((1, 5, 16), 3, 1, 1, 1, 1, True),
    ((3, 4, 19), 5, 2, 2, 1, 2, False),
    ((2, 6, 23), 3, 3, 1, 2, 3, True),
    ((2, 7, 9), 1, 1, 0, 1, 7, True),
    ((1, 3, 5), 5, 1, 4, 1, 1, False),  # padding wider than the input
    ((2, 3, 8, 8), 3, 1, 1, 1, 1, False),
    ((1, 5, 7, 9), 3, 1, 1, 1, 1, True),
    ((2, 4, 11, 10), (3, 2), (2, 1), (1, 0), (1, 2), 2, False),
    ((3, 6, 13, 7), (2, 3), (1, 2), (0, 2), (2, 1), 3, True),
    ((1, 3, 6, 6), 3, 2, 1, 1, 1, True),
    ((2, 9, 5, 5), 3, 1, 2, 2, 3, False),
    ((1, 1, 4, 4), 4, 1, 0, 1, 1, True),  # one output position
    ((2, 5, 10, 12), (1, 3), 1, (0, 1), 1, 5, False),  # depthwise
    ((1, 13, 7, 6), 2, 1, 0, 1, 1, True),  # channels not a multiple of anything
    ((2, 4, 9, 9), 3, 3, 0, 1, 4, True),  # stride = kernel
    ((2, 70, 6, 5), 3, 1, 1, 1, 70, True),  # depthwise, 70 groups: vector tails across groups
    ((1, 33, 11), 3, 2, 2, 2, 33, False),  # depthwise Conv1d, strided and dilated
]


CONV3D_CONFIGS = [
    ((2, 3, 5, 6, 7), 3, 1, 0, 1, 1, False),
    ((1, 2, 6, 5, 5), 3, 1, 1, 1, 1, True),
    ((2, 4, 7, 6, 5), (3, 2, 1), (2, 1, 2), (1, 0, 1), (1, 2, 1), 2, False),
    ((1, 6, 5, 7, 4), (2, 3, 2), (1, 2, 1), (2, 1, 0), (2, 1, 1), 3, True),  # depth padding beyond the kernel reach
    ((2, 4, 4, 4, 4), 1, 2, 0, 1, 4, True),  # depthwise 1×1×1, strided
    ((1, 3, 3, 3, 3), 3, 1, 0, 1, 1, True),  # one output position
    ((1, 2, 9, 3, 4), (4, 1, 2), (3, 1, 1), (2, 0, 1), (2, 1, 1), 1, True),  # stride < depth span, dilated depth
    ((2, 5, 2, 4, 3), (2, 2, 2), 1, (3, 0, 1), 1, 5, False),  # depth padding 3 > reach 1: trimmed
]


def conv_id(cfg) -> str:
    shape, k, s, p, d, g, b = cfg
    return f"{len(shape) - 2}d-{'x'.join(map(str, shape))}-k{k}-s{s}-p{p}-d{d}-g{g}-{'b' if b else 'nb'}"


def _small(backend, cfg):
    return not interpreted(backend) or math.prod(cfg[0]) <= 1500


@pytest.mark.parametrize("cfg", CONV_CONFIGS + CONV3D_CONFIGS, ids=conv_id)
def test_im2col_gram_matches_reference(backend, cfg, fresh_seed):
    """Conv1d/2d/3d, float32 within SPEC §3's bar; Conv3d (chunked through the 2-D kernels) also in float64."""
    shape, k, s, p, d, g, b = cfg
    dev = backend_device(backend)
    x = torch.randn(shape, device=dev)
    out = ak.im2col_gram(x, k, s, p, d, g, b, backend=backend)
    ref = ref_gram(x, k, s, p, d, g, b)
    assert out.dtype == torch.float32 and out.shape == ref.shape and out.device == x.device
    assert rel_fro(out, ref) <= TOL
    assert torch.isfinite(out).all()
    if x.dim() == 5:
        assert rel_fro(ak.im2col_gram(x.double(), k, s, p, d, g, b, backend=backend), ref) <= 1e-12


@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=conv_id)
def test_reference_is_the_conv_weight_order(cfg, fresh_seed):
    """Independent of F.unfold: for any weight W of the layer, Σ_m z_m z_mᵀ = W A Wᵀ per group where z is
    torch's own convolution output (with the bias as W's trailing column). This pins down the
    flattening order of ``W.view(C_out, -1)``, zero padding, stride, dilation and groups."""
    shape, k, s, p, d, g, b = cfg
    x = torch.randn(shape, dtype=torch.float64)
    conv = (torch.nn.Conv1d if len(shape) == 3 else torch.nn.Conv2d)(
        shape[1], 2 * g, k, stride=s, padding=p, dilation=d, groups=g, bias=b, dtype=torch.float64)
    z = conv(x)  # (N, C_out, *out)
    zg = z.transpose(0, 1).reshape(g, 2, -1)  # (groups, C_out/groups, M)
    lhs = zg @ zg.transpose(1, 2)
    w = conv.weight.reshape(g, 2, -1)
    if b:
        w = torch.cat([w, conv.bias.reshape(g, 2, 1)], dim=2)
    a = reference.im2col_gram(x, *(ak.ops.gram.conv_geometry(x, k, s, p, d, g, b)[:5]), b)
    assert a.dtype == torch.float64 and a.shape == (g, w.shape[2], w.shape[2])
    torch.testing.assert_close(w @ a @ w.transpose(1, 2), lhs, rtol=1e-12, atol=1e-12)
    m = z.shape[0] * math.prod(z.shape[2:])
    if b:
        assert (a[:, -1, -1] == m).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_im2col_gram_dtypes(backend, dtype, fresh_seed):
    if backend == "triton" and interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 numpy type: bf16 is covered on GPU and by AOT compile")
    dev = backend_device(backend)
    for shape, k, s, p, d, g, b in [((2, 3, 7, 6), 3, 1, 1, 1, 1, True), ((2, 4, 15), 3, 2, 1, 2, 2, False)]:
        x = torch.randn(shape, device=dev).to(dtype)
        out = ak.im2col_gram(x, k, s, p, d, g, b, backend=backend)
        ref = ref_gram(x, k, s, p, d, g, b)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert rel_fro(out, ref) <= (1e-12 if dtype == torch.float64 else TOL)


def test_im2col_gram_non_contiguous(backend, fresh_seed):
    dev = backend_device(backend)
    base = torch.randn(5, 3, 9, 8, device=dev)
    for x in (base.transpose(2, 3), base[::2, :, 1::2], base.permute(1, 0, 2, 3)[:, :2],
              base.to(memory_format=torch.channels_last), base[:, :, :, 3]):
        args = (3, 1, 1, 1, 1, True)
        out = ak.im2col_gram(x, *args, backend=backend)
        assert rel_fro(out, ref_gram(x, *args)) <= TOL


def test_im2col_gram_empty_batch_and_channels(backend):
    dev = backend_device(backend)
    out = ak.im2col_gram(torch.randn(0, 4, 5, 5, device=dev), 3, padding=1, groups=2, bias=True, backend=backend)
    assert out.shape == (2, 19, 19) and (out == 0).all()
    out = ak.im2col_gram(torch.randn(0, 3, 6, device=dev), 3, backend=backend)
    assert out.shape == (1, 9, 9) and (out == 0).all()
    out = ak.im2col_gram(torch.randn(2, 0, 6, device=dev), 3, bias=True, backend=backend)
    assert out.shape == (1, 1, 1) and out.item() == 8  # M = 2 samples × 4 positions


def test_im2col_gram_constant_input_exact(backend):
    """All-ones input, no padding: every entry is M (exact in float32)."""
    dev = backend_device(backend)
    x = torch.ones(3, 2, 6, 5, device=dev)
    out = ak.im2col_gram(x, 2, bias=True, backend=backend)
    assert (out == 3 * 5 * 4).all()


LINEAR_SHAPES = [(7,), (5, 3), (4, 6, 9), (1, 17), (0, 5), (33, 64)]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
def test_linear_gram_matches_reference(backend, shape, bias, fresh_seed):
    dev = backend_device(backend)
    x = torch.randn(shape, device=dev)
    out = ak.linear_gram(x, bias, backend=backend)
    rows = x.double().reshape(-1, shape[-1]).cpu()
    if bias:
        rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=torch.float64)], 1)
    ref = (rows.T @ rows)[None]
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert rel_fro(out, ref) <= TOL


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_linear_gram_dtypes_and_layout(backend, dtype, fresh_seed):
    if backend == "triton" and interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 numpy type: bf16 is covered on GPU and by AOT compile")
    dev = backend_device(backend)
    x = torch.randn(6, 40, 11, device=dev).to(dtype).transpose(0, 2)  # (11, 40, 6), non-contiguous
    out = ak.linear_gram(x, True, backend=backend)
    ref = ak.linear_gram(x.double(), True, backend="reference")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert rel_fro(out, ref) <= (1e-12 if dtype == torch.float64 else TOL)


def test_opcheck(backend, fresh_seed):
    dev = backend_device(backend)
    x = torch.randn(2, 4, 6, 5, device=dev)
    torch.library.opcheck(torch.ops.avg_kernels.im2col_gram.default, (x, [3, 2], [1, 1], [1, 0], [1, 1], 2, True, backend))
    torch.library.opcheck(torch.ops.avg_kernels.im2col_gram.default, (x[:, :, 0], [3], [2], [1], [1], 1, False, backend))
    torch.library.opcheck(torch.ops.avg_kernels.linear_gram.default, (torch.randn(3, 4, 5, device=dev), True, backend))
    xd = torch.randn(2, 2, 4, 4, dtype=torch.float64, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.avg_kernels.im2col_gram.default, (xd, [2, 2], [1, 1], [1, 1], [1, 1], 1, True, backend))
    torch.library.opcheck(torch.ops.avg_kernels.linear_gram.default, (xd[0, 0].detach().requires_grad_(), True, backend))


def test_torch_compile_fullgraph(fresh_seed):
    x = torch.randn(2, 3, 8, 8)

    def f(x):
        return ak.im2col_gram(x, 3, padding=1, bias=True) + 1, ak.linear_gram(x.flatten(1), True)

    a, b = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    a0, b0 = f(x)
    torch.testing.assert_close(a, a0)
    torch.testing.assert_close(b, b0)
    c = torch.compile(lambda x: ak.im2col_gram(x, 3, stride=2, groups=3), fullgraph=True)(x)
    assert rel_fro(c, ref_gram(x, 3, stride=2, groups=3)) <= TOL
    dyn = torch.compile(lambda x: ak.im2col_gram(x, (3, 1), padding=(1, 0), bias=True), fullgraph=True, dynamic=True,
                        backend="aot_eager")
    for shape in [(2, 3, 8, 8), (3, 3, 9, 5)]:  # symbolic batch and spatial sizes
        x = torch.randn(shape)
        assert rel_fro(dyn(x), ref_gram(x, (3, 1), 1, (1, 0), 1, 1, True)) <= TOL


def test_autograd_gradcheck():
    x = torch.randn(2, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ak.im2col_gram(x, (3, 2), 2, (1, 0), (1, 2), 2, True, backend="reference"), (x,))
    x1 = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ak.im2col_gram(x, 3, 1, 1, 2, 1, False, backend="reference"), (x1,))
    xl = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda x: ak.linear_gram(x, True, backend="reference"), (xl,))
    torch.autograd.gradgradcheck(lambda x: ak.linear_gram(x, True, backend="reference"), (xl,))


def test_use_backend_context(fresh_seed):
    x = torch.randn(2, 3, 6, 6)
    with ak.use_backend("reference"):
        a = ak.im2col_gram(x, 3)
    assert rel_fro(a, ref_gram(x, 3)) <= TOL


def _raises(exc, match, fn, *args, **kw):
    with pytest.raises(exc, match=match):
        fn(*args, **kw)


def test_bad_input_errors_name_the_argument():
    x = torch.randn(2, 4, 6, 6)
    g = ak.im2col_gram
    _raises(ValueError, r"kernel_size=\(7, 7\).*empty output", g, x, 7)
    _raises(ValueError, r"stride=\(0, 0\)", g, x, 3, stride=0)
    _raises(ValueError, r"padding=\(-1, -1\)", g, x, 3, padding=-1)
    _raises(ValueError, r"dilation=\(0, 1\)", g, x, 3, dilation=(0, 1))
    _raises(ValueError, r"kernel_size=\(0, 0\)", g, x, 0)
    _raises(ValueError, r"dilation=\(1, 3\).*empty output", g, x, 3, dilation=(1, 3))
    _raises(ValueError, r"4 channels, not divisible by groups=3", g, x, 3, groups=3)
    _raises(ValueError, r"groups=0", g, x, 3, groups=0)
    _raises(ValueError, r"kernel_size=\(3, 3, 3\) has 3 entries", g, x, (3, 3, 3))
    _raises(ValueError, r"2-d shape", g, x[0, 0], 3)
    _raises(ValueError, r"6-d shape", g, x[None, None], 3)
    x5 = torch.randn(2, 4, 5, 6, 6)  # Conv3d
    _raises(ValueError, r"kernel_size=\(3, 3\) has 2 entries; a 3-d conv", g, x5, (3, 3))
    _raises(ValueError, r"kernel_size=\(6, 3, 3\).*empty output", g, x5, (6, 3, 3))
    _raises(ValueError, r"stride=\(1, 0, 1\)", g, x5, 3, stride=(1, 0, 1))
    _raises(ValueError, r"padding=\(-1, -1, -1\)", g, x5, 3, padding=-1)
    _raises(ValueError, r"4 channels, not divisible by groups=3", g, x5, 3, groups=3)
    _raises(TypeError, r"dtype torch.int64", g, x.long(), 3)
    _raises(TypeError, r"kernel_size must be an int.*float", g, x, 3.0)
    _raises(TypeError, r"stride must be an int.*bool", g, x, 3, stride=True)
    _raises(TypeError, r"bias must be a bool", g, x, 3, bias=1)
    _raises(TypeError, r"x must be a torch.Tensor", g, [1.0], 3)
    _raises(ValueError, r"backend='nope'", g, x, 3, backend="nope")
    _raises(ValueError, r"0-d", ak.linear_gram, torch.tensor(1.0))
    _raises(TypeError, r"dtype torch.int32", ak.linear_gram, torch.ones(3, 3, dtype=torch.int32))
    _raises(TypeError, r"bias must be a bool", ak.linear_gram, torch.ones(3, 3), bias=None)
    # the raw op validates too (schema lists are not normalised there)
    _raises(ValueError, r"kernel_size=\(3,\) has 1 entries", torch.ops.avg_kernels.im2col_gram, x, [3], [1, 1],
            [0, 0], [1, 1], 1, False)
    _raises(ValueError, r"empty output", torch.ops.avg_kernels.im2col_gram, x[:, :, 0], [9], [1], [1], [1], 1, False)


def _random_conv_config(gen: torch.Generator):
    """A random valid Conv1d/Conv2d configuration (small sizes, every argument exercised)."""
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    nd = r(1, 2)
    groups = r(1, 3)
    c = groups * r(1, 5)
    k = tuple(r(1, 4) for _ in range(nd))
    s = tuple(r(1, 3) for _ in range(nd))
    d = tuple(r(1, 2) for _ in range(nd))
    p = tuple(r(0, (d[i] * (k[i] - 1)) + 1) for i in range(nd))
    size = tuple(max(1, d[i] * (k[i] - 1) + 1 - 2 * p[i]) + r(0, 7) for i in range(nd))
    return (r(1, 3), c, *size), k, s, p, d, groups, bool(r(0, 1))


@pytest.mark.parametrize("seed", range(6))
def test_im2col_gram_random_configurations(backend, seed):
    """200 random configurations per seed (interpreted Triton: 15): 1-D/2-D, stride, padding (up to wider
    than the kernel reach), dilation, groups, bias, odd sizes."""
    gen = torch.Generator().manual_seed(1000 + seed)
    dev = backend_device(backend)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems: OpenMP barriers cost more than they save on a busy machine
    try:
        _random_configs(backend, dev, gen)
    finally:
        torch.set_num_threads(threads)


def _random_configs(backend, dev, gen):
    for _ in range(15 if interpreted(backend) else 200):
        shape, k, s, p, d, g, b = _random_conv_config(gen)
        x = torch.randn(shape, generator=gen).to(dev)
        out = ak.im2col_gram(x, k, s, p, d, g, b, backend=backend)
        ref = ref_gram(x, k, s, p, d, g, b)
        assert rel_fro(out, ref) <= TOL, (shape, k, s, p, d, g, b)


def _windows_reading_input(size, k, s, p, d):
    """Brute force: output positions of one spatial dim whose window overlaps the input's index range."""
    out = (size + 2 * p - d * (k - 1) - 1) // s + 1
    return [o for o in range(out) if size > 0 and o * s - p <= size - 1 and o * s - p + d * (k - 1) >= 0]


def test_trim_dim_keeps_every_window_that_reads_the_input():
    """ops/gram.py's _trim_dim against brute force on every small 1-D geometry: with padding beyond the
    kernel's reach the kept positions are exactly the windows overlapping the input (otherwise all are
    kept), and the sliced/padded input has exactly that many windows."""
    trim = ak.ops.gram._trim_dim
    checked = 0
    for size in range(0, 6):
        for k in range(1, 4):
            for s in range(1, 6):
                for p in range(0, 9):
                    for d in range(1, 4):
                        out = (size + 2 * p - d * (k - 1) - 1) // s + 1
                        if out < 1:
                            continue
                        plan = trim(size, k, s, p, d, out)
                        want = _windows_reading_input(size, k, s, p, d)
                        if plan is None:
                            assert not want, (size, k, s, p, d)
                            continue
                        if p <= d * (k - 1):  # every window overlaps [-p, size + p): kept as it is
                            assert plan.positions == out and (plan.start, plan.stop) == (0, size)
                        else:
                            assert plan.positions == len(want) >= 1, (size, k, s, p, d, plan)
                        length = plan.stop - plan.start + plan.pad_lo + plan.pad_hi
                        assert (length - d * (k - 1) - 1) // plan.stride + 1 == plan.positions
                        assert 0 <= plan.start <= plan.stop <= size and 1 <= plan.stride <= s
                        assert max(plan.pad_lo, plan.pad_hi) <= max(p, 0) and min(plan.pad_lo, plan.pad_hi) >= 0
                        checked += 1
    assert checked > 1500


@pytest.mark.parametrize("seed", range(3))
def test_im2col_gram_padding_beyond_the_kernel_and_large_strides(backend, seed):
    """Geometries that ops/gram.py trims (padding wider than the kernel's reach, asymmetric needs, a stride
    past the input): every backend against the untrimmed float64 definition (reference.im2col_gram called
    directly: F.pad + F.unfold over every position), bias count included."""
    gen = torch.Generator().manual_seed(2000 + seed)
    dev = backend_device(backend)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))
    done = 0
    while done < (6 if interpreted(backend) else 60):
        nd = r(1, 2)
        g = r(1, 2)
        size = tuple(r(0, 5) for _ in range(nd))
        k = tuple(r(1, 3) for _ in range(nd))
        s = tuple(r(1, 9) for _ in range(nd))
        d = tuple(r(1, 3) for _ in range(nd))
        p = tuple(r(0, 12) for _ in range(nd))
        b = bool(r(0, 1))
        if any((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 < 1 for i in range(nd)):
            continue
        x = torch.randn((r(1, 2), 2 * g, *size), generator=gen, dtype=torch.float64)
        want = reference.im2col_gram(x, k, s, p, d, g, b)
        out = ak.im2col_gram(x.to(dev), k, s, p, d, g, b, backend=backend)
        assert rel_fro(out, want) <= 1e-12, (x.shape, k, s, p, d, g, b)
        done += 1


@pytest.mark.parametrize("kw,count,tap", [
    (dict(kernel_size=1, stride=2 ** 62), 1, 0),
    (dict(kernel_size=1, padding=2 ** 62), (2 ** 63 + 1) ** 2, 0),
    (dict(kernel_size=1, padding=2 ** 20), (2 ** 21 + 1) ** 2, 0),
    (dict(kernel_size=3, stride=10 ** 12, padding=1), 1, 4),
    (dict(kernel_size=(1, 2), padding=(0, 2 ** 40), stride=(1, 2 ** 39)), 4, 0),  # starts -2**40, -2**39, 0, 2**39
])
def test_im2col_gram_huge_geometry_costs_what_the_output_needs(backend, kw, count, tap):
    """SPEC §6: stride/padding far beyond the input cost nothing extra (these asked for 35 TB, a vector of
    2**62 entries, or failed with 'invalid'): only the windows that read the input are computed, the
    all-padding positions reach the bias count exactly. The input is one pixel of 4 channels, read by
    exactly one window at kernel offset ``tap``: A holds x xᵀ at that offset, x in the bias column."""
    dev = backend_device(backend)
    x = torch.arange(1.0, 5.0, dtype=torch.float64)
    out = ak.im2col_gram(x.view(1, 4, 1, 1).to(dev), bias=True, backend=backend, **kw).cpu()
    taps = (out.shape[-1] - 1) // 4
    u = torch.zeros(4, taps, dtype=torch.float64)
    u[:, tap] = x
    u = u.flatten()
    want = torch.zeros_like(out[0])
    want[:-1, :-1] = torch.outer(u, u)
    want[:-1, -1] = want[-1, :-1] = u
    want[-1, -1] = float(count)
    torch.testing.assert_close(out[0], want, rtol=0, atol=0)


@pytest.mark.parametrize("mode", [-1, 1], ids=["correlation", "gemm"])
def test_im2col_gram_cpu_paths(mode, fresh_seed):
    """The CPU kernel has two paths (csrc/cpu/gram.cpp): shifted-channel correlations and GEMMs (conv with 1-3
    channels per group: explicit im2col of a few samples; Linear with D <= 64: the rows). The other tests see
    whichever the size picks; here each is forced for every configuration, dtype and layout."""
    from avg_kernels.ops._backend import unavailable_reason

    if unavailable_reason("cpu"):
        pytest.skip(unavailable_reason("cpu"))
    previous = torch.ops.avg_kernels_C.set_gram_path(mode)
    try:
        for shape, k, s, p, d, g, b in CONV_CONFIGS:
            x = torch.randn(shape)
            for inp in (x, x.transpose(-1, -2).contiguous().transpose(-1, -2), x.half(), x.double()):
                out = ak.im2col_gram(inp, k, s, p, d, g, b, backend="cpu")
                tol = 1e-12 if inp.dtype == torch.float64 else TOL
                assert rel_fro(out, ref_gram(inp, k, s, p, d, g, b)) <= tol, (mode, shape, k, s, p, d, g, b, inp.dtype)
        _random_configs("cpu", "cpu", torch.Generator().manual_seed(2000 + mode))
        x = torch.randn(0, 2, 5, 5)
        out = ak.im2col_gram(x, 3, bias=True, backend="cpu")
        assert out[0, -1, -1] == 0 and out.abs().sum() == 0
        # several chunks of the bounded workspace (1.5 MB): the chunk sums must add up
        x = torch.randn(300, 2, 40, 40)
        assert rel_fro(ak.im2col_gram(x, 3, 1, 1, bias=True, backend="cpu"), ref_gram(x, 3, 1, 1, bias=True)) <= TOL
        # Linear: the GEMM path runs on the rows themselves (one chunk, several chunks, 16-bit, strided)
        for shape, dtype in [((7,), torch.float32), ((64, 10), torch.float32), ((3, 5, 33), torch.float64),
                             ((50000, 10), torch.float32), ((45000, 9), torch.bfloat16), ((20, 63), torch.float16),
                             ((0, 5), torch.float32), ((4, 0), torch.float32)]:
            x = torch.randn(shape).to(dtype)
            for inp in (x, x[::2] if x.dim() > 1 else x):
                for bias in (False, True):
                    out = ak.linear_gram(inp, bias, backend="cpu")
                    ref = ak.linear_gram(inp.double(), bias, backend="reference")
                    tol = 1e-12 if dtype == torch.float64 else TOL
                    assert rel_fro(out, ref) <= tol, (mode, shape, dtype, bias)
    finally:
        torch.ops.avg_kernels_C.set_gram_path(previous)
    with pytest.raises(RuntimeError, match="mode must be -1, 0 or 1"):
        torch.ops.avg_kernels_C.set_gram_path(2)


@pytest.mark.parametrize("splits,wide", [(1, False), (2, False), (3, True)])
def test_triton_splits_and_tile_edges(splits, wide, fresh_seed):
    """The Triton kernel's split-M partial Grams (workspace + sum) and tiles across D: D_IN = 64 puts
    the bias row alone in the second 64-wide tile; D = 72 cuts a tile; M not a multiple of BLOCK_M; the
    int64 position arithmetic used from M = 2^31 on (``wide``) on small inputs."""
    from avg_kernels.ops._backend import unavailable_reason

    if unavailable_reason("triton"):
        pytest.skip(unavailable_reason("triton"))
    from avg_kernels._triton import gram as tg

    dev = backend_device("triton")
    for shape, k, s, p, d, g, b in [((3, 16, 5, 6), 2, 1, 0, 1, 1, True), ((2, 8, 7, 5), 3, 1, 1, 1, 1, True),
                                    ((2, 6, 9), 3, 2, 1, 1, 2, False)]:
        x = torch.randn(shape, device=dev)
        geo = ak.ops.gram.conv_geometry(x, k, s, p, d, g, b)
        out = tg.im2col_gram(x, geo.kernel_size, geo.stride, geo.padding, geo.dilation, g, b, splits=splits, wide=wide)
        assert rel_fro(out, ref_gram(x, k, s, p, d, g, b)) <= TOL
    x = torch.randn(37, 70, device=dev)
    assert rel_fro(tg.linear_gram(x, True, splits=splits, wide=wide), ak.linear_gram(x.double(), True, backend="reference")) <= TOL


# ---------------------------------------------------------------------------------------------
# The CUDA kernel's index logic, run on the host (csrc/cuda/gram_kernel.cuh through
# csrc/testing/gram_cuda_emulation.cpp): every block and thread of the launch, the same stages.

def _needs_extension():
    from avg_kernels.ops._backend import unavailable_reason

    if unavailable_reason("cpu"):
        pytest.skip(unavailable_reason("cpu"))


def _emulated(x, k, s=1, p=0, d=1, g=1, b=False, splits=0, wide=False, sm_count=4):
    from avg_kernels._contract.dtypes import gram_dtype
    from avg_kernels._contract.outputs import new_output

    geo = ak.ops.gram.conv_geometry(x, k, s, p, d, g, b)
    out = new_output((g, geo.dim, geo.dim), x, gram_dtype(x.dtype))  # NaN-poisoned under the test suite
    info = hook_ops().im2col_gram_cuda_emulated(
        x, list(geo.kernel_size), list(geo.stride), list(geo.padding), list(geo.dilation), g, b, out, splits, wide,
        sm_count)
    return out, info


@pytest.mark.parametrize("splits", [0, 2])
@pytest.mark.parametrize("cfg", CONV_CONFIGS, ids=conv_id)
def test_cuda_kernel_emulated(cfg, splits, fresh_seed):
    _needs_extension()
    shape, k, s, p, d, g, b = cfg
    x = torch.randn(shape)
    out, (tiles, n_splits, steps, wide) = _emulated(x, k, s, p, d, g, b, splits=splits)
    assert rel_fro(out, ref_gram(x, k, s, p, d, g, b)) <= TOL
    assert not wide and (splits == 0 or n_splits <= splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_cuda_kernel_emulated_dtypes_layouts_wide(dtype, fresh_seed):
    _needs_extension()
    base = torch.randn(3, 70, 9, 8).to(dtype)  # D = 70·4 + 1 = 281: five 64-wide tiles per side
    for x, args in [(base, (2, 1, 0, 1, 1, True)), (base.transpose(2, 3)[:, :, ::2], (3, 2, 1, 1, 2, False)),
                    (base[:, :7, 0], (3, 1, 1, 2, 7, True))]:
        for splits, wide in [(1, False), (3, True)]:
            out, info = _emulated(x, *args, splits=splits, wide=wide)
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert info[3] == int(wide)
            assert rel_fro(out, ref_gram(x, *args)) <= (1e-12 if dtype == torch.float64 else TOL)


def test_cuda_kernel_emulated_linear_and_empty(fresh_seed):
    _needs_extension()
    from avg_kernels._contract.outputs import new_output

    x = torch.randn(5, 7, 66)
    out = new_output((1, 67, 67), x, torch.float32)
    hook_ops().linear_gram_cuda_emulated(x, True, out, 2, False, 4)
    assert rel_fro(out, ak.linear_gram(x.double(), True, backend="reference")) <= TOL
    out, info = _emulated(torch.randn(0, 4, 5, 5), 3, 1, 1, 1, 2, True)
    assert (out == 0).all() and info[2] == 0
    out, _ = _emulated(torch.randn(2, 0, 6), 3, b=True)  # no channels: only the bias count M
    assert out.shape == (1, 1, 1) and out.item() == 8


def test_cuda_kernel_tile_numbering():
    """Tile t -> (bi, bj) enumerates the upper triangle once, also far beyond 2^31 tiles."""
    _needs_extension()
    coords = hook_ops().gram_tile_coords
    n = 60
    got = [tuple(coords(t)) for t in range(n * (n + 1) // 2)]
    assert got == [(i, j) for j in range(n) for i in range(j + 1)]
    for j in (2**20 + 3, 2**26 - 1, 3 * 10**7):
        first = j * (j + 1) // 2
        assert tuple(coords(first)) == (0, j) and tuple(coords(first + j)) == (j, j)
        assert tuple(coords(first - 1)) == (j - 1, j - 1)


def test_cuda_kernel_addresses_beyond_2_31(fresh_seed):
    """The kernel's element addresses for an input of 2^36 elements (a meta tensor: nothing is
    allocated), at positions past 2^31, against Python integer arithmetic (SPEC §6)."""
    _needs_extension()
    sizes, ks, st, pd, dl, groups = (2**22, 8, 96, 64), (3, 5), (2, 1), (1, 2), (2, 1), 2
    strides = (8 * 96 * 64, 96 * 64, 64, 1)
    cg = sizes[1] // groups
    oh = (sizes[2] + 2 * pd[0] - dl[0] * (ks[0] - 1) - 1) // st[0] + 1
    ow = (sizes[3] + 2 * pd[1] - dl[1] * (ks[1] - 1) - 1) // st[1] + 1
    m_total = sizes[0] * oh * ow
    assert m_total > 2**33
    gen = torch.Generator().manual_seed(7)
    pos = torch.cat([torch.randint(2**31, m_total, (3000,), generator=gen), torch.tensor([m_total - 1, m_total])])
    d_in = cg * ks[0] * ks[1]
    rows = torch.randint(0, d_in + 2, pos.shape, generator=gen)
    g = 1
    off, kind = hook_ops().gram_unfolded_index(list(sizes), list(strides), list(ks), list(st), list(pd),
                                                            list(dl), groups, True, g, rows, pos, True)
    for e in range(pos.numel()):
        m, d = int(pos[e]), int(rows[e])
        n, rem = divmod(m, oh * ow)
        y, xw = divmod(rem, ow)
        want_kind, want_off = 1, 0
        if m < m_total and d == d_in:
            want_kind = 2
        elif m < m_total and d < d_in:
            c, i = divmod(d, ks[0] * ks[1])
            kh, kw = divmod(i, ks[1])
            ih, iw = y * st[0] + kh * dl[0] - pd[0], xw * st[1] + kw * dl[1] - pd[1]
            if 0 <= ih < sizes[2] and 0 <= iw < sizes[3]:
                want_kind = 0
                want_off = n * strides[0] + (g * cg + c) * strides[1] + ih * strides[2] + iw * strides[3]
        assert (int(kind[e]), int(off[e])) == (want_kind, want_off), (m, d)
    assert int(off.max()) > 2**35


def test_bench_smoke(tmp_path):
    """bench/gram.py end to end on case (a) with batch 1: time rows for cpu and unfold+matmul, the
    error, and a peak-memory figure from the LD_PRELOADed tracking allocator."""
    import json

    _needs_extension()
    from bench import runner

    argv = ["--ops", "gram", "--gram-cases", "a", "--gram-batch", "1", "--min-run-time", "0.01", "--rounds", "1",
            "--no-progress", "--out", str(tmp_path)]
    assert runner.main(argv) == 0
    doc = json.loads((tmp_path / "gram-cpu-quick.json").read_text())
    by_impl = {r["impl"]: r for r in doc["rows"]}
    assert set(by_impl) == {"cpu", "unfold+matmul"} and all(r["median_s"] > 0 for r in by_impl.values())
    assert by_impl["cpu"]["accuracy"] < TOL and "unfold+matmul" in by_impl["cpu"]["ratios"]
    # unfold + matmul of one 64x56x56 sample holds its 7.2 MB of columns; the kernel ~2 MB at most
    assert by_impl["unfold+matmul"]["extra"]["peak_extra_bytes"] > 7e6
    assert by_impl["cpu"]["extra"]["peak_extra_bytes"] < 3e6


# ---------------------------------------------------------------------------------------------
# Conv3d: the reference computes it directly (F.pad + Tensor.unfold per dim); cpu/cuda/triton as Conv2d Grams of
# depth-gathered chunks (ops/gram.py _conv3d_by_depth).



@pytest.mark.parametrize("cfg", CONV3D_CONFIGS, ids=conv_id)
def test_reference_conv3d_is_the_conv_weight_order(cfg, fresh_seed):
    """As test_reference_is_the_conv_weight_order, through torch's own F.conv3d: Σ_m z_m z_mᵀ = W A Wᵀ."""
    shape, k, s, p, d, g, b = cfg
    x = torch.randn(shape, dtype=torch.float64)
    conv = torch.nn.Conv3d(shape[1], 2 * g, k, stride=s, padding=p, dilation=d, groups=g, bias=b, dtype=torch.float64)
    z = conv(x)
    zg = z.transpose(0, 1).reshape(g, 2, -1)
    w = conv.weight.reshape(g, 2, -1)
    if b:
        w = torch.cat([w, conv.bias.reshape(g, 2, 1)], dim=2)
    a = reference.im2col_gram(x, *(ak.ops.gram.conv_geometry(x, k, s, p, d, g, b)[:5]), b)
    assert a.dtype == torch.float64 and a.shape == (g, w.shape[2], w.shape[2])
    torch.testing.assert_close(w @ a @ w.transpose(1, 2), zg @ zg.transpose(1, 2), rtol=1e-12, atol=1e-12)
    if b:
        assert (a[:, -1, -1] == z.shape[0] * math.prod(z.shape[2:])).all()
    # the composed path against the same oracle (cpu when built, else the Triton interpreter)
    for be in ("cpu", "triton"):
        if not ak.ops._backend.unavailable_reason(be) and not (be == "triton" and torch.cuda.is_available()):
            a2 = ak.im2col_gram(x, k, s, p, d, g, b, backend=be)
            torch.testing.assert_close(w @ a2 @ w.transpose(1, 2), zg @ zg.transpose(1, 2), rtol=1e-12, atol=1e-12)
            break


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_im2col_gram_conv3d_dtypes_and_layouts(backend, dtype, fresh_seed):
    if backend == "triton" and interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 numpy type: bf16 is covered on GPU and by AOT compile")
    dev = backend_device(backend)
    base = torch.randn(3, 4, 6, 5, 7, device=dev).to(dtype)
    for x in (base, base.transpose(2, 4), base[::2, :, 1::2], base.to(memory_format=torch.channels_last_3d),
              base.permute(1, 0, 2, 3, 4)[:, :2]):
        for args in [(3, 1, 1, 1, 1, True), ((2, 3, 1), (2, 1, 1), (1, 1, 0), (1, 1, 2), 2, False)]:
            out = ak.im2col_gram(x, *args, backend=backend)
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
            assert rel_fro(out, ref_gram(x, *args)) <= (1e-12 if dtype == torch.float64 else TOL), (x.shape, args)


def test_im2col_gram_conv3d_empty(backend):
    dev = backend_device(backend)
    out = ak.im2col_gram(torch.randn(0, 4, 3, 5, 5, device=dev), 3, padding=1, groups=2, bias=True, backend=backend)
    assert out.shape == (2, 55, 55) and (out == 0).all()
    out = ak.im2col_gram(torch.randn(2, 0, 4, 3, 3, device=dev), (2, 3, 3), bias=True, backend=backend)
    assert out.shape == (1, 1, 1) and out.item() == 2 * 3  # M = 2 samples × 3 positions
    # depth 0 with padding that fills it (kernel reach 2 = padding): two all-padding depths, only the count
    out = ak.im2col_gram(torch.randn(2, 2, 0, 3, 3, device=dev), 3, padding=(2, 1, 1), bias=True, backend=backend)
    assert out.shape == (1, 55, 55) and (out[:, :-1] == 0).all() and out[0, -1, -1] == 2 * 2 * 9


@pytest.mark.parametrize("budget", [1, 500, 2500])
def test_im2col_gram_conv3d_chunks(backend, budget, monkeypatch, fresh_seed):
    """The depth gather in chunks of (sample, output depth) through one buffer: a budget below one slice (one
    (n, od) per chunk), a few output depths per chunk, several samples per chunk. The buffer is the only
    input-sized allocation: one per call, max(budget, C·kd·H·W) elements at most."""
    import avg_kernels.ops.gram as gram_mod

    sizes = []
    real = gram_mod._gather_buffer
    monkeypatch.setattr(gram_mod, "_GATHER_ELEMENTS", budget)
    monkeypatch.setattr(gram_mod, "_gather_buffer", lambda numel, x: sizes.append(numel) or real(numel, x))
    dev = backend_device(backend)
    x = torch.randn(3, 2, 7, 4, 5, device=dev)
    for args in [((3, 2, 2), (2, 1, 1), (2, 1, 0), (1, 1, 1), 1, True), ((2, 1, 3), 1, (1, 0, 1), (3, 1, 1), 2, False)]:
        sizes.clear()
        out = ak.im2col_gram(x, *args, backend=backend)
        assert rel_fro(out, ref_gram(x, *args)) <= TOL, args
        if backend == "reference":
            assert sizes == []  # the reference does not gather
            continue
        kd, pd, dd = args[0][0], args[2][0], args[3][0]
        sd = args[1] if isinstance(args[1], int) else args[1][0]
        od = (7 + 2 * pd - dd * (kd - 1) - 1) // sd + 1
        unit = 2 * kd * 4 * 5  # C·kd·H·W
        per = max(1, budget // unit)
        ob = min(od, per)
        nb = min(3, per // od) if ob == od else 1
        assert sizes == [nb * ob * unit] and sizes[0] <= max(budget, unit), (sizes, nb, ob)


@pytest.mark.parametrize("seed", range(2))
def test_im2col_gram_conv3d_random_configurations(backend, seed):
    """Random Conv3d geometries (interpreted Triton: 4), padding up to beyond the kernel reach and strides past
    the input (trimmed in every dim), against the untrimmed float64 reference."""
    gen = torch.Generator().manual_seed(3000 + seed)
    dev = backend_device(backend)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (), generator=gen))  # noqa: E731
    done = 0
    while done < (4 if interpreted(backend) else 40):
        g = r(1, 2)
        k = tuple(r(1, 3) for _ in range(3))
        s = tuple(r(1, 4) for _ in range(3))
        d = tuple(r(1, 2) for _ in range(3))
        p = tuple(r(0, d[i] * (k[i] - 1) + 2) for i in range(3))
        size = tuple(r(0, 5) for _ in range(3))
        b = bool(r(0, 1))
        if any((size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 < 1 for i in range(3)):
            continue
        x = torch.randn((r(1, 2), g * r(1, 2), *size), generator=gen, dtype=torch.float64)
        want = reference.im2col_gram(x, k, s, p, d, g, b)
        out = ak.im2col_gram(x.to(dev), k, s, p, d, g, b, backend=backend)
        assert rel_fro(out, want) <= 1e-12, (x.shape, k, s, p, d, g, b)
        out = ak.im2col_gram(x.float().to(dev), k, s, p, d, g, b, backend=backend)
        assert rel_fro(out, ref_gram(x.float(), k, s, p, d, g, b)) <= TOL, (x.shape, k, s, p, d, g, b)
        done += 1


def test_im2col_gram_conv3d_huge_geometry(backend):
    """Depth padding/stride far beyond the input cost nothing (trimmed like the other dims): one voxel of 4
    channels, read by one window at depth offset 0; every other position only adds to the bias count."""
    dev = backend_device(backend)
    x = torch.arange(1.0, 5.0, dtype=torch.float64)
    out = ak.im2col_gram(x.view(1, 4, 1, 1, 1).to(dev), 1, padding=(2 ** 40, 0, 0), bias=True, backend=backend).cpu()
    want = torch.zeros(5, 5, dtype=torch.float64)
    want[:4, :4] = torch.outer(x, x)
    want[:4, 4] = want[4, :4] = x
    want[4, 4] = float(2 ** 41 + 1)
    torch.testing.assert_close(out[0], want, rtol=0, atol=0)


def test_opcheck_conv3d(backend, fresh_seed):
    dev = backend_device(backend)
    x = torch.randn(2, 4, 4, 3, 5, device=dev)
    torch.library.opcheck(torch.ops.avg_kernels.im2col_gram.default,
                          (x, [2, 3, 2], [1, 2, 1], [1, 1, 0], [1, 1, 2], 2, True, backend))
    if interpreted(backend):
        return  # the autograd formula is the same for every backend; interpreted Triton is slow
    xd = torch.randn(1, 2, 3, 3, 3, dtype=torch.float64, device=dev, requires_grad=True)
    torch.library.opcheck(torch.ops.avg_kernels.im2col_gram.default,
                          (xd, [2, 2, 2], [1, 1, 1], [1, 0, 1], [1, 1, 1], 1, True, backend))


def test_torch_compile_fullgraph_conv3d(fresh_seed):
    x = torch.randn(2, 3, 5, 6, 6)

    def f(x):
        return ak.im2col_gram(x, 3, padding=1, bias=True) + 1

    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(x), f(x))
    c = torch.compile(lambda x: ak.im2col_gram(x, (2, 3, 3), stride=2, groups=3), fullgraph=True)(x)
    assert rel_fro(c, ref_gram(x, (2, 3, 3), stride=2, groups=3)) <= TOL
    dyn = torch.compile(lambda x: ak.im2col_gram(x, (3, 1, 2), padding=(1, 0, 1), bias=True), fullgraph=True,
                        dynamic=True, backend="aot_eager")
    for shape in [(2, 3, 5, 6, 6), (3, 3, 4, 7, 5)]:  # symbolic batch and spatial sizes
        x = torch.randn(shape)
        assert rel_fro(dyn(x), ref_gram(x, (3, 1, 2), 1, (1, 0, 1), 1, 1, True)) <= TOL


def test_autograd_gradcheck_conv3d():
    x = torch.randn(2, 4, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    f = lambda x: ak.im2col_gram(x, (2, 2, 3), (2, 1, 1), (1, 0, 1), (1, 2, 1), 2, True, backend="reference")  # noqa: E731
    torch.autograd.gradcheck(f, (x,), fast_mode=True)  # 1250 outputs: the slow mode takes 20 s
    x = torch.randn(1, 1, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradgradcheck(lambda x: ak.im2col_gram(x, 2, 1, 1, 1, 1, True, backend="reference"), (x,))
