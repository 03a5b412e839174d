"""Benchmark of the batched ridge solve (SPEC §3): ``avg_kernels.ridge_solve(G, A, lam)`` = G (A + λI)⁻¹.

Cases (float32, one run, implementations interleaved):

* 25 systems of D = 15 (C = 10 rows of G): many tiny layers;
* 64 systems of D = 576 (C = 64): a 3x3 conv with 64 input channels, 64 layers or groups;
* 64 x D = 576 with rank-deficient Grams (M = 288 < D), G = ΔZ Xᵀ in the range of X as a layer's gradient
  is, and λ = 1e-9·max|A_ii|: float32 Cholesky fails on every system and the eigendecomposition fallback
  runs (the cost of that path; the plain Cholesky peers return garbage there, see their error).

Implementations:

* ``cpu`` / ``triton`` / ``cuda``: the public op (Python checks and dispatch included);
* ``cpu_kernel`` / ``cuda_kernel``: the same driver called bare (internal op ``avg_kernels_C::ridge_solve``);
* ``loop``: a Python loop of per-system ``torch.linalg.cholesky(A[b] + λI)`` + ``torch.cholesky_solve``
  (what the batched op replaces; no symmetrisation, no checks, no fallback);
* ``batched_torch``: the same two calls batched (``cholesky_ex`` + ``cholesky_solve``, no checks, no fallback);
* ``pinv``: ``G @ torch.linalg.pinv(A + λI, hermitian=True)`` batched.

Accuracy (not timed): normwise relative error of each output against a float64 Cholesky solve on the
same float32 inputs (for the fallback case: against the float64 reference backend).
"""
from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/ridge.py [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import avg_kernels as ak

from bench.harness import Context, Report, add_ratios

NAME = "ridge"

CASES = {  # name -> (systems, D, C, rank M or None for 2D, lam: relative to max|A_ii| if negative)
    "25 x D=15": (25, 15, 10, None, 1e-3),
    "64 x D=576": (64, 576, 64, None, 1e-3),
    "64 x D=576 rank-deficient": (64, 576, 64, 288, -1e-9),
}
QUICK = list(CASES)
FULL = list(CASES)


def add_arguments(group) -> None:
    group.add_argument("--ridge-cases", default=None, help=f"comma-separated cases (default: all: {', '.join(CASES)})")


def _inputs(nb, d, c, m, dev, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(nb, d, m or 2 * d, generator=gen)
    A = x @ x.mT
    # full rank: a random G; rank-deficient: G = ΔZ Xᵀ, in the range of X (a layer's weight gradient)
    G = torch.randn(nb, c, d, generator=gen) if m is None else torch.randn(nb, c, m, generator=gen) @ x.mT
    return G.to(dev), A.to(dev)


def _loop(G, A, lam):
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    out = torch.empty_like(G)
    for b in range(A.shape[0]):
        L = torch.linalg.cholesky(A[b] + lam * eye)
        out[b] = torch.cholesky_solve(G[b].mT, L).mT
    return out


def _batched(G, A, lam):
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    L, _ = torch.linalg.cholesky_ex(A + lam * eye)
    return torch.cholesky_solve(G.mT, L).mT


def _pinv(G, A, lam):
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return G @ torch.linalg.pinv(A + lam * eye, hermitian=True)


def _error(out, ref) -> float:
    return ((out.double().cpu() - ref).norm() / ref.norm()).item()


def run(ctx: Context) -> Report:
    dev = ctx.device
    names = [s.strip() for s in ctx.args.ridge_cases.split(",")] if getattr(ctx.args, "ridge_cases", None) else (
        QUICK if ctx.mode == "quick" else FULL)
    bad = [n for n in names if n not in CASES]
    if bad:
        raise SystemExit(f"--ridge-cases: unknown {bad}; expected some of {list(CASES)}")
    avail = ak.available_backends()
    backends = [b for b in (("cpu",) if dev.type == "cpu" else ("triton", "cuda")) if b in avail]
    rows = []
    # Inputs and float64 references first: in this environment (torch 2.13 CPU, MKL) a batched float64
    # torch.linalg.solve (LU) failed with "MKL ERROR: Parameter 6 was incorrect on entry to DLASWP" once
    # torch.utils.benchmark.Timer had run; the references use Cholesky in float64 and come before any timing.
    data = {}
    for name in names:
        nb, d, c, m, lam_spec = CASES[name]
        G, A = _inputs(nb, d, c, m, dev)
        lam = lam_spec if lam_spec > 0 else -lam_spec * A.diagonal(0, -2, -1).amax().item()
        if m:
            ref = ak.ridge_solve(G.double().cpu(), A.double().cpu(), lam, backend="reference")
        else:
            L = torch.linalg.cholesky(A.double().cpu() + lam * torch.eye(d, dtype=torch.float64))
            ref = torch.cholesky_solve(G.double().cpu().mT, L).mT
        data[name] = (G, A, lam, ref)
    bar = ctx.bar(len(names), f"{NAME} on {dev.type}")
    for name in names:
        nb, d, c, m, _ = CASES[name]
        G, A, lam, ref = data[name]
        fns = {b: (lambda b=b: ak.ridge_solve(G, A, lam, backend=b)) for b in backends}
        if ("cpu" in backends or "cuda" in backends) and hasattr(torch.ops.avg_kernels_C, "ridge_solve"):
            kernel = "cpu_kernel" if dev.type == "cpu" else "cuda_kernel"
            fns[kernel] = lambda: torch.ops.avg_kernels_C.ridge_solve(G, A, lam)
        fns["loop"] = lambda: _loop(G, A, lam)
        fns["batched_torch"] = lambda: _batched(G, A, lam)
        fns["pinv"] = lambda: _pinv(G, A, lam)
        common = dict(op=NAME, case=name, inputs=f"G ({nb}, {c}, {d}), A = X Xᵀ with X ({nb}, {d}, {m or 2 * d}), "
                                                  f"λ = {lam:.3g}", size=nb * d * d, dtype="float32")
        measured = ctx.measure_many(fns, None, **common)
        for impl, row in measured.items():
            if row.error is None:
                try:
                    row.accuracy = _error(fns[impl](), ref)
                except Exception as exc:  # noqa: BLE001
                    row.error = f"{type(exc).__name__}: {exc}"[:200]
            rows.append(row)
        bar.update(1)
    bar.close()
    peers = ["loop", "batched_torch", "pinv"]
    add_ratios(rows, peers)
    subjects = backends + [k for k in ("cpu_kernel", "cuda_kernel") if any(r.impl == k for r in rows)]
    notes = [
        "Subjects: " + ", ".join(f"`{b}`" for b in backends) + " = `avg_kernels.ridge_solve(G, A, lam, backend=...)` "
        "(public op: validation, backend choice, custom-op dispatch included); `cpu_kernel`/`cuda_kernel` = the same "
        "driver called bare. It symmetrises A, checks it (finite, Gram), factorises and solves; on CPU systems of "
        "D <= 256 take a fused per-system path, larger ones LAPACK one entry after the other; where G has more than "
        "2/3 D rows (D >= 64), the explicit inverse and one GEMM per entry instead (docs/kernel_choices.md).",
        "Peers: `loop` = Python loop over the systems of torch.linalg.cholesky(A[b] + λI) + torch.cholesky_solve; "
        "`batched_torch` = the same two calls batched (cholesky_ex, no checks, no fallback: wrong where Cholesky "
        "fails, see the rank-deficient case's error); `pinv` = G @ torch.linalg.pinv(A + λI, hermitian=True).",
        "`X vs P` = time(P) / time(X): above 1 means X is faster. `err X` = normwise relative error against float64 "
        "Cholesky (torch.linalg.cholesky + cholesky_solve) on the same float32 inputs (rank-deficient case: against the float64 reference backend, "
        "which applies the same clamped-eigenvalue fallback).",
        "Rank-deficient case: λ = 1e-9·max|A_ii| is far below the float32 rounding level of the Gram's null-space "
        "eigenvalues (~1e-7·‖A‖), so every float32 result is dominated by amplified rounding noise there (err ~1 "
        "or more, also for pinv); this is why SPEC §3 and the C-optimizers use the M × M form when M < D. The case "
        "times the eigendecomposition fallback (it makes ridge_solve return instead of fail: `loop` raises, "
        "`batched_torch` returns garbage without noticing).",
    ]
    title = f"Batched ridge solve (ridge_solve), {dev.type.upper()}, {ctx.mode} sweep"
    return Report(op=NAME, title=title, rows=rows, subjects=subjects, peers=peers, notes=notes,
                  config={"cases": names})


if __name__ == "__main__":
    from bench.runner import main

    sys.exit(main(["--ops", NAME, *sys.argv[1:]]))
