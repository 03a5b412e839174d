"""avg_kernels.optim.AG: AG-1 / AG-2 / AG-3-1 steps exactly as SPEC §4 defines them.

The oracle is tests/_ag_reference.py: a float64 implementation that builds two separate graphs
(paper 000 Alg. 2) on an unconverted copy of the model.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels
from avg_kernels.nn import CheckpointingError, PairingError
from avg_kernels.optim import AG

import _ag_reference as ref
from conftest import backend_device, interpreted


def mlp(dtype=torch.float64, p_drop=0.2):
    return nn.Sequential(
        nn.Linear(6, 12), nn.Tanh(), nn.Dropout(p_drop),
        nn.Linear(12, 12), nn.BatchNorm1d(12), nn.GELU(),
        nn.Linear(12, 10), nn.ELU(), nn.Dropout(p_drop),
        nn.Linear(10, 4)).to(dtype)


def cnn(dtype=torch.float64):
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ELU(), nn.Dropout2d(0.25),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), nn.GELU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Dropout(0.1), nn.Linear(8, 3)).to(dtype)


def batch(kind, dtype=torch.float64, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    if kind == "mlp":
        x = torch.randn(n, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 4, (n,), generator=g)
    else:
        x = torch.randn(n, 2, 8, 8, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (n,), generator=g)
    return x, y


def params_of(model):
    return [p for p in model.parameters() if p.requires_grad]


def max_diff(a, b):
    return max(float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b))


def twin_models(kind, dtype=torch.float64, seed=1):
    torch.manual_seed(seed)
    plain = mlp(dtype) if kind == "mlp" else cnn(dtype)
    ours = avg_kernels.nn.convert(copy.deepcopy(plain))
    return plain, ours


OPTS = {
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=3e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=2e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.3, momentum=0.9),
}


# -- equality with the two-graph reference ---------------------------------------------------------

@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("mode,opt_name", [("ag1", "rmsprop"), ("ag1", "sgd"), ("ag2", "adam"), ("ag2", "rmsprop")])
def test_step_equals_two_graph_float64_reference(kind, mode, opt_name):
    plain, ours = twin_models(kind)
    make = OPTS[opt_name]
    opt_ref = make(params_of(plain))
    opt = AG(ours, make(params_of(ours)), mode=mode, backend="reference")
    for step in range(3):
        x, y = batch(kind, seed=step)
        rng = torch.manual_seed(100 + step).get_state()
        loss_ref, gbar_ref, _ = ref.ag_step(plain, opt_ref, x, y, F.cross_entropy, mode, rng, opt_factory=make)
        torch.set_rng_state(rng)
        loss = opt.step(lambda: F.cross_entropy(ours(x), y))
        assert float(loss) == pytest.approx(float(loss_ref), abs=1e-12)
        d_params = max_diff(params_of(ours), params_of(plain))
        d_grads = max_diff([p.grad for p in params_of(ours)], gbar_ref)
        d_buf = max_diff(list(ours.buffers()), list(plain.buffers()))
        assert d_params <= 1e-6 and d_grads <= 1e-6 and d_buf <= 1e-6, (step, d_params, d_grads, d_buf)
        # the averaged gradient really differs from the ordinary one (the test can fail)
        assert opt.last.activation_calls == sum(isinstance(m, ref.ACT_TYPES) for m in plain.modules())


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_ag3_1_equals_reference(kind):
    plain, ours = twin_models(kind)
    opt_ref = OPTS["rmsprop"](params_of(plain))
    opt = AG(ours, OPTS["rmsprop"](params_of(ours)), mode="ag3-1", backend="reference")
    prev = None
    for step in range(4):
        x, y = batch(kind, seed=step)
        rng = torch.manual_seed(200 + step).get_state()
        prev = ref.ag3_step(plain, opt_ref, x, y, F.cross_entropy, rng, prev)
        torch.set_rng_state(rng)
        opt.step(lambda: F.cross_entropy(ours(x), y))
        assert opt.last.plain == (step == 0)
        assert max_diff(params_of(ours), params_of(plain)) <= 1e-6, step
        assert max_diff(list(ours.buffers()), list(plain.buffers())) <= 1e-6


def test_averaged_gradient_differs_from_gradient():
    """Guard against a test oracle and implementation that both silently fall back to f'."""
    _, ours = twin_models("mlp")
    x, y = batch("mlp")
    loss = F.cross_entropy(ours(x), y)
    g = torch.autograd.grad(loss, params_of(ours))
    opt = AG(ours, OPTS["rmsprop"](params_of(ours)), mode="ag1", backend="reference")
    opt.step(lambda: F.cross_entropy(ours.eval()(x), y))
    assert max_diff([p.grad for p in params_of(ours)], g) > 1e-4


