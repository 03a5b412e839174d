"""The ``reproduce`` command: argument checks, data, the study's settings × methods × seeds, the records."""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from .. import data as datasets
from . import engine, report
from .studies import STUDIES

DEFAULT_SEEDS = {"quick": 3, "full": 5, "smoke": 1}
#: --quick on a given data set (MNIST-sized) trains on this many images so it stays a CPU job
QUICK_TRAIN_CAP = 10_000


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help=f"one of {', '.join(STUDIES)}")
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", dest="preset", action="store_const", const="quick",
                        help="small budget, CPU minutes, committed learning rates (the default)")
    preset.add_argument("--full", dest="preset", action="store_const", const="full",
                        help="closer to the papers' budgets and widths (meant for a GPU: --device cuda)")
    preset.add_argument("--smoke", dest="preset", action="store_const", const="smoke", help=argparse.SUPPRESS)
    p.add_argument("--tune", action="store_true",
                   help="run the learning-rate grids at the preset's budget instead of the study; with --save-rates "
                        "the chosen rates replace this study's entry in the package's rates.json")
    p.add_argument("--save-rates", action="store_true",
                   help="with --tune: write the chosen rates into avg_kernels/reproduce/rates.json")
    p.add_argument("--methods", default=None,
                   help="with --tune: tune only these rate keys (comma-separated, e.g. agn; the study's tune record "
                        "lists them); the record is <study>-tune-<keys>.md and --save-rates replaces only these "
                        "rates, keeping the study's others")
    p.add_argument("--data", default=None, help="folder with the four MNIST/Fashion-MNIST IDX files "
                   "(default: scikit-learn's embedded digits)")
    p.add_argument("--seeds", default=None, help="number of seeds (default: 3 quick, 5 full, 1 for --tune)")
    p.add_argument("--out", default="reproduce_results", help="folder for the records (default reproduce_results)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: these models are small, and more threads mostly spin on a "
                        "busy machine; 0 = torch's default; use 0 with --full on a GPU machine)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(preset=None)


def check(args) -> tuple[str, int]:
    """Validates the arguments before anything runs; returns (preset, seeds) or raises ValueError."""
    if args.study not in STUDIES:
        raise ValueError(f"unknown study {args.study!r}: expected one of {', '.join(STUDIES)}")
    preset = args.preset or "quick"
    seeds = args.seeds
    if seeds is None:
        seeds = 1 if args.tune else DEFAULT_SEEDS[preset]
    else:
        try:
            seeds = int(seeds)
        except (TypeError, ValueError):
            raise ValueError(f"--seeds {args.seeds!r}: expected a whole number >= 1") from None
        if seeds < 1:
            raise ValueError(f"--seeds {seeds}: expected a whole number >= 1")
    if args.save_rates and not args.tune:
        raise ValueError("--save-rates only goes with --tune")
    if args.methods is not None and not args.tune:
        raise ValueError("--methods only goes with --tune")
    if args.data is not None and not Path(args.data).is_dir():
        raise ValueError(f"--data {args.data!r} is not a folder (expected the four IDX files in it)")
    if args.threads < 0:
        raise ValueError(f"--threads {args.threads}: expected >= 0")
    torch.device(args.device)  # raises for a malformed device string
    return preset, seeds


def load_data(path: str | None, preset: str, device: torch.device):
    notes = []
    if path is None:
        train, test = datasets.digits()
        name = "digits"
    else:
        train, test = datasets.mnist(path)
        name = Path(path).resolve().name
        if preset in ("quick", "smoke") and len(train.y) > QUICK_TRAIN_CAP:
            train = datasets.Split(train.x[:QUICK_TRAIN_CAP], train.y[:QUICK_TRAIN_CAP])
            notes.append(f"--quick trains on the first {QUICK_TRAIN_CAP} training images of {name}")
    train = datasets.Split(train.x.to(device), train.y.to(device))
    test = datasets.Split(test.x.to(device), test.y.to(device))
    info = {"name": name, "side": train.x.shape[-1], "pixels": train.x[0].numel(),
            "classes": int(train.y.max().item()) + 1}
    return train, test, info, notes


def main(args) -> int:
    try:
        preset, n_seeds = check(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    study = STUDIES[args.study]
    device = torch.device(args.device)
    train, test, info, notes = load_data(args.data, preset, device)
    settings = study.settings(preset, info)
    keys = None
    if args.methods is not None:
        keys = {k.strip() for k in args.methods.split(",") if k.strip()}
        known = {k for s in settings for k in s.tune}
        if not keys or keys - known:
            print(f"error: --methods {args.methods!r}: expected rate keys of {study.name} among {sorted(known)}",
                  file=sys.stderr)
            return 2
    budget = study.budgets[preset]
    seeds = list(range(n_seeds))
    out = Path(args.out)
    t0, c0 = time.perf_counter(), time.process_time()
    where = report.machine()  # at the start: the commit that runs
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    if args.tune:
        total = sum(len(g) * n_seeds for s in settings for k, (_, g) in s.tune.items() if keys is None or k in keys)
    else:
        total = sum(n_seeds for s in settings for m in s.methods)
    bar = tqdm(total=total, desc=study.name, unit="run", disable=args.no_progress) if tqdm else None
    base = {"device": device.type, "study": study.name, "title": study.title, "paper": study.paper, "preset": preset, "data": info["name"],
            "n_train": len(train.y), "seeds": seeds, "budget": vars(budget) if hasattr(budget, "__dict__") else
            budget.__dict__, "notes": [*study.notes, *notes]}
    if args.tune:
        results = [engine.tune_setting(study, s, train, test, budget, seeds, bar, keys) for s in settings]
        doc = {**base, "settings": results, "wall_s": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0, "machine": where}
        if bar:
            bar.close()
        out.mkdir(parents=True, exist_ok=True)
        stem = f"{study.name}-tune" + ("-" + "-".join(sorted(keys)) if keys else "")
        (out / f"{stem}.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
        text = report.tune_markdown(doc)
        (out / f"{stem}.md").write_text(text + "\n")
        print(text)
        if args.save_rates:
            save_rates(study.name, info["name"], results, doc["machine"], stem if keys else None)
            print(f"saved the chosen rates into {engine.RATES_FILE}")
        print(f"wrote {out / stem}.md, .json")
        return 0
    table = engine.load_rates()
    try:
        found = [engine.rates_for(table, study.name, info["name"], s.key) for s in settings]
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    results = []
    for s, (rates, note) in zip(settings, found):
        r = engine.run_setting(study, s, rates, train, test, budget, seeds, bar)
        r["rates_note"] = note
        results.append(r)
    if bar:
        bar.close()
    prov = table.get(study.name, {}).get("_from")
    if prov:
        base["notes"].append(f"learning rates from `{engine.RATES_FILE.name}`: {prov}")
    if preset == "full" and "--full" not in (prov or ""):
        base["notes"].append("these rates were tuned at the --quick budget (smaller models, fewer epochs); "
                             "`--tune --full` tunes them for this budget")
    doc = {**base, "settings": results, "wall_s": time.perf_counter() - t0,
               "cpu_s": time.process_time() - c0, "machine": where}
    paths = report.write(doc, out, study.name)
    print(report.markdown(doc))
    print("wrote " + ", ".join(map(str, paths)))
    return 0


def save_rates(study: str, dataset: str, results: list[dict], machine: dict, partial: str | None = None) -> None:
    """Replaces ``study``/``dataset`` in the package's rates.json (under a lock: tunes may run side by side).
    ``partial`` (the tune record's stem of a ``--methods`` tune): only the tuned keys are replaced, the others
    and the provenance of the earlier tune are kept, this tune's provenance appended."""
    import fcntl

    path = engine.RATES_FILE
    with open(path.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = json.loads(path.read_text()) if path.exists() else {}
        entry = table.setdefault(study, {})
        src = machine.get("source", {})
        prov = f"`{machine['command']}` at commit {src.get('head')} on {machine['date_utc']} UTC"
        if partial is None:
            entry[dataset] = {r["setting"]: r["rates"] for r in results}
            entry["_from"] = f"{prov} (grids: docs/reproduction/{study}-tune.md)"
        else:
            for r in results:
                entry.setdefault(dataset, {}).setdefault(r["setting"], {}).update(r["rates"])
            keys = sorted({k for r in results for k in r["rates"]})
            entry["_from"] = ((entry.get("_from", "") + "; ") if entry.get("_from") else "") + (
                f"{', '.join(keys)}: {prov} (grids: docs/reproduction/{partial}.md)")
        path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
