"""AG averages every supported activation the forward computes, however it is written (issue 12, item 1):
torch.nn modules, F.* calls, torch.tanh / x.sigmoid() calls, attributes holding a function, and the
hand-written forms of avg_kernels.nn._compound.FORMS averaged as ONE activation. Plus the traced report,
the first-step failure, bf16/fp16 autocast and GradScaler steps.

The oracle for the averaged step is tests/_ag_reference.py (float64, two graphs, secant of the whole
function at each functional site).
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels
from avg_kernels.nn import PairingError
from avg_kernels.optim import AG

import _ag_reference as ref
from _ag_reference import site
from _hf_models import build as _hf


def _gelu_tanh_hf(h):
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


def _gelu_tanh_fast(h):
    return 0.5 * h * (1.0 + torch.tanh(h * 0.7978845608 * (1.0 + 0.044715 * h * h)))


def _gelu_tanh_exact(t):
    return F.gelu(t, approximate="tanh")


class FnNet(nn.Module):
    """Every way of writing an activation, each a reference site (see _ag_reference.site)."""

    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.l = nn.ModuleList(nn.Linear(6 if i == 0 else 10, 10) for i in range(7)).to(dtype)
        self.module_act = nn.ELU()  # a torch.nn module (converted by convert; the reference hooks it)
        self.held = F.relu  # an attribute holding a function
        self.out = nn.Linear(10, 4).to(dtype)
        self.site = None

    def forward(self, x):
        h = self.l[0](x)
        h = site(self, h, torch.tanh(h), torch.tanh)  # bare torch.tanh
        h = self.l[1](h)
        h = site(self, h, F.silu(h), F.silu)  # bare F.silu
        h = self.l[2](h)
        h = site(self, h, h * torch.sigmoid(h), F.silu)  # compound: x * sigmoid(x) is SiLU
        h = self.l[3](h)
        h = site(self, h, _gelu_tanh_hf(h), _gelu_tanh_exact)  # compound: HF NewGELU
        h = self.l[4](h)
        h = site(self, h, _gelu_tanh_fast(h), _gelu_tanh_exact)  # compound: HF FastGELU
        h = self.module_act(self.l[5](h))
        h = self.l[6](h)
        h = site(self, h, self.held(h), torch.relu) + site(self, h, h.sigmoid(), torch.sigmoid)  # attr, Tensor method
        return self.out(h)


EXPECTED_KINDS = {"bare": 4, "compound": 3, "module": 1}  # tanh, silu, relu, sigmoid; silu, 2x gelu_tanh; ELU


def _batch(seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(16, 6, generator=g, dtype=dtype), torch.randint(0, 4, (16,), generator=g)


def _twins(seed=1):
    torch.manual_seed(seed)
    plain = FnNet()
    return plain, avg_kernels.nn.convert(copy.deepcopy(plain))


def _params(m):
    return [p for p in m.parameters() if p.requires_grad]


def _max_diff(a, b):
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b))


# -- equality with the float64 two-graph reference --------------------------------------------------

@pytest.mark.parametrize("mode,make", [("ag1", lambda ps: torch.optim.RMSprop(ps, lr=3e-2)),
                                       ("ag2", lambda ps: torch.optim.Adam(ps, lr=2e-2))])
def test_step_with_functional_activations_equals_the_float64_reference(mode, make):
    plain, ours = _twins()
    opt_ref, opt = make(_params(plain)), AG(ours, make(_params(ours)), mode=mode, backend="reference")
    for step in range(2):
        x, y = _batch(step)
        rng = torch.manual_seed(100 + step).get_state()
        loss_ref, gbar_ref, g_ref = ref.ag_step(plain, opt_ref, x, y, F.cross_entropy, mode, rng, opt_factory=make)
        torch.set_rng_state(rng)
        loss = opt.step(lambda: F.cross_entropy(ours(x), y))
        assert float(loss) == pytest.approx(float(loss_ref), abs=1e-9)
        assert _max_diff([p.grad for p in _params(ours)], gbar_ref) <= 1e-6, step
        assert _max_diff(_params(ours), _params(plain)) <= 1e-6, step
        assert opt.last.activation_calls == 8 and opt.last.compound_calls == 3
        assert _max_diff(gbar_ref, g_ref) > 1e-4  # the step really averaged (the test can fail)


def test_ag3_1_with_functional_activations_equals_the_reference():
    plain, ours = _twins()
    opt_ref = torch.optim.RMSprop(_params(plain), lr=3e-2)
    opt = AG(ours, torch.optim.RMSprop(_params(ours), lr=3e-2), mode="ag3-1", backend="reference")
    ref.assert_ag3_steps_match(plain, ours, opt_ref, opt, _batch, F.cross_entropy)


def test_inner_tanh_alone_would_give_another_step():
    """The tanh-GELU is averaged as the secant of the whole GELU: the reference that averages only its
    inner tanh (a bare call) gives a different ḡ, so the equality above tests the compound."""
    plain, ours = _twins()
    x, y = _batch(0)
    make = lambda ps: torch.optim.RMSprop(ps, lr=3e-2)  # noqa: E731
    opt = AG(ours, make(_params(ours)), mode="ag1", backend="reference")
    opt.step(lambda: F.cross_entropy(ours(x), y))
    gbar = [p.grad for p in _params(ours)]
    plain.forward = _inner_tanh_sites.__get__(plain)  # the same function, the GELU's tanh as its own site
    _, gbar_inner, _ = ref.ag_step(plain, make(_params(plain)), x, y, F.cross_entropy, "ag1",
                                   torch.get_rng_state())
    assert _max_diff(gbar, gbar_inner) > 1e-6


def _inner_tanh_sites(self, x):
    h = self.l[0](x)
    h = site(self, h, torch.tanh(h), torch.tanh)
    h = self.l[1](h)
    h = site(self, h, F.silu(h), F.silu)
    h = self.l[2](h)
    h = site(self, h, h * torch.sigmoid(h), F.silu)
    h = self.l[3](h)
    u = math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))
    h = 0.5 * h * (1.0 + site(self, u, torch.tanh(u), torch.tanh))
    h = self.l[4](h)
    h = site(self, h, _gelu_tanh_fast(h), _gelu_tanh_exact)
    h = self.module_act(self.l[5](h))
    h = self.l[6](h)
    h = site(self, h, self.held(h), torch.relu) + site(self, h, h.sigmoid(), torch.sigmoid)
    return self.out(h)



def test_hand_written_ops_of_a_compound_get_no_backward(monkeypatch):
    """A compound's averaged backward replaces the hand-written ops' gradient path: that path is cut from
    the graph, not run on materialised zero gradients (it once ran every op of the form's backward and the
    inner tanh's slot on zeros: 8 of GPT-2's 60 ms averaged backward)."""
    from avg_kernels.nn import _recording

    ran = []
    inner = _recording._SlotAct.backward

    def spy(ctx, grad):
        ran.append((ctx.slot.kind, ctx.slot.superseded))
        return inner(ctx, grad)

    monkeypatch.setattr(_recording._SlotAct, "backward", staticmethod(spy))
    _, ours = _twins()
    x, y = _batch(0)
    opt = AG(ours, torch.optim.RMSprop(_params(ours), lr=3e-2), mode="ag1", backend="reference")
    opt.step(lambda: F.cross_entropy(ours(x), y))
    assert ("compound", False) in ran  # the spy sees the backwards (the test can fail)
    assert not [r for r in ran if r[1]], ran  # no superseded inner call's backward ran

# -- kinds, report, bitwise outside steps ------------------------------------------------------------

def test_report_names_each_averaged_activation_with_its_kind():
    _, ours = _twins()
    rep = avg_kernels.nn.report(ours, example_inputs=_batch(0)[0])
    assert rep.complete and rep.kinds() == EXPECTED_KINDS
    text = str(rep)
    assert "gelu(approximate='tanh') written as" in text and "silu written as x*sigmoid(x)" in text
    assert "tanh() [bare]" in text and "relu() [bare]" in text


def test_unsupported_forms_are_reported_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(x)
            return h * torch.sigmoid(1.702 * h) + F.mish(h) + torch.tanh(h).relu_()

    rep = avg_kernels.nn.report(Net(), example_inputs=torch.randn(3, 4))
    found = sorted(n.what for n in rep.not_averaged)
    assert len(found) == 3 and not rep.complete
    assert "F.mish" in found[0] and "quick_gelu" in found[1] and "relu_() (in place)" in found[2]
    assert rep.kinds() == {"bare": 2}  # QuickGELU's sigmoid and the tanh, as bare calls


def test_converted_model_is_bitwise_the_original_outside_steps():
    plain, ours = _twins()
    opt = AG(ours, torch.optim.SGD(_params(ours), lr=0.1))
    x, y = _batch(3)
    opt.step(lambda: F.cross_entropy(ours(x), y))  # a step in between changes nothing outside steps
    with torch.no_grad():
        for p, q in zip(_params(plain), _params(ours)):
            p.copy_(q)
    for m in (plain, ours):
        m.zero_grad()
        F.cross_entropy(m(x), y).backward()
    assert torch.equal(plain(x), ours(x))
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(_params(plain), _params(ours)))


def test_never_taken_branch_is_no_problem_once_traced():
    """timm's ViT Attention style: a branch that is never taken calls an activation."""

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.qkv, self.gate = nn.Linear(4, 4), None

        def forward(self, x):
            h = F.gelu(self.qkv(x))
            if self.gate is not None:
                h = h * self.gate(x).sigmoid() + F.mish(h)
            return h

    model = nn.Sequential(*[Attention() for _ in range(3)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the supported .sigmoid() is no problem even statically
        _, traced = avg_kernels.nn.convert(model, example_inputs=torch.randn(2, 4), return_report=True)
    assert traced.complete and traced.kinds() == {"bare": 3}
    static = avg_kernels.nn.report(model)  # without a trace, the F.mish call might run: said so
    assert len(static.not_averaged) == 3
    assert all(n.what.endswith("Attention.forward calls F.mish()") for n in static.not_averaged)


@pytest.mark.parametrize("activation", [F.relu, "gelu"])
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_layer_activation_attribute_is_averaged(activation, train):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation, batch_first=True)
    layer.train(train)
    model = avg_kernels.nn.convert(copy.deepcopy(layer), warn=False)
    x = torch.randn(2, 5, 8)
    rep = avg_kernels.nn.report(model, example_inputs=x)
    assert rep.complete and rep.kinds() == {"bare": 1}
    w = torch.randn(2, 5, 8)
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.5))
    opt.step(lambda: (model(x) * w).sum())
    assert opt.last.activation_calls == 1
    g = torch.autograd.grad((layer(x) * w).sum(), list(layer.parameters()))
    scale = max(float(t.abs().max()) for t in g)
    assert _max_diff([p.grad for p in model.parameters()], g) > 1e-3 * scale  # averaged, not the plain gradient