# -- properties ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_length_base_step_gives_ordinary_gradients(mode, dtype):
    torch.manual_seed(3)
    model = avg_kernels.nn.convert(cnn(dtype))
    twin = copy.deepcopy(model)
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.0), mode=mode)
    x, y = batch("cnn", dtype)
    before = [p.detach().clone() for p in params_of(model)]
    for _ in range(2 if mode == "ag3-1" else 1):  # AG-3-1's first step is a plain step
        rng = torch.get_rng_state()
        opt.step(lambda: F.cross_entropy(model(x), y))
    torch.set_rng_state(rng)
    for _ in range(1 if mode == "ag3-1" else 0):  # twin: same BatchNorm history as the model
        twin(x)
    torch.set_rng_state(rng)
    g = torch.autograd.grad(F.cross_entropy(twin(x), y), params_of(twin))
    for p, gi in zip(params_of(model), g):
        torch.testing.assert_close(p.grad, gi, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=1e-7)
    for p, b in zip(params_of(model), before):
        assert torch.equal(p, b)  # |θ' − θ| = 0 and lr = 0: nothing moves


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
@pytest.mark.parametrize("track", [False, True])
def test_graph_at_theta_is_built_once_per_step(mode, track):
    torch.manual_seed(0)
    model = avg_kernels.nn.convert(mlp(torch.float32))
    counts = {"grad": 0, "nograd": 0, "backward": 0}

    def fwd_hook(mod, args, out):
        counts["grad" if torch.is_grad_enabled() else "nograd"] += 1

    model.register_forward_hook(fwd_hook)
    model[3].register_full_backward_hook(lambda *a: counts.__setitem__("backward", counts["backward"] + 1))
    opt = AG(model, torch.optim.RMSprop(model.parameters(), lr=1e-3), mode=mode, track_loss_after=track)
    x, y = batch("mlp", torch.float32)
    for step in range(3):
        for k in counts:
            counts[k] = 0
        opt.step(lambda: F.cross_entropy(model(x), y))
        plain = mode == "ag3-1" and step == 0
        # replays after the optimizer's first stop after the last activation unless track_loss_after (the default
        # of track_replay_loss): the model's forward, interrupted, does not reach its forward hook
        stopped = not track and step >= (2 if mode == "ag3-1" else 1)
        assert counts["grad"] == 1
        assert counts["nograd"] == (0 if plain or stopped else 1) + int(track)
        assert counts["backward"] == (1 if plain or mode == "ag3-1" else 2)


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_buffers_after_step_equal_one_ordinary_training_forward(mode):
    torch.manual_seed(0)
    model = avg_kernels.nn.convert(cnn(torch.float32))
    opt = AG(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode=mode, track_loss_after=True)
    for step in range(3):
        x, y = batch("cnn", torch.float32, seed=step)
        twin = copy.deepcopy(model)
        rng = torch.get_rng_state()
        opt.step(lambda: F.cross_entropy(model(x), y))
        after_rng = torch.get_rng_state()
        torch.set_rng_state(rng)
        twin(x)  # one ordinary training forward at θ_t
        for (name, b), bt in zip(model.named_buffers(), twin.buffers()):
            assert torch.equal(b, bt), name
        assert torch.equal(after_rng, torch.get_rng_state())  # the RNG advanced exactly as by one forward


