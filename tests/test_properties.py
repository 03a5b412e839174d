"""Property-based tests (hypothesis) of the Gram, ridge-solve, AG-update and averaged-activation ops, on every backend this machine
has, each example checked against an oracle that is right (issue: "no wrong answer at the edges").

Each example draws a shape (0-d/empty/odd sizes where the op allows), a memory layout (contiguous, transposed,
stepped, expanded, channels_last), dtypes, a seed for the values and how many special values to plant (±0,
±inf, NaN, subnormals, values near the dtype's max), and parameters (conv geometries past the input,
SPD / rank-deficient / indefinite / non-finite Grams). Oracles:

* Grams: reference.im2col_gram / linear_gram called directly (float64 F.pad + F.unfold over every position,
  no trimming), SPEC §3's 1e-5 relative Frobenius bar (1e-12 for float64 inputs);
* ridge_solve: the float64 reference on the same (rounded) inputs, within a backward-stable bound
  20·√D·u·κ(S + λI) + output rounding; a clearly-not-Gram or non-finite A must raise, naming the batch index;
* AG-1: the formula evaluated elementwise in numpy in SPEC §2's arithmetic (float32, float64 when a member
  is float64; float64 for the reference backend; numpy's sign, so NaN in ḡ gives NaN and ḡ = ±0 keeps θ
  exactly), rounded once to the parameter's dtype: bit for bit;
* AG-2: the float64 reference, within 4 ulps of the parameter dtype plus the float32 rounding SPEC §2 allows
  in the global scale (norm ratios outside float32's range included);
* avg_act_backward: the exact value of g·s (tests/_exact_avg_act.py: rationals / mpmath, its assumptions in its
  docstring) within docs/numerics.md's bar, every activation with its parameters, every dtype, eps ties.

Budget: the ``ci`` profile (default) keeps the whole file within about a minute of CPU time here;
``python -m pytest tests/test_properties.py --hypothesis-profile=long`` runs 20 times more examples.
Hypothesis draws fresh seeds every run and prints the failing example and its reproduction blob.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import avg_kernels as ak
from avg_kernels import reference

from conftest import backend_device, interpreted

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _examples(backend: str, n: int) -> int:
    """n examples per backend in the active profile's proportion (profiles: tests/conftest.py); the Triton
    interpreter gets a fifth."""
    scale = settings().max_examples / 40
    return max(3, int(n * scale / (5 if interpreted(backend) else 1)))


def _has_bf16(case) -> bool:
    return "bfloat16" in repr(case)


def _run(backend: str, n: int, strategy, check):
    """Runs ``check(case)`` over ``strategy`` with the backend's example budget. Triton's interpreter has no
    bfloat16 numpy type (it computes garbage there): bf16 is covered on GPU and by the AOT compile."""
    @settings(max_examples=_examples(backend, n))
    @given(case=strategy)
    def prop(case):
        if interpreted(backend) and _has_bf16(case):
            return
        check(case)

    prop()


# ------------------------------------------------------------------------------------------------
# Values and layouts.

def _values(shape, dtype, seed: int, specials: int, scale: float) -> torch.Tensor:
    """Normal values times ``scale`` with ``specials`` special values planted at random places."""
    gen = torch.Generator().manual_seed(seed)
    t = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    n = t.numel()
    if n and specials:
        fi = torch.finfo(dtype)
        pool = torch.tensor([0.0, -0.0, math.inf, -math.inf, math.nan, fi.tiny / 4, -fi.tiny / 4,
                             fi.max / 2, -fi.max / 2, fi.tiny], dtype=torch.float64)
        where = torch.randint(0, n, (specials,), generator=gen)
        which = torch.randint(0, len(pool), (specials,), generator=gen)
        t.view(-1)[where] = pool[which]
    return t.to(dtype)


def _layout(t: torch.Tensor, how: str) -> torch.Tensor:
    """The same values in another memory layout (never aliasing another tensor)."""
    if how == "transposed" and t.dim() >= 2:
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if how == "stepped" and t.dim() >= 1:
        big = torch.zeros((*t.shape[:-1], 2 * t.shape[-1] + 1), dtype=t.dtype)
        big[..., 1::2] = t
        return big[..., 1::2]
    if how == "channels_last" and t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.contiguous()


def _rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    den = torch.linalg.norm(ref)
    return float(torch.linalg.norm(a - ref) / (den if den > 0 else 1.0))


# ------------------------------------------------------------------------------------------------
# im2col_gram

@st.composite
def conv_cases(draw):
    nd = draw(st.integers(1, 2))
    groups = draw(st.integers(1, 3))
    size = tuple(draw(st.integers(0, 7)) for _ in range(nd))
    k = tuple(draw(st.integers(1, 4)) for _ in range(nd))
    s = tuple(draw(st.integers(1, 6)) for _ in range(nd))
    d = tuple(draw(st.integers(1, 3)) for _ in range(nd))
    p = tuple(draw(st.integers(0, 9)) for _ in range(nd))
    out = [(size[i] + 2 * p[i] - d[i] * (k[i] - 1) - 1) // s[i] + 1 for i in range(nd)]
    if any(o < 1 for o in out):  # an empty output is an error: tested in test_gram.py
        p = tuple(max(p[i], (d[i] * (k[i] - 1) + 1 - size[i] + 1) // 2) for i in range(nd))
    shape = (draw(st.integers(0, 3)), groups * draw(st.integers(1, 3)), *size)
    return dict(shape=shape, k=k, s=s, p=p, d=d, groups=groups, bias=draw(st.booleans()),
                dtype=draw(st.sampled_from(FLOATS)), seed=draw(st.integers(0, 2 ** 31)),
                scale=draw(st.sampled_from([1.0, 1e-3, 1e3, 1e-20])),
                layout=draw(st.sampled_from(["contiguous", "transposed", "stepped", "channels_last", "expanded"])))


def test_im2col_gram_properties(backend):
    dev = backend_device(backend)

    def check(c):
        if interpreted(backend) and math.prod(c["shape"]) > 400:
            return
        x = _values(c["shape"], c["dtype"], c["seed"], 0, c["scale"])
        if c["layout"] == "expanded" and x.shape[0] >= 1:
            x = x[:1].expand(c["shape"])
        else:
            x = _layout(x, c["layout"])
        args = (c["k"], c["s"], c["p"], c["d"], c["groups"], c["bias"])
        want = reference.im2col_gram(x.double(), *args)
        out = ak.im2col_gram(x.to(dev), *args, backend=backend)
        assert out.dtype == (torch.float64 if c["dtype"] == torch.float64 else torch.float32)
        _assert_gram_close(out, want, c)

    _run(backend, 60, conv_cases(), check)


def _assert_gram_close(out, want, c) -> None:
    """A Gram against the float64 reference: 1e-12 (float64 inputs) or 1e-5 relative Frobenius, plus the
    output's own rounding (subnormal Grams)."""
    tol = 1e-12 if c["dtype"] == torch.float64 else 1e-5
    tol += 2 * _rel_fro(want.to(out.dtype), want)
    assert _rel_fro(out, want) <= tol, c


