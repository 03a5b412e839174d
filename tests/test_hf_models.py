"""Every method on six models nobody here wrote, tried as a new user would (issue 12 "Tests"): HF GPT-2, Llama,
BERT, ViT, ResNet and MobileNetV2 built from tiny ``transformers`` configs (tests/_hf_models.py; random init,
never a download).

* AG (``convert`` + ``optim.AG``, modes ag1 / ag2 / ag3-1): the step runs, its losses and the parameters are
  finite, the parameters moved, and ``opt.last`` / ``nn.report`` say what was averaged, per model: GPT-2's 2
  hand-written tanh-GELUs (compound), Llama's 2 ``F.silu`` and BERT's 3 ``F.gelu`` calls (bare; their report
  and bitwise checks are in test_ag_functional.py), ViT's 2 ``F.gelu`` calls, ResNet's 5 ``nn.ReLU`` modules.
  MobileNetV2's 35 ``nn.ReLU6`` modules (hardtanh's kernel at 0, 6). The same MobileNetV2 built with Mish
  (no averaged kernel) fails at the first step in every mode, naming each module, and changes nothing. A step
  on each of GPT-2, Llama, ViT, ResNet and BERT (with dropout) equals the float64 two-graph reference
  (_ag_reference); tests/test_ag_mobilenet.py does the same for ReLU6.
* C-optimizers: a C-SGD and a C-Adam step run on each model; ``opt.report()`` lists every parameter, every
  >= 2-D parameter is preconditioned except the ones named here with their reason (tied embedding / head,
  embedding lookups, ViT's [CLS] token and position table), and only a tied weight is warned about; two
  C-Nesterov steps on ViT, ResNet and MobileNetV2 (depthwise) equal the float64 implementation of
  tests/test_coptim.py (P = G (X Xᵀ + λI)⁻¹ from unfolded inputs), D × D and M × M layers both present.
* Mixed precision: a bf16-autocast AG-1 and C-SGD step on ViT and on ResNet; an fp16-autocast C-SGD step on
  BERT without a GradScaler (its subnormal query/key gradients made the M × M check raise).
"""
from __future__ import annotations

import copy
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

import avg_kernels  # noqa: E402
from avg_kernels.optim import AG, CAdam, CSGD  # noqa: E402

import _ag_reference as ref  # noqa: E402
from _hf_models import batch, build, loss_of  # noqa: E402
from test_ag_optim import max_diff, params_of  # noqa: E402
from test_coptim import Reference  # noqa: E402

# kinds of the averaged calls in one forward of each model (count by kind) and a phrase of the report's line
AVERAGED = {
    "gpt2": ({"compound": 2}, "gelu(approximate='tanh') written as 0.5*x*(1+tanh("),  # NewGELUActivation
    "llama": ({"bare": 2}, "(SiLUActivation): silu() [bare]"),
    "bert": ({"bare": 3}, "(GELUActivation): gelu() [bare]"),  # 2 layers + the MLM head's transform
    "vit": ({"bare": 2}, "(GELUActivation): gelu() [bare]"),
    "resnet": ({"module": 5}, "(ReLU): relu module [module]"),  # stem, 2 blocks x (inner + after the residual)
    "mobilenetv2": ({"module": 35}, "(ReLU6): hardtanh module [module]"),  # relu6 = hardtanh's kernel at 0, 6
}
BASES = {"ag1": lambda ps: torch.optim.RMSprop(ps, lr=1e-3), "ag2": lambda ps: torch.optim.Adam(ps, lr=1e-3),
         "ag3-1": lambda ps: torch.optim.RMSprop(ps, lr=1e-3)}


def _snapshot(model):
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def _closure(model, inputs, target, dtype=None):
    def closure():
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            return loss_of(model, inputs, target)

    return closure


