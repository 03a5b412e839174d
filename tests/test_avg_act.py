"""Parity of every backend of the averaged activation backward with the float64 reference (SPEC §1),
special values, shapes, dtypes, the autograd/forward contract, opcheck and torch.compile."""
from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

import avg_kernels as ak
from avg_kernels import EPS, reference
from avg_kernels.activations import native_backward, forward

from _accuracy import (CONFIGS, CANCELLING, config_id, float64_violations, fp32_rounding_tol, kernel_act, literal_float32,
                       non_finite_inputs, reduced_precision_violations, slope_errors, spec_inputs)
from conftest import backend_device, interpreted, hook_ops


def _n(backend: str) -> int:
    return 3000 if interpreted(backend) else 40000


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_float32_meets_spec_bar(backend, cfg, fresh_seed):
    """SPEC §1: elementwise |s - s_ref| <= 1e-5 |s_ref| + 1e-6 and normwise 1e-6 on |d| > eps."""
    dev = backend_device(backend)
    k = kernel_act(cfg)
    g, x, xn = spec_inputs(_n(backend), device=dev)
    out = ak.avg_act_backward(g, x, xn, cfg[0], backend=backend, **cfg[1])
    assert out.dtype == torch.float32 and out.shape == x.shape
    mask, bad, normwise, _ = slope_errors(out.cpu(), g.cpu(), x.cpu(), xn.cpu(), k)
    assert mask.sum() > 0.9 * x.numel()
    assert not bad.any(), f"{bad.sum().item()} elements over the bar, e.g. x={x[bad][:3]}, x_new={xn[bad][:3]}"
    assert normwise <= 1e-6


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c[0] in CANCELLING], ids=config_id)
def test_literal_float32_formula_fails_the_bar(cfg, fresh_seed):
    """The bar is not vacuous: the papers' literal float32 secant misses it (SPEC §1 measures 4.5e-2
    for tanh), so the kernels' stable formulas are what make the tests above pass."""
    k = kernel_act(cfg)
    g, x, xn = spec_inputs(40000)
    out = literal_float32(g, x, xn, k)
    _, bad, normwise, _ = slope_errors(out, g, x, xn, k)
    assert bad.sum() > 100
    assert normwise > 1e-4


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_fallback_matches_pytorch_backward(backend, cfg, fresh_seed):
    """|d| <= eps (including d = 0) gives grad_out * f'(x) as PyTorch's own backward computes it."""
    dev = backend_device(backend)
    k = kernel_act(cfg)
    n = 2000 if interpreted(backend) else 20000
    x = torch.cat([torch.randn(n // 2) * 4, (torch.rand(n - n // 2) * 2 - 1) * 30, torch.tensor([0.0, -0.0])])
    d = (torch.rand_like(x) * 2 - 1) * EPS
    d[::3] = 0
    xn = x + d
    g = torch.randn_like(x)
    out = ak.avg_act_backward(g.to(dev), x.to(dev), xn.to(dev), cfg[0], backend=backend, **cfg[1]).cpu()
    torch_bw = native_backward(g, x, forward(x, k), k)  # PyTorch, float32
    exact = native_backward(g.double(), x.double(), forward(x.double(), k), k)  # float64
    assert ((out - torch_bw).abs() <= fp32_rounding_tol(torch_bw, g, x)).all()
    assert ((out.double() - exact).abs() <= 1e-5 * exact.abs() + 1e-6 * g.abs().double()).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_reduced_precision_only_final_rounding(backend, cfg, dtype, fresh_seed):
    """float16/bfloat16: arithmetic in float32, so the only extra error is rounding grad_in once."""
    if backend == "triton" and interpreted(backend) and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter has no bfloat16 numpy type: bf16 is covered on GPU and by AOT compile")
    dev = backend_device(backend)
    k = kernel_act(cfg)
    g, x, xn = spec_inputs(_n(backend) // 4, dtype=dtype, device=dev)
    out = ak.avg_act_backward(g, x, xn, cfg[0], backend=backend, **cfg[1])
    assert out.dtype == dtype
    ref = reference.avg_act_backward(g.double(), x.double(), xn.double(), k, EPS).cpu()
    assert not reduced_precision_violations(out, g, ref).any()


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_float64(backend, cfg, fresh_seed):
    """float64 inputs are computed in float64: the kernels match the reference to the reference's
    own rounding error (see _accuracy.float64_violations)."""
    dev = backend_device(backend)
    k = kernel_act(cfg)
    g, x, xn = spec_inputs(_n(backend) // 4, dtype=torch.float64, device=dev)
    out = ak.avg_act_backward(g, x, xn, cfg[0], backend=backend, **cfg[1]).cpu()
    assert not float64_violations(out, g.cpu(), x.cpu(), xn.cpu(), k).any()


SHAPES = [(), (0,), (0, 3), (1,), (7,), (31,), (33,), (1023,), (1025,), (3, 5, 7), (2, 1, 65)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_shapes(backend, shape, fresh_seed):
    dev = backend_device(backend)
    n = math.prod(shape)
    g, x, xn = (t.reshape(shape) for t in spec_inputs(n, device=dev))
    for act, params in [("tanh", {}), ("gelu", {}), ("softplus", {})]:
        out = ak.avg_act_backward(g, x, xn, act, backend=backend, **params)
        ref = reference.avg_act_backward(g, x, xn, kernel_act((act, params)), EPS)
        assert out.shape == shape and out.is_contiguous()
        torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=2e-5, atol=2e-6)


def test_non_contiguous(backend, fresh_seed):
    dev = backend_device(backend)
    base = [t.reshape(40, 60) for t in spec_inputs(2400, device=dev)]
    views = [base[0].t(), base[1].t(), base[2].t()]  # transposed
    sliced = [t[::2, 1::3] for t in base]  # strided
    expanded = [t[:1].expand(5, 60) for t in base]  # stride 0
    for g, x, xn in (views, sliced, expanded):
        for act in ("sigmoid", "elu"):
            out = ak.avg_act_backward(g, x, xn, act, backend=backend)
            ref = reference.avg_act_backward(g, x, xn, kernel_act((act, {})), EPS)
            torch.testing.assert_close(out.cpu(), ref.cpu(), rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_non_finite_propagate_elementwise(backend, cfg):
    """NaN in grad_out, x or x_new gives NaN in that element only; infinities give what the float64
    reference gives (the secant's limit when one end is infinite)."""
    dev = backend_device(backend)
    k = kernel_act(cfg)
    g, x, xn = non_finite_inputs()
    out = ak.avg_act_backward(g.to(dev), x.to(dev), xn.to(dev), cfg[0], backend=backend, **cfg[1]).cpu()
    ref = reference.avg_act_backward(g, x, xn, k, EPS)
    assert torch.equal(out.isnan(), ref.isnan()), (out, ref)
    fin = ~ref.isnan()
    torch.testing.assert_close(out[fin], ref[fin].to(out.dtype), rtol=1e-5, atol=1e-6)


def test_zero_gradient_and_exact_values(backend):
    dev = backend_device(backend)
    x = torch.tensor([1.0, 2.0, -3.0, -1.0, -1.0], device=dev)
    xn = torch.tensor([3.0, 5.0, -1.0, 2.0, 1.0], device=dev)
    g = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0], device=dev)
    out = ak.avg_act_backward(g, x, xn, "relu", backend=backend).cpu()
    assert torch.equal(out, torch.tensor([1.0, 1.0, 0.0, 2.0 / 3.0, 0.0]))
    out = ak.avg_act_backward(g, x, xn, "leaky_relu", negative_slope=0.25, backend=backend).cpu()
    torch.testing.assert_close(out, torch.tensor([1.0, 1.0, 0.25, 0.75, 0.0]))


@pytest.mark.parametrize("act", ["hardswish", "hardsigmoid"])
def test_hard_activations_exact_secants_and_kinks(backend, act):
    """Piecewise polynomials: secants across and inside the kinks at -3 and 3 are exact (or one
    rounding away), and at the kinks (d = 0) the fallback is PyTorch's own f'."""
    dev = backend_device(backend)
    pairs = [(-4.0, 4.0), (-3.0, 3.0), (3.0, 5.0), (-5.0, -3.0), (-6.0, -4.0), (4.0, 6.0), (-1.0, 2.0),
             (-2.0, -1.0), (-4.0, 0.0), (0.0, 4.0), (-1.5, -1.5 + 2**-20), (-1.5 - 2**-20, -1.5 + 2**-21)]
    x = torch.tensor([p[0] for p in pairs], dtype=torch.float64)
    xn = torch.tensor([p[1] for p in pairs], dtype=torch.float64)
    k = kernel_act((act, {}))
    exact = (forward(xn, k) - forward(x, k)) / (xn - x)  # one rounding for pairs reaching a kink or beyond
    inner = (x > -3) & (xn < 3)  # inside (-3, 3) the mean of f' in closed form: (a + b + 3) / 6 or 1/6
    exact = torch.where(inner, (x + xn + 3) / 6 if act == "hardswish" else torch.full_like(x, 1 / 6), exact)
    # The reference is the literal secant: its own float64 rounding of f, over |d|, is allowed to it.
    ref_err = 4 * torch.finfo(torch.float64).eps * (forward(x, k).abs() + forward(xn, k).abs()) / (xn - x).abs()
    for dtype in (torch.float32, torch.float64):
        out = ak.avg_act_backward(torch.ones_like(x, dtype=dtype).to(dev), x.to(dtype).to(dev), xn.to(dtype).to(dev),
                                  act, backend=backend).cpu().double()
        tol = 4 * torch.finfo(dtype).eps * exact.abs() + (ref_err if backend == "reference" else 0)
        assert ((out - exact).abs() <= tol).all(), (out, exact)
    kinks = torch.tensor([-3.0, 3.0, -3.0 - 2**-21, -3.0 + 2**-21, 3.0 - 2**-21, 3.0 + 2**-21, -1.5, 0.0, -0.0])
    for dtype in (torch.float32, torch.float64):
        xk, g = kinks.to(dtype), torch.randn(len(kinks), dtype=dtype)
        out = ak.avg_act_backward(g.to(dev), xk.to(dev), xk.to(dev), act, backend=backend).cpu()
        want = native_backward(g, xk, forward(xk, k), k)
        if backend == "reference":  # computes in float64, then rounds
            assert ((out - want).abs() <= fp32_rounding_tol(want, g, xk)).all(), (out, want)
        else:  # the kernels evaluate PyTorch's formula in the same arithmetic
            assert torch.equal(out, want), (out, want)


@pytest.mark.parametrize("params", [{}, {"min_val": 0.0, "max_val": 6.0}, {"min_val": -0.3, "max_val": 2.7}],
                         ids=["default", "relu6", "inexact-bounds"])
def test_hardtanh_exact_secants_and_bounds(backend, params):
    """clamp(x, L, H): the secant is the fraction of [x, x_new] inside [L, H], so 1 exactly inside, 0 exactly
    outside, and within a few roundings across a bound (also for d overflowing float32, and ends at +-inf); at
    and around the bounds (d = 0) it is PyTorch's hardtanh_backward bitwise (0 AT L and H). The bounds are
    PyTorch's: rounded to float32 for float32 tensors (-0.3 and 2.7 are not float32 values)."""
    dev = backend_device(backend)
    k = kernel_act(("hardtanh", params))
    lo, hi = k.p0, k.p1
    pairs = [(lo + 0.25, hi - 0.25), (hi - 0.25, lo + 0.25), (lo - 1, lo + 0.5), (hi + 2, lo + 0.125), (lo - 3, hi + 5),
             (lo - 3, lo - 1), (hi + 1, hi + 4), (lo, hi), (hi, lo), (lo - 2**-20, lo + 2**-21), (hi - 2**-21, hi + 2**-19),
             (-3e38, 3e38), (3e38, -3e38), (-3e38, lo + 0.5), (-math.inf, 0.5 * (lo + hi)), (hi, math.inf),
             (-math.inf, math.inf)]
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor([p[0] for p in pairs], dtype=dtype)
        xn = torch.tensor([p[1] for p in pairs], dtype=dtype)
        L, H = (float(torch.tensor(v, dtype=dtype)) for v in (lo, hi))  # f's bounds in this dtype
        want = []
        for a, b in zip(x.tolist(), xn.tolist()):
            if math.isinf(a) or math.isinf(b):
                want.append(0.0)  # bounded: one end infinite, or opposite infinities
                continue
            fa, fb = (Fraction(min(max(v, L), H)) for v in (a, b))
            want.append(float((fb - fa) / (Fraction(b) - Fraction(a))))
        want = torch.tensor(want, dtype=torch.float64)
        out = ak.avg_act_backward(torch.ones_like(x).to(dev), x.to(dev), xn.to(dev), "hardtanh", backend=backend,
                                  **params).cpu().double()
        fi = torch.finfo(dtype)  # a few roundings, and the subnormal grid ((-3e38, L + 0.5): s = 1.7e-39)
        assert ((out - want).abs() <= 4 * fi.eps * want.abs() + fi.smallest_normal * fi.eps).all(), (dtype, out, want)
        assert (out[want == 1] == 1).all() and (out[want == 0] == 0).all()
    bounds = torch.tensor([lo, hi], dtype=torch.float32)
    for dtype in (torch.float32, torch.float64):
        b = bounds.to(dtype)
        up, down = torch.tensor(math.inf, dtype=dtype), torch.tensor(-math.inf, dtype=dtype)
        xk = torch.cat([b, torch.nextafter(b, up), torch.nextafter(b, down), torch.tensor([lo, hi, 0.0, -0.0]).to(dtype),
                        (b[:1] + b[1:]) / 2])
        g = torch.randn(len(xk), dtype=dtype)
        out = ak.avg_act_backward(g.to(dev), xk.to(dev), xk.to(dev), "hardtanh", backend=backend, **params).cpu()
        assert torch.equal(out, native_backward(g, xk, forward(xk, k), k)), (dtype, xk, out)
        assert torch.equal(out[:2], torch.zeros(2, dtype=dtype))  # PyTorch: f'(L) = f'(H) = 0


# ---- the op contract -------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_avg_act_forward_and_backward_bitwise_pytorch_without_x_new(cfg, fresh_seed):
    k = kernel_act(cfg)
    x = (torch.randn(257) * 3).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    y = ak.avg_act(x, cfg[0], **cfg[1])
    y_ref = forward(x_ref, k)
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)


def test_avg_act_backward_uses_secant_with_x_new(backend, fresh_seed):
    dev = backend_device(backend)
    g, x, xn = spec_inputs(1000, device=dev)
    x = x.clone().requires_grad_()
    xn.requires_grad_()  # never receives a gradient
    y = ak.avg_act(x, "silu", xn, backend=backend)
    y.backward(g)
    expected = ak.avg_act_backward(g, x.detach(), xn.detach(), "silu", backend=backend)
    assert torch.equal(x.grad, expected)
    assert xn.grad is None


def test_use_backend_and_keyword(fresh_seed):
    g, x, xn = spec_inputs(100)
    with ak.use_backend("reference"):
        assert ak.current_backend() == "reference"
        a = ak.avg_act_backward(g, x, xn, "tanh")
        with ak.use_backend("cpu"):
            assert ak.current_backend() == "cpu"
        b = ak.avg_act_backward(g, x, xn, "tanh", backend="cpu")  # the keyword beats the context
    assert ak.current_backend() is None
    torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)
    assert "reference" in ak.available_backends()


def test_unavailable_backend_says_why():
    g, x, xn = spec_inputs(10)
    if "cuda" not in ak.available_backends():
        with pytest.raises(ak.BackendUnavailableError, match="cuda"):
            ak.avg_act_backward(g, x, xn, "tanh", backend="cuda")
    with pytest.raises(ValueError, match="backend='fast'"):
        ak.avg_act_backward(g, x, xn, "tanh", backend="fast")
    with pytest.raises(ValueError, match="backend='fast'"):
        with ak.use_backend("fast"):
            pass


def test_opcheck(backend, fresh_seed):
    dev = backend_device(backend)
    g, x, xn = spec_inputs(64, device=dev)
    for act, params in [("tanh", [0.0, 0.0]), ("softplus", [2.0, 10.0]), ("leaky_relu", [0.1, 0.0]), ("hardtanh", [0.0, 6.0])]:
        torch.library.opcheck(torch.ops.avg_kernels.avg_act_backward.default,
                              (g, x, xn, act, params, EPS, backend))
        torch.library.opcheck(torch.ops.avg_kernels.avg_act.default,
                              (x.clone().requires_grad_(), xn, act, params, EPS, backend))
        torch.library.opcheck(torch.ops.avg_kernels.avg_act.default,
                              (x.clone().requires_grad_(), None, act, params, EPS, backend))


def test_torch_compile_fullgraph(fresh_seed):
    g, x, xn = spec_inputs(512)

    def f(x, xn):
        return (ak.avg_act(x, "gelu", xn, approximate="tanh") * 2).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    xa = x.clone().requires_grad_()
    xb = x.clone().requires_grad_()
    compiled(xa, xn).backward()
    f(xb, xn).backward()
    assert torch.equal(xa.grad, xb.grad)
    gb = torch.compile(lambda g, x, xn: ak.avg_act_backward(g, x, xn, "elu", alpha=0.5), fullgraph=True)
    torch.testing.assert_close(gb(g, x, xn), ak.avg_act_backward(g, x, xn, "elu", alpha=0.5))


# ---- bad input (SPEC §6) ---------------------------------------------------------------------

def test_bad_input_errors_name_the_argument():
    g, x, xn = spec_inputs(8)
    with pytest.raises(ValueError, match="act='swish'"):
        ak.avg_act_backward(g, x, xn, "swish")
    with pytest.raises(TypeError, match="unexpected"):
        ak.avg_act_backward(g, x, xn, "tanh", alpha=1.0)
    with pytest.raises(TypeError, match="negative_slope"):
        ak.avg_act_backward(g, x, xn, "leaky_relu", negative_slope="0.1")
    with pytest.raises(ValueError, match="approximate"):
        ak.avg_act_backward(g, x, xn, "gelu", approximate="erf")
    with pytest.raises(ValueError, match="beta"):
        ak.avg_act_backward(g, x, xn, "softplus", beta=-1.0)
    with pytest.raises(ValueError, match="min_val=2.0 > max_val=1.0"):
        ak.avg_act_backward(g, x, xn, "hardtanh", min_val=2.0)
    with pytest.raises(ValueError, match="max_val=inf"):
        ak.avg_act_backward(g, x, xn, "hardtanh", max_val=math.inf)
    with pytest.raises(TypeError, match="unexpected"):
        ak.avg_act_backward(g, x, xn, "relu6", max_val=5.0)
    with pytest.raises(ValueError, match="x_new has shape"):
        ak.avg_act_backward(g, x, xn[:4], "tanh")
    with pytest.raises(ValueError, match="grad_out has shape"):
        ak.avg_act_backward(g[:4], x, xn, "tanh")
    with pytest.raises(TypeError, match="x_new has dtype torch.float64"):
        ak.avg_act_backward(g, x, xn.double(), "tanh")
    with pytest.raises(TypeError, match="x has dtype torch.int64"):
        ak.avg_act_backward(g, x.long(), xn, "tanh")
    with pytest.raises(TypeError, match="grad_out must be a torch.Tensor"):
        ak.avg_act_backward([1.0], x, xn, "tanh")
    with pytest.raises(ValueError, match="eps=-1"):
        ak.avg_act_backward(g, x, xn, "tanh", eps=-1.0)
    with pytest.raises(ValueError, match="x_new has shape"):
        ak.avg_act(x, "tanh", xn[:3])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="is on cuda"):
            ak.avg_act_backward(g, x, xn.cuda(), "tanh")


def test_internal_op_checks_too():
    g, x, xn = spec_inputs(8)
    out = torch.empty(4)
    if "cpu" in ak.available_backends():
        with pytest.raises(RuntimeError, match="one shape"):
            torch.ops.avg_kernels_C.avg_act_backward_out(g, x, xn, out, 0, 0.0, 0.0, EPS)


# ---- the reference itself --------------------------------------------------------------------

def test_reference_against_mpmath(fresh_seed):
    """The float64 reference (the kernels' identities in float64) against 50-digit arithmetic on a sample
    (float32 inputs: the literal secant at 50 digits is exact to far below the float32 bar; float64 inputs are
    checked against the exact oracle in tests/test_properties.py)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    fns = {
        "tanh": mpmath.tanh,
        "sigmoid": lambda t: 1 / (1 + mpmath.exp(-t)),
        "gelu": lambda t: t * mpmath.ncdf(t),
        "silu": lambda t: t / (1 + mpmath.exp(-t)),
        "elu": lambda t: t if t > 0 else mpmath.expm1(t),
        "softplus": lambda t: t if t > 20 else mpmath.log1p(mpmath.exp(t)),
        "hardswish": lambda t: t * min(max(t + 3, 0), 6) / 6,
        "hardsigmoid": lambda t: min(max(t + 3, 0), 6) / 6,
        "hardtanh": lambda t: min(max(t, -1), 1),
        "relu6": lambda t: min(max(t, 0), 6),
    }
    g, x, xn = spec_inputs(300, dtype=torch.float32)
    for name, fn in fns.items():
        k = kernel_act((name, {}))
        s_ref = reference.avg_act_backward(torch.ones(300), x, xn, k, EPS).double()
        for i in range(300):
            a, b = mpmath.mpf(float(x[i])), mpmath.mpf(float(xn[i]))
            if abs(b - a) <= EPS:
                continue  # the fallback, tested against PyTorch's backward above
            exact = float((fn(b) - fn(a)) / (b - a))
            assert abs(float(s_ref[i]) - exact) <= 1e-6 * abs(exact) + 1e-7, (name, float(a), float(b))


def test_header_f_and_fprime_match_pytorch(fresh_seed):
    """The header's f (act_value) and f' (the fallback) agree with PyTorch's forward and backward."""
    if "cpu" not in ak.available_backends():
        pytest.skip("C++ extension not built")
    x = torch.cat([torch.randn(5000) * 3, (torch.rand(5000) * 2 - 1) * 30])
    for cfg in CONFIGS:
        k = kernel_act(cfg)
        for dtype in (torch.float32, torch.float64):
            xd = x.to(dtype)
            val = hook_ops().act_value(xd, k.kernel_id, k.p0, k.p1)
            exact = forward(xd.double(), k)
            tol = 4 * torch.finfo(dtype).eps * (exact.abs() + 1e-30) + (1e-7 if dtype == torch.float32 else 1e-15)
            assert ((val.double() - exact).abs() <= tol).all(), config_id(cfg)


@pytest.mark.parametrize("name", sorted(ak.ACTIVATIONS))
def test_avg_act_double_backward_is_pytorchs(name, fresh_seed):
    """Outside an AG pass avg_act's gradient is PyTorch's, and so is its derivative (create_graph=True):
    silu's aten backward has none, so under grad mode it runs PyTorch's own differentiable composite
    (derivatives.yaml's switch); hardsigmoid's gets a zero derivative in x (PyTorch 2.13 raises there).
    The first gradient stays bitwise PyTorch's in both modes; gradgradcheck passes."""
    fn = getattr(torch.nn.functional, name)
    x = (torch.randn(64, dtype=torch.float64) * 4).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    g, = torch.autograd.grad(ak.avg_act(x, name).sum(), x, create_graph=True)
    g_torch, = torch.autograd.grad(fn(x2).sum(), x2, create_graph=True)
    assert torch.equal(g, g_torch)
    plain, = torch.autograd.grad(ak.avg_act(x, name).sum(), x)
    plain_torch, = torch.autograd.grad(fn(x2).sum(), x2)
    assert torch.equal(plain, plain_torch)
    gg, = torch.autograd.grad((g * torch.linspace(-1, 1, 64, dtype=torch.float64)).sum(), x)
    if name == "hardsigmoid":
        assert not gg.any()
    else:
        gg_torch, = torch.autograd.grad((g_torch * torch.linspace(-1, 1, 64, dtype=torch.float64)).sum(), x2)
        assert torch.equal(gg, gg_torch)
    assert torch.autograd.gradgradcheck(lambda v: ak.avg_act(v, name), (x.detach()[:6].clone().requires_grad_(True),))
