"""AG-1 update and AG-2 rescale (SPEC §2): every backend against the float64 reference and against an
exact emulation of the kernels' arithmetic, special values, layouts, dtypes, bad input (nothing written
before an error), the grad-mode guard, opcheck and torch.compile."""
from __future__ import annotations

import math

import pytest
import torch

import avg_kernels as ak
from avg_kernels import reference
from avg_kernels._contract import lists as _lists
from avg_kernels.ops.ag_update import AG1, AG2

from conftest import backend_device, interpreted

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------------------------
# Inputs.
# ---------------------------------------------------------------------------------------------
def shapes_for(backend: str) -> list[tuple]:
    """Model-like shapes: 0-d, empty, odd sizes, 2^k +- 1, conv weights; smaller when interpreted."""
    base = [(), (0,), (0, 3), (1,), (7,), (33,), (3, 5, 7), (64,), (16, 3, 3, 3), (1023,), (1025,)]
    if interpreted(backend):
        return base + [(2, 2049)]
    return base + [(4097,), (64, 64, 3, 3), (100, 300), (65537,)]


def _rand(shape, dtype, device, scale=1.0):
    return (torch.randn(shape, dtype=torch.float64) * scale).to(dtype).to(device)


def _strictly_moving(p, q):
    """q with every element != p (so a forgotten element always shows)."""
    bump = torch.where(q == p, torch.ones_like(p), torch.zeros_like(p))
    return q + bump


def ag1_lists(shapes, dtypes, device, none_every=0):
    """Random (params, params_new, avg_grads) whose exact result differs from params in every
    element: ḡ nonzero and θ' != θ everywhere (special values have their own tests)."""
    ps, qs, gs = [], [], []
    for k, shape in enumerate(shapes):
        dp, dq, dg = dtypes[k % len(dtypes)]
        p = _rand(shape, dp, device)
        # a step of at least 4 ulps of the coarser dtype: θ ± |θ' − θ| never rounds back to θ
        step = _rand(shape, torch.float64, device, 0.1)
        least = 4 * max(torch.finfo(dp).eps, torch.finfo(dq).eps) * p.double().abs() + torch.finfo(dp).tiny
        step = torch.where(step < 0, -1.0, 1.0) * torch.maximum(step.abs(), least)
        q = (p.double() + step).to(dq)
        g = _rand(shape, dg, device)
        g = torch.where(g == 0, torch.ones_like(g), g)
        ps.append(p)
        qs.append(q)
        gs.append(None if none_every and k % none_every == none_every - 1 else g)
    return ps, qs, gs


def ag2_lists(shapes, dtypes, device):
    """Random (params = θ'', params_old = θ, params_step = θ')."""
    ps, os_, ss = [], [], []
    for k, shape in enumerate(shapes):
        dp, do, ds = dtypes[k % len(dtypes)]
        o = _rand(shape, do, device)
        ps.append((o.double() + _rand(shape, torch.float64, device, 0.01)).to(dp))
        os_.append(o)
        ss.append((o.double() + _rand(shape, torch.float64, device, 0.02)).to(ds))
    return ps, os_, ss


def clone_all(ts):
    return [None if t is None else t.clone() for t in ts]


# ---------------------------------------------------------------------------------------------
# What the kernels compute, exactly: float32 arithmetic (float64 if a member is float64), the same
# operations in the same order, one rounding to the parameter's dtype.
# ---------------------------------------------------------------------------------------------
def _op_dtype(*ts):
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def exact_ag1(p, q, g, into=None):
    """θ_{t+1} as the kernels compute it, rounded to ``into`` (default p's dtype; ag1_update_new_ writes q's)."""
    into = p.dtype if into is None else into
    if g is None:
        return p.clone()
    op = _op_dtype(p, q, g)
    t, qq, gg = p.to(op), q.to(op), g.to(op)
    d = (qq - t).abs()
    r = torch.where(gg > 0, t - d, torch.where(gg < 0, t + d, torch.where(gg == 0, t, gg)))
    return r.to(torch.float32).to(into) if into in (torch.float16, torch.bfloat16) else r.to(into)


