"""avg_kernels.nn: drop-in modules, convert(model), its report, and the recorder's slots (SPEC §4)."""
from __future__ import annotations

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels
from avg_kernels import nn as ann
from avg_kernels.nn import _recording
from avg_kernels.activations import TABLE
from avg_kernels.nn._recording import BACKWARD, GRAPH, CheckpointingError, Recorder

from _accuracy import CONFIGS

# (torch.nn module, its averaged class, positional constructor args): one per configuration of
# _accuracy.CONFIGS (every activation of the table; non-default configurations pass every parameter).
KINDS = [(TABLE[act].module, getattr(ann, TABLE[act].module.__name__),
          tuple({**TABLE[act].params, **params}.values()) if params else ()) for act, params in CONFIGS]
IDS = [f"{t.__name__}{args}" for t, _, args in KINDS]


def _inputs(dtype, n=257):
    x = torch.randn(n, dtype=dtype) * 4
    # kinks (0, ±3, ±1, 6), softplus threshold
    x[:12] = torch.tensor([0.0, -0.0, 1.5, 25.0, -25.0, 3.0, -3.0, 1e-30, -1e-30, 1.0, -1.0, 6.0], dtype=dtype)
    return x


@pytest.mark.parametrize("tcls,acls,args", KINDS, ids=IDS)
def test_modules_take_the_namesake_arguments(tcls, acls, args):
    m, t = acls(*args), tcls(*args)
    assert isinstance(m, tcls) and isinstance(m, ann.AveragedActivation)
    assert repr(m) == repr(t)
    assert m.state_dict().keys() == t.state_dict().keys()
    if "inplace" in tcls.__init__.__code__.co_varnames:
        m2 = acls(*args, inplace=True)
        assert m2.inplace is False and m2.requested_inplace is True


