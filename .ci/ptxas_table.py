#!/usr/bin/env python3
"""Reads nvcc `-Xptxas -v` output (a build log) and prints a per-kernel register/spill table.

Usage: ptxas_table.py BUILD_LOG [--expect N]
Exit status 1 when any kernel has spill stores/loads, a stack frame or local memory (lmem) > 0,
or when the number of (kernel, arch) entries differs from --expect; 0 otherwise.
"""
import argparse
import re
import subprocess
import sys
from pathlib import Path

HEADER = Path(__file__).resolve().parents[1] / "csrc" / "include" / "avg_kernels" / "activations.h"
# Kernel-level activation names by id: the rows X(Enumerator, id, "name", bounded) of the header's
# AVG_KERNELS_ACTIVATIONS X-macro (ids are the row numbers).
ACTS = re.findall(r'^\s*X\(\w+,\s*\d+,\s*"(\w+)"', HEADER.read_text(), re.M)
DTYPES = {"F32": "float32", "F64": "float64", "F16": "float16", "BF16": "bfloat16"}
ENTRY = re.compile(r"Compiling entry function '([^']+)' for '(sm_\d+a?)'")
PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers")
LMEM = re.compile(r"(\d+) bytes lmem")
AVG_ACT = re.compile(r"avg_act_kernelILNS_3ActE(\d+)ENS0_\d+Elem(\w+?)ELi(\d+)E")
# ag1_kernel<Op, kIntoNew> mangles as ...ag1_kernelIfLb1EE...; the other AG kernels as ...kernelIfE...
AG = re.compile(r"7ag_cuda\d+(ag\w+?)_kernel(?:I([fd])(?:Lb([01])E)?E)?")


def label(mangled: str) -> str:
    m = AVG_ACT.search(mangled)
    if m:
        act, dtype, vec = ACTS[int(m.group(1))], DTYPES.get(m.group(2), m.group(2)), int(m.group(3))
        return f"avg_act {act:<10} {dtype:<8} " + ("scalar" if vec == 1 else f"vec{vec}")
    m = AG.search(mangled)
    if m:
        into = {"1": " into θ'", "0": " into θ", None: ""}[m.group(3)]
        return f"ag_update {m.group(1):<10} " + {"f": "float", "d": "double", None: ""}[m.group(2)] + into
    try:
        return subprocess.run(["c++filt", mangled], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return mangled


def sort_key(lbl: str):
    parts = lbl.split()
    if len(parts) == 4 and parts[0] == "avg_act" and parts[1] in ACTS:
        dtypes = list(DTYPES.values())
        return (0, ACTS.index(parts[1]), dtypes.index(parts[2]) if parts[2] in dtypes else 9, parts[3], "")
    return (1, 0, 0, "", lbl)


def parse(text: str):
    """{(label, arch): dict(regs, stack, spill_st, spill_ld, lmem)} in order of appearance."""
    out, cur = {}, None
    for line in text.splitlines():
        m = ENTRY.search(line)
        if m:
            cur = (label(m.group(1)), m.group(2))
            out[cur] = dict(regs=None, stack=0, spill_st=0, spill_ld=0, lmem=0)
            continue
        if cur is None:
            continue
        m = PROPS.search(line)
        if m:
            out[cur].update(stack=int(m.group(1)), spill_st=int(m.group(2)), spill_ld=int(m.group(3)))
        m = USED.search(line)
        if m:
            out[cur]["regs"] = int(m.group(1))
            lm = LMEM.search(line)
            out[cur]["lmem"] = int(lm.group(1)) if lm else 0
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("log")
    ap.add_argument("--expect", type=int, default=None, help="expected number of (kernel, arch) entries")
    args = ap.parse_args()
    with open(args.log, encoding="utf-8", errors="replace") as f:
        res = parse(f.read())
    archs = sorted({a for _, a in res})
    kernels = sorted(dict.fromkeys(k for k, _ in res), key=sort_key)
    head = f"{'kernel':<38}" + "".join(f" | {a:>6} regs stack spill(st/ld) lmem" for a in archs)
    print(head)
    print("-" * len(head))
    bad = []
    for k in kernels:
        row = f"{k:<38}"
        for a in archs:
            r = res.get((k, a))
            if r is None:
                row += f" | {'-':>38}"
                continue
            row += f" | {r['regs']!s:>11} {r['stack']:>5} {r['spill_st']:>6}/{r['spill_ld']:<6} {r['lmem']:>4}"
            if r["spill_st"] or r["spill_ld"] or r["stack"] or r["lmem"] or r["regs"] is None:
                bad.append(f"{k} [{a}]: {r}")
        print(row)
    regs = [r["regs"] for r in res.values() if r["regs"] is not None]
    print(f"\n{len(res)} (kernel, arch) entries; registers min {min(regs, default=0)} max {max(regs, default=0)}")
    ok = True
    if args.expect is not None and len(res) != args.expect:
        print(f"FAIL: expected {args.expect} (kernel, arch) entries, found {len(res)}")
        ok = False
    if bad:
        print("FAIL: spills, stack frames or local memory in:\n  " + "\n  ".join(bad))
        ok = False
    if ok:
        print("OK: no spills, no stack frames, no local memory")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