@st.composite
def linear_cases(draw):
    lead = tuple(draw(st.integers(0, 4)) for _ in range(draw(st.integers(0, 2))))
    return dict(shape=(*lead, draw(st.integers(0, 70))), bias=draw(st.booleans()),
                dtype=draw(st.sampled_from(FLOATS)), seed=draw(st.integers(0, 2 ** 31)),
                scale=draw(st.sampled_from([1.0, 1e-3, 1e3])),
                layout=draw(st.sampled_from(["contiguous", "transposed", "stepped"])))


def test_linear_gram_properties(backend):
    dev = backend_device(backend)

    def check(c):
        x = _layout(_values(c["shape"], c["dtype"], c["seed"], 0, c["scale"]), c["layout"])
        want = reference.linear_gram(x.double(), c["bias"])
        out = ak.linear_gram(x.to(dev), c["bias"], backend=backend)
        _assert_gram_close(out, want, c)

    _run(backend, 40, linear_cases(), check)


# ------------------------------------------------------------------------------------------------
# ridge_solve

@st.composite
def ridge_cases(draw):
    return dict(batch=tuple(draw(st.integers(0, 3)) for _ in range(draw(st.integers(0, 2)))),
                c=draw(st.integers(0, 6)), d=draw(st.sampled_from([1, 2, 3, 7, 16, 33, 64])),
                kind=draw(st.sampled_from(["spd", "rank_deficient", "indefinite_rounding", "not_gram", "nonfinite"])),
                lam=draw(st.sampled_from([0.0, 1e-6, 1e-3, 1.0])),
                g_dtype=draw(st.sampled_from(FLOATS)), a_dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2 ** 31)), scale=draw(st.sampled_from([1.0, 1e-4, 1e4])),
                layout=draw(st.sampled_from(["contiguous", "transposed"])))


