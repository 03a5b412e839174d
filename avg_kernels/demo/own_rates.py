"""Each demo method's OWN tuned learning rate (``rates.json`` next to this file), next to its base's.

The demo shows two protocols for every method that has a base (AG methods, C-methods): at the base's tuned
rate (paper 002's protocol) and at the method's own best rate from a committed grid (paper 000's and 003's).
``python -m avg_kernels demo --tune --save-rates`` runs the grid on the demo's default model and budget and
writes the table; the criterion is the final full-train loss (as for the base rates, docs/ag_training.md).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

RATES_FILE = Path(__file__).with_name("rates.json")
#: the grid: the base's rate and the method's default rate times these factors
FACTORS_BASE = (1 / 3, 1.0, 3.0, 10.0)
FACTORS_OWN = (1 / 3, 1.0, 3.0)


def load() -> dict:
    """{"config": the run the grid used, "rates": {method: lr}, "grids": ..., "_from": provenance}, or {}."""
    try:
        return json.loads(RATES_FILE.read_text())
    except FileNotFoundError:
        return {}


def own_rate(name: str) -> Optional[float]:
    return load().get("rates", {}).get(name)


def grid(base_lr: float, default_lr: float) -> list[float]:
    vals = {float(f"{base_lr * f:.3g}") for f in FACTORS_BASE} | {float(f"{default_lr * f:.3g}") for f in FACTORS_OWN}
    return sorted(vals)


def config_of(args) -> dict:
    return {"depth": args.depth, "epochs": args.epochs, "batch_size": args.batch_size, "seed": args.seed,
            "data": "digits" if args.data is None else "IDX files"}


def save(config: dict, grids: dict, command: str, commit: Optional[str], date: str) -> None:
    rates = {name: min(rows, key=lambda r: r[1])[0] for name, rows in grids.items()}
    RATES_FILE.write_text(json.dumps({"config": config, "rates": rates,
                                      "grids": {n: [[lr, loss] for lr, loss in rows] for n, rows in grids.items()},
                                      "_from": f"`{command}` at commit {commit} on {date} UTC"}, indent=1) + "\n")