def test_ag2_uses_pre_step_state_and_state_advances_once():
    torch.manual_seed(0)
    # (no bias in front of a BatchNorm here: its gradient is rounding noise, which Adam blows up to ±lr)
    model = avg_kernels.nn.convert(nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 12), nn.GELU(),
                                                 nn.Linear(12, 10), nn.ELU(), nn.Linear(10, 4)).double())
    base = torch.optim.Adam(model.parameters(), lr=1e-2)
    opt = AG(model, base, mode="ag2", backend="reference")
    x, y = batch("mlp")
    for step in range(1, 4):
        theta = [p.detach().clone() for p in params_of(model)]
        state_t = copy.deepcopy(base.state_dict())
        # the base optimizer's own step from s_t with g
        twin = copy.deepcopy(model)
        g = torch.autograd.grad(F.cross_entropy(twin(x), y), params_of(twin))
        adam = torch.optim.Adam(params_of(twin), lr=1e-2)
        adam.load_state_dict(copy.deepcopy(state_t))  # (load_state_dict keeps the tensors it is given)
        for p, gi in zip(params_of(twin), g):
            p.grad = gi
        adam.step()
        opt.step(lambda: F.cross_entropy(model(x), y))
        # s_{t+1} persists: the state is what ONE base step with g gives (step count = step)
        for p, pt in zip(params_of(model), params_of(twin)):
            assert float(base.state[p]["step"]) == step
            torch.testing.assert_close(base.state[p]["exp_avg"], adam.state[pt]["exp_avg"], rtol=0, atol=0)
            torch.testing.assert_close(base.state[p]["exp_avg_sq"], adam.state[pt]["exp_avg_sq"], rtol=0, atol=0)
        # θ'' from s_t with ḡ, rescaled to ‖θ' − θ‖₁
        gbar = [p.grad for p in params_of(model)]
        fresh = [t.clone().requires_grad_() for t in theta]
        adam2 = torch.optim.Adam(fresh, lr=1e-2)
        adam2.load_state_dict(copy.deepcopy(state_t))
        for p, gi in zip(fresh, gbar):
            p.grad = gi
        adam2.step()
        delta = [f.detach() - t for f, t in zip(fresh, theta)]
        l1_step = sum((pt.detach() - t).abs().sum() for pt, t in zip(params_of(twin), theta))
        l1_delta = sum(d.abs().sum() for d in delta)
        expect = [t + d * (l1_step / l1_delta) for t, d in zip(theta, delta)]
        assert max_diff(params_of(model), expect) <= 1e-12
        new_l1 = sum((p.detach() - t).abs().sum() for p, t in zip(params_of(model), theta))
        assert float(new_l1) == pytest.approx(float(l1_step), rel=1e-10)


def test_last_reports_losses():
    torch.manual_seed(0)
    model = avg_kernels.nn.convert(mlp(torch.float64))
    opt = AG(model, torch.optim.RMSprop(model.parameters(), lr=1e-2), mode="ag1", track_loss_after=True, profile=True)
    x, y = batch("mlp")
    twin = copy.deepcopy(model)
    rng = torch.get_rng_state()
    loss = opt.step(lambda: F.cross_entropy(model(x), y))
    info = opt.last
    assert info.step == 1 and info.mode == "ag1" and info.activation_calls == 3 and not info.plain
    assert not loss.requires_grad and torch.equal(loss, info.loss)
    # ℓ(θ') is the loss after the base optimizer's own step; ℓ(θ_{t+1}) the loss after the AG update
    base = torch.optim.RMSprop(twin.parameters(), lr=1e-2)
    torch.set_rng_state(rng)
    F.cross_entropy(twin(x), y).backward()
    base.step()

    def eval_at(m):
        saved = [(b, b.clone()) for b in m.buffers()]
        torch.set_rng_state(rng)
        with torch.no_grad():
            v = F.cross_entropy(m(x), y)
        for b, s in saved:
            b.copy_(s)
        return v

    assert float(info.loss_new) == pytest.approx(float(eval_at(twin)), abs=1e-12)
    assert float(info.loss_after) == pytest.approx(float(eval_at(model)), abs=1e-12)
    assert info.reduction == pytest.approx(float(info.loss) - float(info.loss_after))
    assert info.base_reduction == pytest.approx(float(info.loss) - float(info.loss_new))
    assert {"forward_graph", "backward_grad", "base_step", "forward_replay", "backward_avg", "update",
            "copies", "loss_after"} <= set(info.times)


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_state_dict_round_trip(mode):
    torch.manual_seed(0)
    model = avg_kernels.nn.convert(mlp(torch.float32))
    opt = AG(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode=mode)
    data = [batch("mlp", torch.float32, seed=s) for s in range(5)]
    for x, y in data[:2]:
        opt.step(lambda: F.cross_entropy(model(x), y))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    for x, y in data[2:]:
        opt.step(lambda: F.cross_entropy(model(x), y))

    torch.manual_seed(123)
    model2 = avg_kernels.nn.convert(mlp(torch.float32))
    model2.load_state_dict(saved_model)
    opt2 = AG(model2, torch.optim.Adam(model2.parameters(), lr=1e-2), mode=mode)
    opt2.load_state_dict(saved_opt)
    assert opt2.steps == 2
    torch.set_rng_state(rng)
    for x, y in data[2:]:
        opt2.step(lambda: F.cross_entropy(model2(x), y))
        assert opt2.last.plain is False
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="mode"):
        AG(model2, torch.optim.Adam(model2.parameters()), mode="ag1" if mode != "ag1" else "ag2").load_state_dict(saved_opt)


