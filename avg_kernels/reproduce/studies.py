"""The four studies: paper 003 §5.3 (p003-mlp) and §5.4 (p003-resnet), paper 000's Model B (p000-model-b),
paper 002's AG-1/AG-2 metrics (p002-ag). Each is data for ``engine``: settings, budgets, rate grids."""
from __future__ import annotations

import torch

from ..data import Split
from . import methods as M
from .engine import Setting, Study
from .methods import Method
from .models import mlp, model_a, model_b, resnet
from .train import Budget


# -- inputs ------------------------------------------------------------------------------------------
def _flat(s: Split) -> Split:
    return Split(s.x.reshape(len(s.y), -1), s.y)


def _standardise(train: Split, test: Split) -> tuple[Split, Split]:
    """Each feature to zero mean and unit variance on the training split (constant features: 0)."""
    mu, sd = train.x.mean(0, keepdim=True), train.x.std(0, keepdim=True)
    sd = torch.where(sd > 0, sd, torch.ones_like(sd))
    return Split((train.x - mu) / sd, train.y), Split((test.x - mu) / sd, test.y)


def _affine(train: Split, test: Split, lo: float, hi: float) -> tuple[Split, Split]:
    """[0, 1] inputs mapped to [lo, hi]."""
    return Split(lo + (hi - lo) * train.x, train.y), Split(lo + (hi - lo) * test.x, test.y)


# -- p003-mlp ----------------------------------------------------------------------------------------
def _p003_mlp(preset: str, info: dict) -> list[Setting]:
    width = {"quick": 256, "smoke": 16, "full": 800}[preset]
    out = []
    for key, title, lam, prep in (
            ("01", "inputs in [0, 1], λ = 1e-3", 1e-3, lambda tr, te: (_flat(tr), _flat(te))),
            ("std", "standardised features (NF), λ = 1e-2", 1e-2, lambda tr, te: _standardise(_flat(tr), _flat(te)))):
        methods = [Method("sgd", M.plain("sgd"), "sgd"), Method("csgd", M.consequentialism("sgd", lam), "csgd", "sgd")]
        d = info["pixels"]
        out.append(Setting(key, f"8 hidden ReLU layers × {width}, batch 32, {title}", methods,
                           lambda m, d=d: mlp(d, width, 8, info["classes"]),
                           lambda tr, te, m, prep=prep: prep(tr, te),
                           tune={"sgd": ("sgd", [0.01, 0.03, 0.1, 0.3]), "csgd": ("csgd", [0.1, 0.3, 1.0, 2.0, 4.0])}))
    return out


P003_MLP = Study(
    "p003-mlp", "Paper 003 §5.3: C-SGD vs SGD on an 8-hidden-layer ReLU MLP",
    "C-SGD optimises faster than SGD from the beginning, per iteration, in both input settings (Fig. 5); per "
    "second it stays competitive on CIFAR and is about equal on Fashion-MNIST.",
    {"quick": Budget(epochs=30, batch=32, evals=30), "full": Budget(epochs=100, batch=32, evals=100),
     "smoke": Budget(epochs=1, batch=32, evals=1, max_steps=2)},
    _p003_mlp)


# -- p003-resnet -------------------------------------------------------------------------------------
_RESNET_LAM, _RESNET_MOM = 0.03, 0.95


def _p003_resnet(preset: str, info: dict) -> list[Setting]:
    blocks, widths = {"quick": (1, (8, 16, 32)), "smoke": (1, (4, 4, 4)), "full": (3, (16, 32, 64))}[preset]
    c = dict(lam=_RESNET_LAM, last_lr_mult=0.1)
    methods = [
        Method("csgd", M.consequentialism("sgd", momentum=_RESNET_MOM, **c), "csgd", "sgd", tags={"c": True}),
        Method("cnesterov", M.consequentialism("nesterov", momentum=_RESNET_MOM, **c), "cnesterov", "nesterov",
               tags={"c": True}),
        Method("cadam", M.consequentialism("adam", **c), "cadam", "adam", tags={"c": True}),
        Method("sgd", M.plain("sgd", _RESNET_MOM), "sgd"),
        Method("nesterov", M.plain("nesterov", _RESNET_MOM), "nesterov"),
        Method("adam", M.plain("adam"), "adam"),
        Method("sgd-bn", M.plain("sgd", _RESNET_MOM), "sgd-bn", tags={"bn": True}),
        Method("nesterov-bn", M.plain("nesterov", _RESNET_MOM), "nesterov-bn", tags={"bn": True}),
        Method("adam-bn", M.plain("adam"), "adam-bn", tags={"bn": True}),
    ]
    depth = 6 * blocks + 2
    grids = {"sgd": [0.003, 0.01, 0.03, 0.1, 0.3], "adam": [1e-3, 3e-3, 1e-2, 3e-2], "c": [0.03, 0.1, 0.3, 1.0, 3.0]}
    tune = {m.name: (m.name, grids["c"] if m.tags.get("c") else grids["adam" if "adam" in m.name else "sgd"])
            for m in methods}
    return [Setting("resnet", f"ResNet-{depth} (widths {widths}), batch 128, λ = 0.03, momentum 0.95; C-methods without "
                    "BN on [−0.5, 0.5] inputs with lr × 0.1 on the final layer, plain methods on [−1, 1]", methods,
                    lambda m: resnet(blocks, widths, batchnorm=bool(m.tags.get("bn")), classes=info["classes"]),
                    lambda tr, te, m: _affine(tr, te, -0.5, 0.5) if m.tags.get("c") else _affine(tr, te, -1.0, 1.0),
                    tune=tune)]