def numpy_ag1(p, q, g):
    """SPEC §2 written with numpy in float64 (numpy's sign: sign(nan) = nan), ḡ = 0 keeping θ."""
    import numpy as np

    t, qq, gg = (x.detach().cpu().double().numpy() for x in (p, q, g))
    with np.errstate(invalid="ignore"):
        r = np.where(gg == 0, t, t - np.abs(qq - t) * np.sign(gg))
    return torch.from_numpy(r).to(p.dtype).to(p.device)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (any payload), and equal signs of zeros."""
    a, b = a.cpu(), b.cpu()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return False
    a, b = a[~na], b[~nb]
    if not a.is_floating_point():
        return torch.equal(a, b)
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


DTYPE_MIXES = {
    "f32": [(torch.float32,) * 3],
    "f64": [(torch.float64,) * 3],
    "f16": [(torch.float16,) * 3],
    "bf16": [(torch.bfloat16,) * 3],
    "mixed": [(torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.float32, torch.float64),
              (torch.float16, torch.bfloat16, torch.float32), (torch.float32,) * 3, (torch.float64, torch.float16, torch.bfloat16),
              (torch.bfloat16,) * 3, (torch.float16,) * 3],
}


# ---------------------------------------------------------------------------------------------
# AG-1 parity.
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_ag1_exact_arithmetic(backend, mix, fresh_seed):
    """Every backend computes exactly the float32/float64 arithmetic of SPEC §2 (bit for bit): AG-1 has
    one subtraction, one absolute value and one sum per element, no product to fuse."""
    if backend == "reference":
        pytest.skip("the reference computes in float64 (test_reference_is_numpy_float64)")
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists(shapes_for(backend), DTYPE_MIXES[mix], dev, none_every=4)
    before = clone_all(ps)
    expected = [exact_ag1(p, q, g) for p, q, g in zip(before, qs, gs)]
    # every element of a non-skipped tensor must change: an element a kernel forgets cannot pass
    for e, b, g in zip(expected, before, gs):
        if g is not None and b.numel():
            assert (e != b).all()
    ak.ag1_update_(ps, qs, gs, backend=backend)
    for k, (p, e) in enumerate(zip(ps, expected)):
        assert same_bits(p, e), f"entry {k}: shape {tuple(p.shape)} {p.dtype}"


@pytest.mark.parametrize("mix", ["f32", "mixed", "bf16", "f64"])
def test_reference_is_numpy_float64(mix, fresh_seed):
    """The reference (ground truth for the tolerances below) against an independent numpy version."""
    ps, qs, gs = ag1_lists(shapes_for("cpu"), DTYPE_MIXES[mix], torch.device("cpu"), none_every=3)
    expected = [p.clone() if g is None else numpy_ag1(p, q, g) for p, q, g in zip(ps, qs, gs)]
    reference.ag1_update_(ps, qs, gs)
    assert all(same_bits(p, e) for p, e in zip(ps, expected))


@pytest.mark.parametrize("mix", ["f32", "mixed", "bf16"])
def test_ag1_matches_float64_reference(backend, mix, fresh_seed):
    """Against the float64 reference: within the float32 arithmetic's rounding plus one rounding to
    the parameter's dtype."""
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists(shapes_for(backend), DTYPE_MIXES[mix], dev, none_every=3)
    ref = clone_all(ps)
    reference.ag1_update_(ref, qs, gs)
    before = clone_all(ps)
    ak.ag1_update_(ps, qs, gs, backend=backend)
    for p, r, b, q in zip(ps, ref, before, qs):
        if p.numel() == 0:
            continue
        ulp = torch.finfo(p.dtype).eps * r.double().abs().clamp(min=torch.finfo(p.dtype).tiny)
        f32 = 2 * torch.finfo(torch.float32).eps * (b.double().abs() + (q.double() - b.double()).abs())
        assert ((p.double() - r.double()).abs() <= ulp + f32).all()


def test_ag1_special_values(backend):
    """sign(0) = 0 keeps θ (also when θ' is infinite); NaN in ḡ gives NaN in that element only;
    infinite steps move θ to ±inf; signed zeros follow the arithmetic."""
    dev = backend_device(backend)
    inf, nan = math.inf, math.nan
    #            θ      θ'     ḡ
    cases = [(1.5, 2.0, 0.0), (1.5, 2.0, -0.0), (1.5, inf, 0.0), (1.5, nan, 0.0), (-2.0, -1.0, nan),
             (1.0, 3.0, 1.0), (1.0, 3.0, -1.0), (1.0, inf, 1.0), (1.0, inf, -1.0), (1.0, nan, 1.0),
             (nan, 1.0, 1.0), (nan, 1.0, 0.0), (inf, 1.0, 1.0), (0.0, 0.0, 1.0), (-0.0, -0.0, 1.0),
             (-0.0, 0.0, -1.0), (0.0, 0.0, 0.0), (-0.0, 5.0, 0.0), (1e38, -1e38, 1.0), (3.0, 3.0, 1e-30),
             (2.0, 1.0, inf), (2.0, 1.0, -inf), (2.0, 1.0, 1e-45)]
    for dtype in FLOATS:
        p = torch.tensor([c[0] for c in cases], dtype=dtype, device=dev)
        q = torch.tensor([c[1] for c in cases], dtype=dtype, device=dev)
        g = torch.tensor([c[2] for c in cases], dtype=dtype, device=dev)
        expected = exact_ag1(p, q, g) if backend != "reference" else numpy_ag1(p, q, g)
        ref = p.clone()
        reference.ag1_update_([ref], [q], [g])
        ak.ag1_update_([p], [q], [g], backend=backend)
        assert same_bits(p, expected), (dtype, p, expected)
        assert torch.equal(p.isnan(), ref.isnan())
        # ḡ = ±0: θ exactly as before (bits included), whatever θ' is
        zero = (g == 0).cpu()
        assert same_bits(p.cpu()[zero], torch.tensor([c[0] for c in cases], dtype=dtype)[zero])


