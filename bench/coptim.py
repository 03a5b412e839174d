"""Benchmark of one C-SGD training step (SPEC §3, ``avg_kernels.optim.CSGD``) against one SGD step.

A step = ``zero_grad`` + forward + backward + ``step()`` on a fixed batch, float32, for

* the demo CNN (``avg_kernels.demo.model.model_b``, depth 4: paper 000's Model B on 8x8 digits), batch 64;
* a ResNet-18-shaped CNN (BasicBlocks [2, 2, 2, 2], widths 64-512, BatchNorm, 7x7/2 stem + max-pool),
  3x64x64 inputs, 10 classes, batch 32: conv1 and layer1-2 have M = N·H·W >= D (D x D form), layer3-4 and
  the classifier M < D (M x M form);
* a MobileNet-style CNN (MobileNet v1's depthwise-separable blocks: 3x3 depthwise conv with groups =
  channels, D = 9 per group, + BatchNorm + ReLU, then a 1x1 pointwise conv + BatchNorm + ReLU; widths
  32-512, a 3x3/2 stem), 3x64x64 inputs, batch 32 (issue 12 item 5: the depthwise Grams).

Implementations (timed interleaved):

* ``sgd``: torch.optim.SGD(momentum=0.9);
* ``csgd``: CSGD(momentum=0.9, lam=1e-3), the factorisation refreshed every step (the paper's method);
* ``csgd refresh/k``: CSGD(refresh_every=k) (k = 10 for the demo CNN, 5 (quick) or 10 (full) for the
  ResNet); one timed call runs k consecutive steps (a whole refresh cycle), the time shown is per step;
* breakdown of one C-SGD step (each replayed alone with the inputs captured from a real step):
  ``part: fwd+bwd+hooks`` (zero_grad, forward with the collection hooks incl. Gram ops, backward),
  ``part: Grams`` (the Gram op calls only), ``part: precondition`` (``CSGD.precondition_``: gradient
  matrices, M x M products, the ridge_solve calls, write-back; includes restoring the gradients),
  ``part: ridge_solve`` (the ridge_solve calls only: symmetrise, check, factorise, solve) and
  ``part: Cholesky factorisations`` (``torch.linalg.cholesky_ex`` of the same matrices + λI: the
  factorisation share, measured with LAPACK).
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

if __name__ == "__main__" and not __package__:  # run as a script: python bench/coptim.py [options]
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels as ak
from avg_kernels.demo.model import model_b

from bench.harness import Context, Report, Row, add_ratios

NAME = "coptim"
LAM = 1e-3


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.down is None else self.down(x)))


def resnet18(classes: int = 10) -> nn.Module:
    """ResNet-18's layer shapes (He et al. 2016; torchvision's resnet18 without pretrained weights)."""
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def _separable(cin: int, cout: int, stride: int) -> list:
    return [nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin), nn.ReLU(),
            nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


def mobilenet(classes: int = 10) -> nn.Module:
    """MobileNet v1's layer pattern (Howard et al. 2017) at reduced depth: a 3x3/2 stem, seven depthwise-
    separable blocks (widths 32-512), global pooling, a Linear head."""
    layers = [nn.Conv2d(3, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU()]
    for cin, cout, stride in ((32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1),
                              (256, 512, 2), (512, 512, 1)):
        layers += _separable(cin, cout, stride)
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, classes)]
    return nn.Sequential(*layers)


def _models(mode: str):
    """name -> (factory, input shape, batch, k for the refresh-every-k variant, seconds per measurement).

    The demo CNN's steps take milliseconds on a shared, noisy machine: its measurements get 4 s each (about
    25 calls of k steps in 3 interleaved rounds) instead of the runner's default."""
    return {
        "demo CNN (model_b, depth 4)": (lambda: model_b(image_size=8, depth=4), (1, 8, 8), 64, 10, 4.0),
        "ResNet-18-shaped CNN": (resnet18, (3, 64, 64), 32, 5 if mode == "quick" else 10, None),
        "MobileNet-style CNN (depthwise-separable)": (mobilenet, (3, 64, 64), 32, 5 if mode == "quick" else 10, None),
    }


def add_arguments(group) -> None:
    group.add_argument("--coptim-models", default=None, help="comma-separated subset of: demo, resnet, mobilenet")


def _trainer(model, opt, x, y):
    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def _capture(opt, model, x, y):
    """One real C-SGD step, recording the Gram and ridge_solve calls, the statistics and gradients that
    precondition_ consumed; returns replay functions for the breakdown."""
    grams, solves = [], []
    collector, preconditioner = opt._collector, opt._preconditioner
    gram, solve = collector.gram, preconditioner.solve
    collector.gram = lambda layer, xx, bias: grams.append((layer, xx, bias)) or gram(layer, xx, bias)
    preconditioner.solve = lambda G, A, lam: solves.append((G.clone(), A.clone(), lam)) or solve(G, A, lam)
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    stats = dict(collector.stats)
    grads = [(p, p.grad.clone()) for p in model.parameters() if p.grad is not None]
    opt.precondition_()
    del collector.gram, preconditioner.solve  # the methods again

    def fwd_bwd():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.clear_statistics()

    def run_grams():
        for layer, xx, bias in grams:
            gram(layer, xx, bias)

    def precondition():
        for p, g in grads:
            p.grad.copy_(g)
        collector.stats = dict(stats)
        opt.precondition_()

    def run_solves():
        for G, A, lam in solves:
            solve(G, A, lam)

    factor_inputs = []
    for G, A, lam in solves:
        eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
        factor_inputs.append(((A + A.mT) / 2 + lam * eye).contiguous())

    def run_factorisations():
        for B in factor_inputs:
            torch.linalg.cholesky_ex(B)

    info = {
        "grams": len(grams), "ridge_solve_calls": len(solves),
        "ridge_solve_shapes": [f"G{tuple(G.shape)} A{tuple(A.shape)}" for G, A, _ in solves],
    }
    return {"part: fwd+bwd+hooks": fwd_bwd, "part: Grams": run_grams, "part: precondition": precondition,
            "part: ridge_solve": run_solves, "part: Cholesky factorisations": run_factorisations}, info


