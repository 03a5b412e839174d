"""AG on MobileNet-style models: ReLU6 and Hardtanh are averaged (the hardtanh kernel, f = clamp(x, min_val,
max_val); relu6 is its record at 0 and 6) as converted modules, as bare ``F.relu6`` / ``F.hardtanh`` calls
and in HF's MobileNetV2 (random init from a tiny config, no download). The oracle for the averaged step is
tests/_ag_reference.py (float64, two graphs, literal secants)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels
from avg_kernels.activations import KernelAct
from avg_kernels.optim import AG

import _ag_reference as ref
from _ag_reference import site
from conftest import backend_device


class ClampNet(nn.Module):
    """A small depthwise-separable CNN with every way of writing the clamp activations: nn.ReLU6 and
    nn.Hardtanh modules (the reference hooks them) and bare F.relu6 / F.hardtanh calls (reference sites)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.a1 = nn.ReLU6()
        self.c2 = nn.Conv2d(6, 6, 3, padding=1, groups=6)  # depthwise
        self.bn = nn.BatchNorm2d(6)
        self.a2 = nn.Hardtanh(-0.5, 2.0)
        self.c3 = nn.Conv2d(6, 8, 1)  # pointwise
        self.out = nn.Linear(8, 4)
        self.site = None

    def forward(self, x):
        h = self.a1(self.c1(x))
        h = self.a2(self.bn(self.c2(h)))
        h = self.c3(h)
        h = site(self, h, F.relu6(h), F.relu6)
        h = site(self, h, F.hardtanh(h, -1.0, 1.5), lambda t: F.hardtanh(t, -1.0, 1.5))
        return self.out(h.mean((2, 3)))


def _twins(seed=0):
    """The plain float64 model (for the reference) and its converted copy (with ReLU6(inplace=True), which
    convert makes out of place)."""
    torch.manual_seed(seed)
    plain = ClampNet().double()
    ours = copy.deepcopy(plain)
    ours.a1.inplace = True
    return plain, avg_kernels.nn.convert(ours, warn=False)


