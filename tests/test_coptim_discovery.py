"""C-optimizers on layers found by their weight (SPEC §3, issue 12): HF GPT-2's ``Conv1D`` (addmm with a
weight stored (in, out)), ``nn.MultiheadAttention``'s packed ``in_proj_weight`` slices and its functional
``out_proj``, ``nn.TransformerEncoderLayer``, Linear/Conv subclasses, a tied embedding/output weight;
``opt.report()``; mixed precision (bf16/fp16 autocast, the M × M form) and ``torch.amp.GradScaler`` (a
skipped step drops its statistics).

References are float64 by hand: P = G (X Xᵀ + λI)⁻¹ per map, G the autograd gradient of that map's rows
(the bias gradient as last column) and X its inputs with a row of ones (both forms are this matrix in
exact arithmetic)."""
from __future__ import annotations

import copy
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from avg_kernels.optim import CSGD, Consequentialism

from _hf_models import build

LAM = 1e-2


def _p_ref(G, X, lam=LAM):
    """G (X Xᵀ + λI)⁻¹ in float64; G (C, D), X (D, M)."""
    G, X = G.double(), X.double()
    return G @ torch.linalg.inv(X @ X.T + lam * torch.eye(X.shape[0], dtype=torch.float64))


def _cols(x, bias=True):
    """Rows of x (..., D) as columns (D(+1), M), with a row of ones for a bias."""
    X = x.detach().double().reshape(-1, x.shape[-1]).T
    return torch.cat([X, torch.ones(1, X.shape[1], dtype=torch.float64)]) if bias else X


def _gb(w_grad, b_grad):
    """G with the bias gradient as last column."""
    return torch.cat([w_grad, b_grad[:, None]], 1)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# HF GPT-2: Conv1D and the tied head.

def _gpt2(seed=0):
    return build("gpt2", seed, torch.float64)


