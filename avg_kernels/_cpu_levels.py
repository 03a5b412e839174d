"""CPU capability levels of the compiled kernels: the one table that setup.py reads for compile flags and
``avg_kernels._build`` for which level the running CPU supports. Imports nothing (setup.py loads this file
by path, before the package is built).

Each level's kernels (csrc/cpu/kernels/) are compiled into their own module ``avg_kernels._cpu_<level>``
with ``FLAGS[level]``: torch's own flags for the level (``torch._inductor.cpu_vec_isa``: VecAVX2 and
VecAVX512; tests/test_cpu_capability.py checks they still agree). ``REQUIRES[level]`` lists what those
flags let the compiler use (names of ``avg_kernels._C.cpu_features()``), OS support for the wider
registers included.
"""
from __future__ import annotations

LEVELS = ("default", "avx2", "avx512")  # ascending: a higher level needs everything a lower one does
ENV = "AVG_KERNELS_CPU_CAPABILITY"

FLAGS = {
    "default": (),
    "avx2": ("-mavx2", "-mfma", "-mf16c"),
    "avx512": ("-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"),
}

# -mavx2 implies AVX, SSE4.2 and POPCNT; -mavx512f implies AVX2 (not F16C).
REQUIRES = {
    "default": (),
    "avx2": ("sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "os_avx"),
    "avx512": ("sse4_2", "popcnt", "avx", "avx2", "fma", "avx512f", "avx512dq", "avx512vl", "avx512bw", "os_avx",
               "os_avx512"),
}


def module_name(level: str) -> str:
    return f"avg_kernels._cpu_{level}"


def missing(level: str, features: dict[str, bool]) -> list[str]:
    """What ``level`` needs that a CPU with ``features`` lacks (empty: the level can run)."""
    return [f for f in REQUIRES[level] if not features.get(f, False)]


def supported(features: dict[str, bool], built: tuple[str, ...] | list[str] = LEVELS) -> list[str]:
    """The levels among ``built`` that a CPU with ``features`` can run, ascending."""
    return [lvl for lvl in LEVELS if lvl in built and not missing(lvl, features)]


def choose(features: dict[str, bool], built: tuple[str, ...] | list[str], requested: str | None) -> str:
    """The level to use: ``requested`` (the value of AVG_KERNELS_CPU_CAPABILITY; None or "" for automatic)
    or else the best level that is built and that the CPU supports. Raises ValueError, saying why, for a
    request that is not a level, not built, or not supported by this CPU."""
    ok = supported(features, built)
    if not requested:
        if not ok:
            raise ValueError(f"no CPU kernel level is usable (built: {', '.join(built) or 'none'})")
        return ok[-1]
    req = requested.strip().lower()
    if req not in LEVELS:
        raise ValueError(f"{ENV}={requested!r} is not a level; expected one of {', '.join(LEVELS)}")
    if req not in built:
        raise ValueError(f"{ENV}={req}: this build of avg_kernels has no {req} kernels (built: {', '.join(built)}); "
                         "the avx2/avx512 levels are built on x86-64 only")
    lacks = missing(req, features)
    if lacks:
        raise ValueError(f"{ENV}={req}: this CPU lacks {', '.join(lacks)}, which the {req} kernels use "
                         f"(levels this CPU supports: {', '.join(ok)})")
    return req