@pytest.mark.parametrize("tcls,acls,args", KINDS, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_modules_are_bitwise_pytorch_outside_ag_steps(tcls, acls, args, dtype):
    x = _inputs(dtype).requires_grad_()
    xt = x.detach().clone().requires_grad_()
    y, yt = acls(*args)(x), tcls(*args)(xt)
    assert torch.equal(y, yt)
    g = torch.randn_like(y)
    y.backward(g)
    yt.backward(g)
    assert torch.equal(x.grad, xt.grad)


@pytest.mark.parametrize("inplace", [False, True])
def test_convert_is_bitwise_outside_ag_steps_forward_and_backward(inplace):
    """Bitwise against the out-of-place original. With inplace=True originals the converted model is
    out-of-place (SPEC §1): outputs stay bitwise, gradients differ from PyTorch's in-place formulas (which
    read the output instead of the input, e.g. elu_backward(is_result=True)) only by rounding."""
    torch.manual_seed(0)
    layers = [nn.Linear(5, 16)]
    for tcls, _, args in KINDS:
        kw = {"inplace": True} if inplace and "inplace" in tcls.__init__.__code__.co_varnames else {}
        layers += [tcls(*args, **kw), nn.Linear(16, 16)]
    model = nn.Sequential(*layers, nn.Dropout(0.3), nn.BatchNorm1d(16)).double()
    conv = ann.convert(copy.deepcopy(model), warn=False)
    out_of_place = copy.deepcopy(model)
    for m in out_of_place.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    assert sum(isinstance(m, ann.AveragedActivation) for m in conv.modules()) == len(KINDS)
    x = torch.randn(32, 5, dtype=torch.float64)
    for step in range(2):
        xs = [x.clone().requires_grad_() for _ in range(3)]
        ys = []
        for m, xi in zip((out_of_place, conv, model), xs):
            torch.manual_seed(step)
            ys.append(m(xi))
            ys[-1].square().sum().backward()
        assert torch.equal(ys[0], ys[1]) and torch.equal(ys[2], ys[1])
        assert torch.equal(xs[0].grad, xs[1].grad)
        torch.testing.assert_close(xs[2].grad, xs[1].grad, rtol=1e-12, atol=1e-15)
        for p, q, r in zip(out_of_place.parameters(), conv.parameters(), model.parameters()):
            assert torch.equal(p.grad, q.grad)
            torch.testing.assert_close(r.grad, q.grad, rtol=1e-12, atol=1e-15)
        for b, c in zip(out_of_place.buffers(), conv.buffers()):
            assert torch.equal(b, c)


def test_convert_swaps_in_place_and_keeps_identity_hooks_sharing_and_mode():
    shared = nn.Tanh()
    inner = nn.ModuleDict({"a": nn.GELU(approximate="tanh"), "b": nn.ModuleList([nn.ReLU(inplace=True), shared])})
    model = nn.Sequential(nn.Linear(3, 3), shared, inner, nn.Softplus(beta=2.0), nn.Linear(3, 3))
    model.eval()
    fired = []
    inner["a"].register_forward_hook(lambda *a: fired.append("a"))
    ids = {name: id(m) for name, m in model.named_modules()}
    keys = set(model.state_dict())
    out, rep = ann.convert(model, return_report=True, warn=False)
    assert out is model
    assert {name: id(m) for name, m in model.named_modules()} == ids
    assert type(model[1]) is ann.Tanh and model[1] is inner["b"][1]
    assert type(inner["a"]) is ann.GELU and inner["a"].approximate == "tanh"
    assert type(inner["b"][0]) is ann.ReLU and inner["b"][0].inplace is False
    assert type(model[3]) is ann.Softplus and model[3].beta == 2.0
    assert type(model[0]) is nn.Linear
    assert not model.training and not model[3].training
    assert set(model.state_dict()) == keys
    inner["a"](torch.randn(2, 3))
    assert fired == ["a"]
    assert rep.swapped == {"Tanh": 1, "GELU": 1, "ReLU": 1, "Softplus": 1}  # the shared Tanh counts once
    assert rep.made_out_of_place == ["2.b.0"] and rep.complete
    assert model[1]._avg_where == "1"
    # converting again changes nothing; the root may itself be an activation
    _, rep2 = ann.convert(model, return_report=True)
    assert rep2.swapped == {} and rep2.averaged == {"Tanh": 1, "GELU": 1, "ReLU": 1, "Softplus": 1}
    root = nn.ELU(0.5)
    assert ann.convert(root) is root and type(root) is ann.ELU and root.alpha == 0.5


def test_revert_restores_torch_modules():
    model = nn.Sequential(nn.ReLU(inplace=True), nn.GELU())
    ann.convert(model)
    ann.revert(model)
    assert type(model[0]) is nn.ReLU and model[0].inplace is True and type(model[1]) is nn.GELU


class _MyReLU(nn.ReLU):
    def forward(self, x):
        return super().forward(x) * 2


class _Direct(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        # F.tanh(x) in a comment is not a call; nor is "torch.sigmoid(x)" in a string
        note = "torch.sigmoid(x)"
        del note
        return torch.nn.functional.gelu(self.lin(x)) + F.silu(x) + x.relu()


def test_report_lists_what_is_not_averaged():
    model = nn.Sequential(nn.Linear(4, 4), nn.SELU(), _MyReLU(), _Direct(), nn.LSTM(4, 4),
                          nn.TransformerEncoderLayer(4, 2, 8, activation="gelu"), nn.Tanh())
    with pytest.warns(UserWarning, match="NOT averaged"):
        _, rep = ann.convert(model, return_report=True)
    text = str(rep)
    assert not rep.complete
    found = {(n.where, n.what) for n in rep.not_averaged}
    assert found == {("1", "nn.SELU module"), ("4", "nn.LSTM")}
    assert type(model[2]) is _MyReLU  # left alone; its forward's F.relu call is averaged as a bare call
    # supported calls in sources and attributes: averaged by AG steps when called (not problems)
    info = {(n.where, n.what) for n in rep.static_calls}
    assert any(w == "2" and "subclass of nn.ReLU" in what for w, what in info)
    direct = sorted(what for w, what in info if w == "3")
    assert direct == ["_Direct.forward calls F.silu()", "_Direct.forward calls torch.nn.functional.gelu()",
                      "_Direct.forward calls x.relu()"]  # not the ones in the comment and the string
    assert ("5", "TransformerEncoderLayer.activation = F.gelu") in info
    assert rep.swapped == {"Tanh": 1}
    assert "static inspection only" in text


def test_report_traces_a_forward_with_example_inputs_without_side_effects():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.bn, self.drop, self.act = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Dropout(0.5), nn.Tanh()
            self.fn = F.gelu

        def forward(self, x):
            return torch.sigmoid(self.act(self.drop(self.bn(self.lin(x))))) + self.fn(x) + ann.functional.silu(x)

    model = Net()
    ann.convert(model, warn=False)
    bufs = [b.clone() for b in model.buffers()]
    x = torch.randn(6, 4)
    rng = torch.get_rng_state()
    rep = ann.report(model, example_inputs=x)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(bufs, model.buffers()))
    assert rep.complete and rep.dynamic_checked
    assert sorted(str(c) for c in rep.calls if c.kind != "functional") == [
        "'<model>' (Net): gelu() [bare]", "'<model>' (Net): sigmoid() [bare]", "'act' (Tanh): tanh module [module]"]
    assert rep.kinds() == {"module": 1, "bare": 2, "functional": 1}


def test_clean_model_converts_without_warning():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ELU(), nn.Flatten(), nn.Linear(2 * 4 * 4, 3), nn.Sigmoid())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, rep = ann.convert(model, example_inputs=torch.randn(2, 1, 6, 6), return_report=True)
    assert rep.complete and rep.dynamic_checked and rep.swapped == {"ELU": 1, "Sigmoid": 1}


