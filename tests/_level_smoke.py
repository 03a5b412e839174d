"""A reduced parity set of every C++ CPU op, run at one capability level: by tests/test_cpu_capability.py
at every level this machine supports (switching in-process), and by tests/test_cpu_emulated.py as a
script under qemu-user emulation of older CPUs, where an instruction the level must not use dies with
SIGILL.

Each check runs the public op with backend="cpu" on small random inputs (odd sizes, every dtype, both
paths where an op has two) and compares with the float64 reference at the SPEC's tolerances, so every
kernel of the level's table executes. As a script it prints one JSON object:
{"level": ..., "features": {...}, "results": [[name, error or null], ...]}.

    python tests/_level_smoke.py [--level LEVEL]     (LEVEL: switch to it first; default: as imported)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch

import avg_kernels as ak
from avg_kernels import EPS, _build, reference
from avg_kernels.activations import resolve

from _accuracy import (CONFIGS, config_id, float64_violations, kernel_act, reduced_precision_violations, slope_errors,
                       spec_inputs)
from test_ag_update import exact_ag1, same_bits

# One configuration per kernel-level activation: the last of _accuracy.CONFIGS for it (non-default parameters).
ACTS = list({kernel_act(c).name: c for c in CONFIGS}.values())
FLOATS = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp(min=1e-300)).item()


def check_avg_act(gen):
    """SPEC §1's bars per dtype (the same as tests/test_avg_act.py), every activation."""
    for act, params in ACTS:
        k = resolve(act, params)
        for dtype in FLOATS:
            g, x, xn = spec_inputs(1037, dtype=dtype, generator=gen)
            out = ak.avg_act_backward(g, x, xn, act, backend="cpu", **params)
            if dtype == torch.float32:
                _, bad, normwise, _ = slope_errors(out, g, x, xn, k)
                err, tol = (normwise if not bad.any() else math.inf), 1e-6
            else:
                bad = (float64_violations(out, g, x, xn, k) if dtype == torch.float64 else
                       reduced_precision_violations(out, g, reference.avg_act_backward(g.double(), x.double(),
                                                                                      xn.double(), k, EPS)))
                err, tol = float(bad.sum()), 0.0
            yield f"avg_act_backward[{config_id((act, params))},{dtype}]", err, tol


def check_ag(gen):
    """AG-1 bitwise equal to the formula in the arithmetic dtype (SPEC §2), AG-2 to rounding."""
    shapes = [(5, 7), (1033,), (3, 1, 17), (70000,)]  # the last: several work items (16384 elements each)
    mixes = [(torch.float32,) * 3, (torch.float64,) * 3, (torch.float16,) * 3, (torch.bfloat16,) * 3,
             (torch.bfloat16, torch.float32, torch.float32), (torch.float32, torch.float16, torch.float64)]
    for mix in mixes:
        name = ",".join(str(t).split(".")[1] for t in mix)
        params = [torch.randn(s, generator=gen).to(mix[0]) for s in shapes]
        new = [(p.double() + torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.1).to(mix[1]) for p in params]
        grads = [torch.randn(p.shape, generator=gen).to(mix[2]) for p in params]
        grads[0].view(-1)[::4] = 0
        got = [p.clone() for p in params]
        ak.ag1_update_(got, new, grads, backend="cpu")
        same = all(same_bits(a, exact_ag1(p, q, g)) for a, p, q, g in zip(got, params, new, grads))
        yield f"ag1_update_[{name}]", 0.0 if same else math.inf, 0.0
        got_new, kept = [q.clone() for q in new], [p.clone() for p in params]
        ak.ag1_update_new_(kept, got_new, grads, backend="cpu")  # θ_{t+1} over θ', rounded to θ''s dtype
        same = all(same_bits(a, exact_ag1(p, q, g, into=q.dtype)) for a, p, q, g in zip(got_new, params, new, grads))
        same &= all(same_bits(a, p) for a, p in zip(kept, params))
        yield f"ag1_update_new_[{name}]", 0.0 if same else math.inf, 0.0
        old = [(p.double() + 0.01).to(mix[1]) for p in params]
        step = [(p.double() - 0.02).to(mix[2]) for p in params]
        want = [p.clone() for p in params]
        ak.ag2_rescale_(want, old, step, backend="reference")
        got = [p.clone() for p in params]
        ak.ag2_rescale_(got, old, step, backend="cpu")
        err = max(_rel(a, b) for a, b in zip(got, want))
        tol = 1e-12 if all(t == torch.float64 for t in mix) else 4 * torch.finfo(mix[0]).eps
        yield f"ag2_rescale_[{name}]", err, tol


