"""Runs the demo (SPEC §7): every requested method on the same data, model init and batch order;
prints a Markdown table and writes a PNG plot of loss against samples seen."""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from .. import data as datasets
from . import own_rates
from .methods import REGISTRY, Settings
from .model import model_b

DEFAULT_METHODS = ["rmsprop", "ag1", "ag3-1", "adam", "ag2", "sgd", "csgd", "cnesterov", "cadam"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--methods", nargs="+", default=None,
                   help=f"methods to run (default: {' '.join(DEFAULT_METHODS)}); --list shows all")
    p.add_argument("--list", action="store_true", help="list the registered methods and exit")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4, help="tanh layers after the convolutions (paper: 27)")
    p.add_argument("--lr", type=float, default=None, help="learning rate for every method (default: each method's own)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=None, help="folder with the four MNIST IDX files (default: scikit-learn digits)")
    p.add_argument("--target-loss", type=float, default=0.5, help="train loss whose first crossing counts samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo_results", help="folder for demo.md, demo.json, demo.png")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: the demo's tensors are tiny, so more threads only add "
                        "synchronisation, which is very slow on a busy machine; 0 = torch's default)")
    p.add_argument("--protocol", choices=("both", "base", "own"), default="both",
                   help="rate of a method with a base (AG, C-methods): the base's tuned rate, its own tuned rate "
                        "(avg_kernels/demo/rates.json), or both as two rows (default); ignored with --lr")
    p.add_argument("--tune", action="store_true",
                   help="run each method's learning-rate grid (final train loss) instead of the demo; with "
                        "--save-rates write the best rates into avg_kernels/demo/rates.json")
    p.add_argument("--save-rates", action="store_true", help="with --tune: save the chosen rates")
    p.add_argument("--no-progress", action="store_true")


def evaluate(model, split, device, batch=1024):
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(split.y), batch):
            x, y = split.x[i:i + batch].to(device), split.y[i:i + batch].to(device)
            out = model(x)
            loss += F.cross_entropy(out, y, reduction="sum").item()
            correct += (out.argmax(1) == y).sum().item()
    model.train()
    return loss / len(split.y), correct / len(split.y)


def train_one(name, args, train, test, progress, lr=None, label=None):
    method = REGISTRY[name]
    lr = lr or args.lr or method.default_lr
    device = torch.device(args.device)
    torch.manual_seed(args.seed)  # the same initial model for every method
    model = model_b(image_size=train.x.shape[-1], depth=args.depth).to(device)
    trainer = method.make(model, Settings(lr=lr))
    order = torch.Generator().manual_seed(args.seed + 1)  # the same batch order for every method
    curve, step_times, step_cpu, epochs = [], [], [], []
    seen = 0
    for epoch in range(args.epochs):
        perm = torch.randperm(len(train.y), generator=order)
        for i in range(0, len(perm), args.batch_size):
            idx = perm[i:i + args.batch_size]
            x, y = train.x[idx].to(device), train.y[idx].to(device)
            t0, c0 = time.perf_counter(), time.process_time()
            loss = trainer.step(x, y)
            step_times.append(time.perf_counter() - t0 - trainer.untimed_s)
            step_cpu.append(time.process_time() - c0 - trainer.untimed_cpu_s)
            seen += len(idx)
            curve.append((seen, loss))
            if progress is not None:
                progress.update(1)
        tr, te = evaluate(model, train, device), evaluate(model, test, device)
        epochs.append({"epoch": epoch + 1, "samples": seen, "train_loss": tr[0], "train_acc": tr[1],
                       "test_loss": te[0], "test_acc": te[1]})
    reached = next((e["samples"] for e in epochs if e["train_loss"] <= args.target_loss), None)
    return {"method": label or name, "base": method.base, "lr": lr, "curve": curve,
            "epochs": epochs, "samples_to_target": reached,
            "step_ms": 1e3 * statistics.median(step_times[1:] or step_times),
            "step_cpu_ms": 1e3 * statistics.median(step_cpu[1:] or step_cpu), **trainer.summary()}