def test_ag1_zero_step_keeps_parameters(backend, fresh_seed):
    """θ' = θ: AG-1 leaves every parameter bitwise unchanged, whatever ḡ is (paper property)."""
    dev = backend_device(backend)
    ps, _, gs = ag1_lists(shapes_for(backend), DTYPE_MIXES["mixed"], dev)
    before = clone_all(ps)
    ak.ag1_update_(ps, clone_all(before), gs, backend=backend)
    assert all(same_bits(p, b) for p, b in zip(ps, before))


def test_ag1_none_entries_untouched(backend, fresh_seed):
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists(shapes_for(backend), DTYPE_MIXES["f32"], dev, none_every=2)
    before = clone_all(ps)
    ak.ag1_update_(ps, qs, gs, backend=backend)
    for p, b, g in zip(ps, before, gs):
        if g is None:
            assert same_bits(p, b)
        elif p.numel():
            assert not torch.equal(p, b)


def _layouts(dev):
    """(param, param_new, avg_grad) triples in assorted memory layouts, plus what to check."""
    base = torch.randn(12, 10, device=dev)
    cl = torch.randn(2, 3, 4, 5, device=dev).to(memory_format=torch.channels_last)
    return [
        ("transposed", torch.randn(10, 12, device=dev).t(), torch.randn(12, 10, device=dev), torch.randn(12, 10, device=dev).t().contiguous().t()),
        ("channels_last", cl, torch.randn(2, 3, 4, 5, device=dev), torch.randn(2, 3, 4, 5, device=dev).to(memory_format=torch.channels_last)),
        ("sliced", base[::2, 1::3], torch.randn(6, 3, device=dev), torch.randn(6, 9, device=dev)[:, ::3]),
        ("expanded_inputs", torch.randn(5, 4, device=dev), torch.randn(1, 4, device=dev).expand(5, 4), torch.randn(5, 1, device=dev).expand(5, 4)),
        ("offset_view", torch.randn(101, device=dev)[1:], torch.randn(101, device=dev)[1:], torch.randn(100, device=dev)),
    ], base


def assert_outside_slice_untouched(base, base_before):
    """The memory of ``_layouts``' base around its "sliced" parameter (base[::2, 1::3]) was not written."""
    untouched = torch.ones_like(base, dtype=torch.bool)
    untouched[::2, 1::3] = False
    assert torch.equal(base[untouched], base_before[untouched])


def test_ag1_layouts(backend, fresh_seed):
    """Non-contiguous parameters are updated in place (same storage), inputs of any strides; memory
    outside a sliced parameter is not touched."""
    dev = backend_device(backend)
    triples, base = _layouts(dev)
    base_before = base.clone()
    ps = [t[1] for t in triples]
    qs = [t[2] for t in triples]
    gs = [t[3] for t in triples]
    ptrs = [p.data_ptr() for p in ps]
    expect = numpy_ag1 if backend == "reference" else exact_ag1
    expected = [expect(p.clone(), q, g) for p, q, g in zip(ps, qs, gs)]
    ak.ag1_update_(ps, qs, gs, backend=backend)
    for (name, *_), p, e, ptr in zip(triples, ps, expected, ptrs):
        assert p.data_ptr() == ptr
        assert same_bits(p, e), name
    assert_outside_slice_untouched(base, base_before)


# ---------------------------------------------------------------------------------------------
# AG-2 parity.
# ---------------------------------------------------------------------------------------------
def _ag2_tol(p_out, ref, old, step_scale_delta):
    """One rounding to the parameter's dtype (a 16-bit result may land one ulp away after float32
    arithmetic) + float32 arithmetic errors relative to |θ| + |Δ·scale|."""
    r = ref.double()
    ulp = torch.finfo(p_out.dtype).eps * r.abs().clamp(min=torch.finfo(p_out.dtype).tiny)
    arith = 8 * torch.finfo(torch.float32).eps * (old.double().abs() + step_scale_delta.abs())
    return ulp + arith