def run(ctx: Context) -> Report:
    dev = ctx.device
    models = _models(ctx.mode)
    if getattr(ctx.args, "coptim_models", None):
        keys = [k.strip() for k in ctx.args.coptim_models.split(",")]
        models = {n: v for n, v in models.items() if any(n.lower().startswith(k) for k in keys)}
        if not models:
            raise SystemExit("--coptim-models: expected some of demo, resnet, mobilenet")
    rows: list[Row] = []
    notes_extra = []
    bar = ctx.bar(len(models), f"{NAME} on {dev.type}")
    for name, (factory, shape, batch, k, seconds) in models.items():
        mctx = dataclasses.replace(ctx, min_run_time=max(ctx.min_run_time, seconds)) if seconds else ctx
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *shape, generator=gen).to(dev)
        y = torch.randint(0, 10, (batch,), generator=gen).to(dev)
        torch.manual_seed(0)
        base = factory().to(dev)
        nets = {key: factory().to(dev) for key in ("sgd", "csgd", "csgdk", "parts")}
        for net in nets.values():
            net.load_state_dict(base.state_dict())
        sgd = _trainer(nets["sgd"], torch.optim.SGD(nets["sgd"].parameters(), lr=0.01, momentum=0.9), x, y)
        csgd = _trainer(nets["csgd"], ak.optim.CSGD(nets["csgd"], lr=0.01, lam=LAM, momentum=0.9), x, y)
        ck = _trainer(nets["csgdk"], ak.optim.CSGD(nets["csgdk"], lr=0.01, lam=LAM, momentum=0.9, refresh_every=k),
                      x, y)

        def cycle(f, n):
            def run_n():
                for _ in range(n):
                    f()

            return run_n

        # Every implementation runs k steps per timed call (a whole refresh cycle for csgd k=K): the same
        # per-call granularity for all, times divided by k below.
        fns = {"sgd": cycle(sgd, k), "csgd": cycle(csgd, k), "csgd refresh/k": cycle(ck, k)}
        parts_opt = ak.optim.CSGD(nets["parts"], lr=0.01, lam=LAM, momentum=0.9)
        parts, info = _capture(parts_opt, nets["parts"], x, y)
        common = dict(op=NAME, case=name, inputs=f"batch {batch}, input {shape}, float32, k = {k}", size=batch,
                      dtype="float32")
        measured = mctx.measure_many(fns, None, **common)
        for row in measured.values():
            if row.median_s:
                row.median_s /= k
                row.iqr_s = (row.iqr_s or 0) / k
                row.extra["steps_per_call"] = k
        measured.update(mctx.measure_many(parts, None, **common))
        rows += measured.values()
        t = {impl: r.median_s for impl, r in measured.items()}
        if t.get("sgd") and t.get("csgd"):
            notes_extra.append(
                f"{name}: C-SGD step / SGD step = {t['csgd'] / t['sgd']:.2f}x; with refresh every {k} steps "
                f"{t['csgd refresh/k'] / t['sgd']:.2f}x. One step made {info['grams']} Gram calls and "
                f"{info['ridge_solve_calls']} ridge_solve calls: {'; '.join(info['ridge_solve_shapes'])}.")
        bar.update(1)
    bar.close()
    add_ratios(rows, ["sgd"])
    subjects = ["csgd", "csgd refresh/k"]
    notes = [
        "Each time is one training step (zero_grad + forward + backward + optimizer step) on a fixed batch, median "
        "over blocks of k consecutive steps divided by k (k = the refresh period of the `csgd refresh/k` row), or one "
        "replayed component of a C-SGD step (`part: ...`, see bench/coptim.py). `X vs sgd` = time(sgd) / time(X): "
        "the C-SGD / SGD time ratio is its inverse (listed below).",
        "`part: Cholesky factorisations` times torch.linalg.cholesky_ex of the same matrices (+λI) as the step's "
        "ridge_solve calls: the factorisation share. On CPU, ridge_solve factorises systems of D <= 256 in its own "
        "fused per-system kernel, larger ones with LAPACK; `part: ridge_solve` minus this row approximates the "
        "triangular solves + checks + dispatch.",
        *notes_extra,
    ]
    title = f"C-SGD step vs SGD step (forward + backward + step), {dev.type.upper()}, {ctx.mode}"
    return Report(op=NAME, title=title, rows=rows, subjects=subjects, peers=["sgd"], notes=notes,
                  config={"lam": LAM, "models": list(models)})


if __name__ == "__main__":
    from bench.runner import main

    sys.exit(main(["--ops", NAME, *sys.argv[1:]]))
