"""ridge_solve (SPEC §3): every backend against float64 torch.linalg.solve / pinv / eigh on the same
(rounded) inputs, the Cholesky -> eigendecomposition fallback, the Gram and finiteness checks naming the
batch index, bad arguments, shapes, strides, opcheck, torch.compile and autograd."""
from __future__ import annotations

import math

import pytest
import torch

import avg_kernels as ak
from avg_kernels._contract.ridge import pinv_rtol

from conftest import backend_device, interpreted, hook_ops

# Triton's interpreter evaluates inf - inf (the finiteness test) in numpy, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OUT_ROUNDING = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8, torch.float32: 0.0, torch.float64: 0.0}


def _unit(dt: torch.dtype) -> float:
    return 2.0 ** -53 if dt == torch.float64 else 2.0 ** -24


def gram_with_spectrum(w: torch.Tensor, gen=None) -> torch.Tensor:
    """(..., D, D) float64 symmetric V diag(w) Vᵀ with a random orthogonal V; w: (..., D)."""
    d = w.shape[-1]
    q, _ = torch.linalg.qr(torch.randn(*w.shape[:-1], d, d, dtype=torch.float64, generator=gen))
    return (q * w.unsqueeze(-2)) @ q.mT


def random_gram(batch, d, m, scale=1.0) -> torch.Tensor:
    """X Xᵀ in float64 with X of shape (..., d, m): rank min(d, m)."""
    x = torch.randn(*batch, d, m, dtype=torch.float64) * scale
    return x @ x.mT


def solve64(G, A, lam):
    """Float64 ground truth on the rounded inputs: G (sym(A) + λI)⁻¹ via torch.linalg.solve."""
    a = A.double()
    s = (a + a.mT) / 2
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    return torch.linalg.solve(s + lam * eye, G.double().mT).mT


def cond(A, lam):
    a = A.double()
    w = torch.linalg.eigvalsh((a + a.mT) / 2) + lam
    return (w.abs().amax(-1) / w.abs().amin(-1)).max().item()


def rel_err(out, ref) -> float:
    return ((out.double().cpu() - ref.double()).norm() / ref.double().norm()).item()


def tol_for(G_dtype, A_dtype, kappa, d) -> float:
    """Normwise bound: solver rounding (backward-stable, ~sqrt(D)·u·κ with margin) + output rounding."""
    ct = torch.float64 if torch.float64 in (G_dtype, A_dtype) else torch.float32
    return 20 * math.sqrt(d) * _unit(ct) * kappa + 2 * OUT_ROUNDING[G_dtype]


def _shapes(backend):
    if interpreted(backend):
        return [((), 3, 6), ((4,), 2, 5), ((2, 2), 3, 33)]
    return [((), 3, 6), ((7,), 4, 15), ((2, 3), 5, 33), ((4,), 64, 96), ((25,), 10, 15)]