@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_ag2_matches_reference(backend, mix, fresh_seed):
    dev = backend_device(backend)
    ps, os_, ss = ag2_lists(shapes_for(backend), DTYPE_MIXES[mix], dev)
    n_step, n_delta = reference.ag_update.l1_norms(ps, os_, ss)
    scale = n_step / n_delta
    assert abs(scale - 1) > 0.5
    ref = clone_all(ps)
    reference.ag2_rescale_(ref, os_, ss)
    before = clone_all(ps)
    ak.ag2_rescale_(ps, os_, ss, backend=backend)
    for p, r, b, o in zip(ps, ref, before, os_):
        if p.numel() == 0:
            continue
        moved = (b.double() - o.double()) * scale
        err = (p.double() - r.double()).abs()
        assert (err <= _ag2_tol(p, r, o, moved)).all(), (p.dtype, err.max())
        if p.dtype in (torch.float32, torch.float64):
            # scale ~ 2: an element left as θ'' would be |Δ (scale - 1)| ~ |Δ| away, far beyond the error
            delta = b.double() - o.double()
            big = delta.abs() > 1e-4
            assert (err[big] <= 0.25 * (delta[big] * (scale - 1)).abs()).all()


def test_ag2_rescales_to_the_gradient_step_norm(backend, fresh_seed):
    """The defining property: afterwards ‖params − θ‖₁ = ‖θ' − θ‖₁ (float64 parameters: to 1e-12)."""
    dev = backend_device(backend)
    ps, os_, ss = ag2_lists(shapes_for(backend), DTYPE_MIXES["f64"], dev)
    target = sum((s - o).abs().sum().item() for s, o in zip(ss, os_))
    ak.ag2_rescale_(ps, os_, ss, backend=backend)
    got = sum((p - o).abs().sum().item() for p, o in zip(ps, os_))
    assert got == pytest.approx(target, rel=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ratio", ["underflow", "overflow"])
def test_ag2_scale_outside_float_range(backend, dtype, ratio):
    """A norm ratio ‖θ' − θ‖₁ / ‖Δ‖₁ outside float32's normal range (1e-50, 1e50) is still applied with float
    arithmetic: θ ← θ + Δ·scale lands on θ' (every |θ' − θ| is equal here, so the rescaled step is θ' − θ
    itself), where a float32 scale would be 0 (every parameter back at θ) or inf. (float16 values cannot
    make such a ratio.)"""
    dev = backend_device(backend)
    big, small = (1e30, 1e-20) if ratio == "underflow" else (1e-30, 1e20)
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    os_ = [torch.zeros(6, dtype=dtype, device=dev)]
    ps = [(signs * big).to(dtype).to(dev)]
    ss = [(signs * small).to(dtype).to(dev)]
    want = ss[0].cpu().double()
    ak.ag2_rescale_(ps, os_, ss, backend=backend)
    assert torch.isfinite(ps[0]).all()
    torch.testing.assert_close(ps[0].cpu().double(), want, rtol=4 * torch.finfo(dtype).eps, atol=0)


def test_ag2_zero_delta_changes_nothing(backend):
    """‖θ'' − θ‖₁ = 0: nothing is written (θ'' = -0 where θ = +0 stays -0, bit for bit)."""
    dev = backend_device(backend)
    os_ = [torch.tensor([0.0, 1.0, -2.0], device=dev), torch.zeros(4, dtype=torch.bfloat16, device=dev)]
    ps = [torch.tensor([-0.0, 1.0, -2.0], device=dev), -torch.zeros(4, dtype=torch.bfloat16, device=dev)]
    ss = [torch.tensor([5.0, 1.0, 0.0], device=dev), torch.ones(4, dtype=torch.bfloat16, device=dev)]
    before = clone_all(ps)
    ak.ag2_rescale_(ps, os_, ss, backend=backend)
    assert all(same_bits(p, b) for p, b in zip(ps, before))
    assert torch.signbit(ps[0][0]).item()


def test_ag2_zero_step_norm_returns_to_old(backend):
    """‖θ' − θ‖₁ = 0 (and ‖Δ‖₁ > 0): scale 0, params become θ exactly."""
    dev = backend_device(backend)
    os_ = [torch.randn(17, device=dev), torch.randn(3, 3, device=dev)]
    ps = [o + 1 for o in os_]
    ak.ag2_rescale_(ps, os_, clone_all(os_), backend=backend)
    assert all(torch.equal(p, o) for p, o in zip(ps, os_))


@pytest.mark.parametrize("where", ["delta_nan", "step_nan", "step_inf", "delta_inf"])
def test_ag2_non_finite_follow_the_formula(backend, where):
    """A NaN/inf in either norm spreads as the formula says (same as the float64 reference)."""
    dev = backend_device(backend)
    torch.manual_seed(3)
    ps, os_, ss = ag2_lists([(5,), (4, 3)], DTYPE_MIXES["f32"], dev)
    target = {"delta_nan": ps, "step_nan": ss, "step_inf": ss, "delta_inf": ps}[where]
    target[1][1, 2] = math.nan if where.endswith("nan") else math.inf
    ref = clone_all(ps)
    reference.ag2_rescale_(ref, os_, ss)
    ak.ag2_rescale_(ps, os_, ss, backend=backend)
    for p, r in zip(ps, ref):
        assert torch.equal(p.isnan(), r.isnan()), (where, p, r)
        assert torch.equal(p.isinf(), r.isinf())
        fin = r.isfinite()
        torch.testing.assert_close(p[fin], r[fin])


def test_ag2_bitwise_reproducible(backend, fresh_seed):
    dev = backend_device(backend)
    ps, os_, ss = ag2_lists(shapes_for(backend), DTYPE_MIXES["mixed"], dev)
    a, b = clone_all(ps), clone_all(ps)
    ak.ag2_rescale_(a, os_, ss, backend=backend)
    ak.ag2_rescale_(b, os_, ss, backend=backend)
    assert all(same_bits(x, y) for x, y in zip(a, b))


def test_ag2_layouts(backend, fresh_seed):
    dev = backend_device(backend)
    triples, base = _layouts(dev)
    base_before = base.clone()
    ps = [t[1] for t in triples]
    os_ = [torch.randn(t[1].shape, device=dev) for t in triples]
    ss = [t[3] for t in triples]
    ref = clone_all(ps)
    reference.ag2_rescale_(ref, os_, ss)
    ptrs = [p.data_ptr() for p in ps]
    ak.ag2_rescale_(ps, os_, ss, backend=backend)
    for p, r, ptr in zip(ps, ref, ptrs):
        assert p.data_ptr() == ptr
        torch.testing.assert_close(p, r, rtol=1e-6, atol=1e-6)
    assert_outside_slice_untouched(base, base_before)


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="the C++ extension is not built")
def test_cpu_results_do_not_depend_on_thread_count():
    torch.manual_seed(5)
    shapes = [(300, 300), (7,), (100000,), (64, 64, 3, 3)] * 3
    ps, os_, ss = ag2_lists(shapes, DTYPE_MIXES["mixed"], torch.device("cpu"))
    threads = torch.get_num_threads()
    outs, norms = [], []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            a = clone_all(ps)
            norms.append(torch.ops.avg_kernels_C.ag2_rescale_(a, os_, ss))
            outs.append(a)
    finally:
        torch.set_num_threads(threads)
    for k in (1, 2):
        assert torch.equal(norms[0], norms[k])
        assert all(same_bits(x, y) for x, y in zip(outs[0], outs[k]))
    n_step, n_delta = reference.ag_update.l1_norms(ps, os_, ss)
    assert norms[0][0].item() == pytest.approx(n_step, rel=1e-9)
    assert norms[0][1].item() == pytest.approx(n_delta, rel=1e-9)