def test_pairing_errors_name_bare_calls():
    torch.manual_seed(0)
    lin = nn.Linear(4, 4)
    calls = []

    def closure():
        calls.append(1)
        h = lin(torch.ones(2, 4))
        return (torch.tanh(h) if len(calls) == 1 else torch.sigmoid(h)).sum()

    opt = AG(lin, torch.optim.SGD(lin.parameters(), lr=0.1))
    with pytest.raises(PairingError, match=r"call 0 is sigmoid at sigmoid\(\) called from .*test_ag_functional"):
        opt.step(closure)


# -- HF Transformers models (random init from tiny configs, no download) ------------------------------

@pytest.mark.parametrize("name,kinds", [("gpt2", {"compound": 2}), ("llama", {"bare": 2}),
                                        ("bert", {"bare": 3})])  # NewGELU; SiLUActivation; GELUActivation x3
def test_hf_models_average_every_activation(name, kinds):
    original = _hf(name)
    model = avg_kernels.nn.convert(copy.deepcopy(original), warn=False)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    rep = avg_kernels.nn.report(model, example_inputs=(ids,))
    assert rep.complete and rep.kinds() == kinds, str(rep)
    # outside steps: bitwise the original, forward and backward (eval: no dropout, so g below is the step's g)
    for m in (original, model):
        m.eval()
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(original.parameters(), model.parameters()))
    g = [p.grad.clone() for p in model.parameters()]
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.5), mode="ag1")
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(lambda: model(ids, labels=ids).loss)
    assert opt.last.activation_calls == sum(kinds.values())
    assert opt.last.compound_calls == kinds.get("compound", 0)
    gbar = [p.grad for p in model.parameters()]
    assert _max_diff(gbar, g) > 1e-6  # averaged, not the plain gradient
    # AG-1: θ − |θ' − θ| ⊙ sign(ḡ), θ' = θ − lr·g (SGD)
    want = [b - (0.5 * gi).abs() * torch.sign(gb) for b, gi, gb in zip(before, g, gbar)]
    assert _max_diff(list(model.parameters()), want) <= 1e-6