@pytest.mark.parametrize("tokens", [8, 32])  # 2 × 8 = 16 positions: every Conv1D in the M × M form; 64: c_attn D × D
def test_gpt2_conv1d_layers_are_preconditioned_and_match_float64(tokens):
    from transformers.pytorch_utils import Conv1D

    model = _gpt2()
    opt = CSGD(model, lr=0.1, lam=LAM)
    seen = {}

    def keep(mod, inp, out):  # the test's own capture of each Conv1D's input
        seen[mod] = inp[0].detach()

    convs = {n: m for n, m in model.named_modules() if isinstance(m, Conv1D)}
    hs = [m.register_forward_hook(keep) for m in convs.values()]
    ids = torch.randint(0, 64, (2, tokens), generator=torch.Generator().manual_seed(1))
    with pytest.warns(UserWarning, match="transformer.wte.weight.*tied"):
        model(input_ids=ids, labels=ids).loss.backward()
        before = _grads(model)
        opt.precondition_()
    for h in hs:
        h.remove()
    assert len(convs) == 8
    for name, mod in convs.items():
        G = _gb(before[f"{name}.weight"].T, before[f"{name}.bias"])  # the map is weightᵀ: (out, in)
        P = _p_ref(G, _cols(seen[mod]))
        torch.testing.assert_close(mod.weight.grad.T, P[:, :-1], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(mod.bias.grad, P[:, -1], rtol=1e-7, atol=1e-10)
    # the tied embedding / head: the plain gradient, reported
    assert torch.equal(model.transformer.wte.weight.grad, before["transformer.wte.weight"])
    rep = opt.report().by_name
    wte = rep["transformer.wte.weight"]
    assert not wte.preconditioned and "tied" in wte.reason and wte.aliases == ("lm_head.weight",)
    forms = {e.parts[0].form for n, e in rep.items() if e.preconditioned}
    assert forms == ({"M×M"} if tokens == 8 else {"M×M", "D×D"})
    assert all(e.parts[0].found == "addmm" for n, e in rep.items() if e.preconditioned)


def test_gpt2_report_lists_every_parameter():
    model = _gpt2()
    model.transformer.h[1].ln_2.weight.requires_grad_(False)
    opt = CSGD(model, lr=0.1, lam=LAM, exclude=["transformer.h.1.mlp.c_fc"])
    rep = opt.report()
    assert [e.name for e in rep] == [n for n, _ in model.named_parameters()]
    before = rep.by_name["transformer.h.0.attn.c_attn.weight"]
    assert not before.preconditioned and "not used in a recorded forward" in before.reason
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    rep = opt.report()
    by = rep.by_name
    text = str(rep)
    assert text.startswith("14 of 28 parameters preconditioned")  # 7 Conv1D (one excluded) × weight and bias
    assert "excluded (module 'transformer.h.1.mlp.c_fc')" in by["transformer.h.1.mlp.c_fc.weight"].reason
    assert "frozen" in by["transformer.h.1.ln_2.weight"].reason
    assert by["transformer.wpe.weight"].reason.startswith("embedding: ")
    assert by["transformer.ln_f.bias"].reason.startswith("norm bias: ")
    part = by["transformer.h.0.mlp.c_proj.weight"].parts[0]
    assert (part.found, part.form, part.size, part.role) == ("addmm", "M×M", 16, "weight")
    assert by["transformer.h.0.mlp.c_proj.weight"].group == 0
    for e in rep:
        assert e.preconditioned or e.reason, e.name


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention / nn.TransformerEncoderLayer.

def _attn_inputs(mha, q, k, v):
    """The attention output before out_proj (F.multi_head_attention_forward with an identity out_proj)."""
    E = mha.embed_dim
    eye, zero = torch.eye(E, dtype=q.dtype), torch.zeros(E, dtype=q.dtype)
    return F.multi_head_attention_forward(q, k, v, E, mha.num_heads, mha.in_proj_weight, mha.in_proj_bias, None,
                                          None, False, 0.0, eye, zero, training=True, need_weights=False)[0]


@pytest.mark.parametrize("kind", ["self", "kv_same", "distinct"])
@pytest.mark.parametrize("n", [2, 8])  # 2 × 5 = 10 positions < D = 17: M × M; 40: D × D
def test_multihead_attention_slices_and_out_proj_match_float64(kind, n):
    torch.manual_seed(3)
    E = 16
    mha = nn.MultiheadAttention(E, 2).double()
    opt = CSGD(mha, lr=0.1, lam=LAM)
    x = torch.randn(3, 5, n, E, dtype=torch.float64)
    a, b, c = x.unbind(0)  # q is k is v: one linear call on the whole weight; k is v: split([E, 2E]); else chunk(3)
    q, k, v = {"self": (a, a, a), "kv_same": (a, b, b), "distinct": (a, b, c)}[kind]
    mha(q, k, v)[0].pow(2).sum().backward()
    before = _grads(mha)
    with torch.no_grad():
        attn = _attn_inputs(mha, q, k, v)
    opt.precondition_()
    W, b = before["in_proj_weight"], before["in_proj_bias"]
    slices = {"self": [(0, 3 * E, q)], "kv_same": [(0, E, q), (E, 3 * E, k)],
              "distinct": [(0, E, q), (E, 2 * E, k), (2 * E, 3 * E, v)]}[kind]
    for r0, r1, inp in slices:
        P = _p_ref(_gb(W[r0:r1], b[r0:r1]), _cols(inp))
        torch.testing.assert_close(mha.in_proj_weight.grad[r0:r1], P[:, :-1], rtol=1e-7, atol=1e-10)
        torch.testing.assert_close(mha.in_proj_bias.grad[r0:r1], P[:, -1], rtol=1e-7, atol=1e-10)
    P = _p_ref(_gb(before["out_proj.weight"], before["out_proj.bias"]), _cols(attn))
    torch.testing.assert_close(mha.out_proj.weight.grad, P[:, :-1], rtol=1e-7, atol=1e-10)
    torch.testing.assert_close(mha.out_proj.bias.grad, P[:, -1], rtol=1e-7, atol=1e-10)
    rep = opt.report().by_name
    assert len(rep["in_proj_weight"].parts) == len(slices)
    assert rep["out_proj.weight"].parts[0].found == "linear"


def test_transformer_encoder_layer_every_projection_preconditioned():
    """It raised before (out_proj's module hook never fires): now in_proj and out_proj are found by their
    weights and linear1/linear2 by their modules; in_proj matches the float64 reference."""
    torch.manual_seed(4)
    enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0).double()
    opt = CSGD(enc, lr=0.1, lam=LAM)
    x = torch.randn(5, 3, 16, dtype=torch.float64)
    enc(x).pow(2).sum().backward()
    before = _grads(enc)
    opt.precondition_()
    P = _p_ref(_gb(before["self_attn.in_proj_weight"], before["self_attn.in_proj_bias"]), _cols(x))
    torch.testing.assert_close(enc.self_attn.in_proj_weight.grad, P[:, :-1], rtol=1e-7, atol=1e-10)
    rep = opt.report()
    assert {e.name for e in rep if e.preconditioned} == {f"{a}.{b}" for a in (
        "self_attn.in_proj", "self_attn.out_proj", "linear1", "linear2") for b in ("weight", "bias")} - {
        "self_attn.in_proj.weight", "self_attn.in_proj.bias"} | {"self_attn.in_proj_weight", "self_attn.in_proj_bias"}
    assert all("norm" in e.reason for e in rep if not e.preconditioned)