# ---------------------------------------------------------------------------------------------
# Bad input: the error names the argument, and nothing has been written.
# ---------------------------------------------------------------------------------------------
def _bad_cases(dev):
    f = lambda *s, dtype=torch.float32: torch.randn(*s, device=dev).to(dtype)  # noqa: E731
    base = f(10)
    shared = f(8)
    cases = [
        ("length", ([f(3), f(4)], [f(3)], [f(3), f(4)]), ValueError, "params_new has 1 entries but params has 2"),
        ("length3", ([f(3)], [f(3)], [f(3), None]), ValueError, "has 2 entries but params has 1"),
        ("shape", ([f(3), f(4)], [f(3), f(5)], [f(3), f(4)]), ValueError,
         r"params_new\[1\] has shape \(5,\) but params\[1\] has shape \(4,\)"),
        ("shape0d", ([f(3), torch.tensor(1.0, device=dev)], [f(3), f(1)], [f(3), f(1)]), ValueError,
         r"params_new\[1\] has shape \(1,\) but params\[1\] has shape \(\)"),
        ("dtype_param", ([f(3), torch.arange(4, device=dev)], [f(3), f(4)], [f(3), f(4)]), TypeError,
         r"params\[1\] has dtype torch.int64; expected float16, bfloat16, float32 or float64"),
        ("dtype_last", ([f(3), f(4)], [f(3), f(4)], [f(3), f(4) > 0]), TypeError, r"\[1\] has dtype torch.bool"),
        ("complex", ([f(3)], [torch.zeros(3, dtype=torch.complex64, device=dev)], [f(3)]), TypeError,
         r"\[0\] has dtype torch.complex64"),
        ("device", ([f(3), f(4)], [f(3), torch.randn(4, device="meta")], [f(3), f(4)]), ValueError,
         r"params_new\[1\] is on meta but params\[0\] is on " + str(dev)),
        ("expanded", ([f(3), f(1).expand(4)], [f(3), f(4)], [f(3), f(4)]), ValueError,
         r"params\[1\] has internally overlapping memory"),
        ("duplicate", ([base, f(3), base], [f(10), f(3), f(10)], [f(10), f(3), f(10)]), ValueError,
         r"params\[0\] overlaps params\[2\] in memory"),
        ("partial", ([base[:6], base[4:]], [f(6), f(6)], [f(6), f(6)]), ValueError,
         r"params\[0\] overlaps params\[1\] in memory"),
        ("cross_index", ([shared, f(8)], [f(8), shared], [f(8), f(8)]), ValueError,
         r"params\[0\] overlaps \w+\[1\] in memory"),
        ("same_index_alias", ([shared], [shared], [f(8)]), None, None),  # allowed: read before written
    ]
    return cases


