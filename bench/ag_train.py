"""Time per training step of AG-1, AG-2 and AG-3-1 relative to the base optimizer's own step (ISSUE 6).

Models (one run measures all of them; within a model every method is interleaved with its base):

* ``demo``: the demo's Model B (depth 4) on 8x8 digits-shaped input, batch 64;
* ``resnet18``: a ResNet-18-shaped CNN (BasicBlock x [2, 2, 2, 2], BatchNorm, SiLU, CIFAR stem: 3x3
  conv, no max-pool) on 32x32 RGB input. ``--quick``: widths 32-256 and batch 16 on CPU; ``--full``:
  the real ResNet-18 widths 64-512, batch 32 on CPU, 128 on CUDA.

AG-1 and AG-3-1 run over RMSProp, AG-2 over Adam (as in the demo); each is compared with its base's own
step on the same model: ``rmsprop``/``adam`` = zero_grad + forward + loss + backward + step; an AG step =
``opt.step(closure)``, everything included (the graph pass, the no-grad pass, both backwards, the base
step, copies, the fused update).

Timing: the harness policy (CPU: Timer.blocked_autorange medians in interleaved rounds; CUDA: do_bench).
``--ag-clock cpu`` times CPU runs by ``time.process_time`` of this process instead (the work done,
insensitive to other processes sharing the cores; use with ``--threads 1``).
The breakdown (forwards, backwards, copies, update, base step) comes from separate runs with
``AG(profile=...)``, which synchronises the device between phases: medians per phase over the profiled
steps, so they need not add up exactly to the unprofiled step time. It is written to
``ag_train-<device>-<mode>-breakdown.md`` next to the harness's table.

Targets: AG-1 <= 2.1x and AG-3-1 <= 1.4x the base step (paper 000's implementation took ~3x, its
estimate of an optimal one is "slightly more than two times").

    python -m avg_kernels bench --ops ag_train [--quick|--full] [--threads 1] [--ag-models demo,resnet18]
"""
from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/ag_train.py [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels
from avg_kernels.demo.model import model_b

from bench.harness import Context, Report, Row

NAME = "ag_train"
MODES = ("ag1", "ag2", "ag3-1")
BASE_OF = {"ag1": "rmsprop", "ag2": "adam", "ag3-1": "rmsprop"}
TARGETS = {"ag1": 2.1, "ag3-1": 1.4}
OPTIMIZERS = {
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}
PHASE_GROUPS = {
    "forwards": ("forward_graph", "forward_replay"),
    "backwards": ("backward_grad", "backward_avg"),
    "copies": ("copies",),
    "update": ("update",),
    "base step": ("base_step",),
}
LABEL = {"rmsprop": "RMSProp", "adam": "Adam", "ag1": "AG-1/RMSProp", "ag2": "AG-2/Adam", "ag3-1": "AG-3-1/RMSProp"}


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


def resnet18(width: int = 64, classes: int = 10, act=nn.SiLU) -> nn.Sequential:
    """ResNet-18 topology (CIFAR stem: 3x3 conv, no max-pool), stage widths width x (1, 2, 4, 8)."""
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
    """(name, description, model factory, x, y) per model."""
    out = []
    g = torch.Generator().manual_seed(0)
    if "demo" in names:
        x, y = torch.rand(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
        out.append(("demo", "Model B depth 4, 8x8 input, batch 64", lambda: model_b(depth=4), x, y))
    if "resnet18" in names:
        width = 32 if mode == "quick" else 64
        batch = 16 if mode == "quick" else (128 if device.type == "cuda" else 32)
        x, y = torch.randn(batch, 3, 32, 32, generator=g), torch.randint(0, 10, (batch,), generator=g)
        out.append(("resnet18", f"ResNet-18-shaped, SiLU, widths {width}-{8 * width}, 32x32 input, batch {batch}",
                    lambda: resnet18(width), x, y))
    return [(n, d, f, x.to(device), y.to(device)) for n, d, f, x, y in out]


def make_steps(factory, x, y, device, profile=False) -> dict:
    """name -> (step callable, AG optimizer or None); every method on its own copy of the same model."""
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

            steps[name] = (step, None)
        else:
            opt = avg_kernels.optim.AG(model, base, mode=name, profile=profile, check_unaveraged=False)
            steps[name] = ((lambda opt=opt, model=model: opt.step(lambda: F.cross_entropy(model(x), y))), opt)
    return steps


# -- timing ----------------------------------------------------------------------------------------

def time_cpu_clock(fns: dict, min_run_time: float, rounds: int) -> dict:
    """Median CPU seconds (``time.process_time``) per call, in interleaved rotated rounds."""
    return {k: statistics.median(v) for k, v in cpu_clock_rounds(fns, min_run_time, rounds).items()}


def cpu_clock_rounds(fns: dict, min_run_time: float, rounds: int) -> dict:
    """CPU seconds (``time.process_time``) per call of each function, one value per round: in each round every
    function runs for min_run_time / rounds (at least 3 calls), in an order rotated from round to round."""
    per = {k: [] for k in fns}
    names = list(fns)
    budget = min_run_time / rounds
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            n, t0 = 0, time.process_time()
            while True:
                fns[k]()
                n += 1
                used = time.process_time() - t0
                if used >= budget and n >= 3:
                    break
            per[k].append(used / n)
    return per


def base_breakdown(model, base, x, y, device, steps, clock):
    """Phases of a plain base-optimizer step, timed like AG's profile."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    acc = {"forwards": [], "backwards": [], "base step": []}
    for i in range(steps + 1):
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
        if i >= 1:
            acc["forwards"].append(t1 - t0)
            acc["backwards"].append(t2 - t1)
            acc["base step"].append(t3 - t2)
    return {k: statistics.median(v) for k, v in acc.items()}


def ag_breakdown(step, opt, steps):
    acc: dict[str, list] = {}
    for i in range(steps + 2):  # AG-3-1's first step is plain
        step()
        if i >= 2:
            for group, phases in PHASE_GROUPS.items():
                acc.setdefault(group, []).append(sum(opt.last.times.get(p, 0.0) for p in phases))
    return {k: statistics.median(v) for k, v in acc.items()}


def add_arguments(group) -> None:
    group.add_argument("--ag-models", default=None,
                       help="comma-separated: demo, resnet18 (default: both; only demo for a smoke run, i.e. an "
                            "explicit --min-run-time below 0.1 s)")
    group.add_argument("--ag-clock", choices=("wall", "cpu"), default="wall",
                       help="CPU runs: wall (the harness policy, default) or cpu (time.process_time: the work done, "
                            "insensitive to other processes on a shared machine; use with --threads 1)")
    group.add_argument("--ag-profile-steps", type=int, default=None, help="profiled steps per method (breakdown)")


def run(ctx: Context) -> Report:
    dev = ctx.device
    args = ctx.args
    explicit = getattr(args, "min_run_time", None) is not None  # --min-run-time given: no floors (smoke runs)
    smoke = explicit and ctx.min_run_time < 0.1
    default_models = "demo" if smoke else "demo,resnet18"
    names = [n.strip() for n in (getattr(args, "ag_models", None) or default_models).split(",") if n.strip()]
    bad = sorted(set(names) - {"demo", "resnet18"})
    if bad:
        raise SystemExit(f"--ag-models: unknown {bad}; expected demo, resnet18")
    cpu_clock = dev.type == "cpu" and getattr(args, "ag_clock", "wall") == "cpu"
    clock = time.process_time if cpu_clock else time.perf_counter
    profile_steps = getattr(args, "ag_profile_steps", None) or (2 if smoke else (8 if ctx.mode == "quick" else 25))
    rows: list[Row] = []
    notes: list[str] = []
    breakdown_lines: list[str] = []
    todo = cases(ctx.mode, dev, names)
    bar = ctx.bar(len(todo), f"{NAME} on {dev.type}")
    for name, desc, factory, x, y in todo:
        steps = make_steps(factory, x, y, dev)
        fns = {k: v[0] for k, v in steps.items()}
        t0 = time.perf_counter()
        warm = 2 if explicit else 3
        for f in fns.values():  # warm-up: allocations, AG-3-1's plain first step; estimate the step time
            for _ in range(warm):
                f()
        per_step = (time.perf_counter() - t0) / (warm * len(fns))
        if explicit:
            min_run = ctx.min_run_time
        else:
            # a training step is noisier than an op: >= 2 s (quick) / 5 s (full) per method on CPU, and at
            # least ~8 steps per method and round whatever the model size
            floor = (2.0 if ctx.mode == "quick" else 5.0) if dev.type == "cpu" else ctx.min_run_time
            min_run = max(ctx.min_run_time, floor, 8 * per_step * ctx.rounds)
        n_params = sum(p.numel() for p in factory().parameters())
        common = dict(op=NAME, case=name, inputs=desc, size=n_params, dtype="float32")
        if cpu_clock:
            times = time_cpu_clock(fns, min_run, max(ctx.rounds, 1))
            got = {k: Row(device=str(dev), impl=k, median_s=t, samples=ctx.rounds,
                          extra={"method": f"time.process_time, {ctx.rounds} interleaved rounds"}, **common)
                   for k, t in times.items()}
        else:
            got = dataclasses.replace(ctx, min_run_time=min_run).measure_many(fns, None, **common)
        # the breakdown: profiled copies of every method
        prof = make_steps(factory, x, y, dev, profile=clock if cpu_clock else True)
        breakdown = {}
        for k in OPTIMIZERS:
            torch.manual_seed(0)
            model = avg_kernels.nn.convert(factory()).to(dev)
            breakdown[k] = base_breakdown(model, OPTIMIZERS[k](model.parameters()), x, y, dev, profile_steps, clock)
        for k in MODES:
            breakdown[k] = ag_breakdown(prof[k][0], prof[k][1], profile_steps)
        for k, r in got.items():
            r.extra["breakdown_s"] = breakdown[k]
            base = got[BASE_OF.get(k, k)]
            if k in MODES and r.median_s and base.median_s:
                r.ratios[base.impl] = base.median_s / r.median_s  # harness convention: peer time / this time
                r.extra["x_base_step"] = r.median_s / base.median_s
            rows.append(r)
        for k in MODES:
            r = got[k]
            if r.median_s is None or "x_base_step" not in r.extra:
                notes.append(f"{name}: {LABEL[k]} failed: {r.error}")
                continue
            x_base = r.extra["x_base_step"]
            tgt = TARGETS.get(k)
            verdict = "" if tgt is None else f" (target <= {tgt}x: {'met' if x_base <= tgt else 'MISSED'})"
            notes.append(f"{name}: {LABEL[k]} step = {x_base:.2f}x the {LABEL[BASE_OF[k]]} step{verdict}")
        breakdown_lines += _breakdown_table(name, desc, got, breakdown)
        bar.update(1)
    bar.close()
    clock_text = "time.process_time (CPU time of this process)" if cpu_clock else "the harness's timing policy"
    notes.insert(0, f"Times per training step, measured with {clock_text}; every AG method is interleaved with "
                    "its base (AG-1 and AG-3-1 over RMSProp, AG-2 over Adam). `X vs P` = time(P) / time(X), so "
                    "AG rows read 1 / (x base step).")
    notes.append("Breakdown (forwards, backwards, copies, update, base step) per method: see the -breakdown.md "
                 "file written next to this table.")
    out = getattr(args, "out", None)
    if out is not None:
        stem = "-".join(filter(None, [NAME, dev.type, ctx.mode, getattr(args, "tag", "")]))
        Path(out).mkdir(parents=True, exist_ok=True)
        text = [f"# AG training step breakdown ({dev.type}, {ctx.mode}, {clock_text})", "",
                f"torch {torch.__version__}, {torch.get_num_threads()} threads; commit of the sources: see the "
                f"main table ({stem}.md).", "",
                "ms per step (medians). `x base` = this step / the base optimizer's own step (timed, "
                "interleaved). The phase columns come from separately profiled steps (device synchronised "
                "between phases): forwards = the pass with graph + the no-grad pass; backwards = every backward "
                "(AG-1/AG-2: g and ḡ; AG-3-1: ḡ only); copies = parameter/buffer copies and AG-2's optimizer-state "
                "snapshot; update = the fused ag1_update_ / (AG-2) second base-optimizer call + ag2_rescale_; base "
                "step = the base optimizer's step with g (AG-3-1: with ḡ).", ""] + breakdown_lines
        (Path(out) / f"{stem}-breakdown.md").write_text("\n".join(text) + "\n")
    title = f"AG training step time relative to the base optimizer's step, {dev.type.upper()}, {ctx.mode}"
    return Report(op=NAME, title=title, rows=rows, subjects=list(MODES), peers=list(OPTIMIZERS), ceiling=None,
                  notes=notes, config={"models": names, "clock": "cpu" if cpu_clock else "wall",
                                       "profile_steps": profile_steps})


def _breakdown_table(name, desc, got, breakdown) -> list[str]:
    head = ["method", "ms/step", "x base", "target", "forwards", "backwards", "copies", "update", "base step"]
    lines = [f"## {name} — {desc}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for k in ("rmsprop", "adam") + MODES:
        r = got[k]
        b = breakdown[k]
        xb = r.extra.get("x_base_step")
        tgt = TARGETS.get(k)
        cells = [LABEL[k], "fail" if r.median_s is None else f"{r.median_s * 1e3:.2f}",
                 "1.00x" if k in OPTIMIZERS else ("-" if xb is None else f"{xb:.2f}x"),
                 "-" if tgt is None or xb is None else f"<= {tgt}x: {'met' if xb <= tgt else 'MISSED'}"]
        cells += [f"{b[c] * 1e3:.2f}" if c in b else "-" for c in ("forwards", "backwards", "copies", "update", "base step")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


if __name__ == "__main__":
    from bench.runner import main

    sys.exit(main(["--ops", NAME, *sys.argv[1:]]))