def _batch(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(8, 3, 6, 6, generator=g, dtype=torch.float64) * 3, torch.randint(0, 4, (8,), generator=g)


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


def _max_diff(a, b):
    return max(float((x.detach().cpu().double() - y.detach().cpu().double()).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("mode,make", [("ag1", lambda ps: torch.optim.SGD(ps, lr=0.2, momentum=0.9)),
                                       ("ag2", lambda ps: torch.optim.Adam(ps, lr=5e-2))])
def test_relu6_cnn_step_equals_the_float64_reference(mode, make, backend):
    dev = backend_device(backend)
    plain, ours = _twins()
    ours.to(dev)  # the reference runs on the CPU
    assert type(ours.a1) is avg_kernels.nn.ReLU6 and type(ours.a2) is avg_kernels.nn.Hardtanh
    opt_ref, opt = make(_params(plain)), AG(ours, make(_params(ours)), mode=mode, backend=backend)
    for step in range(2):
        x, y = _batch(step)
        rng = torch.manual_seed(100 + step).get_state()
        loss_ref, gbar_ref, g_ref = ref.ag_step(plain, opt_ref, x, y, F.cross_entropy, mode, rng, opt_factory=make)
        torch.set_rng_state(rng)
        loss = opt.step(lambda: F.cross_entropy(ours(x.to(dev)), y.to(dev)))
        assert float(loss) == pytest.approx(float(loss_ref), abs=1e-9)
        assert _max_diff([p.grad for p in _params(ours)], gbar_ref) <= 1e-6, step
        assert _max_diff(_params(ours), _params(plain)) <= 1e-6, step
        assert opt.last.activation_calls == 4
        assert _max_diff(gbar_ref, g_ref) > 1e-4  # the step really averaged (the test can fail)


def test_relu6_cnn_ag3_1_equals_the_reference():
    plain, ours = _twins()
    opt_ref = torch.optim.SGD(_params(plain), lr=0.2)
    opt = AG(ours, torch.optim.SGD(_params(ours), lr=0.2), mode="ag3-1")
    ref.assert_ag3_steps_match(plain, ours, opt_ref, opt, _batch, F.cross_entropy)
    assert opt.last.activation_calls == 4


def test_convert_maps_relu6_and_hardtanh_to_their_records():
    """nn.ReLU6 subclasses nn.Hardtanh in torch: each becomes its own averaged class, with its own bounds;
    inplace=True runs out of place and revert restores it."""
    model = nn.Sequential(nn.ReLU6(inplace=True), nn.Hardtanh(-2.0, 3.0, inplace=True), nn.Hardtanh())
    _, rep = avg_kernels.nn.convert(model, example_inputs=torch.randn(4, 3), return_report=True)
    assert type(model[0]) is avg_kernels.nn.ReLU6 and type(model[1]) is avg_kernels.nn.Hardtanh
    assert isinstance(model[0], nn.ReLU6) and type(model[2]) is avg_kernels.nn.Hardtanh
    assert model[0].kernel_act() == KernelAct("hardtanh", 0.0, 6.0)
    assert model[1].kernel_act() == KernelAct("hardtanh", -2.0, 3.0)
    assert model[2].kernel_act() == KernelAct("hardtanh", -1.0, 1.0)
    assert model[0].requested_inplace and not model[0].inplace and model[1].requested_inplace and not model[1].inplace
    assert rep.complete and rep.swapped == {"ReLU6": 1, "Hardtanh": 2} and rep.made_out_of_place == ["0", "1"]
    assert rep.kinds() == {"module": 3}
    avg_kernels.nn.revert(model)
    assert type(model[0]) is nn.ReLU6 and model[0].inplace and type(model[1]) is nn.Hardtanh and model[1].inplace


def test_bare_calls_are_averaged_and_in_place_calls_reported():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            y = F.relu6(h) + F.hardtanh(h, -0.5, 0.5)  # averaged
            return y + F.relu6(h.clone(), inplace=True) + F.hardtanh(h.clone(), inplace=True) + F.hardtanh_(h.clone())

    rep = avg_kernels.nn.report(Net(), example_inputs=torch.randn(3, 4))
    assert rep.kinds() == {"bare": 2} and not rep.complete
    found = sorted(n.what for n in rep.not_averaged)
    assert len(found) == 3, found
    assert "hardtanh(inplace=True)" in found[0] and "hardtanh_() (in place)" in found[1] and "relu6(inplace=True)" in found[2]
    # an unconverted nn.ReLU6 computes F.hardtanh(x, 0, 6): averaged as a bare call
    rep = avg_kernels.nn.report(nn.Sequential(nn.Linear(4, 4), nn.ReLU6()), example_inputs=torch.randn(3, 4))
    assert rep.complete and rep.kinds() == {"bare": 1}, str(rep)


def _mobilenet_v2():
    T = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = T.MobileNetV2Config(image_size=32, depth_multiplier=0.35, finegrained_output=False, num_labels=4)
    return T.MobileNetV2ForImageClassification(cfg)


@pytest.mark.parametrize("mode", ["ag1", "ag3-1"])
def test_hf_mobilenet_v2_trains_with_ag(mode):
    """HF MobileNetV2 (ReLU6 throughout) converts completely and trains with AG: each step pairs every ReLU6
    and the loss stays finite."""
    model = _mobilenet_v2()
    n_relu6 = sum(type(m) is nn.ReLU6 for m in model.modules())
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 3, 32, 32, generator=g), torch.tensor([0, 3])
    _, rep = avg_kernels.nn.convert(model, example_inputs=(x,), return_report=True)
    assert n_relu6 > 10 and rep.complete and rep.swapped == {"ReLU6": n_relu6}, str(rep)
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), mode=mode)
    losses = []
    for _ in range(3):
        losses.append(float(opt.step(lambda: model(x, labels=y).loss)))
        assert math.isfinite(losses[-1])
    assert opt.last.activation_calls == n_relu6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert losses[-1] < losses[0]  # three steps on one batch of two images