def _check_bad(op_fn, args, exc, msg, backend):
    before = [clone_all(lst) for lst in args]
    with pytest.raises(exc, match=msg):
        op_fn(*args, backend=backend)
    for lst, b in zip(args, before):
        for t, c in zip(lst, b):
            if t is not None and t.device.type != "meta":
                assert same_bits(t, c), "a tensor changed before the error"


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases("cpu") if c[2] is not None])
def test_bad_input_ag1(backend, case):
    dev = backend_device(backend)
    _, args, exc, msg = next(c for c in _bad_cases(dev) if c[0] == case)
    _check_bad(ak.ag1_update_, args, exc, "ag1_update_: .*" + msg, backend)


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases("cpu") if c[2] is not None])
def test_bad_input_ag2(backend, case):
    dev = backend_device(backend)
    _, args, exc, msg = next(c for c in _bad_cases(dev) if c[0] == case)
    _check_bad(ak.ag2_rescale_, _as_ag2(args), exc, "ag2_rescale_: .*" + msg.replace("params_new", "params_old"), backend)


def _as_ag2(args):
    p, q, g = args
    return p, q, [torch.zeros(1) if x is None else x for x in g]


def test_same_index_aliasing_is_allowed(backend):
    """A parameter may be its own θ' (AG-1: zero step) or its own θ (AG-2: Δ = 0): every element is
    read before the same thread writes it."""
    dev = backend_device(backend)
    p = torch.randn(37, device=dev)
    before = p.clone()
    ak.ag1_update_([p], [p], [torch.randn(37, device=dev)], backend=backend)
    assert torch.equal(p, before)
    ak.ag2_rescale_([p], [p], [torch.randn(37, device=dev)], backend=backend)
    assert torch.equal(p, before)


def test_not_a_list_or_not_tensors():
    x = torch.randn(3)
    with pytest.raises(TypeError, match=r"ag1_update_: params must be a list or tuple of tensors, got Tensor"):
        ak.ag1_update_(x, [x], [x])
    with pytest.raises(TypeError, match=r"ag1_update_: params_new\[1\] must be a Tensor, got float"):
        ak.ag1_update_([x, x.clone()], [x, 1.0], [x, x])
    with pytest.raises(TypeError, match=r"ag2_rescale_: params_step\[0\] must be a Tensor, got NoneType"):
        ak.ag2_rescale_([x], [x], [None])
    with pytest.raises(TypeError, match=r"ag1_update_: avg_grads must be a list or tuple of tensors, got int"):
        ak.ag1_update_([x], [x], 3)


def test_generators_are_accepted():
    """A model's parameters() generator works as a list would."""
    m = torch.nn.Linear(3, 2)
    new = [p.detach() + 1 for p in m.parameters()]
    g = [torch.ones_like(p) for p in m.parameters()]
    before = [p.detach().clone() for p in m.parameters()]
    with torch.no_grad():
        ak.ag1_update_(m.parameters(), new, g)
    for p, b in zip(m.parameters(), before):
        torch.testing.assert_close(p.detach(), b - 1)


@pytest.mark.parametrize("op", [AG1, AG2])
def test_requires_grad_with_grad_mode_is_an_error(backend, op):
    dev = backend_device(backend)
    w = torch.nn.Parameter(torch.randn(4, device=dev))
    other = torch.randn(4, device=dev)
    before = w.detach().clone()
    fn = ak.ag1_update_ if op == AG1 else ak.ag2_rescale_
    msg = rf"{op}: params\[1\] requires grad and grad mode is enabled; .* torch.no_grad\(\)"
    with pytest.raises(ValueError, match=msg):
        fn([other.clone(), w], [other, other + 1], [other, other - 1], backend=backend)
    with pytest.raises(ValueError, match=msg):  # the torch.ops entry point is guarded too
        getattr(torch.ops.avg_kernels, op)([other.clone(), w], [other, other + 1], [other, other - 1], backend)
    assert torch.equal(w.detach(), before)
    with torch.no_grad():
        fn([other.clone(), w], [other, other + 1], [other, other - 1], backend=backend)
    assert not torch.equal(w.detach(), before)


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("op", [AG1, AG2])
def test_cpp_and_python_checks_agree(op):
    """csrc/ag_lists.h and _contract/lists.py raise the same exception types and messages."""
    names = ("params", "params_new", "avg_grads") if op == AG1 else ("params", "params_old", "params_step")
    cpp = getattr(torch.ops.avg_kernels_C, "ag1_check" if op == AG1 else "ag2_check")
    n = 0
    for case, args, exc, msg in _bad_cases("cpu"):
        if op == AG2:
            args = _as_ag2(args)
        errs = []
        for check in (lambda: cpp(*args), lambda: _lists.check_lists(op, names, args)):
            try:
                check()
                errs.append(None)
            except (ValueError, TypeError) as e:
                errs.append((type(e), str(e).split("\n")[0]))
        assert errs[0] == errs[1], case
        assert (errs[0] is None) == (exc is None), (case, errs[0])
        n += errs[0] is not None
    assert n >= 10