# ----------------------------------------------------------------------------------------------
# Subclasses, functional uses, ties.

class ScaledLinear(nn.Linear):
    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias)


class StridedConv(nn.Conv2d):
    def forward(self, x):
        return torch.tanh(super().forward(x))


def test_linear_and_conv_subclasses_found_by_their_weights():
    torch.manual_seed(5)
    model = nn.Sequential(StridedConv(2, 4, 3, stride=2, padding=1), nn.Flatten(), ScaledLinear(4 * 9, 3)).double()
    opt = CSGD(model, lr=0.1, lam=LAM)
    assert opt._layers == []  # neither is on the module path
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    h = model[0](x)
    model(x).pow(2).sum().backward()
    before = _grads(model)
    opt.precondition_()
    P = _p_ref(_gb(before["2.weight"], before["2.bias"]), _cols(h.flatten(1)))
    torch.testing.assert_close(model[2].weight.grad, P[:, :-1], rtol=1e-7, atol=1e-10)
    u = F.unfold(x, 3, padding=1, stride=2)  # (N, C·9, L)
    X = torch.cat([u.permute(1, 0, 2).reshape(18, -1), torch.ones(1, 27, dtype=torch.float64)])
    P = _p_ref(_gb(before["0.weight"].reshape(4, -1), before["0.bias"]), X)
    torch.testing.assert_close(model[0].weight.grad.reshape(4, -1), P[:, :-1], rtol=1e-7, atol=1e-10)
    found = {e.name: e.parts[0].found for e in opt.report() if e.preconditioned}
    assert found == {"0.weight": "conv2d", "0.bias": "conv2d", "2.weight": "linear", "2.bias": "linear"}


