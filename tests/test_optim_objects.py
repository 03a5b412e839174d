"""The optimizers as ordinary Python objects (issue 14, item 4): copies and pickles of AG and the
C-optimizers, ``torch.save(model)`` with a C-optimizer attached, a deep-copied model that must not feed
the original optimizer, and steps that meet a NaN/infinity or a failing closure.

Every check is bitwise: a failed or skipped step leaves parameters, buffers, the base optimizer's state
and the step count exactly as they were.
"""
from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels as ak
from avg_kernels.optim import AG, CAdam, CSGD, Consequentialism, NonFiniteError
from avg_kernels.optim._collect import InertHook, LayerHook

NAN = float("nan")


# -- helpers ----------------------------------------------------------------------------------------
def c_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 36, 3))


def c_batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def ag_model(seed=0):
    torch.manual_seed(seed)
    return ak.nn.convert(nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.2),
                                       nn.Linear(8, 3)))


def ag_batch(seed=0, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g), torch.randint(0, 3, (n,), generator=g)


C_MAKERS = {
    "csgd": lambda m, **kw: CSGD(m, lr=0.1, lam=1e-2, momentum=0.9, **kw),
    "cadam": lambda m, **kw: CAdam(m, lr=1e-2, lam=1e-2, refresh_every=2, **kw),
    "rmsprop": lambda m, **kw: Consequentialism(m, torch.optim.RMSprop(m.parameters(), lr=1e-2), lam=1e-2, **kw),
}


def c_train(model, opt, seeds, n=8):
    for s in seeds:
        x, y = c_batch(n, s)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def ag_train(model, opt, seeds):
    for s in seeds:
        x, y = ag_batch(s)
        torch.manual_seed(100 + s)  # the dropout masks
        opt.step(lambda: F.cross_entropy(model(x), y))


def snapshot(model, opt):
    return ([t.detach().clone() for t in model.parameters()], [b.clone() for b in model.buffers()],
            copy.deepcopy(opt.base.state_dict()), opt.steps)


def assert_same_tensors(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_same_state(a, b):
    assert a["param_groups"] == b["param_groups"]
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].keys() == b["state"][k].keys()
        for name, v in a["state"][k].items():
            w = b["state"][k][name]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w


def assert_unchanged(model, opt, snap):
    params, buffers, base_state, steps = snap
    assert_same_tensors(params, [p.detach() for p in model.parameters()])
    assert_same_tensors(buffers, list(model.buffers()))
    assert_same_state(base_state, opt.base.state_dict())
    assert opt.steps == steps


