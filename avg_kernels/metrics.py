"""Metrics of the AG papers: RD (paper 000 Eq. 7, sign as in SPEC §4) and relative sample efficiency
(paper 002 §4.1(a)).

RD compares, batch by batch at the SAME parameters and on the SAME batch, the loss reduction of the AG
update with the reduction of the base optimizer's own step (which an AG-1/AG-2 step computes anyway:
it is the step to θ'):

    r_AG   = ℓ_b(θ) − ℓ_b(θ_{t+1})        r_base = ℓ_b(θ) − ℓ_b(θ')
    RD     = (Σ r_AG − Σ r_base) / |Σ r_base|

RD > 0: the AG update reduced the batch loss more than the base step would have. Paper 000 reports
RD = 10.41 as "1141 % of the base optimizer's reduction" (Eq. 7 as printed has the opposite sign).
"""
from __future__ import annotations

import math
from typing import Iterable, Optional, Sequence

import torch

__all__ = ["rd", "RD", "relative_sample_efficiency", "matching_epoch"]


def rd(ag_reductions: Iterable[float], base_reductions: Iterable[float]) -> float:
    """RD from per-batch loss reductions r = ℓ_b(θ) − ℓ_b(θ_next) of the AG update and of the base step.

    Raises ValueError when the lengths differ, a value is not finite, or Σ r_base = 0 (RD undefined).
    """
    a = [float(v) for v in ag_reductions]
    b = [float(v) for v in base_reductions]
    if len(a) != len(b):
        raise ValueError(f"rd: {len(a)} AG reductions but {len(b)} base reductions; they pair batch by batch")
    if not a:
        raise ValueError("rd: no batches")
    bad = [i for i, v in enumerate(a + b) if not math.isfinite(v)]
    if bad:
        raise ValueError(f"rd: non-finite reduction at position {bad[0] % len(a)}")
    sa, sb = math.fsum(a), math.fsum(b)
    if sb == 0:
        raise ValueError("rd: the base reductions sum to 0, RD is undefined")
    return (sa - sb) / abs(sb)


class RD:
    """Running RD over a training run: ``update`` once per step, read ``value``.

    ``update(loss, loss_ag, loss_base)`` takes ℓ_b(θ), ℓ_b(θ_{t+1}) and ℓ_b(θ'); ``update_from(opt.last)``
    reads them from an ``avg_kernels.optim.AG`` step made with ``track_loss_after=True`` (AG-1/AG-2;
    AG-3-1 has no base step on the same batch to compare with).
    """

    def __init__(self):
        self.sum_ag = 0.0
        self.sum_base = 0.0
        self.n = 0
        self._ag: list[float] = []
        self._base: list[float] = []

    def update(self, loss, loss_ag, loss_base) -> None:
        l0, la, lb = float(loss), float(loss_ag), float(loss_base)
        if not (math.isfinite(l0) and math.isfinite(la) and math.isfinite(lb)):
            raise ValueError(f"RD.update: non-finite loss ({l0}, {la}, {lb})")
        self._ag.append(l0 - la)
        self._base.append(l0 - lb)
        self.n += 1

    def update_from(self, info) -> None:
        if info is None or getattr(info, "plain", False):
            return
        if info.loss_new is None:
            raise ValueError(f"RD.update_from: the {info.mode} step has no ℓ(θ') on its batch (only AG-1 and AG-2 "
                             "compute θ', and only with track_replay_loss, which track_loss_after=True implies)")
        if info.loss_after is None:
            raise ValueError("RD.update_from: the step has no ℓ(θ_(t+1)); create AG with track_loss_after=True")
        self.update(info.loss, info.loss_after, info.loss_new)

    @property
    def value(self) -> Optional[float]:
        """RD so far, or None before the first update or while Σ r_base = 0."""
        if not self.n:
            return None
        try:
            return rd(self._ag, self._base)
        except ValueError:
            return None

    @property
    def ag_reduction(self) -> float:
        return math.fsum(self._ag)

    @property
    def base_reduction(self) -> float:
        return math.fsum(self._base)


def _as_runs(losses) -> torch.Tensor:
    t = torch.as_tensor(losses, dtype=torch.float64)
    if t.dim() == 1:
        t = t.unsqueeze(0)
    if t.dim() != 2 or t.shape[1] == 0:
        raise ValueError(f"losses must be a sequence over epochs or runs x epochs, got shape {tuple(t.shape)}")
    return t


def matching_epoch(curve: Sequence[float], target: float) -> Optional[int]:
    """The first epoch (1-based) whose loss is <= target, or None."""
    for i, v in enumerate(curve):
        if v <= target:
            return i + 1
    return None


def relative_sample_efficiency(losses, base_losses) -> float:
    """Relative sample efficiency of a method against a baseline (paper 002 §4.1(a)).

    ``losses`` and ``base_losses``: per-epoch losses (full training set, say), one sequence for one run
    or a (runs x epochs) array for several; both cover the same epochs. For every prefix of epochs
    [1, n] (n = 1..E): take the baseline's best-loss epoch e_b in the prefix, and the method's first
    epoch e_m whose loss matches it (<=); the ratio is e_b / e_m (0 when the method never matches within
    the prefix). This is computed on the mean and on the median curves over runs and the two ratios
    combined by their geometric mean; the result is the arithmetic average over all prefixes.
    1.0 = as sample-efficient as the baseline; 4.44 reads "444 % (of the baseline)".
    """
    m, b = _as_runs(losses), _as_runs(base_losses)
    if m.shape[1] != b.shape[1]:
        raise ValueError(f"losses cover {m.shape[1]} epochs but base_losses cover {b.shape[1]}")
    if not (torch.isfinite(m).all() and torch.isfinite(b).all()):
        raise ValueError("relative_sample_efficiency: non-finite loss values")
    curves = [(m.mean(0).tolist(), b.mean(0).tolist()), (m.median(0).values.tolist(), b.median(0).values.tolist())]
    total = 0.0
    epochs = m.shape[1]
    for n in range(1, epochs + 1):
        ratios = []
        for mc, bc in curves:
            prefix = bc[:n]
            best = min(prefix)
            e_b = prefix.index(best) + 1
            e_m = matching_epoch(mc[:n], best)
            ratios.append(0.0 if e_m is None else e_b / e_m)
        total += math.sqrt(ratios[0] * ratios[1])
    return total / epochs