P003_RESNET = Study(
    "p003-resnet", "Paper 003 §5.4 in small: C-SGD / C-Nesterov / C-Adam (no BN) vs SGD / Nesterov / Adam with and "
    "without BN on a CIFAR-style ResNet",
    "Without BN, C-SGD and C-Nesterov beat SGD and Nesterov (per iteration and per second); C-Adam does not change "
    "Adam's outcome; SGD with BN is about equal to C-SGD per second and crosses it late in training (Figs. 6-7).",
    {"quick": Budget(epochs=20, batch=128, evals=20), "full": Budget(epochs=200, batch=128, evals=100),
     "smoke": Budget(epochs=1, batch=128, evals=1, max_steps=2)},
    _p003_resnet)


# -- p000-model-b ------------------------------------------------------------------------------------
def _p000(preset: str, info: dict) -> list[Setting]:
    layers = {"quick": 27, "smoke": 3, "full": 27}[preset]
    methods = [Method("rmsprop", M.plain("rmsprop"), "rmsprop")]
    methods += M.ag_methods("rmsprop", ("ag1",), "rmsprop", agn=5, suffix=" @RMSProp's rate")
    methods += M.ag_methods("rmsprop", ("ag1",), "ag1", agn=5, suffix=" @own rate", agn_rate="agn")
    grid = [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]  # the same grid for every method: no method is favoured
    tune = {"rmsprop": ("rmsprop", grid), "ag1": ("ag1/rmsprop @own rate", grid),
            "agn": ("ag5-iter/rmsprop @own rate", grid)}
    return [Setting("model-b", f"Model B: 2 ELU convs + {layers} Linear(·, 10) + Tanh layers + Linear, Glorot uniform "
                    "gain 5/3, batch 128", methods,
                    lambda m: model_b(info["side"], layers, classes=info["classes"]), lambda tr, te, m: (tr, te), tune)]


P000_MODEL_B = Study(
    "p000-model-b", "Paper 000 Model B: RMSProp vs AG two-iteration (AG-1) and n-iteration over RMSProp",
    "MNIST, AG at its own rate (≈ 3× RMSProp's): RD = 10.41 ± 1.94 (two iterations), 1.43 ± 0.29 (five); about 3× "
    "the sample efficiency (median training loss). At RMSProp's best rate: RD between 0.06 and 1.07. Appendix I "
    "(Glorot gain 5/3): RMSProp's best loss in 125 epochs reached by two iterations in 50 (> 2.5×).",
    {"quick": Budget(epochs=100, batch=128, evals=50), "full": Budget(epochs=125, batch=128, evals=125),
     "smoke": Budget(epochs=1, batch=128, evals=1, max_steps=2)},
    _p000)


# -- p002-ag -----------------------------------------------------------------------------------------
def _p002(preset: str, info: dict) -> list[Setting]:
    layers = {"quick": 27, "smoke": 3, "full": 27}[preset]
    out = []
    for key, title, make in (("model-b", f"Model B ({layers} tanh layers, Glorot gain 5/3)",
                              lambda m: model_b(info["side"], layers, classes=info["classes"])),
                             ("model-a", "Model A (six ELU convs + Linear)",
                              lambda m: model_a(info["side"], classes=info["classes"]))):
        methods = [Method("rmsprop", M.plain("rmsprop", track_step=True), "rmsprop"),
                   Method("adam", M.plain("adam", track_step=True), "adam")]
        for base in ("rmsprop", "adam"):
            methods += M.ag_methods(base, ("ag1", "ag2"), base, track_step=True, linear=True)
        out.append(Setting(key, f"{title}, batch 128; AG at its base's tuned rate", methods, make,
                           lambda tr, te, m: (tr, te),
                           tune={"rmsprop": ("rmsprop", [3e-4, 1e-3, 3e-3, 1e-2]),
                                 "adam": ("adam", [3e-4, 1e-3, 3e-3, 1e-2])}))
    return out


P002_AG = Study(
    "p002-ag", "Paper 002: AG-1 / AG-2 (and Linear variants) over RMSProp and Adam on Models A and B",
    "Deep models: AG-1/AG-2 improve the batch-loss reduction at matched step length by 2.2 %–38.5 % over every base "
    "(Tabs. 2-5); sample efficiency is mixed (AG-1 over RMSProp on Model B: > 4.5×); shallow Model A: about equal.",
    {"quick": Budget(epochs=20, batch=128, evals=20), "full": Budget(epochs=100, batch=128, evals=100),
     "smoke": Budget(epochs=1, batch=128, evals=1, max_steps=2)},
    _p002)


STUDIES = {s.name: s for s in (P003_MLP, P003_RESNET, P000_MODEL_B, P002_AG)}
