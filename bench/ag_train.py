"""Time per training step of AG-1, AG-2 and AG-3-1 relative to the base optimizer's own step.

Models (one run measures all of them, every method interleaved with its base):

* ``demo``: the demo's Model B on 8x8 digits-shaped input (batch 64), RMSProp base (AG-2 over Adam:
  its base row is Adam);
* ``resnet18``: a ResNet-18-shaped CNN (BasicBlock x [2, 2, 2, 2], BatchNorm, SiLU, CIFAR stem) on
  32x32 RGB input, RMSProp base (AG-2 over Adam). ``--quick`` (the default) uses base width 32 and
  batch 16, ``--full`` width 64 (the real ResNet-18 widths 64-512) and batch 32 (CPU) / 128 (CUDA).

Timing: CPU: ``torch.utils.benchmark.Timer.blocked_autorange`` medians, several interleaved rounds
(the base step and every AG step alternate, so load changes on a shared machine hit all of them);
CUDA: ``triton.testing.do_bench`` medians. Each timed call is one complete training step
(``base``: zero_grad + forward + loss + backward + step; AG: ``opt.step(closure)``).
The breakdown (forwards, backwards, copies, update, base optimizer step) comes from separate runs with
``AG(profile=True)``, which synchronises the device between phases; its per-phase times are medians
over the profiled steps and do not add up exactly to the unprofiled step time.

    python bench/ag_train.py [--quick|--full] [--device cpu|cuda] [--models demo,resnet18] [--out DIR]

Targets (ISSUE 6): AG-1 <= 2.1x and AG-3-1 <= 1.4x the base step.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import avg_kernels  # noqa: E402
from avg_kernels.demo.model import model_b  # noqa: E402

NAME = "ag_train"
MODES = ("ag1", "ag2", "ag3-1")
BASE_OF = {"ag1": "rmsprop", "ag2": "adam", "ag3-1": "rmsprop"}
TARGETS = {"ag1": 2.1, "ag3-1": 1.4}
PHASE_GROUPS = {
    "forwards": ("forward_graph", "forward_replay"),
    "backwards": ("backward_grad", "backward_avg"),
    "copies": ("copies",),
    "update": ("update",),
    "base step": ("base_step",),
}


# -- models ----------------------------------------------------------------------------------------

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.act1 = act()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.act2 = act()

    def forward(self, x):
        return self.act2(self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x))))) + self.short(x))


def resnet18(width=64, classes=10, act=nn.SiLU):
    """ResNet-18 topology (CIFAR stem: 3x3 conv, no max-pool), widths width x (1, 2, 4, 8)."""
    layers = [nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), act()]
    cin = width
    for i, blocks in enumerate((2, 2, 2, 2)):
        cout = width * 2 ** i
        for b in range(blocks):
            layers.append(BasicBlock(cin, cout, 2 if (b == 0 and i > 0) else 1, act))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, classes)]
    return nn.Sequential(*layers)


def cases(mode: str, device: torch.device, names):
    """(name, description, model factory, input batch) per model."""
    out = []
    g = torch.Generator().manual_seed(0)
    if "demo" in names:
        x = torch.rand(64, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (64,), generator=g)
        out.append(("demo", "Model B depth 4 (8x8, batch 64)", lambda: model_b(depth=4), x, y))
    if "resnet18" in names:
        width = 32 if mode == "quick" else 64
        batch = 16 if mode == "quick" else (128 if device.type == "cuda" else 32)
        x = torch.randn(batch, 3, 32, 32, generator=g)
        y = torch.randint(0, 10, (batch,), generator=g)
        out.append(("resnet18", f"ResNet-18-shaped, SiLU, width {width} (32x32, batch {batch})",
                    lambda: resnet18(width), x, y))
    return [(n, d, f, x.to(device), y.to(device)) for n, d, f, x, y in out]


OPTIMIZERS = {
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}


def make_steps(factory, x, y, device, profile=False):
    """One training-step callable per method (own model copy each, same initial weights)."""
    steps = {}
    for name in ("rmsprop", "adam") + MODES:
        torch.manual_seed(0)
        model = avg_kernels.nn.convert(factory()).to(device)
        base = OPTIMIZERS[BASE_OF.get(name, name)](model.parameters())
        if name in OPTIMIZERS:
            def step(model=model, base=base):
                base.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(x), y)
                loss.backward()
                base.step()
                return loss
            steps[name] = step
        else:
            opt = avg_kernels.optim.AG(model, base, mode=name, profile=profile, check_unaveraged=False)
            closure = (lambda model=model: F.cross_entropy(model(x), y))
            steps[name] = (lambda opt=opt, closure=closure: opt.step(closure)), opt
    return steps


# -- timing ----------------------------------------------------------------------------------------

def time_cpu_clock(fns: dict, min_run_time: float, rounds: int) -> dict:
    """Median CPU seconds (``time.process_time``: this process, all threads) per call, interleaved rounds.

    On a shared machine wall time measures how much of a core the scheduler gave us; CPU time measures
    the work. Blocks of calls run until each has used ``min_run_time / rounds`` CPU seconds."""
    per = {k: [] for k in fns}
    names = list(fns)
    budget = min_run_time / rounds
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            f = fns[k]
            n, t0 = 0, time.process_time()
            while True:
                f()
                n += 1
                used = time.process_time() - t0
                if used >= budget and n >= 3:
                    break
            per[k].append(used / n)
    return {k: statistics.median(v) for k, v in per.items()}


def time_interleaved(fns: dict, device: torch.device, min_run_time: float, rounds: int, clock: str) -> dict:
    """Median seconds per call of each fn; CPU: interleaved Timer rounds (or CPU time), CUDA: do_bench."""
    if device.type == "cpu" and clock == "cpu":
        return time_cpu_clock(fns, min_run_time, rounds)
    if device.type == "cuda":
        from triton.testing import do_bench

        return {k: do_bench(f, warmup=5, rep=max(50, int(min_run_time * 1e3))) * 1e-3 for k, f in fns.items()}
    from torch.utils import benchmark

    timers = {k: benchmark.Timer(stmt="fn()", globals={"fn": f}, num_threads=torch.get_num_threads())
              for k, f in fns.items()}
    parts = {k: [] for k in fns}
    names = list(fns)
    for r in range(rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            parts[k].append(timers[k].blocked_autorange(min_run_time=min_run_time / rounds))
    return {k: benchmark.Measurement.merge(v)[0].median for k, v in parts.items()}


def base_breakdown(model_factory, x, y, device, base_name, steps=20, clock=time.perf_counter):
    torch.manual_seed(0)
    model = avg_kernels.nn.convert(model_factory()).to(device)
    base = OPTIMIZERS[base_name](model.parameters())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    acc = {"forwards": [], "backwards": [], "base step": []}
    for i in range(steps + 3):
        sync()
        t0 = clock()
        base.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        sync()
        t1 = clock()
        loss.backward()
        sync()
        t2 = clock()
        base.step()
        sync()
        t3 = clock()
        if i >= 3:
            acc["forwards"].append(t1 - t0)
            acc["backwards"].append(t2 - t1)
            acc["base step"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in acc.items()}


def ag_breakdown(opt_and_step, steps=20):
    step, opt = opt_and_step
    acc: dict[str, list] = {}
    for i in range(steps + 3):
        step()
        if i >= 3:
            for group, phases in PHASE_GROUPS.items():
                acc.setdefault(group, []).append(sum(opt.last.times.get(p, 0.0) for p in phases))
    return {k: statistics.median(v) for k, v in acc.items()}


def run_case(name, desc, factory, x, y, device, min_run_time, rounds, profile_steps, clock):
    steps = make_steps(factory, x, y, device)
    fns = {k: (v[0] if isinstance(v, tuple) else v) for k, v in steps.items()}
    for f in fns.values():  # warm-up (first-step allocations, AG-3-1's plain first step)
        for _ in range(3):
            f()
    times = time_interleaved(fns, device, min_run_time, rounds, clock)
    clock_fn = time.process_time if (clock == "cpu" and device.type == "cpu") else time.perf_counter
    prof = make_steps(factory, x, y, device, profile=clock_fn if clock_fn is not time.perf_counter else True)
    breakdown = {k: base_breakdown(factory, x, y, device, k, profile_steps, clock_fn) for k in OPTIMIZERS}
    for mode in MODES:
        breakdown[mode] = ag_breakdown(prof[mode], profile_steps)
    n_params = sum(p.numel() for p in factory().parameters())
    rows = []
    for method in ("rmsprop", "adam") + MODES:
        base = BASE_OF.get(method, method)
        rows.append({"model": name, "description": desc, "params": n_params, "method": method,
                     "base": base, "step_s": times[method], "ratio": times[method] / times[base],
                     "target": TARGETS.get(method), "breakdown_s": breakdown[method]})
    return rows


# -- output ----------------------------------------------------------------------------------------

def table(rows) -> str:
    head = ["model", "method", "ms/step", "x base step", "target", "forwards", "backwards", "copies", "update",
            "base step"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        b = r["breakdown_s"]
        method = r["method"] if r["method"] in OPTIMIZERS else f"{r['method']}/{r['base']}"
        tgt = "-" if r["target"] is None else (f"<= {r['target']}x " + ("met" if r["ratio"] <= r["target"] else "MISSED"))
        cells = [r["model"], method, f"{r['step_s'] * 1e3:.2f}", f"{r['ratio']:.2f}x", tgt]
        cells += [f"{b[k] * 1e3:.2f}" if k in b else "-" for k in ("forwards", "backwards", "copies", "update",
                                                                     "base step")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_line(device) -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    dev = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine()
    return (f"{dev}; torch {torch.__version__}; {torch.get_num_threads()} threads; load average {load:.1f} on "
            f"{os.cpu_count()} CPUs at the start")


def add_arguments(p):
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", dest="mode", action="store_const", const="quick")
    mode.add_argument("--full", dest="mode", action="store_const", const="full")
    p.set_defaults(mode="quick")
    p.add_argument("--device", default=None)
    p.add_argument("--models", default="demo,resnet18")
    p.add_argument("--min-run-time", type=float, default=None, help="seconds per method and model (all rounds)")
    p.add_argument("--rounds", type=int, default=None)
    p.add_argument("--profile-steps", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="CPU only: wall (Timer.blocked_autorange, default) or cpu (time.process_time of this process: "
                        "the work done, insensitive to other processes sharing the cores; use with --threads 1)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    args = p.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = set(names) - {"demo", "resnet18"}
    if unknown:
        p.error(f"--models: unknown {sorted(unknown)}")
    min_run = args.min_run_time or (2.0 if args.mode == "quick" else 6.0) * (1 if device.type == "cpu" else 0.25)
    rounds = args.rounds or (4 if device.type == "cpu" else 1)
    profile_steps = args.profile_steps or (10 if args.mode == "quick" else 30)
    header = machine_line(device)
    rows = []
    for case in cases(args.mode, device, names):
        print(f"[{NAME}] {case[1]} ...", file=sys.stderr, flush=True)
        rows += run_case(*case, device, min_run, rounds, profile_steps, args.clock)
    clock = "CPU time (time.process_time)" if (args.clock == "cpu" and device.type == "cpu") else "wall time"
    text = (f"# AG training step time relative to the base optimizer's step ({device.type}, --{args.mode}, {clock})\n\n"
            f"{header}\n\n{table(rows)}\n\n"
            "Times in ms; `x base step` = this step / the base optimizer's own step on the same model (AG-1 and "
            "AG-3-1 over RMSProp, AG-2 over Adam), medians of interleaved rounds. The breakdown columns are "
            "medians of separately profiled steps (device synchronised between phases): forwards = the pass "
            "with graph + the no-grad pass, backwards = all backward passes, copies = parameter/buffer/optimizer-"
            "state copies, update = the fused AG update (AG-2: its second base-optimizer call + rescale), base "
            "step = the base optimizer's step.\n")
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{NAME}_{device.type}" + ("_cputime" if clock.startswith("CPU") else "")
    (args.out / f"{stem}.md").write_text(text)
    (args.out / f"{stem}.json").write_text(json.dumps({"machine": header, "mode": args.mode, "rows": rows}, indent=1))
    print(f"wrote {args.out / (stem + '.md')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
