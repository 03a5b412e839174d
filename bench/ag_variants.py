"""Step cost of the AG variants relative to plain AG-1 / AG-2 on the same model, in the same run (issue 13).

Methods, each on its own copy of the same model, interleaved in rotated rounds (``bench.ag_train``'s CPU
clock: median ``time.process_time`` per step, the work done, insensitive to other processes):
``rmsprop`` (base step), ``ag1``, ``ag1-linear`` (``linear=True``), ``agn3`` (``mode="agn", iterations=3``),
``adam``, ``ag2``, ``ag2-linear``. Ratios: ag1-linear / ag1, agn3 / ag1, ag2-linear / ag2 (and each / its base).

    python bench/ag_variants.py [--models demo,resnet18] [--min-run-time 6] [--rounds 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

import avg_kernels
from bench.ag_train import OPTIMIZERS, cases, time_cpu_clock

METHODS = {  # name -> (base, AG keyword arguments or None for the base's own step)
    "rmsprop": ("rmsprop", None),
    "ag1": ("rmsprop", dict(mode="ag1")),
    "ag1-linear": ("rmsprop", dict(mode="ag1", linear=True)),
    "agn3": ("rmsprop", dict(mode="agn", iterations=3)),
    "adam": ("adam", None),
    "ag2": ("adam", dict(mode="ag2")),
    "ag2-linear": ("adam", dict(mode="ag2", linear=True)),
}
RATIOS = [("ag1-linear", "ag1"), ("agn3", "ag1"), ("ag2-linear", "ag2"), ("ag1", "rmsprop"),
          ("ag1-linear", "rmsprop"), ("agn3", "rmsprop"), ("ag2", "adam"), ("ag2-linear", "adam")]


def steps_for(factory, x, y) -> dict:
    fns = {}
    for name, (base_name, kw) in METHODS.items():
        torch.manual_seed(0)
        model = avg_kernels.nn.convert(factory())
        base = OPTIMIZERS[base_name](model.parameters())
        if kw is None:
            def step(model=model, base=base):
                base.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                base.step()
        else:
            opt = avg_kernels.optim.AG(model, base, check_unaveraged=False, **kw)

            def step(opt=opt, model=model):
                opt.step(lambda: F.cross_entropy(model(x), y))
        fns[name] = step
    return fns


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="demo,resnet18")
    ap.add_argument("--min-run-time", type=float, default=6.0, help="CPU seconds per method, all rounds")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, time.process_time medians of "
          f"{a.rounds} interleaved rounds, {a.min_run_time:g} s per method")
    for name, desc, factory, x, y in cases("quick", torch.device("cpu"), names):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # linear: BatchNorm layers keep θ's Jacobian (reported)
            fns = steps_for(factory, x, y)
            for f in fns.values():
                f(), f()
            t = time_cpu_clock(fns, a.min_run_time, a.rounds)
        print(f"\n## {name}: {desc}")
        print("| method | ms/step |\n| --- | --- |")
        for k, v in t.items():
            print(f"| {k} | {1e3 * v:.2f} |")
        print("\n| ratio | value |\n| --- | --- |")
        for p, q in RATIOS:
            print(f"| {p} / {q} | {t[p] / t[q]:.3f} |")


if __name__ == "__main__":
    main()
