"""Runs a study: every setting × method × seed on the same data, inits and batch orders; aggregates mean ± SEM
over seeds; tunes learning rates over grids (``--tune``).

A ``Study`` is data: its settings (model, inputs, methods), its budgets per preset and its rate grids.
Learning rates come from the committed table ``rates.json`` (written by ``--tune --save-rates``), keyed
study → data set → setting → rate key; a method runs at the rate of its ``rate`` key.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from ..data import Split
from ..metrics import relative_sample_efficiency
from .methods import Method
from .train import Budget, run

RATES_FILE = Path(__file__).with_name("rates.json")
#: a diverged run's later evaluations count as this loss for the sample-efficiency metric (never matches)
DIVERGED_LOSS = 1e6


@dataclass
class Setting:
    """One model/input configuration of a study and the methods compared on it.

    ``prepare(split, method) -> Split``: the inputs as this method sees them (e.g. [0, 1] or standardised);
    ``make_model(method) -> nn.Module``.
    """

    key: str
    title: str
    methods: list[Method]
    make_model: Callable[[Method], object]
    prepare: Callable[[Split, Split, Method], tuple[Split, Split]]
    #: rate key -> (method that tunes it, grid of learning rates)
    tune: dict[str, tuple[str, list[float]]] = field(default_factory=dict)


@dataclass
class Study:
    name: str
    title: str
    paper: str  # what the paper reports, for the record
    budgets: dict[str, Budget]  # preset -> budget ("quick", "full", "smoke")
    settings: Callable[[str, dict], list[Setting]]  # (preset, data info) -> settings
    notes: list[str] = field(default_factory=list)
    target: Optional[str] = None  # a column to highlight (unused by the engine)


def load_rates(path: Path = RATES_FILE) -> dict:
    """The committed learning-rate table: {study: {data set: {setting: {rate key: lr}}, "_from": provenance}}."""
    try:
        table = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"the learning-rate table {path} is missing: run `python -m avg_kernels reproduce "
                                "<study> --tune --save-rates` to produce it") from None
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object keyed by study")
    return table


def rates_for(table: dict, study: str, dataset: str, setting: str) -> tuple[dict, Optional[str]]:
    """(rates of this setting, a note when they were tuned on another data set) or raise naming what is missing."""
    by_data = table.get(study)
    if not by_data:
        raise KeyError(f"no tuned learning rates for study {study!r} in {RATES_FILE}: run it with --tune --save-rates")
    note = None
    if dataset not in by_data:
        if "digits" not in by_data:
            raise KeyError(f"no tuned learning rates for {study!r} on {dataset!r} (or digits): run --tune --save-rates")
        note = f"rates tuned on digits, not on {dataset}: run --tune --save-rates for rates of this data"
        dataset = "digits"
    rates = by_data[dataset].get(setting)
    if rates is None:
        raise KeyError(f"no tuned learning rates for {study!r} / {dataset!r} / setting {setting!r}")
    return rates, note


def mean_sem(values: list[float]) -> tuple[Optional[float], Optional[float]]:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None, None
    m = statistics.fmean(vals)
    return m, (statistics.stdev(vals) / math.sqrt(len(vals)) if len(vals) > 1 else None)


def loss_matrix(runs: list[dict]) -> list[list[float]]:
    """runs × evaluation points of the full-train loss; after a divergence: DIVERGED_LOSS."""
    width = max(len(r["evals"]) for r in runs)
    out = []
    for r in runs:
        row = [e["train_loss"] if math.isfinite(e["train_loss"]) else DIVERGED_LOSS for e in r["evals"]]
        out.append(row + [DIVERGED_LOSS] * (width - len(row)))
    return out


def epochs_to(runs: list[dict], target: float, n_train: int) -> Optional[float]:
    """Epochs until the seeds' mean full-train loss first reaches ``target`` (None: never)."""
    mat = loss_matrix(runs)
    for j in range(len(mat[0])):
        if statistics.fmean(row[j] for row in mat) <= target:
            return next(r["evals"][j]["samples"] for r in runs if j < len(r["evals"])) / n_train
    return None


def seconds_to(runs: list[dict], target: float) -> Optional[float]:
    """Mean training wall time until the mean full-train loss first reaches ``target``."""
    mat = loss_matrix(runs)
    for j in range(len(mat[0])):
        if statistics.fmean(row[j] for row in mat) <= target:
            return statistics.fmean(r["evals"][j]["wall_s"] for r in runs if j < len(r["evals"]))
    return None


def early(run: dict, fraction: float = 0.1) -> Optional[float]:
    """Full-train loss at the evaluation point nearest ``fraction`` of the run's steps (None: diverged before)."""
    evals = run["evals"]
    total = evals[-1]["step"] if run["diverged_at"] is None else None
    if not total:
        return None
    return min(evals, key=lambda e: abs(e["step"] - fraction * total))["train_loss"]