_KNOWN = {"method", "base", "lr", "curve", "epochs", "samples_to_target", "step_ms", "step_cpu_ms", "RD", "protocol"}


def _fmt(v) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def relative_efficiency(r, base) -> float | None:
    """Relative sample efficiency of run ``r`` against ``base`` on the per-epoch full-train losses
    (paper 002 §4.1(a), one run each: avg_kernels.metrics.relative_sample_efficiency)."""
    if base is None:
        return None
    from ..metrics import relative_sample_efficiency

    return relative_sample_efficiency([e["train_loss"] for e in r["epochs"]], [e["train_loss"] for e in base["epochs"]])


def header(args, train) -> list[str]:
    """What the table is: the model, depth, budget and data, and where the papers' claims are checked."""
    return [f"Demo: paper 000's Model B adapted to {train.x.shape[-1]}x{train.x.shape[-1]} inputs at depth "
            f"{args.depth} (2 conv+ELU+maxpool, {args.depth} Linear+Tanh layers of width 10; the paper has 27), "
            f"{args.epochs} epochs of batch {args.batch_size}, {'digits' if args.data is None else args.data} "
            f"({len(train.y)} training images), seed {args.seed}, one run per row.",
            "`@base rate`: the method at its base optimizer's tuned rate (paper 002's protocol); `@own rate`: at "
            "its own best rate from the committed grid (avg_kernels/demo/rates.json). This small, shallow run is "
            "a smoke test of the methods, not a test of the papers' claims: `python -m avg_kernels reproduce "
            "<p003-mlp|p003-resnet|p000-model-b|p002-ag>` runs those (docs/reproduction.md has the results).", ""]


def table(results, target_loss):
    by_name = {r["method"]: r for r in results}
    extra_cols = sorted({k for r in results for k in r if k not in _KNOWN})
    head = ["method", "base", "lr", "train loss", "train acc", "test loss", "test acc", f"samples to loss {target_loss}",
            "rel. sample efficiency", "RD", "ms/step", "CPU ms/step", "time vs base"] + extra_cols
    rows = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in results:
        last = r["epochs"][-1]
        base = by_name.get(r["base"]) if r["base"] else None
        rel = f"{r['step_cpu_ms'] / base['step_cpu_ms']:.2f}x" if base and base["step_cpu_ms"] > 0 else "-"
        eff = relative_efficiency(r, base)
        cells = [r["method"], r["base"] or "-", f"{r['lr']:g}", f"{last['train_loss']:.4f}", f"{last['train_acc']:.3f}",
                 f"{last['test_loss']:.4f}", f"{last['test_acc']:.3f}", str(r["samples_to_target"] or "not reached"),
                 "-" if eff is None else f"{eff:.2f}", _fmt(r.get("RD")), f"{r['step_ms']:.2f}",
                 f"{r['step_cpu_ms']:.2f}", rel]
        cells += [_fmt(r.get(c)) for c in extra_cols]
        rows.append("| " + " | ".join(cells) + " |")
    rows += ["", "rel. sample efficiency: paper 002 §4.1(a) on the per-epoch full-train losses against the `base` "
             "column's run (2.0 = reaches the base's best losses in half the epochs; 0 = never matches them). "
             "RD: SPEC §4 / paper 000 Eq. 7, summed batch-loss reductions of the AG update against the base "
             "optimizer's own step on the same batch and parameters (> 0: AG reduced the batch loss more; AG-1/AG-2 "
             "only). ms/step: median wall time of a step; CPU ms/step: its CPU time (time.process_time, all threads of "
             "this process); time vs base: CPU time per step against the base method's (CPU time, because the "
             "methods run one after another and wall time on a shared machine measures the load as much as "
             "the method). The extra forward that RD needs is not timed."]
    return "\n".join(rows)


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        xs = [s for s, _ in r["curve"]]
        ys = [l for _, l in r["curve"]]
        k = max(1, len(ys) // 100)  # moving average over ~1% of the run, for readability
        smooth = [sum(ys[max(0, i - k + 1):i + 1]) / len(ys[max(0, i - k + 1):i + 1]) for i in range(len(ys))]
        ax.plot(xs, smooth, label=r["method"])
    ax.set_xlabel("training samples seen")
    ax.set_ylabel("batch loss (moving average)")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    if args.list:
        for m in REGISTRY.values():
            print(f"{m.name:10s} {m.help}")
        return 0
    names = args.methods or DEFAULT_METHODS
    if args.save_rates and not args.tune:
        raise SystemExit("--save-rates only goes with --tune")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise SystemExit(f"--methods: unknown {unknown}; registered: {sorted(REGISTRY)}")
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, names)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace, names: list[str]) -> int:
    train, test = datasets.mnist(args.data) if args.data else datasets.digits(seed=args.seed)
    if args.tune:
        return _tune(args, names, train, test)
    runs = plan(args, names)
    steps = args.epochs * -(-len(train.y) // args.batch_size) * len(runs)
    try:
        from tqdm import tqdm

        progress = tqdm(total=steps, disable=args.no_progress, desc="demo", unit="step")
    except ImportError:  # pragma: no cover
        progress = None
    results = [train_one(n, args, train, test, progress, lr, label) for n, lr, label in runs]
    if progress is not None:
        progress.close()
    text = "\n".join(header(args, train)) + "\n" + table(results, args.target_loss)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "demo.md"), "w") as f:
        f.write(text + "\n")
    with open(os.path.join(args.out, "demo.json"), "w") as f:
        json.dump(results, f)
    plot(results, os.path.join(args.out, "demo.png"))
    print(f"wrote {args.out}/demo.md, demo.json, demo.png")
    return 0