@pytest.mark.parametrize("mode", ["ag1", "ag3-1"])
def test_state_dict_of_the_nested_layout_loads(mode):
    """Before the shared optimizer wrapper, AG.state_dict() was {"base": the base's state dict, "ag": {mode,
    eps, steps, prev}}. Built here by hand, it loads and training continues exactly as from today's layout
    (the base's state dict plus "ag")."""
    torch.manual_seed(0)
    model = avg_kernels.nn.convert(mlp(torch.float32))
    opt = AG(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode=mode)
    data = [batch("mlp", torch.float32, seed=s) for s in range(4)]
    for x, y in data[:2]:
        opt.step(lambda: F.cross_entropy(model(x), y))
    saved_model = copy.deepcopy(model.state_dict())
    new = copy.deepcopy(opt.state_dict())
    assert set(new) == {"state", "param_groups", "ag"} and new["ag"]["steps"] == 2
    prev = None if opt._prev is None else [t.detach().clone() for t in opt._prev]
    old = {"base": copy.deepcopy(opt.base.state_dict()),
           "ag": {"mode": mode, "eps": opt.eps, "steps": 2, "prev": prev}}
    assert (prev is not None) == (mode == "ag3-1")
    rng = torch.get_rng_state()
    for x, y in data[2:]:
        opt.step(lambda: F.cross_entropy(model(x), y))
    for layout in (old, new):
        model2 = avg_kernels.nn.convert(mlp(torch.float32))
        model2.load_state_dict(saved_model)
        opt2 = AG(model2, torch.optim.Adam(model2.parameters(), lr=1e-2), mode=mode)
        opt2.load_state_dict(layout)
        assert opt2.steps == 2
        assert opt2.param_groups is opt2.base.param_groups and opt2.state is opt2.base.state
        torch.set_rng_state(rng)
        for x, y in data[2:]:
            opt2.step(lambda: F.cross_entropy(model2(x), y))
            assert opt2.last.plain is False
        for p, q in zip(model.parameters(), model2.parameters()):
            assert torch.equal(p, q)
    with pytest.raises(ValueError, match="'ag'"):
        opt2.load_state_dict(opt2.base.state_dict())


# -- errors ----------------------------------------------------------------------------------------

def _model():
    torch.manual_seed(0)
    return avg_kernels.nn.convert(nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.GELU(), nn.Linear(5, 2)))


def test_shape_mismatch_names_call_index_and_both_shapes_and_restores_params():
    model = _model()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ag1")
    x = torch.randn(8, 4)
    calls = []

    def closure():
        calls.append(1)
        xb = x if len(calls) == 1 else x[:6]  # a different batch in the pass at θ'
        return model(xb).square().mean()

    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(PairingError, match=r"call 0 .*\(6, 5\).*θ'.*\(8, 5\).*θ"):
        opt.step(closure)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)
    assert avg_kernels.nn._recording.ACTIVE is None


def test_count_mismatch_both_directions():
    model = _model()
    extra = avg_kernels.nn.Sigmoid()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ag1")
    x = torch.randn(8, 4)
    n = []

    def more():
        n.append(1)
        out = model(x)
        return (extra(out) if len(n) == 2 else out).square().mean()

    with pytest.raises(PairingError, match=r"call 2 \(sigmoid.*has no partner.*only 2 calls"):
        opt.step(more)
    n.clear()

    def fewer():
        n.append(1)
        out = model(x)
        return (extra(out) if len(n) == 1 else out).square().mean()

    with pytest.raises(PairingError, match=r"made 2 averaged-activation calls but the pass at θ made 3; call 2"):
        opt.step(fewer)