def test_convert_rejects_non_modules():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        ann.convert(lambda x: x)


def test_functional_is_bitwise_pytorch_outside_ag_steps():
    x = _inputs(torch.float32)
    AF = ann.functional
    pairs = [(AF.tanh(x), torch.tanh(x)), (AF.sigmoid(x), torch.sigmoid(x)), (AF.relu(x), F.relu(x)),
             (AF.leaky_relu(x, 0.3), F.leaky_relu(x, 0.3)), (AF.elu(x, 0.5), F.elu(x, 0.5)),
             (AF.gelu(x, approximate="tanh"), F.gelu(x, approximate="tanh")), (AF.silu(x), F.silu(x)),
             (AF.softplus(x, 2.0, 5.0), F.softplus(x, 2.0, 5.0)), (AF.softplus(x, threshold=5.0), F.softplus(x, 1.0, 5.0)),
             (AF.hardswish(x), F.hardswish(x)), (AF.hardsigmoid(x), F.hardsigmoid(x)),
             (AF.hardtanh(x), F.hardtanh(x)), (AF.hardtanh(x, -0.3, max_val=2.7), F.hardtanh(x, -0.3, 2.7)),
             (AF.relu6(x), F.relu6(x))]
    for a, b in pairs:
        assert torch.equal(a, b)


def test_functional_signatures_and_argument_errors():
    """The functional forms take the table's parameters (PyTorch's names and defaults) and nothing else."""
    AF = ann.functional
    assert str(inspect.signature(AF.softplus)) == "(input: torch.Tensor, beta=1.0, threshold=20.0) -> torch.Tensor"
    x = torch.randn(4)
    with pytest.raises(TypeError, match="takes 1 positional"):
        AF.relu(x, True)
    with pytest.raises(TypeError, match="unexpected keyword argument 'inplace'"):
        AF.relu(x, inplace=True)
    with pytest.raises(TypeError, match="multiple values for argument 'alpha'"):
        AF.elu(x, 0.5, alpha=0.5)


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_torch_compile_fullgraph_of_converted_forward(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 8), nn.LeakyReLU(0.1), nn.Linear(8, 8),
                          nn.Softplus(beta=2.0), nn.Linear(8, 2), nn.Tanh())
    conv = ann.convert(copy.deepcopy(model))
    x = torch.randn(5, 4)
    torch._dynamo.reset()
    ca = torch.compile(model, backend=backend, fullgraph=True)
    cb = torch.compile(conv, backend=backend, fullgraph=True)
    ya, yb = ca(x), cb(x)
    assert torch.equal(ya, yb)  # the converted model traces to the same graph
    torch.testing.assert_close(yb, conv(x), rtol=1e-6, atol=1e-6)
    ya.sum().backward()
    yb.sum().backward()
    for p, q in zip(model.parameters(), conv.parameters()):
        assert torch.equal(p.grad, q.grad)


# -- the recorder ----------------------------------------------------------------------------------

@pytest.mark.parametrize("tcls,acls,args", KINDS, ids=IDS)
def test_slot_backward_empty_is_pytorch_and_filled_is_the_averaged_op(tcls, acls, args):
    torch.manual_seed(0)
    m = acls(*args)
    x = (torch.randn(64) * 3).requires_grad_()
    x_new = x.detach() + torch.randn(64) * 0.3
    g = torch.randn(64)
    with Recorder(avg_kernels.EPS, "reference") as rec:
        rec.phase = GRAPH
        y = m(x)
        assert len(rec.slots) == 1 and rec.slots[0].x_new is None
        assert torch.equal(y, tcls(*args)(x.detach()))
        rec.phase = BACKWARD
        (g_empty,) = torch.autograd.grad(y, x, g, retain_graph=True)
        xt = x.detach().clone().requires_grad_()
        (g_torch,) = torch.autograd.grad(tcls(*args)(xt), xt, g)
        assert torch.equal(g_empty, g_torch)
        rec.start_replay("θ'")
        with torch.no_grad():
            m(x_new)
        rec.finish_replay()
        rec.phase = BACKWARD
        (g_avg,) = torch.autograd.grad(y, x, g)
    params = {name: getattr(m, name) for name in m.spec.params}  # the module's attributes
    expect = avg_kernels.avg_act_backward(g, x.detach(), x_new, m.act, backend="reference", **params)
    assert torch.equal(g_avg, expect)
    assert not torch.equal(g_avg, g_torch)
    assert _recording.ACTIVE is None


def test_recorder_rejects_calls_during_backward_and_nesting():
    with Recorder(avg_kernels.EPS, None) as rec:
        rec.phase = BACKWARD
        with pytest.raises(CheckpointingError, match="checkpointing"):
            ann.Tanh()(torch.randn(3))
        with pytest.raises(RuntimeError, match="cannot nest"):
            Recorder(avg_kernels.EPS, None).__enter__()
    assert _recording.ACTIVE is None