# -- C-optimizers: copies, pickles, torch.save -------------------------------------------------------
@pytest.mark.parametrize("make", sorted(C_MAKERS))
@pytest.mark.parametrize("how", ["deepcopy", "pickle", "torch.save"])
def test_c_optimizer_copied_with_its_model_trains_on_identically(make, how):
    """A copy of (model, opt) trains on exactly as the original (kept factorisations of refresh_every=2,
    momentum and Adam moments included); the original is not touched by the copy's forwards."""
    model = c_model()
    opt = C_MAKERS[make](model)
    c_train(model, opt, [0])  # CAdam: the factorisation of step 0 is reused by step 1
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    elif how == "pickle":
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    else:
        buf = io.BytesIO()
        torch.save({"model": model, "opt": opt}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        model2, opt2 = loaded["model"], loaded["opt"]
    assert opt2.model is model2 and opt2.base is not opt.base and opt2.steps == 1
    assert [p for g in opt2.param_groups for p in g["params"]] == list(model2.parameters())
    for mod in model2.modules():  # the copy's layers carry the copy's live hooks only, no inert stand-ins
        assert not any(isinstance(h, InertHook) for h in mod._forward_hooks.values())
    assert sum(isinstance(h, LayerHook) for m in model2.modules() for h in m._forward_hooks.values()) == 2
    c_train(model2, opt2, [1, 2])  # first: the copy alone (must not feed the original)
    c_train(model, opt, [1, 2])
    assert_same_tensors([p.detach() for p in model.parameters()], [p.detach() for p in model2.parameters()])
    assert_same_state(opt.base.state_dict(), opt2.base.state_dict())
    assert opt.steps == opt2.steps == 3


def test_deepcopy_of_the_c_optimizer_alone_copies_its_model():
    model = c_model()
    opt = CSGD(model, lr=0.1, lam=1e-2, momentum=0.9)
    c_train(model, opt, [0])
    opt2 = copy.deepcopy(opt)
    assert opt2.model is not model
    c_train(opt2.model, opt2, [1])
    c_train(model, opt, [1])
    assert_same_tensors([p.detach() for p in model.parameters()], [p.detach() for p in opt2.model.parameters()])


@pytest.mark.parametrize("make", sorted(C_MAKERS))
def test_torch_save_of_a_model_with_a_c_optimizer_attached(make):
    """torch.save(model) used to fail ("Can't pickle local object _forward_hook.<locals>.hook"). The loaded
    model computes what the original does; its training forwards feed nothing."""
    model = c_model()
    opt = C_MAKERS[make](model)
    c_train(model, opt, [0])
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    x, _ = c_batch(4, 5)
    model.eval(), loaded.eval()
    assert torch.equal(model(x), loaded(x))
    assert any(isinstance(h, InertHook) for m in loaded.modules() for h in m._forward_hooks.values())
    model.train(), loaded.train()
    loaded(x * 3)
    assert opt._collector.stats == {}


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("make", sorted(C_MAKERS))
@pytest.mark.parametrize("copier", [copy.deepcopy, _pickled])
def test_a_copied_model_does_not_feed_the_original_optimizer(make, copier):
    """Before: a training-mode forward of copy.deepcopy(model) went through the original's hooks and
    changed the original's next step (by up to 0.2 in a parameter, C-Adam, here)."""
    after = []
    for feed_copy in (False, True):
        model = c_model()
        opt = C_MAKERS[make](model)
        twin = copier(model)
        x, y = c_batch(8, 0)
        F.cross_entropy(model(x), y).backward()
        if feed_copy:
            twin(c_batch(8, 1)[0] * 3)
        opt.step()
        after.append([p.detach().clone() for p in model.parameters()])
    assert_same_tensors(*after)


def test_a_module_sharing_the_hook_with_another_weight_is_ignored():
    """copy.copy(layer) shares the hook dict; given its own weight it is not a use of the layer."""
    model = c_model()
    opt = CSGD(model, lr=0.1)
    other = copy.copy(model[4])
    other._parameters = dict(other._parameters)  # its own parameter table (shared by a shallow copy)
    other.weight = nn.Parameter(other.weight.detach().clone())
    other(torch.randn(2, 4 * 36))
    assert opt._collector.stats == {}
    same = copy.copy(model[4])  # the same weight: a use of the layer
    same(torch.randn(2, 4 * 36))
    assert [layer.name for layer in opt._collector.stats] == ["4"]


def test_c_state_dict_pickles_and_loads_into_a_new_optimizer_over_a_copied_model():
    model = c_model()
    opt = CAdam(model, lr=1e-2, lam=1e-2, refresh_every=3)
    c_train(model, opt, [0, 1])
    blob = pickle.dumps(opt.state_dict())
    model2 = copy.deepcopy(model)
    opt2 = CAdam(model2, lr=1e-2, lam=1e-2, refresh_every=3)
    opt2.load_state_dict(pickle.loads(blob))
    c_train(model, opt, [2, 3])
    c_train(model2, opt2, [2, 3])
    assert_same_tensors([p.detach() for p in model.parameters()], [p.detach() for p in model2.parameters()])


def test_a_dropped_c_optimizer_stops_collecting():
    """The hooks hold the collector weakly: once the optimizer is gone its hooks record nothing (before,
    a closure kept the collector alive and every training forward added to its statistics)."""
    import gc
    import weakref

    model = c_model()
    opt = CSGD(model, lr=0.1)
    ref = weakref.ref(opt._collector)
    del opt
    gc.collect()
    assert ref() is None
    model(c_batch(4)[0])  # the hooks find nothing to feed


# -- C-optimizers: non-finite values -----------------------------------------------------------------
@pytest.mark.parametrize("make", sorted(C_MAKERS))
@pytest.mark.parametrize("n", [8, 1])  # D × D form (and M × M for the Linear) / M × M for both layers
def test_c_nan_loss_raises_and_changes_nothing(make, n):
    """Before: RuntimeError "its gradient is not ΔZ·Xᵀ ..." (the M × M probe), nothing said about NaN."""
    model = c_model()
    opt = C_MAKERS[make](model)
    c_train(model, opt, [0], n=n)
    snap = snapshot(model, opt)
    x, y = c_batch(n, 1)
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * NAN).backward()
    buffers_after_forward = [b.clone() for b in model.buffers()]
    with pytest.raises(NonFiniteError, match=r"gradient of parameter '0\.weight' has a NaN or infinity.*"
                                             r"nothing was changed.*skip_nonfinite=True") as info:
        opt.step()
    assert isinstance(info.value, FloatingPointError)
    params, _, base_state, steps = snap
    assert_same_tensors(params, [p.detach() for p in model.parameters()])
    assert_same_state(base_state, opt.base.state_dict())
    assert opt.steps == steps == 1 and opt._collector.stats == {}
    assert_same_tensors(buffers_after_forward, list(model.buffers()))  # the forward was the user's
    # the dropped statistics do not leak into the next step: it equals a run that never saw the NaN batch
    c_train(model, opt, [2], n=n)
    ref_model = c_model()
    ref_opt = C_MAKERS[make](ref_model)
    c_train(ref_model, ref_opt, [0], n=n)
    ref_model(c_batch(n, 1)[0])  # the same BatchNorm update as the failed batch's forward
    ref_opt.clear_statistics()
    c_train(ref_model, ref_opt, [2], n=n)
    assert_same_tensors([p.detach() for p in ref_model.parameters()], [p.detach() for p in model.parameters()])