def check_gram(gen):
    prev = torch.ops.avg_kernels_C.set_gram_path(0)
    cases = [  # (shape, kernel, stride, padding, dilation, groups, bias)
        ((2, 5, 9, 11), 3, 1, 1, 1, 1, True),     # general correlation path
        ((2, 17, 8, 7), 3, 2, 1, 1, 1, False),    # strided
        ((1, 16, 6, 6), 1, 1, 0, 1, 1, False),    # 1x1: accumulates straight into A
        ((2, 12, 7, 9), 3, 1, 1, 1, 12, True),    # depthwise
        ((2, 6, 9, 8), (2, 3), 1, (0, 1), 2, 2, False),
        ((3, 4, 13), 5, 2, 2, 1, 1, True),        # conv1d
    ]
    try:
        for path in (-1, 1):  # correlation kernels only, then the im2col GEMM path everywhere
            torch.ops.avg_kernels_C.set_gram_path(path)
            for shape, k, s, p, d, g, b in cases:
                for dtype in (torch.float32, torch.float64, torch.bfloat16):
                    x = torch.randn(shape, generator=gen).to(dtype)
                    out = ak.im2col_gram(x, k, s, p, d, g, b, backend="cpu")
                    ref = ak.im2col_gram(x.double(), k, s, p, d, g, b, backend="reference")
                    yield f"im2col_gram[{shape},k={k},s={s},g={g},b={b},{dtype},path={path}]", _rel(out, ref), 1e-5
            for shape, b in (((37, 19), True), ((5, 3, 80), False)):
                x = torch.randn(shape, generator=gen)
                out = ak.linear_gram(x, b, backend="cpu")
                ref = ak.linear_gram(x.double(), b, backend="reference")
                yield f"linear_gram[{shape},b={b},path={path}]", _rel(out, ref), 1e-5
    finally:
        torch.ops.avg_kernels_C.set_gram_path(prev)


def check_ridge(gen):
    """Every path of the driver: fused small systems, one LAPACK factorisation per entry (D > 256), the
    eigendecomposition fallback (A + λI indefinite), the pseudoinverse (λ = 0). Normwise bound as in
    tests/test_ridge.py: ~sqrt(D)·u·κ with margin."""
    cases = [(7, 3, 20, 1e-3, 0.0), (40, 5, 200, 1e-2, 0.0), (300, 4, 600, 1e-1, 0.0), (30, 4, 10, 1e-10, -1e-8),
             (9, 2, 30, 0.0, 0.0)]  # (D, C, M, λ, shift): A = X Xᵀ + shift·I
    for D, C, M, lam, shift in cases:
        for dtype in (torch.float32, torch.float64):
            if shift and dtype == torch.float32:
                continue  # κ ~ 1e10: a float32 answer says nothing there
            X = torch.randn(2, D, M, generator=gen, dtype=torch.float64)
            A = X @ X.mT + shift * torch.eye(D, dtype=torch.float64)
            G = torch.randn(2, C, D, generator=gen).to(dtype)
            out = ak.ridge_solve(G, A.to(dtype), lam, backend="cpu")
            ref = ak.ridge_solve(G.double(), A.to(dtype).double(), lam, backend="reference")
            w = torch.linalg.eigvalsh(A).abs()
            kappa = ((w.max() + lam) / (w.clamp(min=1e-300).min() + lam if lam else w[w > 1e-6 * w.max()].min())).item()
            tol = 20 * math.sqrt(D) * torch.finfo(dtype).eps * kappa + 4 * torch.finfo(dtype).eps
            yield f"ridge_solve[D={D},M={M},lam={lam},shift={shift},{dtype}]", _rel(out, ref), tol


def check_vec_math(gen):
    ops = _build.testing_extension() and torch.ops.avg_kernels_testing
    if not ops:
        return
    x = torch.cat([torch.linspace(-100, 88, 4001), torch.tensor([0.0, -0.0, 1e-30, -1e-30])])
    for dtype in (torch.float32, torch.float64):
        xd = x.to(dtype)
        for fn, ref_fn, arg in (("exp", torch.exp, xd), ("erfc", torch.special.erfc, xd / 8),
                                ("log1p", torch.log1p, xd.abs())):
            got = ops.vec_math_probe(arg, fn).double()
            want = ref_fn(arg.double())
            keep = want.isfinite() & (want.abs() > 1e-30)
            err = ((got - want).abs() / want.abs())[keep].max().item()
            yield f"vec_math[{fn},{dtype}]", err, 16 * torch.finfo(dtype).eps


CHECKS = (check_avg_act, check_ag, check_gram, check_ridge, check_vec_math)


def run_all(seed: int = 0) -> list[tuple[str, str | None]]:
    """[(check name, None when it passed or a message)] for every check, at the active level."""
    gen = torch.Generator().manual_seed(seed)
    results = []
    for check in CHECKS:
        try:
            for name, err, tol in check(gen):
                ok = math.isfinite(err) and err <= tol
                results.append((name, None if ok else f"error {err:.3g} > {tol:.3g}"))
        except Exception as exc:  # noqa: BLE001 - reported per check, the run goes on
            results.append((check.__name__, f"{type(exc).__name__}: {exc}"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--level", default=None, help="switch to this capability level first")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    if args.level:
        _build.set_cpu_capability(args.level)
    out = {"level": ak.cpu_capability(), "features": _build.cpu_features(), "supported": _build.supported_levels(),
           "results": run_all()}
    print(json.dumps(out))
    return 0 if all(err is None for _, err in out["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
