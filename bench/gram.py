"""Benchmark of the input Grams (SPEC §3): ``avg_kernels.im2col_gram`` / ``linear_gram``.

The issue's three cases, each in one run and back to back:

* (a) conv 3×3, padding 1, 64 channels, N×64×56×56 input (D = 576);
* (b) conv 3×3, padding 1, 256 channels, N×256×14×14 input (D = 2304);
* (c) Linear, 4096 features, M rows (D = 4096);
* (d) Conv3d 3×3×3, padding 1, 32 channels, N×32×16×16×16 input (D = 864): not one of the issue's cases
  (no committed table row yet); the peer unfolds with ``Tensor.unfold`` per dim (F.unfold is 2-D only).

Implementations: every available compiled backend ("cpu" on CPU; "cuda" and "triton" on a GPU; never
the float64 reference nor Triton's CPU interpreter) against ``unfold+matmul``: ``F.unfold`` of the
input, the columns of all samples side by side (``transpose(0, 1).reshape(D, M)``) and one ``X @ X.T``
(for Linear the unfold is the identity: ``x.T @ x``), in float32, as a user would write it.

Figures per case: median time (the harness's policy: interleaved rounds of
``Timer.blocked_autorange`` on CPU, ``triton.testing.do_bench`` on CUDA), the ratio to unfold+matmul,
the relative Frobenius error against the float64 reference, and the PEAK EXTRA MEMORY of one call:
the most heap memory alive during the call beyond what was alive before it, minus the returned
(groups, D, D) result itself. How it is measured:

* CPU: a child process runs the call with ``bench/memtrack.c`` LD_PRELOADed, a tracking allocator
  that wraps malloc/calloc/realloc/posix_memalign/aligned_alloc/free of the whole process (torch's CPU
  allocator, std::vector, MKL's own buffers, everything) and keeps live/peak bytes
  (``malloc_usable_size``) in atomic counters; the call is made once before measuring (lazy
  initialisation, thread pools), then the peak is reset to the live bytes and the call measured.
* CUDA: ``torch.cuda.reset_peak_memory_stats`` / ``max_memory_allocated`` around the call.

On CPU the quick mode scales the batch of (a) to N = 16 (the issue's N = 64 needs 882 MB for unfold
alone and ~1.5 s per unfold+matmul call on 2 loaded cores; ``--full`` runs N = 64), (b) to N = 32
(full: 128) and (c) to M = 1024 rows (full: 4096). On a GPU every mode runs the full sizes.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/gram.py [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import avg_kernels as ak
from avg_kernels.reference.gram import unfold3d

from bench.harness import Context, Report, Row, add_ratios

NAME = "gram"
PEER = "unfold+matmul"

# case -> (kind, channels or features, spatial size, quick batch on CPU, full batch)
CASES = {
    "a": ("conv", 64, 56, 16, 64),
    "b": ("conv", 256, 14, 32, 128),
    "c": ("linear", 4096, None, 1024, 4096),
    "d": ("conv3d", 32, 16, 4, 16),
}


def case_title(case: str, n: int) -> str:
    kind, c, hw, _, full = CASES[case]
    scaled = "" if n == full else f" (batch scaled from {full})"
    if kind == "conv":
        return f"({case}) conv 3×3 pad 1, {c} ch, {n}×{c}×{hw}×{hw}, D = {c * 9}{scaled}"
    if kind == "conv3d":
        return f"({case}) conv3d 3×3×3 pad 1, {c} ch, {n}×{c}×{hw}×{hw}×{hw}, D = {c * 27}{scaled}"
    return f"({case}) Linear {c}, {n} rows, D = {c}{scaled}"


def add_arguments(group) -> None:
    group.add_argument("--gram-cases", default=",".join(CASES),
                       help=f"comma-separated Gram cases to run (default: all: {','.join(CASES)})")
    group.add_argument("--gram-batch", type=int, default=None,
                       help="override the batch (conv) / rows (Linear) of every Gram case, e.g. for a smoke test")


def batch(case: str, ctx_mode: str, device: torch.device, override: int | None = None) -> int:
    _, _, _, quick, full = CASES[case]
    if override:
        return override
    return full if (ctx_mode == "full" or device.type == "cuda") else quick


def make_input(case: str, n: int, device, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    kind, c, hw, _, _ = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    shape = {"conv": (n, c, hw, hw), "conv3d": (n, c, hw, hw, hw)}.get(kind, (n, c))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def ours(case: str, backend: str):
    kind = CASES[case][0]
    if kind in ("conv", "conv3d"):
        return lambda x: ak.im2col_gram(x, 3, padding=1, backend=backend)
    return lambda x: ak.linear_gram(x, backend=backend)


def unfold_matmul(case: str):
    kind = CASES[case][0]
    if kind == "conv":
        def f(x):
            cols = F.unfold(x, 3, padding=1)  # (N, D, L)
            cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (D, M): a second copy
            return (cols @ cols.T).unsqueeze(0)
        return f
    if kind == "conv3d":
        def f3(x):
            cols = unfold3d(x, (3, 3, 3), (1, 1, 1), (1, 1, 1), (1, 1, 1))  # (N, D, L), F.pad + Tensor.unfold
            cols = cols.transpose(0, 1).reshape(cols.shape[1], -1)  # (D, M)
            return (cols @ cols.T).unsqueeze(0)
        return f3
    return lambda x: (x.T @ x).unsqueeze(0)


def implementations(case: str, device: torch.device) -> dict:
    from avg_kernels.ops._backend import unavailable_reason

    backends = ["cpu"] if device.type == "cpu" else ["cuda", "triton"]
    impls = {b: ours(case, b) for b in backends if unavailable_reason(b) is None}
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        impls.pop("triton", None)
    impls[PEER] = unfold_matmul(case)
    return impls


# --------------------------------------------------------------------------------------------
# Peak extra memory

def _memtrack_lib() -> Path:
    """bench/memtrack.c compiled into a cached shared library (gcc or cc)."""
    src = Path(__file__).resolve().parent / "memtrack.c"
    out_dir = Path(tempfile.gettempdir()) / f"avg_kernels_memtrack_{os.getuid()}"
    out_dir.mkdir(exist_ok=True)
    lib = out_dir / f"libmemtrack_{int(src.stat().st_mtime)}.so"
    if not lib.exists():
        cc = os.environ.get("CC", "cc")
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([cc, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True, capture_output=True)
        tmp.rename(lib)
    return lib


def _child_measure(case: str, impl: str, n: int, threads: int) -> dict:
    """Runs in the LD_PRELOADed child: peak extra bytes of one call of ``impl`` on case ``case``."""
    import ctypes

    torch.set_num_threads(threads)
    lib = ctypes.CDLL(None)
    lib.memtrack_peak.restype = ctypes.c_long
    lib.memtrack_live.restype = ctypes.c_long
    x = make_input(case, n, "cpu")
    fn = implementations(case, torch.device("cpu"))[impl]
    fn(x)  # lazy initialisation, thread pools, MKL buffers
    base = lib.memtrack_live()
    lib.memtrack_reset()
    out = fn(x)
    peak = lib.memtrack_peak() - base
    return {"peak": peak, "out": out.numel() * out.element_size(), "input": x.numel() * x.element_size()}


def peak_extra_cpu(case: str, impl: str, n: int) -> dict:
    try:
        lib = _memtrack_lib()
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"error": f"memtrack could not be built: {exc}"}
    env = dict(os.environ, LD_PRELOAD=str(lib))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    cmd = [sys.executable, "-m", "bench.gram", "--memory-child", case, impl, str(n), str(torch.get_num_threads())]
    proc = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["child failed"])[-1][:200]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_extra_cuda(fn, x) -> dict:
    fn(x)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(x)
    torch.cuda.synchronize()
    return {"peak": torch.cuda.max_memory_allocated() - base, "out": out.numel() * out.element_size(),
            "input": x.numel() * x.element_size()}


def rel_fro(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.double().cpu(), ref.double().cpu()
    return float(torch.linalg.norm(a - ref) / torch.linalg.norm(ref))


def run(ctx: Context) -> Report:
    rows: list[Row] = []
    notes = [
        f"{PEER}: F.unfold + transpose/reshape to (D, M) + X @ X.T in float32 (Linear: x.T @ x); "
        "ours: one triangle, no unfolded matrix (CPU: shifted channel correlations; GPU: implicit GEMM).",
        "Conv3d (d): ours gathers the kd input depth slices of chunks of output depths as channels (a buffer "
        "of at most 2**24 elements) and runs the Conv2d kernels on them; the peer unfolds with Tensor.unfold.",
        "peak extra MB: most memory alive during one call beyond what was alive before it, minus the "
        "returned Gram itself; CPU: every malloc of the process through an LD_PRELOADed tracking allocator "
        "(bench/memtrack.c) in a child process; CUDA: torch.cuda.max_memory_allocated.",
        "mem % of peer: peak extra MB as a percentage of unfold+matmul's.",
        "err: relative Frobenius error against the float64 F.unfold reference (SPEC §3: 1e-5 with TF32 off).",
    ]
    cases = [c.strip() for c in getattr(ctx.args, "gram_cases", ",".join(CASES)).split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ValueError(f"--gram-cases: unknown {unknown}; expected some of {list(CASES)}")
    for case in cases:
        n = batch(case, ctx.mode, ctx.device, getattr(ctx.args, "gram_batch", None))
        x = make_input(case, n, ctx.device)
        impls = implementations(case, ctx.device)
        title = case_title(case, n)
        common = dict(op=NAME, case=f"({case})", inputs=title, size=x.numel(), dtype="float32")
        measured = ctx.measure_many({k: (lambda f=f: f(x)) for k, f in impls.items()}, **common)
        if CASES[case][0] in ("conv", "conv3d"):
            ref = ak.im2col_gram(x.double().cpu(), 3, padding=1, backend="reference")
        else:
            ref = ak.linear_gram(x.double().cpu(), backend="reference")
        mem = {}
        for name, fn in impls.items():
            r = measured[name]
            try:
                r.accuracy = rel_fro(fn(x), ref)
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: keep the others
                r.error = r.error or f"{type(exc).__name__}: {exc}"[:300]
            m = peak_extra_cpu(case, name, n) if ctx.device.type == "cpu" else peak_extra_cuda(fn, x)
            if "error" in m:
                r.extra["peak extra MB"] = "n/a"
                notes.append(f"({case}) {name}: memory not measured: {m['error']}")
            else:
                extra = max(m["peak"] - m["out"], 0)
                mem[name] = extra
                r.extra["peak extra MB"] = f"{extra / 1e6:.2f}"
                r.extra["peak_extra_bytes"] = extra
        for name in impls:
            if name != PEER and name in mem and PEER in mem:
                # a peer with (almost) no extra memory (Linear: x.T @ x) has no meaningful percentage
                measured[name].extra["mem % of peer"] = (f"{100 * mem[name] / mem[PEER]:.2f} %" if mem[PEER] >= 1e6
                                                         else "– (peer < 1 MB)")
        rows += measured.values()
        del x, ref
    add_ratios(rows, [PEER])
    subjects = [i for i in ("cpu", "cuda", "triton") if any(r.impl == i for r in rows)]
    return Report(op=NAME, title="Input Gram X Xᵀ (im2col_gram / linear_gram) vs F.unfold + matmul", rows=rows,
                  subjects=subjects, peers=[PEER], notes=notes,
                  extra_columns=["peak extra MB", "mem % of peer"])


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--memory-child":
    _, _, case_, impl_, n_, threads_ = sys.argv
    print(json.dumps(_child_measure(case_, impl_, int(n_), int(threads_))))