def test_c_nan_in_a_parameter_outside_the_layers_is_named():
    model = c_model()
    opt = CSGD(model, lr=0.1)
    x, y = c_batch()
    F.cross_entropy(model(x), y).backward()
    model[1].weight.grad[0] = float("inf")
    with pytest.raises(NonFiniteError, match=r"'1\.weight'"):
        opt.step()


def test_c_closure_loss_nan_is_named():
    model = c_model()
    opt = CSGD(model, lr=0.1)
    x, y = c_batch()

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y) * NAN
        loss.backward()
        return loss

    with pytest.raises(NonFiniteError, match="the loss has a NaN"):
        opt.step(closure)


def test_c_skip_nonfinite_skips_and_counts():
    model = c_model()
    opt = CSGD(model, lr=0.1, momentum=0.9, skip_nonfinite=True)
    c_train(model, opt, [0])
    snap = snapshot(model, opt)
    x, y = c_batch(8, 1)
    opt.zero_grad()
    (F.cross_entropy(model(x), y) * NAN).backward()
    snap = (snap[0], [b.clone() for b in model.buffers()], snap[2], snap[3])
    assert opt.step() is None
    assert_unchanged(model, opt, snap)
    assert opt.skipped_steps == 1 and opt._collector.stats == {}
    assert opt.state_dict()["consequentialism"]["skipped_steps"] == 1
    c_train(model, opt, [2])
    assert opt.steps == 2 and opt.skipped_steps == 1
    with pytest.raises(TypeError, match="skip_nonfinite"):
        CSGD(model, lr=0.1, skip_nonfinite=1)


def test_nonfinite_finds_nan_and_inf_not_overflowing_norms():
    """The fast path's L2 norm overflows for finite huge values: those are looked at element by element."""
    from avg_kernels.optim._wrapper import nonfinite

    huge = torch.full((100,), 3e38)
    assert nonfinite([("huge", huge), ("half", torch.full((100,), 6e4, dtype=torch.float16))]) is None
    inf = torch.tensor([-float("inf")])
    assert nonfinite([("huge", huge), ("nan", torch.tensor([1.0, NAN]).half()), ("inf", inf)]) == "nan"
    assert nonfinite([("ok", torch.ones(3)), ("inf", inf.double()), ("none", None)]) == "inf"
    assert nonfinite([("empty", torch.empty(0)), ("none", None)]) is None