def aggregate(runs: list[dict], base_runs: Optional[list[dict]], n_train: int) -> dict:
    """Mean ± SEM over seeds, and the comparisons with the base method's runs (same seeds)."""
    agg = {"seeds": len(runs), "diverged": sum(r["diverged_at"] is not None for r in runs)}
    for key, get in (("final_loss", lambda r: r["final"]["train_loss"] if r["diverged_at"] is None else None),
                     ("best_loss", lambda r: min(e["train_loss"] for e in r["evals"])),
                     ("test_acc", lambda r: r["final"].get("test_acc")),
                     ("early_loss", lambda r: early(r)),
                     ("RD", lambda r: r.get("RD")),
                     ("step_ms", lambda r: r["step_ms"])):
        agg[key], agg[key + "_sem"] = mean_sem([get(r) for r in runs])
    l1 = [r.get("step_l1") for r in runs if r.get("step_l1") is not None]
    agg["step_l1"] = statistics.fmean(l1) if l1 else None
    if base_runs:
        base_best = min(statistics.fmean(row[j] for row in loss_matrix(base_runs)) for j in range(len(base_runs[0]["evals"])))
        agg["base_best"] = base_best
        agg["epochs_to_base_best"] = epochs_to(runs, base_best, n_train)
        agg["base_epochs_to_base_best"] = epochs_to(base_runs, base_best, n_train)
        agg["s_to_base_best"] = seconds_to(runs, base_best)
        agg["base_s_to_base_best"] = seconds_to(base_runs, base_best)
        a, b = loss_matrix(runs), loss_matrix(base_runs)
        w = min(len(a[0]), len(b[0]))
        agg["rel_sample_eff"] = relative_sample_efficiency([r[1:w] for r in a], [r[1:w] for r in b]) if w > 1 else None
        bl1 = [r.get("step_l1") for r in base_runs if r.get("step_l1") is not None]
        agg["step_l1_vs_base"] = (agg["step_l1"] / statistics.fmean(bl1)) if (agg["step_l1"] and bl1) else None
    return agg


def run_setting(study: Study, setting: Setting, rates: dict, train: Split, test: Split, budget: Budget,
                seeds: list[int], progress=None, lr_override: Optional[dict] = None) -> dict:
    """Every method of ``setting`` over ``seeds``; returns {"methods": [...]} with runs and aggregates."""
    results = {}
    for m in setting.methods:
        entry = {"method": m.name, "base": m.base, "rate_key": m.rate, "tags": m.tags}
        lr = (lr_override or {}).get(m.name, rates.get(m.rate))
        if lr is None:
            raise KeyError(f"{study.name} / {setting.key}: no tuned rate {m.rate!r} for method {m.name!r}")
        tr, te = setting.prepare(train, test, m)
        runs = []
        for s in seeds:
            runs.append(run(m, lambda: setting.make_model(m), lr, tr, te, budget, s))
            if progress is not None:
                progress.update(1)
        results[m.name] = {**entry, "lr": lr, "runs": runs}
    for name, r in results.items():
        if "runs" in r:
            base = results.get(r["base"]) if r["base"] else None
            r["agg"] = aggregate(r["runs"], base.get("runs") if base else None, len(train.y))
    return {"setting": setting.key, "title": setting.title, "methods": list(results.values())}


def tune_setting(study: Study, setting: Setting, train: Split, test: Split, budget: Budget, seeds: list[int],
                 progress=None, keys: Optional[set] = None) -> dict:
    """For each rate key (those in ``keys`` when given): the grid run of its tuning method; the chosen rate minimises the seeds' mean of the
    smallest full-train loss over the run (paper 000's criterion); a diverged run counts as +inf."""
    by_name = {m.name: m for m in setting.methods}
    chosen, grids = {}, {}
    for key, (name, grid) in setting.tune.items():
        if keys is not None and key not in keys:
            continue
        m = by_name[name]
        tr, te = setting.prepare(train, test, m)
        rows = []
        for lr in grid:
            bests = []
            for s in seeds:
                r = run(m, lambda: setting.make_model(m), lr, tr, None, budget, s)
                best = min(e["train_loss"] for e in r["evals"])
                bests.append(best if (r["diverged_at"] is None and math.isfinite(best)) else math.inf)
                if progress is not None:
                    progress.update(1)
            rows.append({"lr": lr, "best_loss": statistics.fmean(bests), "per_seed": bests})
        best_row = min(rows, key=lambda r: r["best_loss"])
        edge = best_row["lr"] in (min(grid), max(grid))
        chosen[key] = best_row["lr"]
        grids[key] = {"method": name, "rows": rows, "chosen": best_row["lr"], "at_grid_edge": edge}
    return {"setting": setting.key, "title": setting.title, "rates": chosen, "grids": grids}