def test_kind_mismatch_is_an_error():
    model = _model()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ag3-1")
    x = torch.randn(8, 4)
    opt.step(lambda: model(x).sum())  # plain first step
    n = []

    def closure():
        n.append(1)
        if len(n) == 2:
            model[1].__class__ = avg_kernels.nn.Sigmoid
        try:
            return model(x).sum()
        finally:
            model[1].__class__ = avg_kernels.nn.Tanh

    with pytest.raises(PairingError, match=r"call 0 is sigmoid .* but tanh"):
        opt.step(closure)


def test_closure_calling_backward_raises():
    model = _model()
    for mode in ("ag1", "ag3-1"):
        opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode)

        def closure():
            loss = model(torch.randn(3, 4)).sum()
            loss.backward()
            return loss

        with pytest.raises(RuntimeError, match="called backward"):
            opt.step(closure)


def test_unconverted_model_is_averaged_through_the_function_mode():
    """An unconverted nn.Tanh calls torch.tanh, which the step's function mode averages as a bare call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2))
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1))
    opt.step(lambda: model(torch.randn(3, 4)).sum())
    assert opt.last.activation_calls == 1


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_model_without_averaged_activation_fails_at_the_first_step_unless_allowed(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5), nn.Mish(), nn.Linear(5, 2))
    before = [p.detach().clone() for p in model.parameters()]
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode)
    with pytest.raises(RuntimeError, match=r"no averaged-activation call(.|\n)*F\.mish"):
        opt.step(lambda: model(torch.randn(3, 4)).sum())  # the FIRST step, AG-3-1's plain one included
    assert opt.steps == 0 and all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode, require_activations=False,
             check_unaveraged=False)
    opt.step(lambda: model(torch.randn(3, 4)).sum())


def test_unaveraged_activation_calls_are_warned_about_on_first_step():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.act = nn.Linear(4, 4), nn.Linear(4, 2), avg_kernels.nn.Tanh()

        def forward(self, x):
            return self.b(F.mish(F.gelu(self.act(self.a(x)))))

    model = Net()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.warns(UserWarning, match=r"<model>' \(Net\): 1 call\(s\) of F\.mish"):
        opt.step(lambda: model(torch.randn(3, 4)).sum())
    assert opt.last.activation_calls == 2  # the module and the bare F.gelu
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: model(torch.randn(3, 4)).sum())  # checked once


@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_is_rejected(reentrant):
    from torch.utils.checkpoint import checkpoint

    model = _model()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(3, 4, requires_grad=reentrant)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(CheckpointingError, match="checkpoint"):
        opt.step(lambda: checkpoint(model, x, use_reentrant=reentrant).sum())
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b)


def test_constructor_validation():
    model = _model()
    other = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="mode"):
        AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ag3")
    with pytest.raises(ValueError, match="not a parameter of model"):
        AG(model, torch.optim.SGD(list(model.parameters()) + list(other.parameters()), lr=0.1))
    with pytest.raises(TypeError, match="torch.optim.Optimizer"):
        AG(model, "sgd")
    with pytest.raises(TypeError, match="LBFGS"):
        AG(model, torch.optim.LBFGS(model.parameters()))
    with pytest.raises(ValueError, match="eps"):
        AG(model, torch.optim.SGD(model.parameters(), lr=0.1), eps=-1.0)
    with pytest.raises(ValueError, match="backend"):
        AG(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="gpu")
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="closure"):
        opt.step(None)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: model(torch.randn(3, 4)))


# -- integration -----------------------------------------------------------------------------------

def test_lr_scheduler_and_param_groups_are_shared_with_the_base():
    model = _model()
    base = torch.optim.SGD(model.parameters(), lr=0.1)
    opt = AG(model, base)
    assert isinstance(opt, torch.optim.Optimizer) and opt.param_groups is base.param_groups
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(lambda: model(torch.randn(3, 4)).square().mean())
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.05)
    # the base's load_state_dict replaces its param_groups and state objects: still shared afterwards
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is base.param_groups and opt.state is base.state
    sched.step()
    assert base.param_groups[0]["lr"] == pytest.approx(0.025)
    extra = nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="not a parameter of model"):
        opt.add_param_group({"params": [extra]})
    assert "AG(mode='ag1', eps=1.19209e-07, base=SGD" in repr(opt)


def test_compiled_model_in_closure_runs_eagerly_inside_ag_steps():
    model = _model()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1))
    x = torch.randn(3, 4)
    compiled(x)  # compiled outside the step
    opt.step(lambda: compiled(x).square().mean())
    assert opt.last.activation_calls == 2


def test_functional_averaged_activations_are_recorded():
    from avg_kernels.nn import functional as AF

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            return self.b(AF.softplus(AF.leaky_relu(self.a(x), 0.1), beta=2.0))

    model = Net()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.5))
    opt.step(lambda: model(torch.randn(3, 4)).square().mean())
    assert opt.last.activation_calls == 2


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_ag_step_on_every_backend(backend, mode):
    device = backend_device(backend)
    small = interpreted(backend)
    torch.manual_seed(0)
    width = 4 if small else 16
    model = avg_kernels.nn.convert(nn.Sequential(nn.Linear(3, width), nn.Tanh(), nn.Linear(width, width), nn.SiLU(),
                                                 nn.Linear(width, 2))).to(device)
    twin = copy.deepcopy(model)
    x, y = torch.randn(5, 3, device=device), torch.randint(0, 2, (5,), device=device)
    opt = AG(model, torch.optim.RMSprop(model.parameters(), lr=1e-2), mode=mode, backend=backend)
    opt_ref = AG(twin, torch.optim.RMSprop(twin.parameters(), lr=1e-2), mode=mode, backend="reference")
    for _ in range(2):
        opt.step(lambda: F.cross_entropy(model(x), y))
        opt_ref.step(lambda: F.cross_entropy(twin(x), y))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_tied_weights_frozen_and_unoptimized_parameters():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.enc, self.dec, self.head = nn.Linear(4, 6, bias=False), nn.Linear(6, 4, bias=False), nn.Linear(4, 2)
            self.dec.weight = nn.Parameter(self.enc.weight.t().detach().clone())
            self.act = avg_kernels.nn.Tanh()
            self.frozen = nn.Linear(4, 4)
            self.frozen.requires_grad_(False)

        def forward(self, x):
            h = self.act(self.enc(x))
            return self.head(self.act(self.dec(h)) + self.frozen(x) + F.linear(h, self.enc.weight.t()))

    torch.manual_seed(0)
    model = Tied()
    other = torch.optim.SGD(model.head.parameters(), lr=0.1)  # head is optimized elsewhere
    params = [model.enc.weight, model.dec.weight]
    opt = AG(model, torch.optim.SGD(params + list(model.frozen.parameters()), lr=0.0))
    x = torch.randn(5, 4)
    frozen = [p.clone() for p in model.frozen.parameters()]
    twin = copy.deepcopy(model)
    opt.step(lambda: model(x).square().mean())
    g = torch.autograd.grad(twin(x).square().mean(), [twin.enc.weight, twin.dec.weight])
    for p, gi in zip(params, g):
        torch.testing.assert_close(p.grad, gi, rtol=1e-6, atol=1e-7)
    assert all(p.grad is None and torch.equal(p, f) for p, f in zip(model.frozen.parameters(), frozen))
    assert model.head.weight.grad is None  # not the AG optimizer's: untouched
    assert opt.state is opt.base.state
    del other


@pytest.mark.parametrize("mode", ["ag1", "ag3-1"])
def test_parameter_read_outside_its_module_is_detected_on_the_first_step(mode):
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.act = nn.Linear(3, 3), avg_kernels.nn.Tanh()
            self.refs = [self.lin.weight]  # a reference AG cannot swap for its copy

        def forward(self, x):
            return self.act(F.linear(x, self.refs[0], self.lin.bias)).sum()

    model = Sneaky()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode=mode)
    x = torch.randn(2, 3)
    if mode == "ag3-1":
        opt.step(lambda: model(x))  # the plain first step swaps nothing
    with pytest.raises(RuntimeError, match=r"parameter 'lin.weight' passed to linear .* Read parameters through"):
        opt.step(lambda: model(x))


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_first_step_checks_do_not_flag_a_clean_converted_model(mode):
    torch.manual_seed(0)
    model = avg_kernels.nn.convert(cnn(torch.float32))
    opt = AG(model, torch.optim.Adam(model.parameters(), lr=1e-3), mode=mode)
    x, y = batch("cnn", torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            opt.step(lambda: F.cross_entropy(model(x), y))
