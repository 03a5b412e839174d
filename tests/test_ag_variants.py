"""avg_kernels.optim.AG variants: n-iteration AG (mode="agn", paper 000 Alg. 4) and the "Linear" variants
(linear=True, paper 002 Eq. 11 / Alg. 2 lines 10-15), against the separate-graph float64 reference
``tests/_ag_reference.variant_step``.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels
from avg_kernels.nn import PairingError
from avg_kernels.optim import AG

import _ag_reference as ref
from test_ag_optim import OPTS, batch, max_diff, params_of, twin_models


def _run_against_reference(plain, ours, make, kind, steps, mode="ag1", iterations=None, linear=False,
                           magnitude="base", data=None):
    opt_ref = make(params_of(plain))
    opt = AG(ours, make(params_of(ours)), mode=mode, iterations=iterations, linear=linear, backend="reference")
    ref_mode = "ag2" if mode == "ag2" else "ag1"
    for step in range(steps):
        x, y = data(step) if data else batch(kind, seed=step)
        rng = torch.manual_seed(300 + step).get_state()
        loss_ref, gbar_ref = ref.variant_step(plain, opt_ref, x, y, F.cross_entropy, rng, mode=ref_mode,
                                              iterations=iterations or 2, linear=linear, magnitude=magnitude,
                                              opt_factory=make)
        torch.set_rng_state(rng)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # linear: the BatchNorm layers keep θ's Jacobian (tested below)
            loss = opt.step(lambda: F.cross_entropy(ours(x), y))
        assert float(loss) == pytest.approx(float(loss_ref), abs=1e-12)
        d_params = max_diff(params_of(ours), params_of(plain))
        d_grads = max_diff([p.grad for p in params_of(ours)], gbar_ref)
        d_buf = max_diff(list(ours.buffers()), list(plain.buffers())) if list(plain.buffers()) else 0.0
        assert d_params <= 1e-6 and d_grads <= 1e-6 and d_buf <= 1e-6, (step, d_params, d_grads, d_buf)
    return opt


# -- n-iteration AG --------------------------------------------------------------------------------

def test_agn_with_two_iterations_is_ag1_bitwise():
    _, a = twin_models("cnn")
    b = copy.deepcopy(a)
    opt_a = AG(a, OPTS["rmsprop"](params_of(a)), mode="ag1")
    opt_b = AG(b, OPTS["rmsprop"](params_of(b)), mode="agn", iterations=2)
    for step in range(3):
        x, y = batch("cnn", seed=step)
        rng = torch.manual_seed(step).get_state()
        la = opt_a.step(lambda: F.cross_entropy(a(x), y))
        torch.set_rng_state(rng)
        torch.manual_seed(step)
        lb = opt_b.step(lambda: F.cross_entropy(b(x), y))
        assert torch.equal(la, lb)
        for p, q in zip(params_of(a), params_of(b)):
            assert torch.equal(p, q) and torch.equal(p.grad, q.grad)
        for p, q in zip(a.buffers(), b.buffers()):
            assert torch.equal(p, q)
    assert opt_b.last.loss_iterates == ()


@pytest.mark.parametrize("kind,n", [("mlp", 3), ("cnn", 3), ("mlp", 4)])
def test_agn_equals_separate_graph_float64_reference(kind, n):
    plain, ours = twin_models(kind)
    opt = _run_against_reference(plain, ours, OPTS["rmsprop"], kind, steps=2, mode="agn", iterations=n)
    # the second step's replays stopped after their last activation (track_replay_loss defaults to False here)
    assert len(opt.last.loss_iterates) == n - 2 and opt.last.loss_new is None


def test_agn_changes_the_step_against_ag1():
    """Guard: the refinement really runs (n = 3 differs from n = 2 on this model)."""
    _, a = twin_models("mlp")
    b = copy.deepcopy(a)
    x, y = batch("mlp")
    for m, n in ((a, 2), (b, 3)):
        opt = AG(m, OPTS["rmsprop"](params_of(m)), mode="agn", iterations=n)
        torch.manual_seed(0)
        opt.step(lambda: F.cross_entropy(m(x), y))
    assert max_diff(params_of(a), params_of(b)) > 1e-3


def _relu_model():
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()


def test_agn_keeps_the_base_step_magnitude():
    """An element whose ḡ_1 is exactly 0 (a dead ReLU unit over [θ, θ']) and ḡ_2 is not moves by |θ' − θ| in
    iteration 2; Alg. 4 as printed (magnitude |θ_1 − θ| = 0) would keep it at θ. This model and batch have such
    elements (checked: the two readings differ), and AG follows the documented one."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (6,), generator=g)
    make = lambda ps: torch.optim.SGD(ps, lr=0.5, weight_decay=0.1)  # noqa: E731 - weight decay moves dead weights
    printed = _relu_model()
    ref.variant_step(printed, make(params_of(printed)), x, y, F.cross_entropy, torch.manual_seed(0).get_state(),
                     iterations=3, magnitude="printed")
    plain, ours = _relu_model(), avg_kernels.nn.convert(_relu_model())
    _run_against_reference(plain, ours, make, "mlp", steps=1, mode="agn", iterations=3, data=lambda s: (x, y))
    assert max_diff(params_of(plain), params_of(printed)) > 1e-3  # the readings differ here (the test can fail)


@pytest.mark.parametrize("mode,iterations", [
    ("agn", 0), ("agn", 1), ("agn", -3), ("agn", 2.5), ("agn", 3.0), ("agn", "3"), ("agn", True), ("agn", None),
    ("ag1", 3), ("ag2", 3), ("ag3-1", 3), ("ag1", 2)])
def test_bad_iterations_are_refused_naming_iterations(mode, iterations):
    m = avg_kernels.nn.convert(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="iterations"):
        AG(m, torch.optim.SGD(m.parameters(), lr=0.1), mode=mode, iterations=iterations)


def test_agn_failure_in_a_later_iteration_restores_the_parameters():
    """A failure in the pass at θ_1 (iteration 2) undoes the step like a failure in AG-1's own passes."""
    m = avg_kernels.nn.convert(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))).double()
    opt = AG(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="agn", iterations=3)
    before = [p.detach().clone() for p in m.parameters()]
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.tensor([0, 1, 0, 1, 1])
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:  # graph at θ, replay at θ', replay at θ_1 of the first step
            raise RuntimeError("boom")
        return F.cross_entropy(m(x), y)

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), before)) and opt.steps == 0
    opt.step(closure)  # the next step runs through
    assert opt.steps == 1 and len(opt.last.loss_iterates) == 1