# -- AG: copies and pickles --------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_ag_copied_with_its_model_trains_on_identically(mode, how):
    """Before: AttributeError: 'AG' object has no attribute 'base'. AG-3-1's θ_(t-1) survives the copy (the
    copy's next step is an AG-3-1 step, not a plain one)."""
    model = ag_model()
    opt = AG(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode=mode)
    ag_train(model, opt, [0, 1])
    if how == "deepcopy":
        model2, opt2 = copy.deepcopy((model, opt))
    else:
        model2, opt2 = pickle.loads(pickle.dumps((model, opt)))
    assert opt2.model is model2 and opt2.steps == 2
    ag_train(model2, opt2, [2, 3])
    assert opt2.last.plain is False
    ag_train(model, opt, [2, 3])
    assert_same_tensors([p.detach() for p in model.parameters()], [p.detach() for p in model2.parameters()])
    assert_same_tensors(list(model.buffers()), list(model2.buffers()))
    assert_same_state(opt.base.state_dict(), opt2.base.state_dict())


def test_ag_deepcopy_of_the_optimizer_alone_copies_its_model():
    model = ag_model()
    opt = AG(model, torch.optim.SGD(model.parameters(), lr=0.1), mode="ag1")
    ag_train(model, opt, [0])
    opt2 = copy.deepcopy(opt)
    assert opt2.model is not model
    ag_train(opt2.model, opt2, [1])
    ag_train(model, opt, [1])
    assert_same_tensors([p.detach() for p in model.parameters()], [p.detach() for p in opt2.model.parameters()])


# -- AG: non-finite values and failing closures ------------------------------------------------------
def _ag_ready(mode, **kw):
    model = ag_model()
    opt = AG(model, torch.optim.Adam(model.parameters(), lr=1e-2), mode=mode, **kw)
    ag_train(model, opt, [0, 1])
    return model, opt


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_ag_nan_loss_raises_and_changes_nothing(mode):
    """Before: every parameter NaN, the BatchNorm statistics updated, the step counted, no word."""
    model, opt = _ag_ready(mode)
    snap = snapshot(model, opt)
    x, y = ag_batch(5)
    with pytest.raises(NonFiniteError, match=r"the loss ℓ\(θ(_t)?\) has a NaN or infinity") as info:
        opt.step(lambda: F.cross_entropy(model(x), y) * NAN)
    assert any("not stepped" in n and "not counted (opt.steps = 2)" in n for n in info.value.__notes__)
    assert_unchanged(model, opt, snap)
    assert all(p.grad is None for p in model.parameters())
    ag_train(model, opt, [2])  # and training goes on
    assert opt.steps == 3 and (mode != "ag3-1" or opt.last.plain is False)