class FunctionalTied(nn.Module):
    """An embedding whose weight is also the output map, written functionally; a matmul with a transpose."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.w = nn.Parameter(torch.randn(6, 6) / 3)  # used as h @ w.T: a linear map (rows of w)

    def forward(self, ids):
        h = torch.tanh(self.emb(ids) @ self.w.T)
        return F.linear(h, self.emb.weight)


def test_functional_tie_left_to_the_base_and_matmul_transpose_found():
    torch.manual_seed(6)
    model = FunctionalTied().double()
    opt = CSGD(model, lr=0.1, lam=LAM)
    ids = torch.randint(0, 10, (4, 5))
    e = model.emb(ids).detach()
    with pytest.warns(UserWarning, match="'emb.weight'.*more than one role"):
        F.cross_entropy(model(ids).flatten(0, 1), ids.flatten()).backward()
        before = _grads(model)
        opt.precondition_()
    assert torch.equal(model.emb.weight.grad, before["emb.weight"])
    P = _p_ref(before["w"], _cols(e, bias=False))
    torch.testing.assert_close(model.w.grad, P, rtol=1e-7, atol=1e-10)
    assert opt.report().by_name["w"].parts[0].found == "matmul"


def test_a_functional_weight_used_twice_adds_both_inputs():
    torch.manual_seed(7)
    model = Twice().double()
    opt = CSGD(model, lr=0.1, lam=LAM)
    x = torch.randn(20, 6, dtype=torch.float64)
    h = torch.tanh(x @ model.w).detach()
    model(x).pow(2).sum().backward()
    before = _grads(model)
    opt.precondition_()
    P = _p_ref(before["w"].T, _cols(torch.cat([x, h]), bias=False))  # x @ w: the map is wᵀ
    torch.testing.assert_close(model.w.grad.T, P, rtol=1e-7, atol=1e-10)


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6) / 3)

    def forward(self, x):
        return torch.tanh(x @ self.w) @ self.w


# ----------------------------------------------------------------------------------------------
# Copies and state.

def test_copy_and_state_dict_with_functional_layers():
    torch.manual_seed(8)
    base = nn.MultiheadAttention(8, 2)
    m1 = copy.deepcopy(base)
    o1 = CSGD(m1, lr=0.1, lam=LAM, momentum=0.9, refresh_every=2)
    xs = torch.randn(3, 2, 12, 8).unbind(0)

    def train(m, o, steps):
        for s in steps:
            o.zero_grad()
            m(xs[s], xs[s], xs[s])[0].pow(2).sum().backward()  # self-attention: the whole in_proj_weight
            o.step()

    train(m1, o1, [0])
    m2, o2 = copy.deepcopy((m1, o1))
    m4, o4 = pickle.loads(pickle.dumps((m1, o1)))
    sd = o1.state_dict()
    assert set(sd["consequentialism"]["inverses"]) == {"in_proj_weight", "out_proj.weight"}
    m3 = copy.deepcopy(m1)
    o3 = CSGD(m3, lr=0.1, lam=LAM, momentum=0.9, refresh_every=2)
    # its functional layers are not known before a forward: their factorisations are attached when found
    o3.load_state_dict(copy.deepcopy(sd))  # (a copy: SGD would share the momentum tensors)
    for m, o in ((m1, o1), (m2, o2), (m3, o3), (m4, o4)):
        train(m, o, [1, 2])
    for m in (m2, m3, m4):
        for a, b in zip(m1.parameters(), m.parameters()):
            assert torch.equal(a, b)


# ----------------------------------------------------------------------------------------------
# Mixed precision.

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [16, 2048])  # 16 < D = 513: M × M; 2048: D × D (well conditioned)
def test_autocast_mxm_and_dxd(dtype, n):
    """Under autocast a layer's gradient is computed in bf16/fp16: the M × M form's consistency check judges
    at that precision (it raised under bf16 before), and P is within that precision of the float64
    ΔZ Xᵀ (X Xᵀ + λI)⁻¹ (ΔZ the bf16/fp16 output gradient, X the input as recorded)."""
    torch.manual_seed(9)
    lin = nn.Linear(512, 10)
    opt = CSGD(lin, lr=0.1, lam=LAM)
    x = torch.randn(n, 512)
    with torch.autocast("cpu", dtype=dtype):
        z = lin(x)
    z.retain_grad()
    z.float().pow(2).sum().backward()
    before = _grads(lin)
    opt.precondition_()
    X = _cols(x)
    P = _p_ref(z.grad.double().T @ X.T, X)
    rel = ((_gb(lin.weight.grad, lin.bias.grad).double() - P).norm() / P.norm()).item()
    assert rel < {(torch.bfloat16, 16): 1e-5, (torch.float16, 16): 1e-5,  # ΔZ is used as it is
                  (torch.bfloat16, 2048): 3e-2, (torch.float16, 2048): 5e-3}[dtype, n]  # .grad rounded
    assert opt.report().by_name["weight"].parts[0].form == ("M×M" if n == 16 else "D×D")


@pytest.mark.parametrize("scale", [1.0, 1e-7])
def test_fp16_mxm_check_judges_subnormal_gradients_at_fp16_spacing(scale):
    """fp16 autocast without a GradScaler: a loss scaled by 1e-7 gives weight gradients of about 1e-6, in fp16's
    subnormal range (below 6.1e-5: rounded to multiples of 2⁻²⁴, 3e-2 relative here), and the M × M check
    raised "its gradient is not ΔZ·Xᵀ" (found on HF BERT's attention query/key layers, tests/test_hf_models.py).
    P still is the float64 ΔZ Xᵀ (X Xᵀ + λI)⁻¹ of the recorded ΔZ; a .grad changed by more than that rounding
    still raises."""
    for tamper in (False, True):
        torch.manual_seed(9)
        lin = nn.Linear(64, 8)
        opt = CSGD(lin, lr=0.1, lam=LAM)
        x = torch.randn(16, 64)
        with torch.autocast("cpu", dtype=torch.float16):
            z = lin(x)
        z.retain_grad()
        (z.float().pow(2).sum() * scale).backward()
        if tamper:
            with torch.no_grad():
                lin.weight.grad += lin.weight.grad.abs().max() * torch.randn(8, 64)
            with pytest.raises(RuntimeError, match="its gradient is not ΔZ·Xᵀ"):
                opt.precondition_()
            continue
        opt.precondition_()
        X = _cols(x)
        P = _p_ref(z.grad.double().T @ X.T, X)
        rel = ((_gb(lin.weight.grad, lin.bias.grad).double() - P).norm() / P.norm()).item()
        assert rel < 1e-5 and opt.report().by_name["weight"].parts[0].form == "M×M"


def _amp_model():
    torch.manual_seed(10)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _amp_step(model, opt, x, scaler=None):
    opt.zero_grad()
    with torch.autocast("cpu", dtype=torch.float16):
        loss = model(x).float().pow(2).mean()
    if scaler is None:
        loss.backward()
        opt.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()


@pytest.mark.parametrize("n", [4, 64])  # layer 2 (D = 17): M × M at 4 rows, D × D at 64
def test_grad_scaler_step_equals_the_unscaled_step(n):
    m1, m2 = _amp_model(), _amp_model()
    o1, o2 = CSGD(m1, lr=0.1, lam=LAM), CSGD(m2, lr=0.1, lam=LAM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(n, 6)
    _amp_step(m1, o1, x, scaler)
    _amp_step(m2, o2, x)
    assert o1.steps == o2.steps == 1 and o1.skipped_steps == 0
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # power-of-two scaling: equal up to rounding


def test_grad_scaler_skipped_step_drops_its_statistics():
    """An inf the scaler finds skips the step; the Grams of that step must not add into the next one."""
    m1, m2 = _amp_model(), _amp_model()
    o1, o2 = CSGD(m1, lr=0.1, lam=LAM), CSGD(m2, lr=0.1, lam=LAM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # fp16 gradients overflow
    x1, x2 = torch.randn(64, 6) * 10, torch.randn(64, 6)
    before = [p.detach().clone() for p in m1.parameters()]
    _amp_step(m1, o1, x1, scaler)
    assert o1.skipped_steps == 1 and o1.steps == 0 and o1._collector.stats == {}
    assert all(torch.equal(a, b) for a, b in zip(before, m1.parameters()))
    scaler.update(2.0 ** 8)
    _amp_step(m1, o1, x2, scaler)
    _amp_step(m2, o2, x2)  # only the second batch
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_generic_wrapper_over_adam_with_grad_scaler_and_unscale_first():
    """scaler.unscale_(opt) before clipping, then scaler.step(opt): grad_scale is None, the gradients are
    already unscaled; the M × M probe finds the scale in ΔZ as a uniform factor."""
    m1, m2 = _amp_model(), _amp_model()
    o1 = Consequentialism(m1, torch.optim.Adam(m1.parameters(), lr=1e-2), lam=LAM)
    o2 = Consequentialism(m2, torch.optim.Adam(m2.parameters(), lr=1e-2), lam=LAM)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    x = torch.randn(4, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = m1(x).float().pow(2).sum()
    scaler.scale(loss).backward()
    scaler.unscale_(o1)
    torch.nn.utils.clip_grad_norm_(m1.parameters(), 1.0)
    scaler.step(o1)
    with torch.autocast("cpu", dtype=torch.float16):
        loss = m2(x).float().pow(2).sum()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(m2.parameters(), 1.0)
    o2.step()
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_plain_linear_conv_model_runs_without_the_functional_path():
    """Only vectors (BatchNorm, biases) besides nn.Linear/nn.ConvNd modules: no model-level hooks, no mode (the
    module path as before); the report says why BatchNorm's parameters get the plain update."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 16, 3))
    opt = CSGD(model, lr=0.1)
    assert not model._forward_pre_hooks and not model._forward_hooks
    F.cross_entropy(model(torch.randn(5, 1, 6, 6)), torch.tensor([0, 1, 2, 0, 1])).backward()
    opt.step()
    rep = opt.report().by_name
    assert rep["1.weight"].reason.startswith("norm weight: a vector (1-D)")
    assert [rep[n].parts[0].found for n in ("0.weight", "3.bias")] == ["module (Conv2d)", "module (Linear)"]


class LowRank(nn.Module):
    """W + B @ A used as one weight: every parameter is part of a computed weight, none a linear map of
    the layer input by itself."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 6) / 3)
        self.a = nn.Parameter(torch.randn(2, 6) / 3)
        self.b = nn.Parameter(torch.randn(4, 2) / 3)

    def forward(self, x):
        return F.linear(x, self.w + self.b @ self.a)


def test_a_computed_weight_is_left_to_the_base_and_reported():
    model = LowRank()
    opt = CSGD(model, lr=0.1)
    model(torch.randn(8, 6)).pow(2).sum().backward()
    before = _grads(model)
    opt.precondition_()
    assert all(torch.equal(p.grad, before[n]) for n, p in model.named_parameters())
    rep = opt.report().by_name
    assert "used by add" in rep["w"].reason
    assert "applied to a parameter" in rep["a"].reason and "as the input" in rep["b"].reason


def test_many_system_groups_are_not_padded_into_the_small_merge():
    """A depthwise conv's per-channel systems (D = 9, one row each) keep their own ridge_solve call instead of
    being padded to the merged small layers' largest D and row count; the result still matches float64."""
    torch.manual_seed(11)
    model = nn.Sequential(nn.Conv2d(2, 24, 3, padding=1), nn.Tanh(), nn.Conv2d(24, 24, 3, padding=1, groups=24),
                          nn.Tanh(), nn.Conv2d(24, 6, 1), nn.Flatten(), nn.Linear(6 * 16, 3)).double()
    opt = CSGD(model, lr=0.1, lam=LAM)
    shapes = []
    solve = opt._preconditioner.solve
    opt._preconditioner.solve = lambda G, A, lam: shapes.append(tuple(G.shape)) or solve(G, A, lam)
    x = torch.randn(16, 2, 4, 4, dtype=torch.float64)
    h = torch.tanh(model[0](x)).detach()
    model(x).pow(2).sum().backward()
    before = _grads(model)
    opt.precondition_()
    assert (24, 1, 10) in shapes  # the depthwise layer alone: 24 systems of D = 9 + bias
    assert (2, 24, 25) in shapes  # conv 1 (D = 19) and the pointwise conv (D = 25) merged, padded to 25
    u = F.unfold(h, 3, padding=1).view(16, 24, 9, 16).permute(1, 2, 0, 3).reshape(24, 9, 256)
    X = torch.cat([u, torch.ones(24, 1, 256, dtype=torch.float64)], 1)
    G = torch.cat([before["2.weight"].reshape(24, 1, 9), before["2.bias"].reshape(24, 1, 1)], 2)
    P = G @ torch.linalg.inv(X @ X.mT + LAM * torch.eye(10, dtype=torch.float64))
    torch.testing.assert_close(model[2].weight.grad.reshape(24, 1, 9), P[:, :, :9], rtol=1e-7, atol=1e-10)