def _gram(c, gen):
    """A batch of symmetric matrices of the case's kind, in float64, and its (ascending) eigenvalues."""
    d, nb = c["d"], math.prod(c["batch"])
    m = {"spd": 2 * d + 3, "rank_deficient": max(1, d // 2)}.get(c["kind"], 2 * d + 3)
    X = torch.randn(nb, d, m, generator=gen, dtype=torch.float64)
    A = X @ X.mT / m * c["scale"]
    w, V = torch.linalg.eigh(A)
    if c["kind"] == "indefinite_rounding" and d > 1:  # slightly negative: a Gram up to rounding
        w[:, 0] = -1e-7 * w[:, -1].abs()
    elif c["kind"] == "not_gram":
        w[:, 0] = -0.1 * w[:, -1].abs() - 1e-30
    if c["kind"] in ("indefinite_rounding", "not_gram"):
        A = (V * w[:, None, :]) @ V.mT
        A = (A + A.mT) / 2
    return A.reshape(*c["batch"], d, d), w


def test_ridge_solve_properties(backend):
    dev = backend_device(backend)

    def check(c):
        gen = torch.Generator().manual_seed(c["seed"])
        A64, w = _gram(c, gen)
        nb = math.prod(c["batch"])
        if c["kind"] == "nonfinite" and nb:
            A64.view(nb, c["d"], c["d"])[nb - 1, 0, c["d"] - 1] = math.nan
        A = _layout(A64.to(c["a_dtype"]), c["layout"])
        G = torch.randn(*c["batch"], c["c"], c["d"], generator=gen, dtype=torch.float64).to(c["g_dtype"])
        bad = nb > 0 and c["kind"] in ("not_gram", "nonfinite")
        if bad:
            # a clear error naming the batch index, whatever C is (C = 0 included)
            with pytest.raises(ValueError, match=r"ridge_solve: A(\[| )"):
                ak.ridge_solve(G.to(dev), A.to(dev), c["lam"], backend=backend)
            return
        if c["lam"] == 0.0 and c["kind"] != "spd":
            return  # pinv of a rank-deficient matrix: the kept rank depends on the precision (test_ridge.py)
        want = reference.ridge_solve(G.double(), A.double(), c["lam"])
        out = ak.ridge_solve(G.to(dev), A.to(dev), c["lam"], backend=backend)
        assert out.shape == G.shape and out.dtype == G.dtype
        if not G.numel():
            return
        wa = torch.linalg.eigvalsh(A.double().reshape(-1, c["d"], c["d"]))
        shifted = wa.clamp_min(0) + c["lam"]
        kappa = float((shifted[:, -1] / shifted[:, 0].clamp_min(1e-300)).max())
        ct = torch.float64 if torch.float64 in (c["g_dtype"], c["a_dtype"]) else torch.float32
        out_round = {torch.float16: 2 ** -10, torch.bfloat16: 2 ** -7, torch.float32: 2 ** -23,
                     torch.float64: 2 ** -52}[c["g_dtype"]]
        tol = 20 * math.sqrt(c["d"]) * torch.finfo(ct).eps * kappa + 2 * out_round
        if float(want.abs().max()) * (1 + tol) > torch.finfo(G.dtype).max / 2:
            # P, or P within the error the bar allows (κ up to 1e7 for float32: 41x), overflows G's dtype
            # (float16 with a small λ): inf is then its rounding, not the property here
            return
        assert torch.isfinite(out).all(), c
        assert _rel_fro(out, want) <= tol, (c, kappa)

    _run(backend, 60, ridge_cases(), check)


# ------------------------------------------------------------------------------------------------
# AG-1 / AG-2 updates

@st.composite
def ag_cases(draw):
    n = draw(st.integers(1, 4))
    tensors = []
    for _ in range(n):
        shape = tuple(draw(st.integers(0, 6)) for _ in range(draw(st.integers(0, 4))))
        tensors.append(dict(shape=shape, dtypes=tuple(draw(st.sampled_from(FLOATS)) for _ in range(3)),
                            layout=draw(st.sampled_from(["contiguous", "transposed", "stepped", "channels_last"])),
                            specials=draw(st.integers(0, 3)), none=draw(st.booleans()) and draw(st.booleans())))
    return dict(tensors=tensors, seed=draw(st.integers(0, 2 ** 31)), scale=draw(st.sampled_from([1.0, 1e-30, 1e30])))


def _triples(c, dev):
    out = []
    for i, t in enumerate(c["tensors"]):
        p, q, g = (_layout(_values(t["shape"], dt, c["seed"] + 7 * i + j, t["specials"], c["scale"]), t["layout"]).to(dev)
                   for j, dt in enumerate(t["dtypes"]))
        out.append((p, q, g, t["none"]))
    return out


def _ag1_expected(p, q, g, backend):
    """numpy, in SPEC §2's arithmetic (float32, float64 when a member is float64), rounded once; the
    reference backend computes in float64 (the exact value where θ' − θ cancels; tests/test_ag_update.py
    bounds the kernels' distance to it)."""
    exact = backend == "reference" or torch.float64 in (p.dtype, q.dtype, g.dtype)
    ct = np.float64 if exact else np.float32
    t, qq, gg = (x.detach().cpu().double().numpy().astype(ct) for x in (p, q, g))
    with np.errstate(invalid="ignore", over="ignore"):
        r = np.where(gg == 0, t, t - np.abs(qq - t) * np.sign(gg))
    return torch.from_numpy(np.asarray(r, dtype=np.float64)).to(p.dtype)


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    na, nb = a.isnan(), b.isnan()
    if not torch.equal(na, nb):
        return False
    a, b = a[~na], b[~nb]
    return torch.equal(a, b) and torch.equal(torch.signbit(a), torch.signbit(b))


def test_ag1_update_properties(backend):
    dev = backend_device(backend)

    def check(c):
        triples = _triples(c, dev)
        want = [None if none else _ag1_expected(p, q, g, backend) for p, q, g, none in triples]
        before = [p.clone() for p, *_ in triples]
        with torch.no_grad():
            ak.ag1_update_([p for p, *_ in triples], [q for _, q, *_ in triples],
                           [None if none else g for _, _, g, none in triples], backend=backend)
        for (p, *_), w, b in zip(triples, want, before):
            assert _same_bits(p, b if w is None else w), c

    _run(backend, 60, ag_cases(), check)


def test_ag2_rescale_properties(backend):
    dev = backend_device(backend)

    def check(c):
        triples = _triples(c, dev)
        ps = [p for p, *_ in triples]
        olds = [q for _, q, *_ in triples]
        steps = [g for *_, g, _ in triples]
        if not all(torch.isfinite(t).all() for t in ps + olds + steps):
            return  # a non-finite global norm: a NaN/0 scale by definition (test_ag_update.py)
        want = [p.detach().cpu().clone() for p in ps]
        reference.ag2_rescale_(want, [o.cpu() for o in olds], [s.cpu() for s in steps])
        with torch.no_grad():
            ak.ag2_rescale_(ps, olds, steps, backend=backend)
        # the global scale's error: float32 differences |θ' − θ|, |θ'' − θ| of non-float64 triples (SPEC §2)
        # give it a relative error up to ~2·2^-24, which reaches every tensor's step, float64 ones too
        scale_rel = 0.0 if all(torch.float64 in (p.dtype, o.dtype, s.dtype) for p, o, s in zip(ps, olds, steps)) \
            else 2 * torch.finfo(torch.float32).eps
        for p, w, o in zip(ps, want, olds):
            if not w.numel():
                continue
            ulp = torch.finfo(p.dtype).eps
            fin = torch.isfinite(w)
            if not fin.all():  # overflow of the parameter's dtype: the same infinity
                assert torch.equal(p.cpu()[~fin].double(), w[~fin].double()), c
                p, w, o = p.cpu()[fin], w[fin], o.cpu()[fin]
                if not w.numel():
                    continue
            big = float(w.double().abs().max())
            step = float((w.double() - o.cpu().double()).abs().max())
            base = float(o.double().abs().max())  # θ + Δ·scale may cancel: rounding scales with the operands
            torch.testing.assert_close(p.cpu().double(), w.double(), rtol=4 * ulp,
                                       atol=4 * ulp * (big + base + step) + 4 * scale_rel * step + 1e-300,
                                       equal_nan=True, msg=str(c))

    _run(backend, 40, ag_cases(), check)


# ------------------------------------------------------------------------------------------------
# avg_act_backward (SPEC §1), against the exact oracle of tests/_exact_avg_act.py (mpmath / rationals)

_ACT_CONFIGS = [("tanh", {}), ("sigmoid", {}), ("relu", {}), ("leaky_relu", {}), ("leaky_relu", {"negative_slope": 0.2}),
                ("leaky_relu", {"negative_slope": -0.3}), ("elu", {}), ("elu", {"alpha": 0.5}), ("elu", {"alpha": -0.5}),
                ("gelu", {}), ("gelu", {"approximate": "tanh"}), ("silu", {}), ("softplus", {}),
                ("softplus", {"beta": 2.0, "threshold": 10.0}), ("softplus", {"beta": 16.0}),
                ("softplus", {"beta": 0.5, "threshold": 1.0}), ("hardswish", {}), ("hardsigmoid", {}),
                ("hardtanh", {}), ("relu6", {}), ("hardtanh", {"min_val": -0.3, "max_val": 2.7}),
                # bounds near FLT_MAX (segments whose d overflows lie inside: s = 1, not the bounded limit 0);
                # equal bounds (f constant)
                ("hardtanh", {"min_val": -3e38, "max_val": 3e38}), ("hardtanh", {"min_val": 0.5, "max_val": 0.5})]


def _f32(v: float) -> float:
    with np.errstate(over="ignore"):
        return float(np.float32(v))


@st.composite
def _act_element(draw, fp64: bool):
    """(g, x, x_new): x anywhere in the range (specials, tails, huge), x_new = x moved by a few ulps, by a
    log-uniform step, or anywhere; g ordinary, huge, tiny, 0 or non-finite."""
    width = 64 if fp64 else 32
    rnd = (lambda v: v) if fp64 else _f32
    x = draw(st.one_of(st.floats(-40, 40, width=width), st.floats(width=width),
                       st.sampled_from([0.0, -0.0, 3.0, -3.0, -1.5, 20.0, 1e-40, -1e-40, 3e38, -3e38, 1e36, -1e37,
                                       1.0, -1.0, 6.0, 0.5, -0.3, 2.7])))  # hardtanh's bounds
    how = draw(st.sampled_from(["ulps", "step", "any", "same"]))
    if how == "ulps" and math.isfinite(x):
        t = np.float64 if fp64 else np.float32
        xn = t(x)
        for _ in range(draw(st.integers(1, 3))):
            xn = np.nextafter(xn, t(math.inf) if draw(st.booleans()) else t(-math.inf))
        xn = float(xn)
    elif how == "step" and math.isfinite(x):
        step = 10.0 ** draw(st.floats(-44 if not fp64 else -300, 38))
        xn = rnd(x + step * (1 if draw(st.booleans()) else -1))
    elif how == "same":
        xn = x
    else:
        xn = draw(st.floats(width=width))
    g = draw(st.one_of(st.floats(-4, 4, width=width),
                       st.sampled_from([0.0, 1.0, math.inf, -math.inf, math.nan, 1e-40, 3e38, -2.5])))
    return rnd(g), x, xn


@st.composite
def avg_act_cases(draw):
    act, params = draw(st.sampled_from(_ACT_CONFIGS))
    dtype = draw(st.sampled_from(FLOATS))
    fp64 = dtype == torch.float64
    elems = draw(st.lists(_act_element(fp64), min_size=1, max_size=8))
    finite_d = [abs(xn - x) for _, x, xn in elems if math.isfinite(xn - x) and xn != x]
    eps_choices = [ak.EPS, 0.0, 1e-3, 1e-12, 1e30]
    eps = draw(st.sampled_from(eps_choices + finite_d[:2]))  # an element's own |d|: a tie of the decision
    return dict(act=act, params=params, dtype=dtype, elems=elems, eps=eps)


def _check_avg_act(c, backend: str, dev) -> None:
    import _exact_avg_act as exact
    from avg_kernels.activations import resolve

    k = resolve(c["act"], c["params"])
    dt = c["dtype"]
    g, x, xn = (torch.tensor([e[i] for e in c["elems"]], dtype=torch.float64).to(dt) for i in range(3))
    out = ak.avg_act_backward(g.to(dev), x.to(dev), xn.to(dev), c["act"], eps=c["eps"], backend=backend,
                              **c["params"]).cpu()
    assert out.dtype == dt and out.shape == x.shape
    fi = torch.finfo(dt)
    for i in range(x.numel()):
        gi, xi, xni = float(g[i]), float(x[i]), float(xn[i])
        want, s = exact.grad_in(k, gi, xi, xni, c["eps"], dt == torch.float64)
        got = float(out[i])
        where = (f"{c['act']}{c['params']} {dt} eps={c['eps']!r}: g={gi!r} x={xi!r} x_new={xni!r}: got {got!r}, "
                 f"exact {want!r} (s={s!r})")
        if math.isnan(want):
            assert math.isnan(got), where
            continue
        if math.isinf(want):
            assert got == want, where
            continue
        # SPEC bar (docs/numerics.md) plus the output's own rounding: half an ulp of the dtype, and half its
        # smallest subnormal where the result underflows
        tol = 1e-5 * abs(want) + 1e-6 * abs(gi) + fi.eps / 2 * abs(want) + fi.smallest_normal * fi.eps / 2
        if abs(want) > fi.max and math.isinf(got) and got * want > 0:
            continue  # overflow of the output dtype: the rounding of a value beyond its range
        assert math.isfinite(got) and abs(got - want) <= tol, where


def test_avg_act_backward_properties(backend):
    dev = backend_device(backend)
    _run(backend, 300, avg_act_cases(), lambda c: _check_avg_act(c, backend, dev))


def test_avg_act_backward_properties_cpu_levels(cpu_level):
    """The C++ CPU kernels at every capability level (the `backend` test above runs the active one)."""
    _run("cpu", 100, avg_act_cases(), lambda c: _check_avg_act(c, "cpu", torch.device("cpu")))
