"""Instruction counts of the CPU averaged-activation kernels: repeatable on a shared machine, where
wall-clock times of one kernel version wander by 2x.

For each (capability level, activation, input family) a child Python process runs the bare kernel
(``torch.ops.avg_kernels_C.avg_act_backward_out`` into a preallocated output, one thread) and the
instructions it executes are counted:

* ``callgrind`` (default and avx2 levels): ``valgrind --tool=callgrind``, collecting only inside that
  level's kernel function (``--toggle-collect``), one call of 2^SIZE elements;
* ``ptrace`` (avx512 level): valgrind (3.19 here) does not decode AVX-512 instructions and reports a
  CPU without AVX-512, and this VM exposes no hardware instruction counter (``perf stat`` says "not
  supported"); so bench/stepcount.c single-steps the child between two signals around the call. At
  ~30 us per instruction that is run at 2^PTRACE_SIZE elements, minus the same call on 0 elements (the
  op's dispatch), and scaled to 2^SIZE. Both counters agree on the avx2 level (``--counter ptrace``).

    python bench/callgrind_avg_act.py                       # sigmoid, gelu, silu; avx2 and avx512; 2^20
    python bench/callgrind_avg_act.py --acts tanh --levels avx2 --size 16
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = {"default": "DEFAULT", "avx2": "AVX2", "avx512": "AVX512"}
# kernel activation -> (public name, parameters), as bench/avg_act.py
PUBLIC = {"gelu_tanh": ("gelu", {"approximate": "tanh"})}

CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
import avg_kernels as ak
from avg_kernels.activations import EPS, resolve
from bench.avg_act import make_inputs
torch.set_num_threads(1)
assert ak.cpu_capability() == {level!r}, ak.cpu_capability()
k = resolve({public!r}, {params!r})
g, x, xn = make_inputs({inputs!r}, {n}, torch.float32, torch.device("cpu"), seed=1000)
out = torch.empty_like(x)
torch.ops.avg_kernels_C.avg_act_backward_out(g, x, xn, out, k.kernel_id, k.p0, k.p1, EPS)
"""


MARKED = CHILD + """
import os, signal
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
signal.signal(signal.SIGUSR2, signal.SIG_IGN)
for m in (0, {n}):  # 0 elements: the op's dispatch alone (the kernel returns at once)
    args = [t[:m] for t in (g, x, xn, out)] + [k.kernel_id, k.p0, k.p1, EPS]
    torch.ops.avg_kernels_C.avg_act_backward_out(*args)  # warm-up: lazy initialisation is not counted
    os.kill(os.getpid(), signal.SIGUSR1)
    torch.ops.avg_kernels_C.avg_act_backward_out(*args)
    os.kill(os.getpid(), signal.SIGUSR2)
"""


def _stepcount() -> Path:
    """bench/stepcount.c compiled into a cached executable."""
    src = Path(__file__).resolve().parent / "stepcount.c"
    out_dir = Path(tempfile.gettempdir()) / f"avg_kernels_stepcount_{os.getuid()}"
    out_dir.mkdir(exist_ok=True)
    exe = out_dir / f"stepcount_{int(src.stat().st_mtime)}"
    if not exe.exists():
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([os.environ.get("CC", "cc"), "-O2", "-o", str(tmp), str(src)], check=True, capture_output=True)
        tmp.rename(exe)
    return exe


def count_ptrace(level: str, act: str, inputs: str, n: int) -> int | str:
    """Instructions of one kernel call on n elements, by single-stepping (see the module docstring)."""
    public, params = PUBLIC.get(act, (act, {}))
    code = MARKED.format(root=str(ROOT), level=level, public=public, params=params, inputs=inputs, n=n)
    env = dict(os.environ, AVG_KERNELS_CPU_CAPABILITY=level, OMP_NUM_THREADS="1")
    proc = subprocess.run([str(_stepcount()), sys.executable, "-c", code], env=env, capture_output=True, text=True)
    steps = [int(v) for v in re.findall(r"^STEPS (\d+)", proc.stderr, re.M)]
    if proc.returncode != 0 or len(steps) != 2:
        return (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1][:160]
    return steps[1] - steps[0]


def count(level: str, act: str, inputs: str, n: int) -> int | str:
    """Instructions executed inside the level's avg_act_backward kernel for one call, or why not."""
    public, params = PUBLIC.get(act, (act, {}))
    code = CHILD.format(root=str(ROOT), level=level, public=public, params=params, inputs=inputs, n=n)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        cmd = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--collect-atstart=no",
               f"--toggle-collect=avg_kernels::cpu::{NAMESPACE[level]}::avg_act_backward*",
               sys.executable, "-c", code]
        env = dict(os.environ, AVG_KERNELS_CPU_CAPABILITY=level, OMP_NUM_THREADS="1")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not out.exists():
            err = [ln for ln in proc.stderr.splitlines() if "Error" in ln or "lacks" in ln or "Illegal" in ln]
            return (err[-1] if err else f"exit {proc.returncode}").strip()[:160]
        m = re.search(r"^totals:\s+(\d+)", out.read_text(), re.M) or re.search(r"^summary:\s+(\d+)",
                                                                               out.read_text(), re.M)
        return int(m.group(1)) if m else "no totals in the callgrind output"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--acts", default="sigmoid,gelu,silu", help="kernel activations, comma-separated")
    p.add_argument("--levels", default="avx2,avx512", help="capability levels, comma-separated")
    p.add_argument("--inputs", default="spec,train", help="input families of bench/avg_act.py")
    p.add_argument("--size", type=int, default=20, help="elements: 2^SIZE (default 20)")
    p.add_argument("--counter", choices=("auto", "callgrind", "ptrace"), default="auto",
                   help="auto (default): callgrind, except ptrace for avx512")
    p.add_argument("--ptrace-size", type=int, default=16, help="elements the ptrace counter runs: 2^N (default 16)")
    a = p.parse_args(argv)
    n = 2 ** a.size
    print(f"| level | activation | inputs | instructions per call (2^{a.size} float32, 1 thread) | per element "
          "| counter |")
    print("|---|---|---|---:|---:|---|")
    for level in a.levels.split(","):
        counter = a.counter if a.counter != "auto" else ("ptrace" if level == "avx512" else "callgrind")
        for act in a.acts.split(","):
            for inputs in a.inputs.split(","):
                if counter == "callgrind":
                    c, how = count(level, act, inputs, n), "callgrind"
                else:
                    m = 2 ** min(a.ptrace_size, a.size)
                    c = count_ptrace(level, act, inputs, m)
                    c, how = (round(c * n / m) if isinstance(c, int) else c), f"ptrace at 2^{min(a.ptrace_size, a.size)}, scaled"
                cells = [f"{c:,}", f"{c / n:.2f}"] if isinstance(c, int) else [f"not measured: {c}", "–"]
                print(f"| {level} | {act} | {inputs} | " + " | ".join(cells) + f" | {how} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