# -- mixed precision -----------------------------------------------------------------------------------

class _Small(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(8, 16), nn.Linear(16, 16), nn.Linear(16, 4)

    def forward(self, x):
        h = _gelu_tanh_hf(self.a(x))
        h = self.b(h)
        return self.c(torch.tanh(h * torch.sigmoid(h)))


def _small(seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    return _Small(), torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_steps_report_the_fallback_fraction(mode, dtype):
    model, x, y = _small()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=1e-4), mode=mode)

    def closure():
        with torch.autocast("cpu", dtype=dtype):
            return F.cross_entropy(model(x), y)

    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):
        opt.step(closure)
    assert opt.last.activation_calls == 3 and opt.last.compound_calls == 2
    frac = opt.last.fallback_fraction
    # a tiny step: x and x' mostly round to the same low-precision value, so the secant is f'(x) there
    assert frac is not None and 0.3 < frac <= 1.0, frac
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert _max_diff(list(model.parameters()), before) > 0
    # float32: the same step has (almost) no fallback
    model32, x, y = _small()
    opt32 = AG(model32, torch.optim.SGD(model32.parameters(), lr=1e-2), mode=mode)
    opt32.step(lambda: F.cross_entropy(model32(x), y))
    assert opt32.last.fallback_fraction is None or opt32.last.plain  # float32: measured on request only
    opt32.track_fallback = True
    opt32.step(lambda: F.cross_entropy(model32(x), y))
    assert opt32.last.fallback_fraction < frac


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_scaler_step_equals_the_unscaled_step(mode):
    """Loss scaling by a power of two is exact: the scaled step is the unscaled one."""
    results = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)):
        model, x, y = _small()
        opt = AG(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode=mode)
        for _ in range(2):
            opt.step(lambda: F.cross_entropy(model(x), y), scaler=scaler)
            if scaler is not None:
                scaler.update()
        results.append([p.detach().clone() for p in model.parameters()])
    assert _max_diff(*results) <= 1e-6


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_scaler_skips_a_step_with_infinite_gradients(mode):
    model, x, y = _small()
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = AG(model, base, mode=mode)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    if mode == "ag3-1":  # past the plain first step
        opt.step(lambda: F.cross_entropy(model(x), y), scaler=scaler)
        scaler.update()
    before = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(base.state_dict())
    steps = opt.steps
    opt.step(lambda: F.cross_entropy(model(x), y) * 1e36, scaler=scaler)  # scaled gradients overflow
    scaler.update()
    assert opt.last.skipped and opt.steps == steps and opt.skipped_steps == 1
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert scaler.get_scale() == 2.0 ** 9  # backed off at the caller's update()
    assert str(base.state_dict()) == str(state)  # the base's state as before (Adam's step count included)
    opt.step(lambda: F.cross_entropy(model(x), y), scaler=scaler)  # and training goes on
    scaler.update()
    assert not opt.last.skipped and opt.steps == steps + 1