def plan(args, names) -> list[tuple[str, float | None, str]]:
    """(method, lr, row label) per run: a method with a base runs at the base's rate and/or its own tuned rate."""
    out = []
    for n in names:
        m = REGISTRY[n]
        own = own_rates.own_rate(n)
        if args.lr is not None or m.base is None:
            out.append((n, None, n))
            continue
        base_lr = REGISTRY[m.base].default_lr
        if args.protocol == "both" and own == base_lr:  # the grid chose the base's rate: one run shows both
            out.append((n, base_lr, f"{n} @base rate = own rate"))
            continue
        if args.protocol in ("both", "base"):
            out.append((n, base_lr, f"{n} @base rate"))
        if args.protocol in ("both", "own"):
            if own is None:
                raise SystemExit(f"demo: no own tuned rate for {n!r} in {own_rates.RATES_FILE}; run "
                                 "`python -m avg_kernels demo --tune --save-rates` or use --protocol base")
            out.append((n, own, f"{n} @own rate"))
    return out


def _tune(args, names, train, test) -> int:
    """Each method with a base over its grid (own_rates.grid), one run per rate; the best final train loss wins."""
    import datetime
    import sys

    grids = {}
    for n in (n for n in names if REGISTRY[n].base):
        m = REGISTRY[n]
        rows = []
        for lr in own_rates.grid(REGISTRY[m.base].default_lr, m.default_lr):
            try:
                r = train_one(n, args, train, test, None, lr)
                loss = r["epochs"][-1]["train_loss"]
            except FloatingPointError:
                loss = float("inf")
            loss = loss if loss == loss else float("inf")  # NaN: diverged
            rows.append((lr, loss))
            print(f"{n} lr {lr:g}: final train loss {loss:.4g}", flush=True)
        grids[n] = rows
    for n, rows in grids.items():
        best = min(rows, key=lambda r: r[1])
        print(f"{n}: own rate {best[0]:g} (final train loss {best[1]:.4g}); base's rate "
              f"{REGISTRY[REGISTRY[n].base].default_lr:g}")
    if args.save_rates:
        import subprocess

        try:
            commit = subprocess.run(["git", "-C", str(own_rates.RATES_FILE.parent), "rev-parse", "--short=12", "HEAD"],
                                    capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            commit = None
        date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
        own_rates.save(own_rates.config_of(args), grids, "python -m avg_kernels demo " + " ".join(sys.argv[2:]),
                       commit, date)
        print(f"wrote {own_rates.RATES_FILE}")
    return 0