# -- AG ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", list(BASES))
@pytest.mark.parametrize("name", list(AVERAGED))
def test_ag_step_averages_every_activation(name, mode):
    kinds, _ = AVERAGED[name]
    model = avg_kernels.nn.convert(build(name), warn=False)
    inputs, target = batch(name)
    opt = AG(model, BASES[mode](model.parameters()), mode=mode)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2 if mode == "ag3-1" else 1):  # AG-3-1's first step is a plain base step (no θ_{t-1} yet)
        loss = opt.step(_closure(model, inputs, target))
    last = opt.last
    assert not last.plain and math.isfinite(float(loss))
    assert math.isfinite(float(last.loss_prev if mode == "ag3-1" else last.loss_new))
    assert last.activation_calls == sum(kinds.values()) and last.compound_calls == kinds.get("compound", 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    moved = [not torch.equal(p, b) for p, b in zip(model.parameters(), before)]
    assert sum(moved) >= 0.9 * len(moved), f"{sum(moved)} of {len(moved)} parameters moved"


@pytest.mark.parametrize("name", ["vit", "resnet", "mobilenetv2"])  # GPT-2, Llama, BERT: test_ag_functional.py
def test_report_says_what_is_averaged(name):
    kinds, phrase = AVERAGED[name]
    model = avg_kernels.nn.convert(build(name), warn=False)
    rep = avg_kernels.nn.report(model, example_inputs=batch(name)[0])
    assert rep.complete and rep.kinds() == kinds, str(rep)
    assert str(rep).count(phrase) == sum(kinds.values()), str(rep)


@pytest.mark.parametrize("mode", list(BASES))
def test_unaveraged_activations_fail_the_first_step_naming_every_module(mode):
    """MobileNetV2 built with Mish (HF MishActivation calls F.mish: no averaged kernel)."""
    model = build("mobilenetv2", hidden_act="mish")
    mish = [n for n, m in model.named_modules() if type(m).__name__ == "MishActivation"]
    assert len(mish) == 35
    avg_kernels.nn.convert(model, warn=False)
    inputs, target = batch("mobilenetv2")
    base = BASES[mode](model.parameters())
    opt = AG(model, base, mode=mode)
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="AG would average nothing") as err:
        opt.step(_closure(model, inputs, target))
    missing = [n for n in mish if f"'{n}' (MishActivation): F.mish" not in str(err.value)]
    assert not missing, missing
    assert opt.steps == 0 and not base.state
    assert all(torch.equal(a, b) for a, b in zip(_snapshot(model), before))  # parameters and BatchNorm buffers


# HF activation modules -> the torch.nn module of the same function, which the float64 reference hooks
AS_NN = {"GELUActivation": nn.GELU,  # F.gelu
         "NewGELUActivation": lambda: nn.GELU(approximate="tanh"),  # the hand-written tanh-GELU
         "SiLUActivation": nn.SiLU}  # F.silu


def _with_nn_activations(model):
    for name, m in list(model.named_modules()):
        if type(m).__name__ in AS_NN:
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent), attr, AS_NN[type(m).__name__]())
    return model