@pytest.mark.parametrize("g_dtype", DTYPES)
@pytest.mark.parametrize("a_kind", ["same", "float32"])
def test_full_rank_matches_linalg_solve(backend, g_dtype, a_kind, fresh_seed):
    """Random SPD Grams (M > D), batched, every dtype (A of G's dtype, or float32 as the Gram ops give)."""
    a_dtype = g_dtype if a_kind == "same" else torch.float32
    dev = backend_device(backend)
    for batch, c, d in _shapes(backend):
        A = random_gram(batch, d, 2 * d + 3).to(a_dtype)
        G = torch.randn(*batch, c, d, dtype=torch.float64).to(g_dtype)
        lam = 1e-3 * d
        out = ak.ridge_solve(G.to(dev), A.to(dev), lam, backend=backend)
        assert out.shape == G.shape and out.dtype == g_dtype and out.is_contiguous()
        ref = solve64(G, A, lam)
        assert rel_err(out, ref) <= tol_for(g_dtype, a_dtype, cond(A, lam), d), (batch, c, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_rank_deficient_matches_linalg_solve(backend, dtype, fresh_seed):
    """M < D (the usual Linear / deep-conv case): S + λI is still positive definite for λ above the
    rounding level, so Cholesky succeeds and the result is the plain ridge solve."""
    dev = backend_device(backend)
    for batch, c, d in _shapes(backend):
        A = random_gram(batch, d, max(1, d // 3)).to(dtype)
        lam = 1e-4 * A.double().diagonal(0, -2, -1).amax().item()
        G = torch.randn(*batch, c, d, dtype=torch.float64).to(dtype)
        out = ak.ridge_solve(G.to(dev), A.to(dev), lam, backend=backend)
        assert rel_err(out, solve64(G, A, lam)) <= tol_for(dtype, dtype, cond(A, lam), d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cholesky_failure_falls_back_to_clamped_eigendecomposition(backend, dtype, fresh_seed):
    """An eigenvalue of S at -1e-4·‖S‖ (acceptable for a Gram, SPEC §3) and λ = 5e-5·‖S‖: S + λI is
    indefinite, Cholesky fails, and the result is G V diag(1/(max(w,0)+λ)) Vᵀ, not an error. Entries
    with a positive definite S + λI in the same batch keep the Cholesky result."""
    dev = backend_device(backend)
    d = 6 if interpreted(backend) else 20
    nb, c = 5, 3
    w = torch.rand(nb, d, dtype=torch.float64) * 0.9 + 0.1
    w[1, 0] = w[3, 2] = -1e-4  # entries 1 and 3 need the fallback
    w[:, -1] = 1.0
    A = gram_with_spectrum(w).to(dtype)
    G = torch.randn(nb, c, d, dtype=torch.float64).to(dtype)
    lam = 5e-5
    out = ak.ridge_solve(G.to(dev), A.to(dev), lam, backend=backend)
    a = A.double()
    s = (a + a.mT) / 2
    wr, v = torch.linalg.eigh(s)
    clamped = (G.double() @ v) / (wr.clamp_min(0) + lam).unsqueeze(-2) @ v.mT
    plain = solve64(G, A, lam)
    expect = plain.clone()
    expect[[1, 3]] = clamped[[1, 3]]
    kappa = (1 + lam) / lam
    assert rel_err(out[[1, 3]], expect[[1, 3]]) <= tol_for(dtype, dtype, kappa, d)
    keep = [0, 2, 4]
    assert rel_err(out[keep], expect[keep]) <= tol_for(dtype, dtype, cond(A[keep], lam), d)
    # and the unclamped solve is really different there (the fallback is not a no-op)
    assert rel_err(plain[[1, 3]], clamped[[1, 3]]) > 1e-2


def test_rank_deficient_float32_gram_with_tiny_lam_is_not_an_error(backend, fresh_seed):
    """A float32 Gram of rank M < D has rounding-level negative eigenvalues far above λ = 1e-9·‖A‖:
    Cholesky fails in float32, the fallback solves it, and for G = ΔZ Xᵀ (in the range of X) the
    result is the float64 ridge solution to float32 accuracy on that range."""
    dev = backend_device(backend)
    d, m, c = (12, 4, 3) if interpreted(backend) else (40, 10, 5)
    x = torch.randn(3, d, m, dtype=torch.float64)
    A = (x @ x.mT).float()
    dz = torch.randn(3, c, m, dtype=torch.float64)
    G = (dz @ x.mT).float()
    lam = 1e-9 * A.double().diagonal(0, -2, -1).amax().item()
    out = ak.ridge_solve(G.to(dev), A.to(dev), lam, backend=backend).double().cpu()
    # In the range of X: P X = ΔZ K (K + λI)⁻¹ ≈ ΔZ (the P003 §4.3 property, D x D form).
    assert torch.isfinite(out).all()
    reached = out @ x
    assert rel_err(reached, dz) < 5e-2


@pytest.mark.parametrize("g_dtype", DTYPES)
def test_lam_zero_is_pinv(backend, g_dtype, fresh_seed):
    """λ = 0: G pinv(S), torch.linalg.pinv(hermitian=True)'s default cutoff at the compute precision;
    full rank and rank-deficient (exact zero eigenvalues, dropped by the cutoff)."""
    dev = backend_device(backend)
    a_dtype = torch.float64 if g_dtype == torch.float64 else torch.float32
    d = 7 if interpreted(backend) else 24
    nb, c = 4, 5
    w = torch.rand(nb, d, dtype=torch.float64) * 0.9 + 0.1
    w[2, : d // 2] = 0.0  # rank-deficient entry
    w[3, :2] = 0.0
    A = gram_with_spectrum(w).to(a_dtype) * 3.0
    G = torch.randn(nb, c, d, dtype=torch.float64).to(g_dtype)
    out = ak.ridge_solve(G.to(dev), A.to(dev), 0.0, backend=backend)
    a = A.double()
    ref = G.double() @ torch.linalg.pinv((a + a.mT) / 2, hermitian=True, rtol=pinv_rtol(d, g_dtype, a_dtype))
    assert rel_err(out, ref) <= tol_for(g_dtype, a_dtype, 10.0, d) + (1e-5 if a_dtype == torch.float32 else 1e-12)


def test_symmetrises_a(backend, fresh_seed):
    """A is symmetrised: A + N (N antisymmetric) gives the result of A."""
    dev = backend_device(backend)
    A = random_gram((3,), 9, 20)
    n = torch.randn(3, 9, 9, dtype=torch.float64)
    G = torch.randn(3, 4, 9, dtype=torch.float64)
    for lam in (1e-2, 0.0):
        out = ak.ridge_solve(G.to(dev), (A + n - n.mT).to(dev), lam, backend=backend)
        assert rel_err(out, ak.ridge_solve(G, A, lam, backend="reference")) < 1e-10


def test_strided_inputs_give_the_contiguous_result(backend, fresh_seed):
    dev = backend_device(backend)
    d = 9 if interpreted(backend) else 40
    big = random_gram((3,), d + 3, 2 * d).float().to(dev)
    A = big[:, 1:d + 1, 1:d + 1].contiguous()  # a principal block: a Gram...
    A_view = torch.empty(3, d + 5, d + 5, device=dev)[:, 2:d + 2, 1:d + 1]  # ...and a strided copy
    A_view.copy_(A)
    G = torch.randn(3, d, 4, device=dev).mT  # (3, 4, d), column-major
    for lam in (1e-3, 0.0):
        out = ak.ridge_solve(G, A_view, lam, backend=backend)
        ref = ak.ridge_solve(G.contiguous(), A.contiguous(), lam, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)


def test_empty_inputs(backend):
    dev = backend_device(backend)
    for gshape, ashape in [((0, 3, 4), (0, 4, 4)), ((2, 0, 4), (2, 4, 4)), ((2, 3, 0), (2, 0, 0)), ((3, 0), (0, 0))]:
        x = torch.randn(*ashape[:-1], 5, device=dev)
        out = ak.ridge_solve(torch.randn(gshape, device=dev), x @ x.mT, 1e-3, backend=backend)
        assert out.shape == gshape and not out.any()


def test_no_rows_still_checks_A(backend):
    """C = 0: nothing to solve, but A is checked as for C > 0 (a NaN A returned an empty result)."""
    G = torch.zeros(2, 0, 3)
    A = torch.eye(3).repeat(2, 1, 1)
    A[1, 0, 0] = float("nan")
    _errs(backend, G, A, 1e-3, r"A\[1\] \(batch index 1 of batch shape \(2,\)\) is not finite")
    A[1] = -torch.eye(3)
    _errs(backend, G, A, 1e-3, r"A\[1\] .* is not a Gram matrix")


def _errs(backend, G, A, lam, match):
    dev = backend_device(backend)
    with pytest.raises(ValueError, match=match):
        ak.ridge_solve(G.to(dev), A.to(dev), lam, backend=backend)


@pytest.mark.parametrize("lam", [1e-6, 10.0, 0.0])
def test_not_a_gram_names_the_batch_index(backend, lam):
    """An eigenvalue below -1e-3·‖A‖₂ is an error naming the first such batch entry, whatever λ
    (small λ: found by the fallback; large λ: by the Gram certificate; λ = 0: by pinv's eigh)."""
    d = 6
    w = torch.linspace(0.1, 1.0, d, dtype=torch.float64).repeat(2, 3, 1)
    w[1, 1, 0] = -0.01
    w[1, 2, 0] = -0.5
    A = gram_with_spectrum(w).float()
    G = torch.randn(2, 3, 2, d)
    _errs(backend, G, A, lam, r"A\[1, 1\] \(batch index 4 of batch shape \(2, 3\)\) is not a Gram matrix")
    # -1e-4·‖A‖ is within the tolerance: no error
    w[1, 1, 0] = w[1, 2, 0] = -1e-4
    out = ak.ridge_solve(G.to(backend_device(backend)), gram_with_spectrum(w).float().to(backend_device(backend)), lam,
                         backend=backend)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("lam", [1e-3, 0.0])
def test_nonfinite_a_names_the_batch_index(backend, bad, lam):
    A = random_gram((5,), 4, 8).float()
    A[3, 1, 2] = bad
    A[4, 0, 0] = bad
    _errs(backend, torch.randn(5, 2, 4), A, lam, r"A\[3\] \(batch index 3 of batch shape \(5,\)\) is not finite")
    # a single matrix has no batch index
    _errs(backend, torch.randn(2, 4), A[3], lam, r"ridge_solve: A is not finite")


def test_large_lam_on_a_valid_gram_passes_the_certificate(backend):
    """λ far above ‖A‖ (so Cholesky succeeds even for a non-Gram) on valid Grams: no error, and the
    zero matrix (a Gram) works too."""
    dev = backend_device(backend)
    A = torch.cat([random_gram((2,), 5, 2).float(), torch.zeros(1, 5, 5)])
    G = torch.randn(3, 2, 5)
    out = ak.ridge_solve(G.to(dev), A.to(dev), 1e3, backend=backend)
    assert rel_err(out, solve64(G, A, 1e3)) < 1e-5


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(4), torch.eye(4), 1e-3), ValueError, r"G must have shape \(\.\.\., C, D\)"),
    ((torch.randn(2, 4), torch.randn(4, 3), 1e-3), ValueError, r"A must have shape \(\.\.\., D, D\)"),
    ((torch.randn(2, 5), torch.eye(4), 1e-3), ValueError, r"D = 5.*D = 4"),
    ((torch.randn(3, 2, 4), torch.eye(4).expand(2, 4, 4), 1e-3), ValueError, r"batch shape \(3,\).*\(2,\)"),
    ((torch.randn(2, 4), torch.eye(4), -1e-3), ValueError, r"lam=-0.001 must be finite and >= 0"),
    ((torch.randn(2, 4), torch.eye(4), float("nan")), ValueError, r"lam=nan"),
    ((torch.randn(2, 4), torch.eye(4), True), TypeError, r"lam must be a real number"),
    ((torch.randn(2, 4), torch.eye(4), "0.1"), TypeError, r"lam must be a real number"),
    ((torch.ones(2, 4, dtype=torch.int32), torch.eye(4), 0.1), TypeError, r"G has dtype torch.int32"),
    ((torch.randn(2, 4), torch.eye(4, dtype=torch.complex64), 0.1), TypeError, r"A has dtype torch.complex64"),
    ((torch.randn(2, 4), [[1.0]], 0.1), TypeError, r"A must be a torch.Tensor"),
])
def test_bad_arguments(args, exc, match):
    with pytest.raises(exc, match=match):
        ak.ridge_solve(*args)
    if all(isinstance(a, torch.Tensor) for a in args[:2]) and not isinstance(args[2], (str, bool)):
        with pytest.raises(exc, match=match):  # the op itself validates too (direct torch.ops calls)
            torch.ops.avg_kernels.ridge_solve(*args)


def test_unknown_or_unavailable_backend():
    with pytest.raises(ValueError, match="not a backend"):
        ak.ridge_solve(torch.randn(2, 3), torch.eye(3), 0.1, backend="fast")
    if "cuda" not in ak.available_backends():
        with pytest.raises(ak.BackendUnavailableError, match="cuda"):
            ak.ridge_solve(torch.randn(2, 3), torch.eye(3), 0.1, backend="cuda")


def test_use_backend_context_chooses_the_backend(monkeypatch):
    seen = []
    monkeypatch.setitem(ak.ops.RIDGE_SOLVE.spec.backends, "reference", lambda c: seen.append("reference") or c.G.clone())
    with ak.use_backend("reference"):
        ak.ridge_solve(torch.randn(2, 3), torch.eye(3), 0.1)
    assert seen == ["reference"]


def test_cpu_fused_small_path_matches_unfused_driver(fresh_seed):
    """The CPU backend solves D <= 256 in one fused kernel; the prologue + LAPACK driver gives the same."""
    if "cpu" not in ak.available_backends():
        pytest.skip("the C++ extension is not built")
    for d in (1, 2, 15, 33, 100, 256):
        A = random_gram((6,), d, d + 2).float()
        if d > 1:  # an entry whose Cholesky fails for small λ
            A[2] = gram_with_spectrum(torch.tensor([[-1e-4] + [1.0] * (d - 1)], dtype=torch.float64))[0].float()
        G = torch.randn(6, 7, d)
        for lam in (1e-5, 1e-2, 1e4):
            ref = ak.ridge_solve(G.double(), A.double(), lam, backend="reference")
            w = torch.linalg.eigvalsh(A.double())
            for b in range(6):  # per entry: κ of S + λI, or of the clamped spectrum where Cholesky fails
                kappa = (w[b].abs().max() + lam) / (w[b].min() + lam if w[b].min() + lam > 0 else lam)
                tol = tol_for(torch.float32, torch.float32, kappa.item(), d)
                for f in (torch.ops.avg_kernels_C.ridge_solve, hook_ops().ridge_solve_unfused):
                    assert rel_err(f(G, A, lam)[b], ref[b]) <= tol, (d, lam, b, f)


def _prologue_impl(backend):
    if backend == "cpu":
        return hook_ops().ridge_prologue
    if backend == "triton":
        from avg_kernels._triton.ridge import prologue

        return prologue
    pytest.skip(f"{backend} has no separate prologue kernel to test here")


def test_prologue_kernel(backend, fresh_seed):
    """The fused prologue: sym(A) + λI in the compute dtype, the non-finite flag and max |A_ii| per entry,
    for strided and reduced-precision inputs, D not a multiple of the tile."""
    prologue = _prologue_impl(backend)
    dev = backend_device(backend)
    for dt in DTYPES:
        a = torch.randn(4, 37, 37, dtype=torch.float64).to(dt).to(dev)
        a[2, 5, 30] = float("inf")
        a[3, 36, 1] = float("nan")
        view = a.mT  # strided
        ct = torch.float64 if dt == torch.float64 else torch.float32
        bm, stats = prologue(view, 0.25, ct)
        v = view.to(ct)
        expect = 0.5 * v + 0.5 * v.mT + 0.25 * torch.eye(37, dtype=ct, device=dev)
        finite = torch.isfinite(expect)
        torch.testing.assert_close(bm[finite], expect[finite], rtol=0, atol=0)
        assert stats[:, 0].tolist() == [0, 0, 1, 1]
        torch.testing.assert_close(stats[:, 1], v.diagonal(0, -2, -1).abs().amax(-1))


def test_opcheck(backend):
    dev = backend_device(backend)
    A = random_gram((2,), 5, 9).float().to(dev)
    G = torch.randn(2, 3, 5, device=dev)
    for lam in (1e-2, 0.0):
        torch.library.opcheck(torch.ops.avg_kernels.ridge_solve.default, (G, A, lam, backend))
    torch.library.opcheck(torch.ops.avg_kernels.ridge_solve.default,
                          (G.double().requires_grad_(), A.double().requires_grad_(), 1e-2, backend))


def test_torch_compile_fullgraph(backend):
    if interpreted(backend):
        pytest.skip("the interpreter adds nothing to tracing")
    dev = backend_device(backend)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def f(G, A):
        return ak.ridge_solve(G * 2, A, 1e-2, backend=backend) + 1

    A = random_gram((2,), 5, 9).float().to(dev)
    G = torch.randn(2, 3, 5, device=dev)
    torch.testing.assert_close(f(G, A), ak.ridge_solve(G * 2, A, 1e-2, backend=backend) + 1)


def test_autograd_matches_finite_differences(backend):
    dev = backend_device(backend)
    A = random_gram((2,), 4, 7).to(dev).requires_grad_()
    G = torch.randn(2, 3, 4, dtype=torch.float64, device=dev, requires_grad=True)
    torch.autograd.gradcheck(lambda g, a: ak.ridge_solve(g, a, 0.1, backend=backend), (G, A))


def test_positive_definite_batch_is_the_plain_cholesky_solve():
    """λ > 0 with every entry positive definite: the float64 result is cholesky_solve's (the driver
    returns LAPACK's output without further arithmetic)."""
    if "cpu" not in ak.available_backends():
        pytest.skip("the C++ extension is not built")
    d = 300  # above the fused small-system path's limit (256): the prologue + LAPACK driver
    A = random_gram((3,), d, d + 20)
    A = (A + A.mT) / 2  # exactly symmetric
    G = torch.randn(3, 5, d, dtype=torch.float64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        L = torch.linalg.cholesky(A + 0.1 * torch.eye(d, dtype=torch.float64))
        expect = torch.cholesky_solve(G.mT, L).mT
        torch.testing.assert_close(ak.ridge_solve(G, A, 0.1, backend="cpu"), expect, rtol=1e-13, atol=0)
    finally:
        torch.set_num_threads(threads)
    # with threads the systems are factorised concurrently (LAPACK single-threaded inside each task, a
    # different blocking than the threaded reference): equal up to rounding
    P = ak.ridge_solve(G, A, 0.1, backend="cpu")
    assert float((P - expect).norm() / expect.norm()) < 1e-12


# ----------------------------------------------------------------------------------------------
# The CUDA kernels' logic, executed on the host (csrc/cuda/ridge_kernel.cuh through
# csrc/testing/ridge_cuda_emulation.cpp): every block and thread of a launch, phase by phase.

def _emulation():
    if "cpu" not in ak.available_backends():
        pytest.skip("the C++ extension is not built")
    return hook_ops()


@pytest.mark.parametrize("dt", DTYPES)
@pytest.mark.parametrize("d", [1, 31, 32, 33, 70])
def test_cuda_prologue_emulated(dt, d, fresh_seed):
    C = _emulation()
    ct = torch.float64 if dt == torch.float64 else torch.float32
    a = torch.randn(3, d, d, dtype=torch.float64).to(dt)
    if d > 2:
        a[1, d - 1, 1] = float("nan")
    for view in (a, a.mT, torch.randn(3, d + 2, d + 3).to(dt)[:, 1:d + 1, 2:d + 2]):
        v = view.to(ct)
        expect = 0.5 * v + 0.5 * v.mT + 0.75 * torch.eye(d, dtype=ct)
        nblocks = C.ridge_cuda_launch(3, d, 1)[0]
        for grid in sorted({1, 2, 7, nblocks}):  # grid-stride over the tiles, and one block per tile
            bm, stats = C.ridge_prologue_emulated(view, 0.75, ct, grid)
            finite = torch.isfinite(expect)
            assert torch.equal(bm[finite], expect[finite]), (grid, view.stride())
            assert stats[:, 0].tolist() == [float(not torch.isfinite(v[b]).all()) for b in range(3)]
            md = v.diagonal(0, -2, -1).abs().amax(-1)
            torch.testing.assert_close(stats[:, 1], md, equal_nan=True)


def test_cuda_scale_emulated(fresh_seed):
    C = _emulation()
    for ct in (torch.float32, torch.float64):
        w = torch.sort(torch.randn(4, 9, dtype=ct), dim=-1).values
        w[2, :3] = 0.0
        y = torch.randn(4, 5, 9, dtype=ct)
        for lam, rtol in ((0.3, 0.0), (0.0, 1e-3)):
            if lam > 0:
                r = 1 / (w.clamp_min(0) + lam)
            else:
                cut = rtol * w.abs().amax(-1, keepdim=True)
                r = torch.where(w.abs() > cut, 1 / w, torch.zeros_like(w))
            expect = y * r.unsqueeze(-2)
            for grid, block in ((1, 1), (3, 32), (1000, 256)):
                out = C.ridge_scale_emulated(y, w, lam, rtol, grid, block)
                torch.testing.assert_close(out, expect, rtol=0, atol=0)
            torch.testing.assert_close(C.ridge_scale(y, w, lam, rtol), expect, rtol=0, atol=0)  # the CPU kernel


@pytest.mark.parametrize("g_dtype", DTYPES)
def test_cuda_code_path_emulated_matches_reference(g_dtype, fresh_seed):
    """The CUDA backend's driver + kernels at its launch configuration, run on the host."""
    C = _emulation()
    a_dtype = torch.float64 if g_dtype == torch.float64 else torch.float32
    for batch, c, d in [((), 3, 6), ((2, 3), 5, 33), ((25,), 10, 15)]:
        A = random_gram(batch, d, 2 * d + 3).to(a_dtype)
        G = torch.randn(*batch, c, d, dtype=torch.float64).to(g_dtype)
        out = C.ridge_solve_emulated(G, A, 1e-3 * d)
        assert rel_err(out, solve64(G, A, 1e-3 * d)) <= tol_for(g_dtype, a_dtype, cond(A, 1e-3 * d), d)
    # fallback entries and pinv
    w = torch.rand(3, 20, dtype=torch.float64) * 0.9 + 0.1
    w[1, 0] = -1e-4
    w[2, :5] = 0
    A = gram_with_spectrum(w).to(a_dtype)
    G = torch.randn(3, 4, 20, dtype=torch.float64).to(g_dtype)
    for lam in (5e-5, 0.0):
        ref = ak.ridge_solve(G, A, lam, backend="reference")
        kappa = 2e4  # the -1e-4 eigenvalue: 1/(λ) for λ = 5e-5, and pinv inverts it too (|w| > cutoff)
        assert rel_err(C.ridge_solve_emulated(G, A, lam), ref.double()) <= tol_for(g_dtype, a_dtype, kappa, 20) + 1e-5


def test_cuda_code_path_emulated_errors_name_the_batch_index():
    C = _emulation()
    A = random_gram((4,), 5, 9).float()
    A[2, 0, 1] = float("inf")
    with pytest.raises(ValueError, match=r"A\[2\] \(batch index 2 of batch shape \(4,\)\) is not finite"):
        C.ridge_solve_emulated(torch.randn(4, 2, 5), A, 1e-3)
    w = torch.linspace(0.1, 1, 5, dtype=torch.float64).repeat(4, 1)
    w[3, 0] = -0.2
    for lam in (1e-6, 100.0, 0.0):
        with pytest.raises(ValueError, match=r"A\[3\] .* is not a Gram matrix"):
            C.ridge_solve_emulated(torch.randn(4, 2, 5), gram_with_spectrum(w).float(), lam)


def test_cuda_tile_indexing_beyond_2_31():
    """Block -> (entry, tile) and the grid cap, at sizes whose element offsets exceed 2^31 and 2^32
    (index logic only: no memory is touched)."""
    C = _emulation()
    for nb, d in [(2048, 1152), (3, 70000), (1, 1 << 20)]:
        nt = -(-d // 32)
        total = nb * nt * nt
        grid, block, _, _ = C.ridge_cuda_launch(nb, d, 1)
        assert block == 256 and grid == min(total, 2 ** 31 - 1)
        for blk in (0, total // 3, total - 1, 2 ** 31 + 7 if total > 2 ** 31 + 7 else total - 2):
            b, i0, j0 = C.ridge_tile_coords(blk, nt)
            assert b * nt * nt + (i0 // 32) * nt + j0 // 32 == blk
            assert 0 <= b < nb and 0 <= i0 < d and 0 <= j0 < d
            last = (b * d + min(i0 + 31, d - 1)) * d + min(j0 + 31, d - 1)  # the tile's last element offset
            assert last < nb * d * d
    assert (2048 * 1152 * 1152) > 2 ** 31 and 3 * 70000 * 70000 > 2 ** 32


def test_cpu_per_entry_lapack_path(fresh_seed):
    """D > 256 on CPU: one entry at a time in a reused buffer factorised in place; the fallback, the Gram
    certificate and the errors work there as in the batched driver."""
    if "cpu" not in ak.available_backends():
        pytest.skip("the C++ extension is not built")
    d = 260
    w = torch.rand(4, d, dtype=torch.float64) * 0.9 + 0.1
    w[1, 0] = -1e-4  # Cholesky fails for small λ: fallback
    A = gram_with_spectrum(w).float()
    G = torch.randn(4, 3, d)
    for lam in (5e-5, 1e-2, 1e3):
        out = ak.ridge_solve(G, A, lam, backend="cpu")
        ref = ak.ridge_solve(G.double(), A.double(), lam, backend="reference")
        unfused = hook_ops().ridge_solve_unfused(G, A, lam)
        kappa = (1 + lam) / lam
        assert rel_err(out, ref) <= tol_for(torch.float32, torch.float32, kappa, d), lam
        assert rel_err(unfused, ref) <= tol_for(torch.float32, torch.float32, kappa, d), lam
    w[3, 0] = -0.2
    with pytest.raises(ValueError, match=r"A\[3\] .* is not a Gram matrix"):
        ak.ridge_solve(G, gram_with_spectrum(w).float(), 1e3, backend="cpu")  # found by the certificate
    A[2, 5, 7] = float("nan")
    with pytest.raises(ValueError, match=r"A\[2\] .* is not finite"):
        ak.ridge_solve(G, A, 1e-2, backend="cpu")


@pytest.mark.parametrize("d,nb,lam,kind", [
    (16, 3, 1e-3, "wide"), (256, 2, 1e-3, "wide"), (257, 1, 1e-3, "wide"), (576, 1, 1e-3, "rank100"),
    (576, 3, 1e-3, "wide"), (300, 2, 0.0, "wide"), (300, 2, 1e-6, "indefinite"),
])
def test_cpu_result_is_bitwise_independent_of_the_thread_count(d, nb, lam, kind):
    """SPEC §3: the CPU solve gives the same bits at 1, 2 and 3 threads at every D: the fused path (D <= 256),
    LAPACK per entry (D > 256; the issue's case: D = 576, M = 100, every element differed, relative 6e-2),
    pinv (lam = 0) and the eigendecomposition fallback (a Cholesky that fails)."""
    if not torch.ops.avg_kernels_C.ridge_lapack_is_sequential():
        pytest.skip("this torch's LAPACK is not MKL: its thread count is not set per call (csrc/cpu/ridge.cpp)")
    gen = torch.Generator().manual_seed(d * 10 + nb)
    m = 100 if kind == "rank100" else 2 * d
    X = torch.randn(nb, d, m, generator=gen)
    A = X @ X.mT / m
    if kind == "indefinite":  # one eigenvalue slightly below zero: Cholesky of S + lam I fails, eigh takes over
        w, V = torch.linalg.eigh(A.double())
        w[:, 0] = -1e-5 * w[:, -1]
        A = (V * w[:, None, :] @ V.mT).float()
    G = torch.randn(nb, 64, d, generator=gen)
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(ak.ridge_solve(G, A, lam, backend="cpu"))
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(outs[0]).all()
    for o in outs[1:]:
        assert torch.equal(o, outs[0])


def test_cpu_many_right_hand_sides_use_the_explicit_inverse(fresh_seed):
    """C > 2/3 D (csrc/ridge_driver.cpp, solve_by_inverse): per entry, cholesky_inverse and one GEMM instead of
    cholesky_solve, at D <= 256 too (instead of the fused kernel): the float64 result is exactly
    G @ cholesky_inverse(cholesky(S + λI)) at 1 thread; bitwise the same at 1, 2 and 3 threads, with an entry
    whose Cholesky fails (eigh fallback); within SPEC §3's bound on ill-conditioned float32 systems."""
    if "cpu" not in ak.available_backends():
        pytest.skip("the C++ extension is not built")
    gen = torch.Generator().manual_seed(11)
    d, c = 96, 160
    A = random_gram((2,), d, d + 5)
    A = (A + A.mT) / 2
    G = torch.randn(2, c, d, dtype=torch.float64, generator=gen)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expect = G @ torch.cholesky_inverse(torch.linalg.cholesky(A + 0.1 * torch.eye(d, dtype=torch.float64)))
        torch.testing.assert_close(ak.ridge_solve(G, A, 0.1, backend="cpu"), expect, rtol=1e-13, atol=0)
    finally:
        torch.set_num_threads(threads)
    for d, rows in ((256, 512), (300, 600)):
        X = torch.randn(3, d, d // 4, generator=gen)  # rank d / 4: ill-conditioned for small λ
        A = X @ X.mT
        w, V = torch.linalg.eigh(A[2].double())
        w[0] = -1e-5 * w[-1]  # entry 2: Cholesky of S + λI fails, eigh takes over
        A[2] = (V * w @ V.mT).float()
        G = torch.randn(3, rows, d, generator=gen)
        lam = 1e-5 * float(torch.linalg.eigvalsh(A[0].double())[-1])
        outs = []
        try:
            for t in (1, 2, 3):
                torch.set_num_threads(t)
                outs.append(ak.ridge_solve(G, A, lam, backend="cpu"))
        finally:
            torch.set_num_threads(threads)
        if torch.ops.avg_kernels_C.ridge_lapack_is_sequential():
            for o in outs[1:]:
                assert torch.equal(o, outs[0]), d
        ref = ak.ridge_solve(G.double(), A.double(), lam, backend="reference")
        assert rel_err(outs[0][:2], ref[:2]) <= tol_for(torch.float32, torch.float32, cond(A[:2], lam), d), d