def test_scaler_argument_is_checked():
    model, x, y = _small()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="GradScaler"):
        opt.step(lambda: F.cross_entropy(model(x), y), scaler=object())


# -- the recogniser ------------------------------------------------------------------------------------

def _kinds_of(fn, x):
    class Net(nn.Module):
        def forward(self, t):
            return fn(t)

    rep = avg_kernels.nn.report(Net(), example_inputs=x)
    return sorted((c.kind, c.what.split(" ")[0]) for c in rep.calls for _ in range(c.calls))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_forms_are_recognised_in_every_dtype_and_arrangement(dtype):
    x = (torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 30).to(dtype)
    x[0, :3] = torch.tensor([60.0, -60.0, 0.0])  # fp16: x^3 overflows, as in the model's own ops
    gelu = [("compound", "gelu(approximate='tanh')")]
    assert _kinds_of(_gelu_tanh_hf, x) == gelu
    assert _kinds_of(_gelu_tanh_fast, x) == gelu
    assert _kinds_of(lambda h: (1.0 + torch.tanh(0.7978845608 * h + 0.0356774 * h ** 3)) * h * 0.5, x) == gelu
    assert _kinds_of(lambda h: torch.sigmoid(h) * h, x) == [("compound", "silu")]
    # other arithmetic around the same calls is not the form: the inner calls are averaged as bare calls
    assert _kinds_of(lambda h: h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * h ** 3))), x) == \
        [("bare", "tanh()")]
    assert _kinds_of(lambda h: (h + 1.0) * torch.sigmoid(h), x) == [("bare", "sigmoid()")]
    assert _kinds_of(lambda h: 0.5 * h * (1.0 + torch.tanh(h)), x) == [("bare", "tanh()")]
