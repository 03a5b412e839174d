"""avg_kernels.metrics: RD (SPEC §4 sign convention) and relative sample efficiency (paper 002 §4.1(a))."""
import math

import pytest
import torch

from avg_kernels import metrics
from avg_kernels.optim import AGStepInfo


def test_rd_sign_convention_and_values():
    # AG reduces the batch losses twice as much as the base step: RD = +1 ("200 % of the base reduction")
    assert metrics.rd([0.2, 0.2], [0.1, 0.1]) == pytest.approx(1.0)
    assert metrics.rd([0.1, 0.1], [0.1, 0.1]) == 0.0
    assert metrics.rd([0.05, 0.05], [0.1, 0.1]) == pytest.approx(-0.5)
    # paper 000: RD = 10.41 reads "1141 % of the base optimizer's reduction"
    assert metrics.rd([11.41], [1.0]) == pytest.approx(10.41)
    # the base step increased the loss in sum: |Σ r_base| keeps RD > 0 meaning "AG did better"
    assert metrics.rd([0.1, 0.1], [-0.1, -0.1]) == pytest.approx(2.0)
    assert metrics.rd([-0.3], [-0.1]) == pytest.approx(-2.0)


def test_rd_errors():
    with pytest.raises(ValueError, match="pair"):
        metrics.rd([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="undefined"):
        metrics.rd([1.0, 2.0], [1.0, -1.0])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.rd([float("nan")], [1.0])
    with pytest.raises(ValueError, match="no batches"):
        metrics.rd([], [])


def _info(mode, loss, new=None, after=None, plain=False):
    t = lambda v: None if v is None else torch.tensor(v)  # noqa: E731
    return AGStepInfo(mode, 1, t(loss), loss_new=t(new), loss_after=t(after), plain=plain)


def test_running_rd_from_step_infos():
    acc = metrics.RD()
    assert acc.value is None
    acc.update_from(_info("ag1", 2.0, new=1.9, after=1.8))  # r_ag = 0.2, r_base = 0.1
    acc.update_from(_info("ag1", 1.8, new=1.7, after=1.6))
    acc.update_from(_info("ag3-1", 1.0, plain=True))  # plain steps are skipped
    assert acc.n == 2 and acc.value == pytest.approx(1.0)
    assert acc.ag_reduction == pytest.approx(0.4) and acc.base_reduction == pytest.approx(0.2)
    with pytest.raises(ValueError, match="track_loss_after"):
        acc.update_from(_info("ag1", 2.0, new=1.9))
    with pytest.raises(ValueError, match=r"no ℓ\(θ'\) on its batch"):
        acc.update_from(_info("ag3-1", 2.0, after=1.9))


def test_relative_sample_efficiency_by_hand():
    base = [4.0, 3.0, 2.0, 1.0]
    assert metrics.relative_sample_efficiency(base, base) == 1.0
    # prefixes: n=1: 1/1, n=2: 2/1, n=3: 3/2, n=4: 4/2 -> mean 1.625
    assert metrics.relative_sample_efficiency([3.0, 1.0, 0.5, 0.2], base) == pytest.approx(1.625)
    # never matching the baseline's best loss counts 0 for that prefix: 1, 0, 0, 0
    assert metrics.relative_sample_efficiency([4.0, 3.5, 3.5, 3.5], base) == pytest.approx(0.25)
    # slower method: n=2: 2/3 ... the baseline at 1.0 is reached at epoch 4 -> 1, 2/3, 3/4, 1
    assert metrics.relative_sample_efficiency([4.0, 3.5, 3.0, 1.0], base) == pytest.approx((1 + 0 + 0 + 1) / 4)


def test_relative_sample_efficiency_mean_and_median_over_runs():
    base = [[4.0, 2.0], [4.0, 2.0], [4.0, 2.0]]
    runs = [[1.0, 0.5], [2.5, 1.0], [2.5, 1.0]]  # mean curve [2.0, 0.83], median curve [2.5, 1.0]
    # n=1: 1/1 on both; n=2: the baseline's best (2.0, epoch 2) is matched at epoch 1 by the mean curve (2/1)
    # and at epoch 2 by the median curve (2/2): geometric mean sqrt(2)
    assert metrics.relative_sample_efficiency(runs, base) == pytest.approx((1 + math.sqrt(2)) / 2)
    runs = [[1.0, 0.5], [5.0, 1.0], [5.0, 1.0]]  # median curve [5, 1] misses 4.0 at n=1 -> 0 for that prefix
    assert metrics.relative_sample_efficiency(runs, base) == pytest.approx((0 + 1) / 2)


def test_relative_sample_efficiency_errors():
    with pytest.raises(ValueError, match="epochs"):
        metrics.relative_sample_efficiency([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        metrics.relative_sample_efficiency([float("nan")], [1.0])
