"""Benchmark of the averaged activation backward (SPEC §1): ``avg_kernels.avg_act_backward``.

Per activation, input distribution, dtype and size, in one run and back to back:

* every available compiled backend ("cpu" on CPU; "triton" and "cuda" on a GPU; never the float64
  "reference" nor Triton's CPU interpreter);
* ``cpu_kernel`` / ``cuda_kernel``: the same compiled kernel called bare (the internal op
  ``torch.ops.avg_kernels_C.avg_act_backward_out`` into a preallocated output): the difference to the
  backend's row is the public op's Python, checks and allocation overhead;
* ``eager``: the literal formula in eager PyTorch, in the input dtype,
  ``where(|d| <= eps, PyTorch's g*f'(x), g * (f(x_new) - f(x)) / d)`` (the papers' float32 secant);
* ``compile``: ``torch.compile(dynamic=False)`` of that same function (compiled per activation, dtype
  and size after ``torch._dynamo.reset()``; compile time excluded from the timing, reported apart);
* ``native``: PyTorch's own activation backward (``aten.tanh_backward(g, y)`` etc.; computes f', not
  the average: a floor, it reads one tensor less);
* ``copy``: ``dst.copy_(src)`` of 2n elements = the same 4n elements of traffic as the op (3 reads +
  1 write): the bandwidth ceiling.

Accuracy (not timed): normwise relative error of each implementation's output against the float64
reference over the elements with |d| > eps, once per (activation, inputs, dtype) at 2^16 elements.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/avg_act.py [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

import avg_kernels as ak
from avg_kernels import reference
from avg_kernels.activations import EPS, KERNEL_ACTS, KernelAct, forward, native_backward, resolve

from bench.harness import Context, Report, Row, add_ratios, dtype_name, log2_size

NAME = "avg_act"
QUICK_ACTS = ("tanh", "sigmoid", "gelu", "silu")
SIZES = {  # exponents of 2
    ("cpu", "quick"): [16, 20, 22],
    ("cpu", "full"): list(range(10, 27, 2)),
    ("cuda", "quick"): [16, 20, 24, 28],
    ("cuda", "full"): list(range(10, 29, 2)),
}
DTYPES = {"quick": [torch.float32, torch.bfloat16],
          "full": [torch.float32, torch.bfloat16, torch.float16, torch.float64]}
ACC_SIZE = 2 ** 16
# kernel activation -> (public name, parameters)
PUBLIC = {"gelu_tanh": ("gelu", {"approximate": "tanh"})}

INPUTS = {
    "spec": "SPEC §1 inputs: x uniform |x|≤30 (half ÷10), |d| log-uniform 1e-7..10",
    "train": "training-like inputs: x ~ N(0, σ=2), d ~ N(0, σ=0.01)",
}


def make_inputs(kind: str, n: int, dtype: torch.dtype, device: torch.device, seed: int = 0):
    """(grad_out, x, x_new) of ``n`` elements, generated in float32 (float64 for float64) then cast."""
    gen = torch.Generator(device=device).manual_seed(seed)
    kw = dict(dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=device, generator=gen)
    if kind == "spec":  # as tests/_accuracy.spec_inputs
        x = (torch.rand(n, **kw) * 2 - 1) * 30
        x = torch.where(torch.rand(n, **kw) < 0.5, x, x / 10)
        d = torch.empty(n, dtype=kw["dtype"], device=device).uniform_(math.log(1e-7), math.log(10), generator=gen)
        d = d.exp_() * torch.where(torch.rand(n, **kw) < 0.5, -1.0, 1.0)
    elif kind == "train":
        x = torch.randn(n, **kw) * 2
        d = torch.randn(n, **kw) * 1e-2
    else:
        raise ValueError(f"unknown inputs kind {kind!r}; expected one of {list(INPUTS)}")
    g = torch.randn(n, **kw)
    return g.to(dtype), x.to(dtype), (x + d).to(dtype)


def make_literal(k: KernelAct, eps: float = EPS):
    """A fresh function object computing the literal secant in the input dtype (the eager peer)."""

    def literal(g, x, x_new):
        d = x_new - x
        fx = forward(x, k)
        s = (forward(x_new, k) - fx) / d
        return torch.where(d.abs() <= eps, native_backward(g, x, fx, k), g * s)

    return literal


def normwise_error(out: torch.Tensor, g, x, x_new, k: KernelAct) -> float:
    """‖out − ref‖/‖ref‖ over |d| > eps, ref = the float64 reference on the same (rounded) inputs."""
    g, x, x_new = (t.detach().cpu().double() for t in (g, x, x_new))
    ref = reference.avg_act_backward(g, x, x_new, k, EPS)
    mask = (x_new - x).abs() > EPS
    return ((out.detach().cpu().double() - ref)[mask].norm() / ref[mask].norm()).item()


def subjects(device: torch.device) -> list[str]:
    """The compiled backends that run natively on ``device`` (never the reference or the interpreter)."""
    avail = ak.available_backends()
    wanted = ("cpu",) if device.type == "cpu" else ("triton", "cuda")
    return [b for b in wanted if b in avail]


def add_arguments(group) -> None:
    group.add_argument("--acts", default=None,
                       help=f"activations (kernel names, comma-separated; default quick: {','.join(QUICK_ACTS)}; "
                            f"full: all {len(KERNEL_ACTS)}: {','.join(KERNEL_ACTS)})")
    group.add_argument("--inputs", default=",".join(INPUTS),
                       help=f"input distributions (default: {','.join(INPUTS)})")
    group.add_argument("--no-compile", dest="compile", action="store_false",
                       help="skip the torch.compile peer (saves the compile time)")


def _compile(k: KernelAct, g, x, xn):
    """torch.compile of a fresh literal function for this shape and dtype; returns (fn, seconds, error)."""
    torch._dynamo.reset()  # stay far from dynamo's recompile limit: every (act, dtype, size) compiles anew
    fn = torch.compile(make_literal(k), dynamic=False)
    t0 = time.perf_counter()
    try:
        fn(g, x, xn)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    except Exception as exc:  # noqa: BLE001 - report and go on without this peer
        return None, time.perf_counter() - t0, f"compile failed: {type(exc).__name__}: {str(exc).splitlines()[0]}"
    return fn, time.perf_counter() - t0, None


def run(ctx: Context) -> Report:
    dev = ctx.device
    args = ctx.args
    acts = [a.strip() for a in args.acts.split(",")] if getattr(args, "acts", None) else (
        list(QUICK_ACTS) if ctx.mode == "quick" else list(KERNEL_ACTS))
    bad = [a for a in acts if a not in KERNEL_ACTS]
    if bad:
        raise SystemExit(f"--acts: unknown {bad}; expected kernel activations {list(KERNEL_ACTS)}")
    kinds = [s.strip() for s in getattr(args, "inputs", ",".join(INPUTS)).split(",") if s.strip()]
    if any(kd not in INPUTS for kd in kinds):
        raise SystemExit(f"--inputs: expected some of {list(INPUTS)}, got {kinds}")
    do_compile = getattr(args, "compile", True)
    sizes = ctx.sizes or [2 ** e for e in SIZES[(dev.type, ctx.mode)]]
    dtypes = ctx.dtypes or DTYPES[ctx.mode]
    acc_size = min(sizes, key=lambda s: abs(math.log2(s) - math.log2(ACC_SIZE)))
    backends = subjects(dev)
    raw_op = getattr(torch.ops.avg_kernels_C, "avg_act_backward_out", None) if backends else None
    rows: list[Row] = []
    accuracy: dict[tuple, float] = {}
    compile_s: list[float] = []

    bar = ctx.bar(len(sizes) * len(dtypes) * len(acts) * len(kinds), f"{NAME} on {dev.type}")
    for n in sizes:
        for dtype in dtypes:
            dt = dtype_name(dtype)
            nbytes = 4 * n * dtype.itemsize  # 3 tensors read + 1 written, once each
            src = torch.empty(2 * n, dtype=dtype, device=dev).uniform_()
            dst = torch.empty_like(src)
            data = {kd: make_inputs(kd, n, dtype, dev, seed=1000 + i) for i, kd in enumerate(kinds)}
            for act in acts:
                public, params = PUBLIC.get(act, (act, {}))
                k = resolve(public, params)
                literal = make_literal(k)
                compiled, c_s, c_err = None, None, "skipped (--no-compile)"
                if do_compile:
                    compiled, c_s, c_err = _compile(k, *data[kinds[0]])
                    compile_s.append(c_s)
                for kd in kinds:
                    g, x, xn = data[kd]
                    y = forward(x, k)
                    fns = {b: (lambda b=b: ak.avg_act_backward(g, x, xn, public, backend=b, **params))
                           for b in backends}
                    for b in backends:  # the bare kernel: no Python wrapper, no checks, output preallocated
                        if b in ("cpu", "cuda") and raw_op is not None:
                            out = torch.empty_like(x)
                            fns[f"{b}_kernel"] = (lambda out=out: raw_op(g, x, xn, out, k.kernel_id, k.p0, k.p1, EPS))
                    fns["eager"] = lambda: literal(g, x, xn)
                    if compiled is not None:
                        fns["compile"] = lambda: compiled(g, x, xn)
                    fns["native"] = lambda: native_backward(g, x, y, k)
                    fns["copy"] = lambda: dst.copy_(src)  # measured with every case: same-run ratios
                    common = dict(op=NAME, case=act, inputs=INPUTS[kd], size=n, dtype=dt)
                    nb = {impl: nbytes for impl in fns}
                    nb["native"] = 3 * n * dtype.itemsize
                    measured = ctx.measure_many(fns, nb, **common)
                    for impl, row in measured.items():
                        if impl == "compile":
                            row.extra["compile_s"] = round(c_s, 3)
                        if n == acc_size and row.error is None and impl not in ("copy", "cpu_kernel", "cuda_kernel"):
                            accuracy[(act, kd, dt, impl)] = normwise_error(fns[impl](), g, x, xn, k)
                        rows.append(row)
                    if compiled is None and do_compile:
                        rows.append(Row(device=str(dev), impl="compile", error=c_err, **common))
                    bar.update(1)
                    bar.set_postfix_str(f"{act} {dt} {log2_size(n)}")
                del compiled
            del data, src, dst
            if dev.type == "cuda":
                torch.cuda.empty_cache()
    bar.close()
    torch._dynamo.reset()

    for r in rows:
        kd = next((key for key, label in INPUTS.items() if label == r.inputs), None)
        r.accuracy = accuracy.get((r.case, kd, r.dtype, r.impl))
    peers = ["eager", "compile", "native", "copy"]
    add_ratios(rows, peers)
    ours = ", ".join(f"`{b}`" for b in backends) or "NONE (no compiled backend available: build the extension)"
    notes = [
        f"Subjects: {ours} = `avg_kernels.avg_act_backward(..., backend=...)` through the public op (its Python "
        "and dispatch overhead included); `cpu_kernel`/`cuda_kernel` = the same kernel called bare (internal op, "
        "preallocated output: the gap is the public op's overhead). Peers: `eager` = the literal secant `where(|d|<=eps, g*f'(x), "
        "g*(f(x_new)-f(x))/d)` in eager PyTorch in the input dtype; `compile` = torch.compile(dynamic=False) of "
        "that function (compile time excluded); `native` = PyTorch's own backward of f (g*f'(x), not the "
        "average; reads 3 tensors not 4); `copy` = copy_ of 2n elements (the same 4n elements of traffic).",
        "Times are medians (CPU: torch.utils.benchmark.Timer.blocked_autorange with torch's thread count; "
        "CUDA: triton.testing.do_bench). `X vs P` = time(P) / time(X): above 1 means X is faster. "
        "`% of copy` = time(copy) / time(X): the fraction of the copy bandwidth reached. GB/s counts the "
        "compulsory bytes only (each input read once, the output written once).",
        f"`err X` = normwise relative error of X's output vs the float64 reference over |d| > eps, measured "
        f"once per (activation, inputs, dtype) at {log2_size(acc_size)} elements, not timed (SPEC §1 bar for "
        "float32: 1e-6). For `native` it is the distance of the plain gradient g*f'(x) from the averaged one "
        "(what averaging changes), not a rounding error.",
    ]
    if torch.float64 in dtypes:
        notes.append("float64: the reference IS the literal secant in float64, so `err eager` is 0 there and the "
                     "other float64 errors (~1e-10) are mostly the reference's own cancellation at |d| ~ 1e-7.")
    if compile_s:
        notes.append(f"torch.compile: {len(compile_s)} compiles, {sum(compile_s):.0f} s in total (first call "
                     f"of each; median {sorted(compile_s)[len(compile_s) // 2]:.1f} s), excluded from the times.")
    title = (f"Averaged activation backward (avg_act_backward), {dev.type.upper()}, "
             f"{ctx.mode} sweep")
    config = {"sizes": sizes, "dtypes": [dtype_name(d) for d in dtypes], "acts": acts, "inputs": kinds,
              "accuracy_size": acc_size, "subjects": backends, "compile": do_compile}
    return Report(op=NAME, title=title, rows=rows, subjects=backends, peers=peers, ceiling="copy", notes=notes,
                  config=config)


if __name__ == "__main__":
    from bench.runner import main

    sys.exit(main(["--ops", NAME, *sys.argv[1:]]))
