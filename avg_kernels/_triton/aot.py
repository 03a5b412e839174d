"""Ahead-of-time compile checks of the Triton kernels: the GPU proof we can run without a GPU.

* A registry of production configurations, ``KernelConfig`` (kernel, signature, constexprs, num_warps,
  16-byte-aligned arguments). Every Triton kernel module registers the configurations its launcher
  really uses, derived from its launch table, when it is imported; ``KERNEL_MODULES`` lists those
  modules (add a new kernel module there).
* ``compile_config(cfg, cc)`` compiles one entry with ``triton.compile(ASTSource(...),
  target=GPUTarget("cuda", cc, 32))`` and reads the cubin's registers / stack / shared / local memory
  with ``cuobjdump -res-usage`` shipped in the Triton wheel (triton/backends/nvidia/bin/cuobjdump),
  plus the widest global load and whether every pointer offset is 64-bit (from PTX / TTIR).
* ``python -m avg_kernels._triton.aot [--cc 80 90] [--filter SUBSTR] [--json] [--jobs N]`` compiles
  every registered configuration and prints a table (or JSON).

Compiling does not work in a process where TRITON_INTERPRET=1 is set (``triton.jit`` then returns an
interpreted function): run this module in a process without it, as tests/test_triton_aot.py does.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Mapping

#: Modules whose import registers their production configurations (``register``).
KERNEL_MODULES = ("avg_kernels._triton.avg_act", "avg_kernels._triton.ag_update", "avg_kernels._triton.gram",
                  "avg_kernels._triton.ridge")

#: Compute capabilities checked by default: A100 (sm_80) and H100 (sm_90).
DEFAULT_CCS = (80, 90)


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """One production launch configuration of a ``@triton.jit`` kernel.

    name: unique, e.g. ``"avg_act_backward[tanh,fp32]"``.
    kernel: ``"package.module:function"`` of the jit function.
    signature: every parameter's Triton type (``"*fp32"``, ``"i32"``, ``"fp64"``, ``"constexpr"``).
    constexprs: the values of the constexpr parameters (ints, floats, ``tl`` dtypes...).
    num_warps: as launched.
    aligned: parameters Triton specialises as divisible by 16 at run time (pointers from torch's
        allocator, which are 16-byte aligned): this is what enables vectorised loads.
    """

    name: str
    kernel: str
    signature: Mapping[str, str]
    constexprs: Mapping[str, Any]
    num_warps: int
    aligned: tuple[str, ...] = ()
    num_stages: int = 3


_REGISTRY: dict[str, KernelConfig] = {}


def register(cfg: KernelConfig) -> None:
    """Adds a production configuration (called by kernel modules at import)."""
    old = _REGISTRY.get(cfg.name)
    if old is not None and old != cfg:
        raise ValueError(f"AOT config {cfg.name!r} registered twice with different contents")
    _REGISTRY[cfg.name] = cfg


def configs() -> list[KernelConfig]:
    """Every registered configuration (imports KERNEL_MODULES first), in registration order."""
    for mod in KERNEL_MODULES:
        importlib.import_module(mod)
    return list(_REGISTRY.values())


def _resolve_kernel(path: str):
    mod, _, attr = path.partition(":")
    return getattr(importlib.import_module(mod), attr)


def cuobjdump_path() -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


_RES_RE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def res_usage(cubin: bytes) -> dict[str, int]:
    """Registers, stack, shared and local memory of the (single) function in ``cubin``, by cuobjdump."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        out = subprocess.run([cuobjdump_path(), "-res-usage", path], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(path)
    found = _RES_RE.findall(out)
    if len(found) != 1:
        raise RuntimeError(f"expected one function in cuobjdump -res-usage output, got:\n{out}")
    reg, stack, shared, local = map(int, found[0])
    return {"regs": reg, "stack": stack, "shared": shared, "local": local}


_LD_RE = re.compile(r"\bld\.global(?:\.[a-z_]+)*?(?:\.v(\d))?\.(?:b|f|u|s)(\d+)\b")
_ADDPTR_RE = re.compile(r"= tt\.addptr [^\n]*?, (tensor<\w+>|i\d+) loc\(")  # the offset's type


def _ptx_max_load_bits(ptx: str) -> int:
    best = 0
    for vec, bits in _LD_RE.findall(ptx):
        best = max(best, int(vec or 1) * int(bits))
    return best


