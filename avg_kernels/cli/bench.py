"""Runs the benchmarks in the source checkout's bench/ folder (see bench/__init__.py)."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

COMMAND = "bench"
HELP = "run the benchmarks (bench/ in a source checkout): tables + plots under bench/out/ (or --out)"

# bench/ lives at the repository root, next to the avg_kernels package, not inside it.
ROOT = Path(__file__).resolve().parent.parent.parent


def locate_bench():
    """The checkout's ``bench`` package, or a string saying why it cannot be found."""
    init = ROOT / "bench" / "__init__.py"
    if not init.is_file():
        return (f"the benchmarks are not part of an installed avg_kernels: bench/ was not found next to the "
                f"package ({ROOT}). Run from a source checkout: clone the repository, "
                "`pip install --no-build-isolation -e .`, then `python -m avg_kernels bench`.")
    loaded = sys.modules.get("bench")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").resolve() != init.resolve():
        return f"another module named 'bench' is already imported ({loaded!r}); cannot load {init}"
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    try:
        mod = importlib.import_module("bench.runner")
    except ImportError as exc:
        return f"bench/ was found at {ROOT / 'bench'} but failed to import: {exc}"
    if Path(mod.__file__).resolve().parent != init.parent.resolve():
        return f"'bench' resolved to {mod.__file__}, not to {init.parent}: a module named 'bench' shadows it"
    return mod


def configure(parser: argparse.ArgumentParser) -> None:
    runner = locate_bench()
    if isinstance(runner, str):
        parser.set_defaults(_bench_error=runner, _accept_extra=True)  # options unknown: say why, not "usage"
        return
    runner.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    error = getattr(args, "_bench_error", None)
    if error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return locate_bench().run(args)