# -- the "Linear" variants -------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode,opt_name,n", [("ag1", "rmsprop", None), ("ag2", "adam", None), ("agn", "rmsprop", 3)])
def test_linear_equals_separate_graph_float64_reference(kind, mode, opt_name, n):
    plain, ours = twin_models(kind)
    opt = _run_against_reference(plain, ours, OPTS[opt_name], kind, steps=2, mode=mode, iterations=n, linear=True)
    layers = sum(isinstance(m, ref.LAYER_TYPES) for m in plain.modules())
    assert opt.last.linear_calls == layers
    assert opt.last.linear_kept == (("4 (BatchNorm1d)",) if kind == "mlp" else ("1 (BatchNorm2d)",))


def test_linear_changes_the_averaged_gradient():
    """Guard: Eq. 11 really acts (ḡ with linear=True differs from ḡ without, same θ and batch)."""
    _, a = twin_models("mlp")
    b = copy.deepcopy(a)
    x, y = batch("mlp")
    for m, lin in ((a, False), (b, True)):
        opt = AG(m, OPTS["rmsprop"](params_of(m)), mode="ag1", linear=lin)
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt.step(lambda: F.cross_entropy(m(x), y))
    assert max_diff([p.grad for p in params_of(a)], [p.grad for p in params_of(b)]) > 1e-4


def _conv1d():
    return nn.Sequential(nn.Conv1d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"), nn.Tanh(),
                         nn.Conv1d(6, 4, 4, padding="same", stride=1), nn.GELU(), nn.Flatten(), nn.Linear(4 * 9, 3))


def _conv3d():
    return nn.Sequential(nn.Conv3d(2, 3, 2, stride=(1, 2, 1), padding=(1, 0, 1), bias=True), nn.ELU(),
                         nn.Conv3d(3, 3, 1, padding_mode="circular"), nn.Tanh(), nn.Flatten(), nn.LazyLinear(3))


def _conv2d_same():
    return nn.Sequential(nn.Conv2d(2, 4, (2, 3), padding="same", padding_mode="replicate"), nn.SiLU(),
                         nn.Conv2d(4, 4, (4, 2), padding="same", dilation=(1, 2)), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 5 * 6, 3))


@pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel")
@pytest.mark.parametrize("build,shape", [(_conv1d, (5, 4, 9)), (_conv3d, (4, 2, 3, 6, 3)), (_conv2d_same, (3, 2, 5, 6))])
@pytest.mark.parametrize("mode", ["ag1", "ag2"])
def test_linear_conv_geometries_equal_the_reference(build, shape, mode):
    torch.manual_seed(0)
    plain = build().double()
    x = torch.randn(*shape, dtype=torch.float64)
    plain(x)  # materialise LazyLinear
    ours = avg_kernels.nn.convert(copy.deepcopy(plain))
    y = torch.arange(shape[0]) % 3
    make = OPTS["adam"] if mode == "ag2" else OPTS["rmsprop"]
    opt = _run_against_reference(plain, ours, make, None, steps=2, mode=mode, linear=True, data=lambda s: (x, y))
    assert opt.last.linear_kept == ()


def test_linear_unbatched_conv_and_linear_inputs():
    """Unbatched Conv2d input (C, H, W) and a Linear over a (B, T, D) input run through the averaged layers."""
    torch.manual_seed(0)
    conv, lin = nn.Conv2d(2, 3, 3), nn.Linear(3, 2)
    model = avg_kernels.nn.convert(nn.ModuleDict({"conv": conv, "act": nn.Tanh(), "lin": lin})).double()
    x = torch.randn(2, 6, 6, dtype=torch.float64)

    def fwd():
        h = model["act"](model["conv"](x))  # (3, 4, 4)
        return model["lin"](h.permute(1, 2, 0)).square().mean()  # (4, 4, 3) -> (4, 4, 2)

    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.5), mode="ag1", linear=True)
    opt.step(fwd)
    assert opt.last.linear_calls == 2 and opt.last.linear_kept == ()


def test_linear_reports_layers_that_keep_the_jacobian_by_name():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 6)
            self.norm = nn.LayerNorm(6)
            self.up = nn.ConvTranspose1d(6, 4, 2)
            self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
            self.act = nn.Tanh()
            self.head = nn.Linear(4, 3)

        def forward(self, t):
            h = self.up(self.norm(self.emb(t)).transpose(1, 2)).transpose(1, 2)  # (B, T+1, 4)
            h = self.act(self.attn(h, h, h, need_weights=False)[0])
            return self.head(h).mean(1)

    torch.manual_seed(0)
    model = avg_kernels.nn.convert(Net())
    t, y = torch.randint(0, 10, (3, 5)), torch.tensor([0, 1, 2])
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ag2", linear=True)
    with pytest.warns(UserWarning, match="keep θ's Jacobian") as rec:
        opt.step(lambda: F.cross_entropy(model(t), y))
    kept = opt.last.linear_kept
    # the Embedding's Jacobians do not depend on θ (Eq. 11's mean is exactly θ's): not reported
    assert kept == ("norm (LayerNorm)", "up (ConvTranspose1d)", "attn (MultiheadAttention)",
                    "attn.out_proj (NonDynamicallyQuantizableLinear)")
    assert all(k in str(rec[0].message) for k in kept)
    assert opt.last.linear_calls == 1  # head
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # reported once per optimizer
        opt.step(lambda: F.cross_entropy(model(t), y))
    assert opt.last.linear_kept == kept
    # outside the step the modules are untouched
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_linear_pairing_error_names_the_layer():
    model = avg_kernels.nn.convert(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)))
    extra = nn.Linear(2, 2)
    model.add_module("extra", extra)
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), linear=True)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    before = [p.detach().clone() for p in model.parameters()]

    def closure():  # the extra layer runs in the pass at θ only
        out = model[2](model[1](model[0](x)))
        return F.cross_entropy(extra(out) if torch.is_grad_enabled() else out, y)

    with pytest.raises(PairingError, match="layer call 2 \\(Linear 'extra'"):
        opt.step(closure)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert all("forward" not in m.__dict__ for m in model.modules())


def test_linear_argument_validation():
    m = avg_kernels.nn.convert(nn.Sequential(nn.Linear(2, 2), nn.Tanh()))
    with pytest.raises(ValueError, match="linear=True.*ag3-1"):
        AG(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="ag3-1", linear=True)
    with pytest.raises(TypeError, match="linear"):
        AG(m, torch.optim.SGD(m.parameters(), lr=0.1), linear=1)
    opt = AG(m, torch.optim.SGD(m.parameters(), lr=0.1), mode="agn", iterations=3, linear=True)
    assert "iterations=3" in repr(opt) and "linear=True" in repr(opt)
