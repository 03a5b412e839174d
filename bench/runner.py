"""Runs the registered op-family benchmarks and writes their tables (``python -m avg_kernels bench``)."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path

from . import OPS, OPT_IN

# A run writes here unless --out says otherwise: git-ignored, so the main job leaves the checkout clean.
# The committed tables in bench/results/ are written with `--out bench/results`.
DEFAULT_OUT = Path(__file__).resolve().parent / "out"
COMMITTED = Path(__file__).resolve().parent / "results"
MIN_RUN_TIME = {"cpu": {"quick": 0.3, "full": 0.6}, "cuda": {"quick": 0.1, "full": 0.1}}
ROUNDS = {"cpu": 3, "cuda": 1}
# --cpu-capability: the level's vector width for torch.compile's generated C++ (inductor's cpp.simdlen);
# None leaves inductor to follow ATEN_CPU_CAPABILITY ("default": scalar code).
SIMDLEN = {"default": None, "avx2": 256, "avx512": 512}
LEVEL_ENV = ("AVG_KERNELS_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY")
# MKL (torch's matmul/LAPACK on x86) ignores ATEN_CPU_CAPABILITY: its own variable caps its code path, so the
# matmul peers run at the level too.
MKL_LEVEL = {"default": "SSE4_2", "avx2": "AVX2", "avx512": "AVX512"}


def _modules(names=None):
    return {name: importlib.import_module(OPS[name]) for name in (names or OPS)}


def _ops(text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [n for n in names if n not in OPS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--ops: unknown {unknown or text!r}; registered: {', '.join(OPS)}")
    return names


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .harness import parse_dtypes, parse_sizes

    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick",
                      help="a few sizes, dtypes and cases; minutes on 2 CPU cores (the default)")
    mode.add_argument("--full", dest="mode", action="store_const", const="full",
                      help="the full sweep (every case, dtype and size; long)")
    parser.set_defaults(mode="quick")
    parser.add_argument("--ops", type=_ops, default=[n for n in OPS if n not in OPT_IN],
                        help=f"comma-separated op families (default: all but {', '.join(OPT_IN)}: "
                             f"{','.join(n for n in OPS if n not in OPT_IN)})")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help=f"output folder (default: {DEFAULT_OUT}, git-ignored; the committed tables are in "
                             f"{COMMITTED})")
    parser.add_argument("--device", default=None,
                        help="cpu or cuda (default: cuda when a GPU is present, else cpu)")
    parser.add_argument("--sizes", type=parse_sizes, default=None,
                        help="override the sizes: exponents of 2, e.g. 16,20,22 or 10-26 or 10-28/2")
    parser.add_argument("--dtypes", type=parse_dtypes, default=None,
                        help="override the dtypes, e.g. float32,bfloat16")
    parser.add_argument("--min-run-time", type=float, default=None,
                        help="seconds per measurement (CPU: Timer.blocked_autorange; CUDA: do_bench rep)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="CPU: interleaved rounds per case (default 3; see bench.harness.Context.measure_many)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads(N) before measuring")
    parser.add_argument("--cpu-capability", choices=list(SIMDLEN), default=None,
                        help="CPU: run every side at this level, as on a CPU that has nothing better: our kernels "
                             "(AVG_KERNELS_CPU_CAPABILITY), torch's eager kernels (ATEN_CPU_CAPABILITY) and the code "
                             "torch.compile generates (inductor cpp.simdlen) and MKL's matmuls "
                             "(MKL_ENABLE_INSTRUCTIONS); the process restarts itself with the variables set, since "
                             "they are read when torch, MKL and avg_kernels load")
    parser.add_argument("--tag", default="", help="added to the output file names")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    for name, mod in _modules().items():
        if hasattr(mod, "add_arguments"):
            mod.add_arguments(parser.add_argument_group(f"{name} options"))


def _force_cpu_capability(level: str) -> None:
    """Sets the level for every side of the comparison (see --cpu-capability); restarts this process when
    the environment does not say it yet (torch and avg_kernels read it once, when they load)."""
    want = {**{k: level for k in LEVEL_ENV}, "MKL_ENABLE_INSTRUCTIONS": MKL_LEVEL[level]}
    if any(os.environ.get(k) != v for k, v in want.items()):
        os.environ.update(want)
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    import torch._inductor.config as inductor_config

    inductor_config.cpp.simdlen = SIMDLEN[level]


def run(args: argparse.Namespace) -> int:
    if getattr(args, "cpu_capability", None):
        _force_cpu_capability(args.cpu_capability)
    import torch

    from . import machine, results
    from .harness import Context

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET is set; the interpreted Triton backend is never timed", file=sys.stderr)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA device is present", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or ROUNDS.get(device.type, 1)
    min_run_time = args.min_run_time or MIN_RUN_TIME.get(device.type, MIN_RUN_TIME["cpu"])[args.mode]
    info = machine.machine_info()
    if info["extension"].get("maybe_stale"):
        print("warning: " + machine.kernel_commit_line(info), file=sys.stderr)
    load, cpus = (info["loadavg"] or [0])[0], info["cpus_usable"] or 1
    if device.type == "cpu" and load > cpus and torch.get_num_threads() > 1 and "OMP_WAIT_POLICY" not in os.environ:
        print(f"warning: this machine is loaded (load average {load} on {cpus} CPUs). OpenMP's default spin-wait "
              "then stalls multi-threaded ops for whole scheduler time slices (measured here: a 0.3 ms copy "
              "taking 16 ms); set OMP_WAIT_POLICY=PASSIVE before starting Python, or use --threads 1",
              file=sys.stderr)
    ctx = Context(mode=args.mode, device=device, min_run_time=min_run_time, args=args, sizes=args.sizes,
                  dtypes=args.dtypes, progress=args.progress, rounds=rounds)
    written = []
    for name, mod in _modules(args.ops).items():
        t0 = time.perf_counter()
        report = mod.run(ctx)
        wall = time.perf_counter() - t0
        report.config.update(mode=args.mode, device=str(device), min_run_time_s=min_run_time, rounds=rounds,
                             loadavg_end=[round(v, 2) for v in os.getloadavg()])
        stem = "-".join(filter(None, [name, device.type, args.mode, args.tag]))
        paths = results.write_all(report, info, args.out, stem, wall_s=wall)
        written += paths.values()
        print(results.markdown(report, info, wall))
        print(f"[{name}] {len(report.rows)} rows in {wall:.0f} s -> {paths['md']}", file=sys.stderr)
    print("wrote:\n  " + "\n  ".join(str(p) for p in written), file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))
