"""One training run of one method: same init and batch order for every method at a given seed; the full
training set's loss is evaluated at fixed step intervals (evaluation time is not training time)."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn
import torch.nn.functional as F

from ..data import Split
from .methods import Method


@dataclass(frozen=True)
class Budget:
    """epochs of batches of ``batch``; ``evals`` full-train-set evaluations spread evenly over the run
    (plus one at step 0); ``max_steps`` (smoke tests) cuts the run short."""

    epochs: int
    batch: int
    evals: int = 20
    max_steps: int | None = None


def evaluate(model: nn.Module, split: Split, chunk: int = 2048) -> tuple[float, float]:
    """Mean cross-entropy and accuracy of ``model`` over ``split`` (eval mode, no grad)."""
    was = model.training
    model.eval()
    loss, correct = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(split.y), chunk):
            out = model(split.x[i:i + chunk])
            loss += F.cross_entropy(out, split.y[i:i + chunk], reduction="sum").item()
            correct += (out.argmax(1) == split.y[i:i + chunk]).sum().item()
    model.train(was)
    return loss / len(split.y), correct / len(split.y)


def run(method: Method, make_model: Callable[[], nn.Module], lr: float, train: Split, test: Split | None,
        budget: Budget, seed: int) -> dict:
    """Trains ``make_model()`` (built under ``torch.manual_seed(seed)``) with ``method`` at rate ``lr``.

    Returns {"evals": [{"step", "samples", "wall_s", "train_loss", "train_acc"}], "final": {...},
    (``wall_s``: training time so far, see ``clock`` below)
    "diverged_at": step or None, "step_ms": median ms/step, **trainer.summary()}. A non-finite batch or
    evaluation loss stops the run (``diverged_at``), as does a step's ``LinAlgError``; later evaluations are
    absent; ``failure`` names the error that ended a run, if one did.
    """
    torch.manual_seed(seed)
    model = make_model()
    trainer = method.build(model, lr)
    order = torch.Generator().manual_seed(10_000 + seed)
    n = len(train.y)
    steps_per_epoch = math.ceil(n / budget.batch)
    total = budget.epochs * steps_per_epoch
    if budget.max_steps is not None:
        total = min(total, budget.max_steps)
    at = sorted({round(total * k / budget.evals) for k in range(1, budget.evals + 1)} | {total})
    # training time: CPU time of the steps on a CPU device (the studies run one thread, where it equals the wall
    # time of an idle machine; on a shared machine wall time measures the load), wall time on a GPU
    cpu = train.x.device.type == "cpu"
    clock = time.process_time if cpu else time.perf_counter
    evals, times = [], []
    wall, step, seen, diverged, failure = 0.0, 0, 0, None, None

    def record():
        tl, ta = evaluate(model, train)
        evals.append({"step": step, "samples": seen, "wall_s": wall, "train_loss": tl, "train_acc": ta})
        return math.isfinite(tl)

    record()
    while step < total and diverged is None:
        perm = torch.randperm(n, generator=order)
        for i in range(0, n, budget.batch):
            idx = perm[i:i + budget.batch]
            t0 = clock()
            try:
                loss = trainer.step(train.x[idx], train.y[idx])
            except (FloatingPointError, torch.linalg.LinAlgError) as exc:
                # NonFiniteError (a FloatingPointError) on NaN/inf; a ridge solve on the Gram of blown-up
                # activations can fail to converge first: both end the run as diverged, with the reason
                loss, failure = math.nan, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            dt = clock() - t0 - (trainer.untimed_cpu_s if cpu else trainer.untimed_s)
            wall += dt
            times.append(dt)
            step += 1
            seen += len(idx)
            if not math.isfinite(loss):
                diverged = step
                break
            if step in at and not record():
                diverged = step
                break
            if step >= total:
                break
    final = evals[-1]
    if test is not None and diverged is None:
        te_loss, te_acc = evaluate(model, test)
        final = {**final, "test_loss": te_loss, "test_acc": te_acc}
    times.sort()
    return {"evals": evals, "final": final, "diverged_at": diverged, "failure": failure, "steps": step,
            "step_ms": 1e3 * times[len(times) // 2] if times else None, **trainer.summary()}