@pytest.mark.parametrize("mode", ["ag1", "ag2"])
def test_ag_nonfinite_averaged_gradient_after_the_base_step(mode):
    """A NaN that appears only in the pass at θ' (so only in ḡ): parameters and buffers as before the step;
    AG-2 also puts the base state back to s_t, AG-1 says that it has advanced."""
    model, opt = _ag_ready(mode)
    snap = snapshot(model, opt)
    x, y = ag_batch(5)
    calls = [0]

    def closure():
        calls[0] += 1
        xin = x.clone()
        if calls[0] == 2:
            xin[0, 0] = NAN
        return F.cross_entropy(model(xin), y)

    with pytest.raises(NonFiniteError, match=r"averaged gradient ḡ \(after the pass at θ'\) of parameter") as info:
        opt.step(closure)
    notes = " ".join(info.value.__notes__)
    params, buffers, base_state, steps = snap
    assert_same_tensors(params, [p.detach() for p in model.parameters()])
    assert_same_tensors(buffers, list(model.buffers()))
    assert opt.steps == steps
    if mode == "ag2":
        assert "put back to s_t" in notes
        assert_same_state(base_state, opt.base.state_dict())
    else:
        assert "has advanced by one step" in notes
        assert opt.base.state_dict()["state"][0]["step"] == base_state["state"][0]["step"] + 1


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
@pytest.mark.parametrize("failing_call", [1, 2])
@pytest.mark.parametrize("where", ["after_forward", "inside_forward"])
def test_ag_closure_that_raises_leaves_parameters_and_buffers(mode, failing_call, where):
    """Before: a closure raising in the θ' pass restored the parameters but left the BatchNorm running
    statistics of the failed step, and opt.steps counted it. ``inside_forward``: the failure comes from a
    layer before the last activation (a hook on the BatchNorm), where AG-3-1's replay, which stops after
    its last averaged activation (track_replay_loss), still runs; ``after_forward`` needs the replay whole."""
    model, opt = _ag_ready(mode, track_replay_loss=True if where == "after_forward" else None)
    snap = snapshot(model, opt)
    x, y = ag_batch(5)
    calls = [0]

    def fail(*args):
        if calls[0] == failing_call:
            raise KeyError("boom")

    if where == "inside_forward":
        model[1].register_forward_hook(fail)  # after the BatchNorm has updated its statistics

    def closure():
        calls[0] += 1
        out = model(x)  # the forward (BatchNorm in training mode) runs before the failure
        if where == "after_forward":
            fail()
        return F.cross_entropy(out, y)

    with pytest.raises(KeyError, match="boom") as info:
        opt.step(closure)
    assert any("not counted (opt.steps = 2)" in n for n in info.value.__notes__)
    params, buffers, base_state, steps = snap
    assert_same_tensors(params, [p.detach() for p in model.parameters()])
    assert_same_tensors(buffers, list(model.buffers()))
    assert opt.steps == steps
    if failing_call == 1 or mode != "ag1":  # ag1: the base stepped (said in the note); ag2: s_t put back
        assert_same_state(base_state, opt.base.state_dict())


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_ag_failure_in_the_loss_after_pass_keeps_the_update_and_says_so(mode):
    model, opt = _ag_ready(mode, track_loss_after=True)
    params = [p.detach().clone() for p in model.parameters()]
    x, y = ag_batch(5)
    calls = [0]

    def closure():
        calls[0] += 1
        out = model(x)
        if calls[0] == 3 - (mode == "ag3-1" and opt._prev is None):
            raise KeyError("boom")
        return F.cross_entropy(out, y)

    torch.manual_seed(7)
    with pytest.raises(KeyError) as info:
        opt.step(closure)
    assert any("update was applied and counted (opt.steps = 3" in n for n in info.value.__notes__)
    assert opt.steps == 3 and opt.last.step == 3 and opt.last.loss_after is None
    after = [p.detach().clone() for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    assert any(not torch.equal(a, b) for a, b in zip(params, after))
    # the same step without the failure gives the same parameters and buffers
    model2, opt2 = _ag_ready(mode, track_loss_after=True)
    torch.manual_seed(7)
    opt2.step(lambda: F.cross_entropy(model2(x), y))
    assert_same_tensors(after, [p.detach() for p in model2.parameters()])
    assert_same_tensors(buffers, list(model2.buffers()))


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1"])
def test_ag_skip_nonfinite(mode):
    model, opt = _ag_ready(mode, skip_nonfinite=True)
    snap = snapshot(model, opt)
    x, y = ag_batch(5)
    loss = opt.step(lambda: F.cross_entropy(model(x), y) * NAN)
    assert torch.isnan(loss) and opt.last.skipped and opt.last.as_dict()["skipped"]
    assert opt.skipped_steps == 1 and opt.state_dict()["ag"]["skipped_steps"] == 1
    assert_unchanged(model, opt, snap)
    ag_train(model, opt, [2])
    assert opt.steps == 3 and not opt.last.skipped and opt.skipped_steps == 1
