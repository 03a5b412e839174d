"""The CPU kernels' own vectorised exp / erfc / log1p (csrc/cpu/kernels/vec_ops.h), at every CPU capability
level this machine supports, against float64; and exp_nonpos, the e^x for x <= 0 that the kernels' math uses."""
import math

import pytest
import torch

import avg_kernels as ak
from conftest import hook_ops

pytestmark = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="C++ extension not built")


def probe(x, fn):
    return hook_ops().vec_math_probe(x, fn)


def max_ulps(fn, x, ref):
    got = probe(x, fn).double()
    keep = ref.isfinite() & (ref.abs() > 1e-37)  # normal float32 results
    rel = ((got - ref).abs() / ref.abs())[keep]
    return (rel.max() / torch.finfo(x.dtype).eps * 2).item()  # in units of 2^-24 (float) / 2^-53


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_accuracy_in_ulps(cpu_level, dtype):
    x = torch.linspace(-87.0, 88.0, 200001, dtype=dtype)
    assert max_ulps("exp", x, torch.exp(x.double())) < 2.0
    z = torch.linspace(-4.0, 9.0, 200001, dtype=dtype)
    assert max_ulps("erfc", z, torch.erfc(z.double())) < 8.0  # 3.5e-7 relative: a fitted rational form
    y = torch.cat([torch.linspace(-0.999, 3.0, 200001), torch.logspace(-30, 38, 20001), -torch.logspace(-30, -0.1, 2001)]).to(dtype)
    ref = torch.log1p(y.double())
    assert max_ulps("log1p", y[ref != 0], ref[ref != 0]) < 4.0
    xn = torch.linspace(-87.0, 0.0, 200001, dtype=dtype)
    assert max_ulps("exp_nonpos", xn, torch.exp(xn.double())) < 2.0


def test_special_values(cpu_level):
    inf, nan = math.inf, math.nan
    e = probe(torch.tensor([inf, -inf, nan, 89.0, -104.0, 0.0]), "exp")
    assert e[0] == inf and e[1] == 0 and e[2].isnan() and e[3] == inf and e[4] == 0 and e[5] == 1
    c = probe(torch.tensor([inf, -inf, nan, 0.0, 11.0]), "erfc")
    assert c[0] == 0 and c[1] == 2 and c[2].isnan() and c[3] == 1 and c[4] == 0
    en = probe(torch.tensor([-inf, nan, -87.33, -88.0, -104.0, -0.0, 0.0, -1e-30]), "exp_nonpos")
    assert en[0] == 0 and en[1].isnan() and en[2] >= torch.finfo(torch.float32).tiny and en[4] == 0
    assert 0 <= en[3] <= math.exp(-88.0) * (1 + 1e-6) and en[5] == 1 and en[6] == 1 and en[7] == 1  # 0 or subnormal
    lg = probe(torch.tensor([0.0, -1.0, -2.0, inf, nan, 1e-30]), "log1p")
    assert lg[0] == 0 and lg[1] == -inf and lg[2].isnan() and lg[3] == inf and lg[4].isnan() and lg[5] == 1e-30