def test_unknown_and_unavailable_backends():
    x = [torch.randn(3)]
    with pytest.raises(ValueError, match="backend='nope' is not a backend"):
        ak.ag1_update_(x, x, x, backend="nope")
    with pytest.raises(ValueError, match="backend='nope' is not a backend"):
        ak.ag2_rescale_([], [], [], backend="nope")
    if not torch.cuda.is_available():
        with pytest.raises(ak.BackendUnavailableError, match="'cuda'"):
            ak.ag1_update_(x, x, x, backend="cuda")


def test_empty_lists(backend):
    ak.ag1_update_([], [], [], backend=backend)
    ak.ag2_rescale_([], [], [], backend=backend)
    with pytest.raises(ValueError, match="params_new has 1 entries but params has 0"):
        ak.ag1_update_([], [torch.randn(2)], [], backend=backend)


def test_use_backend_context(fresh_seed):
    ps, qs, gs = ag1_lists([(5,), (3, 3)], DTYPE_MIXES["f32"], torch.device("cpu"))
    a, b = clone_all(ps), clone_all(ps)
    with ak.use_backend("reference"):
        ak.ag1_update_(a, qs, gs)
    reference.ag1_update_(b, qs, gs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


# ---------------------------------------------------------------------------------------------
# torch.library contract.
# ---------------------------------------------------------------------------------------------
def test_schemas():
    s1 = str(torch.ops.avg_kernels.ag1_update_.default._schema)
    s2 = str(torch.ops.avg_kernels.ag2_rescale_.default._schema)
    assert s1 == ('avg_kernels::ag1_update_(Tensor(a!)[] params, Tensor[] params_new, Tensor?[] avg_grads, '
                  'str backend="auto") -> ()')
    assert s2 == ('avg_kernels::ag2_rescale_(Tensor(a!)[] params, Tensor[] params_old, Tensor[] params_step, '
                  'str backend="auto") -> ()')


def test_opcheck(backend, fresh_seed):
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists([(3, 4), (), (5,), (0,)], DTYPE_MIXES["mixed"], dev, none_every=3)
    torch.library.opcheck(torch.ops.avg_kernels.ag1_update_.default, (ps, qs, gs, backend))
    ps, os_, ss = ag2_lists([(3, 4), (), (5,)], DTYPE_MIXES["mixed"], dev)
    torch.library.opcheck(torch.ops.avg_kernels.ag2_rescale_.default, (ps, os_, ss, backend))


def test_torch_compile_fullgraph(backend, fresh_seed):
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists([(3, 4), (5,)], DTYPE_MIXES["f32"], dev)
    os_ = clone_all(ps)

    def step(params, new, grads, old, stepped):
        ak.ag1_update_(params, new, grads, backend=backend)
        ak.ag2_rescale_(params, old, stepped, backend=backend)
        return params[0].sum()

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    a, b = clone_all(ps), clone_all(ps)
    out_c = compiled(a, qs, gs, os_, qs)
    out_e = step(b, qs, gs, os_, qs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.testing.assert_close(out_c, out_e)


@pytest.mark.parametrize("op", [AG1, AG2])
def test_version_counters_bumped(backend, op):
    """In-place writes are visible to autograd: a graph that saved a parameter refuses to backward
    through a value the op overwrote."""
    dev = backend_device(backend)
    w = torch.randn(5, device=dev, requires_grad=True)
    v = w.detach()  # shares w's version counter
    y = (w * w).sum()  # saves w
    v0 = v._version
    fn = ak.ag1_update_ if op == AG1 else ak.ag2_rescale_
    fn([v], [v + 1], [torch.ones_like(v) if op == AG1 else v + 2], backend=backend)
    assert v._version > v0
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_python_checks_run_without_the_extension(monkeypatch):
    """Without the compiled extension the reference and Triton backends check in Python (same errors)."""
    from avg_kernels import _build

    monkeypatch.setattr(_build, "extension", lambda: None)
    base = torch.randn(10)
    p = [base[:5], torch.randn(4)]
    before = clone_all(p)
    with pytest.raises(ValueError, match=r"ag1_update_: params_new\[1\] has shape \(5,\) but params\[1\] has shape \(4,\)"):
        ak.ag1_update_(p, [torch.randn(5), torch.randn(5)], [None, torch.randn(4)], backend="reference")
    with pytest.raises(ValueError, match=r"ag2_rescale_: params\[0\] overlaps params_step\[1\] in memory"):
        ak.ag2_rescale_(p, [torch.randn(5), torch.randn(4)], [torch.randn(5), base[3:7]], backend="reference")
    assert all(torch.equal(x, y) for x, y in zip(p, before))


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="the C++ extension is not built")
def test_torch_compile_inductor(fresh_seed):
    """The default torch.compile backend (Inductor) with the mutating list ops inside the graph."""
    ps, qs, gs = ag1_lists([(3, 4), (5,)], DTYPE_MIXES["f32"], torch.device("cpu"))
    os_ = clone_all(ps)

    def step(params, new, grads, old, stepped):
        ak.ag1_update_(params, new, grads)
        ak.ag2_rescale_(params, old, stepped)
        return params[0].sum()

    torch._dynamo.reset()
    a, b = clone_all(ps), clone_all(ps)
    out_c = torch.compile(step, fullgraph=True)(a, qs, gs, os_, qs)
    out_e = step(b, qs, gs, os_, qs)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    torch.testing.assert_close(out_c, out_e)


# ---------------------------------------------------------------------------------------------
# GPU-only properties (run by bench/gpu_check.sh on a CUDA machine; skipped here).
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
def test_gpu_no_host_synchronisation(backend_name):
    """SPEC §2: no device-to-host synchronisation (AG-2's scale stays on the device)."""
    if backend_name not in ak.available_backends():
        pytest.skip(f"{backend_name} unavailable")
    ps, qs, gs = ag1_lists([(300, 70), (5,), (3, 3, 3, 3)], DTYPE_MIXES["mixed"], torch.device("cuda"))
    for _ in range(2):  # the second call runs with compiled kernels / warm caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            ak.ag1_update_(ps, qs, gs, backend=backend_name)
            ak.ag2_rescale_(ps, qs, [q + 1 for q in qs], backend=backend_name)
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend_name", ["cuda", "triton"])
@pytest.mark.parametrize("n", [4, 200])
def test_gpu_launch_count(backend_name, n):
    """Kernel launches per call do not grow with the number of tensors (SPEC §2 "Launch count")."""
    if backend_name not in ak.available_backends():
        pytest.skip(f"{backend_name} unavailable")
    from torch.profiler import ProfilerActivity, profile

    ps = [torch.randn(7, device="cuda") for _ in range(n)]
    qs = [p + 1 for p in ps]
    gs = [torch.ones(7, device="cuda") for _ in range(n)]
    ak.ag1_update_(ps, qs, gs, backend=backend_name)  # compile / warm up
    ak.ag2_rescale_(ps, qs, gs, backend=backend_name)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        ak.ag1_update_(ps, qs, gs, backend=backend_name)
        ak.ag2_rescale_(ps, qs, gs, backend=backend_name)
        torch.cuda.synchronize()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ag = [nm for nm in names if "ag1" in nm or "ag2" in nm]
    assert len(ag) == 4, names  # AG-1: 1; AG-2: reduce + final + scale


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture():
    """The CUDA backend keeps everything in kernel arguments and device memory: it can be captured in
    a CUDA graph and replayed (the tensors' addresses are baked in, as for any captured step)."""
    if "cuda" not in ak.available_backends():
        pytest.skip("cuda unavailable")
    torch.manual_seed(0)
    ps, qs, gs = ag1_lists([(300, 70), (5,), (3, 3, 3, 3)], DTYPE_MIXES["f32"], torch.device("cuda"))
    start = clone_all(ps)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        ak.ag1_update_(ps, qs, gs, backend="cuda")  # warm up outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        ak.ag1_update_(ps, qs, gs, backend="cuda")
        ak.ag2_rescale_(ps, start, qs, backend="cuda")
    for p, st in zip(ps, start):
        p.copy_(st)
    graph.replay()
    expected = clone_all(start)
    ak.ag1_update_(expected, qs, gs, backend="cuda")
    ak.ag2_rescale_(expected, start, qs, backend="cuda")
    assert all(same_bits(a, b) for a, b in zip(ps, expected))


@pytest.mark.parametrize("shape,fmt", [((2, 0, 1, 1), torch.channels_last), ((0, 3, 2, 2), torch.channels_last),
                                       ((2, 0, 1), torch.contiguous_format)])
def test_empty_parameters_with_stride_0_dims_are_accepted(backend, shape, fmt):
    """torch gives empty tensors stride-0 dims (channels_last (2, 0, 1, 1): strides (0, 1, 0, 0)); with no
    elements nothing overlaps, so both ops accept them (they were refused as 'internally overlapping')."""
    dev = backend_device(backend)
    p = torch.empty(shape, device=dev).to(memory_format=fmt) if len(shape) == 4 else torch.empty(shape, device=dev)
    q, g = torch.empty_like(p), torch.empty_like(p)
    with torch.no_grad():
        ak.ag1_update_([p], [q], [g], backend=backend)
        ak.ag2_rescale_([p], [q], [g], backend=backend)
    assert p.shape == shape