def _ttir_offsets_all_i64(ttir: str) -> bool:
    types = _ADDPTR_RE.findall(ttir)
    return bool(types) and all(t.endswith("xi64>") or t == "i64" for t in types)


def compile_config(cfg: KernelConfig, cc: int) -> dict[str, Any]:
    """Compiles ``cfg`` for sm_<cc>. Returns a dict: name, cc, ok, error, seconds and, when it
    compiled, regs / stack / shared / local (bytes, from cuobjdump), max_load_bits (widest global
    load in the PTX) and offsets_i64 (every tt.addptr offset in the TTIR is 64-bit)."""
    import triton
    from triton.backends.compiler import GPUTarget

    result: dict[str, Any] = {"name": cfg.name, "cc": cc, "num_warps": cfg.num_warps, "ok": False, "error": None}
    t0 = time.perf_counter()
    try:
        fn = _resolve_kernel(cfg.kernel)
        if not isinstance(fn, triton.runtime.jit.JITFunction):
            raise RuntimeError(f"{cfg.kernel} is {type(fn).__name__}, not a JITFunction "
                               "(is TRITON_INTERPRET set in this process?)")
        names = list(fn.arg_names)
        missing = set(names) ^ set(cfg.signature)
        if missing:
            raise ValueError(f"signature does not match the kernel's parameters: {sorted(missing)}")
        attrs = {(names.index(a),): [["tt.divisibility", 16]] for a in cfg.aligned}
        src = triton.compiler.ASTSource(fn=fn, signature=dict(cfg.signature), constexprs=dict(cfg.constexprs),
                                        attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})
        result.update(res_usage(kernel.asm["cubin"]))
        result["max_load_bits"] = _ptx_max_load_bits(kernel.asm["ptx"])
        result["offsets_i64"] = _ttir_offsets_all_i64(kernel.asm["ttir"])
        result["ok"] = True
    except Exception as exc:  # report every failure, keep compiling the others
        chain, e = [], exc
        while e is not None and len(chain) < 4:  # Triton's CompilationError wraps the real cause
            chain.append(f"{type(e).__name__}: {e}")
            e = e.__cause__ or e.__context__
        result["error"] = "\ncaused by ".join(chain)
    result["seconds"] = round(time.perf_counter() - t0, 3)
    return result


def _compile_job(job):
    name, cc = job
    cfg = next(c for c in configs() if c.name == name)
    return compile_config(cfg, cc)


def compile_all(ccs=DEFAULT_CCS, name_filter: str | None = None, jobs: int = 1) -> list[dict[str, Any]]:
    """Compiles every registered configuration (optionally those whose name contains name_filter)
    for each cc; ``jobs`` > 1 compiles in that many worker processes."""
    todo = [(c.name, cc) for c in configs() if not name_filter or name_filter in c.name for cc in ccs]
    if jobs <= 1:
        return [_compile_job(j) for j in todo]
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(jobs) as pool:
        return pool.map(_compile_job, todo, chunksize=1)


def format_table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'config':40s} {'sm':>3s} {'warps':>5s} {'regs':>4s} {'stack':>5s} {'local':>5s} {'ld bits':>7s} "
             f"{'i64':>3s} {'s':>6s}"]
    for r in results:
        if r["ok"]:
            lines.append(f"{r['name']:40s} {r['cc']:>3d} {r['num_warps']:>5d} {r['regs']:>4d} {r['stack']:>5d} "
                         f"{r['local']:>5d} {r['max_load_bits']:>7d} {'y' if r['offsets_i64'] else 'n':>3s} "
                         f"{r['seconds']:>6.2f}")
        else:
            last = [ln for ln in r["error"].splitlines() if ln.strip()][-1]
            lines.append(f"{r['name']:40s} {r['cc']:>3d} FAILED: {last[:160]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cc", type=int, nargs="+", default=list(DEFAULT_CCS), help="compute capabilities")
    parser.add_argument("--filter", default=None, help="only configurations whose name contains this")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        print("aot: unset TRITON_INTERPRET to compile (the interpreter replaces triton.jit)", file=sys.stderr)
        return 2
    results = compile_all(args.cc, args.filter, args.jobs)
    print(json.dumps(results, indent=1) if args.json else format_table(results))
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    # Run main() of the package module, not of __main__: the kernel modules register into that one.
    from avg_kernels._triton import aot as _aot

    sys.exit(_aot.main())