@pytest.mark.parametrize("name,mode,config", [
    ("gpt2", "ag2", {}), ("llama", "ag1", {}), ("vit", "ag1", {}), ("resnet", "ag2", {}),
    ("bert", "ag1", {"hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1})])
def test_ag_step_equals_the_float64_two_graph_reference(name, mode, config):
    """GPT-2's hand-written tanh-GELU (the secant of the whole GELU), Llama's F.silu, ViT's F.gelu calls,
    ResNet's nn.ReLU modules between BatchNorms, BERT's F.gelu calls with dropout in training mode (the masks
    replayed in every pass): ḡ and the update of one step are the papers' two-graph AG in float64, on the
    same model with each activation written as its torch.nn module."""
    plain = build(name, dtype=torch.float64, **config)
    ours = avg_kernels.nn.convert(copy.deepcopy(plain), warn=False)
    _with_nn_activations(plain)
    (x,), y = batch(name, torch.float64)
    y = x if y is None else y  # BERT: the tokens are the labels
    make = BASES[mode]
    opt_ref, opt = make(params_of(plain)), AG(ours, make(params_of(ours)), mode=mode, backend="reference")
    rng = torch.get_rng_state()
    loss_fn = lambda out, t: F.cross_entropy(out.logits.flatten(0, -2), t.flatten())  # noqa: E731
    loss_ref, gbar_ref, g_ref = ref.ag_step(plain, opt_ref, x, y, loss_fn, mode, rng, opt_factory=make)
    torch.set_rng_state(rng)
    loss = opt.step(lambda: loss_fn(ours(x), y))
    assert float(loss) == pytest.approx(float(loss_ref), abs=1e-12)
    assert max_diff([p.grad for p in params_of(ours)], gbar_ref) <= 1e-9
    assert max_diff(params_of(ours), params_of(plain)) <= 1e-9
    assert all(torch.equal(a, b) for a, b in zip(ours.buffers(), plain.buffers()))  # BatchNorm: the θ pass only
    assert max_diff(gbar_ref, g_ref) > 1e-4  # the step really averaged (the test can fail)


# -- C-optimizers --------------------------------------------------------------------------------------

# the >= 2-D parameters each model leaves to the base update, with (a pattern of) the reason the report gives
NOT_PRECONDITIONED = {
    "gpt2": {"transformer.wte.weight": r"more than one role.*\(tied\)",  # also lm_head
             "transformer.wpe.weight": r"^embedding: not a linear map"},
    "llama": {"model.embed_tokens.weight": r"^embedding: not a linear map"},
    "bert": {"bert.embeddings.word_embeddings.weight": r"more than one role.*\(tied\)",  # also the MLM decoder
             "bert.embeddings.position_embeddings.weight": r"^embedding: not a linear map",
             "bert.embeddings.token_type_embeddings.weight": r"^embedding: not a linear map"},
    "vit": {"vit.embeddings.cls_token": r"not a linear map of a layer input \(used by cat\)",
            "vit.embeddings.position_embeddings": r"not a linear map of a layer input \(used by add\)"},
    "resnet": {},
    "mobilenetv2": {},
}
TIED = {"gpt2": "transformer.wte.weight", "bert": "bert.embeddings.word_embeddings.weight"}
C_OPTS = {  # C-Nesterov: the float64 comparison below
    "csgd": lambda m: CSGD(m, lr=0.1, lam=1e-2),
    "cadam": lambda m: CAdam(m, lr=1e-3, lam=1e-2),
}


@pytest.mark.parametrize("opt_name", list(C_OPTS))
@pytest.mark.parametrize("name", list(NOT_PRECONDITIONED))
def test_c_optimizer_step_and_report_cover_every_weight(name, opt_name):
    model = build(name)
    inputs, target = batch(name)
    opt = C_OPTS[opt_name](model)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = loss_of(model, inputs, target)
        loss.backward()
        opt.step()
    loss = loss.detach()
    said = [str(w.message) for w in caught if "is not preconditioned" in str(w.message)]
    if name in TIED:  # a weight in two roles is warned about, by name
        assert len(said) == 1 and f"'{TIED[name]}'" in said[0] and "tied" in said[0], said
    else:
        assert not said, said
    assert math.isfinite(float(loss)) and all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(p, b) for p, b in zip(model.parameters(), before)) >= 0.9 * len(before)
    rep = _assert_report_covers(opt, model, name)
    if name in TIED:
        assert rep.by_name[TIED[name]].aliases  # the head's name, under which the same tensor is also used


def _assert_report_covers(opt, model, name):
    """opt.report() after a step lists every parameter; each >= 2-D one is preconditioned in that step or in
    NOT_PRECONDITIONED[name] with its reason; every other one not preconditioned says why."""
    rep = opt.report()
    assert [e.name for e in rep] == [n for n, _ in model.named_parameters()]
    expected = NOT_PRECONDITIONED[name]
    for e in rep:
        if e.preconditioned:  # used as a linear map in this step: its form and size are known
            assert e.parts and all(p.form is not None and p.size for p in e.parts), e
        else:
            assert e.reason, e.name
            if len(e.shape) >= 2:  # a weight left to the base update only for a stated, expected reason
                assert e.name in expected and re.search(expected[e.name], e.reason), (e.name, e.reason)
    assert {e.name for e in rep.not_preconditioned() if len(e.shape) >= 2} == set(expected)
    return rep


LAM = 1e-2


@pytest.mark.parametrize("name", ["vit", "resnet", "mobilenetv2"])
def test_c_nesterov_steps_equal_the_float64_implementation(name):
    """Two C-SGD steps with Nesterov momentum on ViT (patch conv, attention projections), ResNet (BatchNorm,
    strided shortcut) and MobileNetV2 (depthwise convs after TF "same" padding) against test_coptim's
    Reference: per Linear/Conv module P = ΔZ Xᵀ (X Xᵀ + λI)⁻¹ from F.unfold-ed inputs (groups: one system per
    group), every other parameter the plain update."""
    ours = build(name, dtype=torch.float64)
    theirs, start = copy.deepcopy(ours), copy.deepcopy(ours)
    opt = CSGD(ours, lr=0.02, lam=LAM, momentum=0.9, nesterov=True)
    reference = Reference(theirs, "sgd", lr=0.02, lam=LAM, momentum=0.9, nesterov=True)
    for step in range(2):
        inputs, target = batch(name, torch.float64, seed=step)
        opt.zero_grad(set_to_none=True)
        loss_of(ours, inputs, target).backward()
        opt.step()
        reference.step([(inputs[0], target)], lambda out, t: F.cross_entropy(out.logits, t))
        # rounding, relative to the size of the update: a bias feeding a BatchNorm has a zero gradient (rounding
        # noise), and BatchNorm over 2 images at 1x1 positions amplifies rounding in the second step
        moved = max_diff(theirs.parameters(), start.parameters())
        for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
            assert max_diff([a], [b]) <= 1e-9 * moved, (step, n, max_diff([a], [b]), moved)
    rep = opt.report()
    forms = {e.parts[0].form for e in rep if e.preconditioned}
    assert forms == {"D×D", "M×M"}, forms  # both forms are compared
    if name == "mobilenetv2":
        depthwise = [n for n, m in ours.named_modules() if isinstance(m, nn.Conv2d) and m.groups == m.out_channels > 1]
        assert len(depthwise) == 17 and all(rep.by_name[f"{n}.weight"].preconditioned for n in depthwise)
    assert {e.name for e in rep if e.preconditioned} == {
        f"{n}.{k}" for n, m in ours.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
        for k in ("weight", "bias") if getattr(m, k) is not None}


# -- mixed precision ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit", "resnet"])
def test_bf16_autocast_ag1_and_csgd_steps(name):  # fp16 and GradScaler: test_ag_functional, test_coptim_discovery
    dtype = torch.bfloat16
    inputs, target = batch(name)
    model = avg_kernels.nn.convert(build(name), warn=False)
    opt = AG(model, torch.optim.RMSprop(model.parameters(), lr=1e-3), mode="ag1")
    before = [p.detach().clone() for p in model.parameters()]
    loss = opt.step(_closure(model, inputs, target, dtype))
    kinds, _ = AVERAGED[name]
    assert math.isfinite(float(loss)) and opt.last.activation_calls == sum(kinds.values())
    assert opt.last.fallback_fraction is not None and 0.0 <= opt.last.fallback_fraction <= 1.0
    assert all(torch.isfinite(p).all() for p in model.parameters()) and max_diff(model.parameters(), before) > 0

    model = build(name)
    opt = CSGD(model, lr=0.1, lam=LAM)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=dtype):
        logits = model(*inputs).logits
    assert logits.dtype == dtype
    F.cross_entropy(logits.float(), target).backward()
    opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters()) and max_diff(model.parameters(), before) > 0
    rep = _assert_report_covers(opt, model, name)
    assert {e.parts[0].form for e in rep if e.preconditioned} == {"D×D", "M×M"}


def test_fp16_autocast_c_sgd_step_on_bert_without_a_scaler():
    """BERT's attention query/key weight gradients are about 1e-6 at init, in fp16's subnormal range: under fp16
    autocast without a GradScaler the M × M check raised "its gradient is not ΔZ·Xᵀ" (a Linear-level test:
    test_coptim_discovery.py::test_fp16_mxm_check_judges_subnormal_gradients_at_fp16_spacing)."""
    model = build("bert")
    inputs, target = batch("bert")
    opt = CSGD(model, lr=0.1, lam=LAM)
    before = [p.detach().clone() for p in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        loss = loss_of(model, inputs, target)
    with pytest.warns(UserWarning, match="tied"):
        loss.backward()
        opt.step()
    assert all(torch.isfinite(p).all() for p in model.parameters()) and max_diff(model.parameters(), before) > 0
    rep = _assert_report_covers(opt, model, "bert")
    assert rep.by_name["bert.encoder.layer.0.attention.self.query.weight"].parts[0].form == "M×M"
