"""Runs the benchmarks of a source checkout (bench/ at the repository root) as their own program.

The benchmarks are not part of the installed package (they time avg_kernels against its peers and need
the repository's fixtures), so this command does not import them: it runs ``python -m bench ARGS`` in the
checkout, passing every argument through (``python -m avg_kernels bench --help`` lists them).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

COMMAND = "bench"
HELP = "run the benchmarks (bench/ in a source checkout): tables + plots under bench/out/ (or --out)"
PASSTHROUGH = True  # every argument, --help included, goes to bench's own parser (run_argv)

# bench/ lives at the repository root, next to the avg_kernels package, not inside it.
ROOT = Path(__file__).resolve().parent.parent.parent


def locate_bench() -> Path | str:
    """The checkout's ``bench`` folder, or a string saying why it cannot be found."""
    init = ROOT / "bench" / "__init__.py"
    if not init.is_file():
        return (f"the benchmarks are not part of an installed avg_kernels: bench/ was not found next to the "
                f"package ({ROOT}). Run from a source checkout: clone the repository, "
                "`pip install --no-build-isolation -e .`, then `python -m avg_kernels bench`.")
    return init.parent


def run_argv(argv: list[str]) -> int:
    where = locate_bench()
    if isinstance(where, str):
        print(f"error: {where}", file=sys.stderr)
        return 2
    # the checkout root on the path (not the working directory: relative --out paths stay the user's)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(where.parent), os.environ.get("PYTHONPATH")])))
    return subprocess.call([sys.executable, "-m", "bench", *argv], env=env)
