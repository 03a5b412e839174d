"""The rank processes of tests/test_ddp.py: one gloo process group (2 ranks on CPU), every check run in turn.

Each check runs on every rank (the collectives must match), returns None or raises; ``main`` records "ok" or
the traceback per check in ``<out>/rank<r>.json``. Models are float64 so that "equal to one process on the
concatenated batch" can be checked tightly (the sums run in another order: equal to rounding only).
"""
from __future__ import annotations

import copy
import json
import math
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

# ----------------------------------------------------------------------------------------------------------
# Models (no BatchNorm unless named) and data.


def mlp():
    """Linear(6 -> 16) tanh Linear(16 -> 16) sigmoid Linear(16 -> 3). C-optimizers with 4 rows per rank (8 in
    all): the first layer (D = 7) takes the D × D form from kept inputs (local M = 4 < 7 <= global M = 8), the
    others (D = 17) the M × M form."""
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Sigmoid(), nn.Linear(16, 3))


class CNN(nn.Module):
    """conv1 (2 -> 4, 3x3, padding 1, on 6x6: D = 19, M = 36 per sample: D × D), conv2 (4 -> 4, 3x3, stride 2:
    D = 37, M = 9 per sample: M × M with 2 samples per rank, 36 < 37 in all), fc (36 -> 3: M × M)."""

    def __init__(self, bn: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.conv2 = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.fc = nn.Linear(36, 3)
        self.act1, self.act2 = nn.Tanh(), nn.ELU()

    def forward(self, x):
        h = self.act1(self.bn(self.conv1(x)))
        h = self.act2(self.conv2(h))
        return self.fc(h.flatten(1))


class Branchy(nn.Module):
    """a (6 -> 16), then ``extra`` (16 -> 16) only where ``branch`` (rank 0 in the runs: rank 1 never uses it, so
    its gradient is absent there and its statistics empty), then b (16 -> 3)."""

    def __init__(self):
        super().__init__()
        self.a, self.extra, self.b = nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 3)
        self.act, self.act2 = nn.Tanh(), nn.Sigmoid()

    def forward(self, x, branch: bool = True):
        h = self.act(self.a(x))
        if branch:
            h = self.act2(self.extra(h))
        return self.b(h)


def gelu_tanh_hf(h):
    """HF NewGELU written by hand (AG recognises it as one tanh-GELU: a compound form)."""
    return 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))


FN_ACTIVATIONS = 4  # FnNet's averaged activations per forward (a compound counts once)


class FnNet(nn.Module):
    """Linear layers with functional activations only (for AG unconverted): F.silu, torch.tanh, the hand-written
    tanh-GELU (compound) and x * sigmoid(x) (compound SiLU)."""

    def __init__(self):
        super().__init__()
        self.l = nn.ModuleList([nn.Linear(6, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16)])
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        h = F.silu(self.l[0](x))
        h = torch.tanh(self.l[1](h))
        h = gelu_tanh_hf(self.l[2](h))
        h = self.l[3](h)
        return self.out(h * torch.sigmoid(h))


class Conv1D(nn.Module):
    """HF GPT-2's Conv1D as written there: weight (in, out), addmm (found by the C-optimizers' functional path)."""

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_in, n_out) * 0.3)
        self.bias = nn.Parameter(torch.randn(n_out) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return out.view(*x.size()[:-1], self.weight.size(-1))


class AttnNet(nn.Module):
    """Self-attention, Conv1D + tanh, attention with distinct q / k / v (batch_first, E = 8: D = 9 for every
    in_proj slice, out_proj and Conv1D), the mean over the T = 3 positions, Linear(8 -> 3). Every layer is found
    by the C-optimizers' functional path (the in_proj_weight row slices by F.linear inside
    F.multi_head_attention_forward)."""

    def __init__(self):
        super().__init__()
        self.att1 = nn.MultiheadAttention(8, 2, batch_first=True)
        self.proj = Conv1D(8, 8)
        self.att2 = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.att1(x, x, x, need_weights=False)[0]
        g = torch.tanh(self.proj(h.contiguous()))  # batch_first MHA returns a transposed view
        h = self.att2(g, x, h, need_weights=False)[0]
        return self.head(h.mean(1))


class BranchyFn(Branchy):
    """Branchy with HF-style Conv1D layers (found by the functional path at the forward that first uses them:
    ``extra`` on the ranks that take the branch only)."""

    def __init__(self):
        super().__init__()
        self.a, self.extra, self.b = Conv1D(6, 16), Conv1D(16, 16), Conv1D(16, 3)


class BranchyRole(BranchyFn):
    """BranchyFn whose branch also uses b's weight outside a linear map (a second role: b is left to the base)."""

    def forward(self, x, branch: bool = True):
        h = torch.tanh(self.a(x))
        if branch:
            h = torch.sigmoid(self.extra(h)) + 0.01 * self.b.weight.sum()
        return self.b(h)


MODELS = {"mlp": (mlp, (6,)), "cnn": (CNN, (2, 6, 6)), "cnn_bn": (lambda: CNN(bn=True), (2, 6, 6)),
          "branchy": (Branchy, (6,)), "fn": (FnNet, (6,)), "attn": (AttnNet, (3, 8)),
          "branchy_fn": (BranchyFn, (6,)), "branchy_role": (BranchyRole, (6,))}


def forward_rank(kind: str, model, x, rank: int, branch=None):
    """This rank's forward (Branchy: the branch where ``branch(rank)``, default on rank 0 only)."""
    if kind.startswith("branchy"):
        return model(x, branch=rank == 0 if branch is None else branch(rank))
    return model(x)


def forward_all(kind: str, model, x, parts, branch=None):
    """The single process's forward of the concatenated batch (Branchy: each rank's part as that rank runs it)."""
    if kind.startswith("branchy"):
        return torch.cat([forward_rank(kind, model, xp, r, branch) for r, (xp, _) in enumerate(parts)])
    return model(x)


def batches(kind: str, sizes: list, steps: int, dtype=torch.float64):
    """Per step: (the concatenated batch x, y; each rank's (x, y) slice); equal on every rank (fixed seed)."""
    shape = MODELS[kind][1]
    g = torch.Generator().manual_seed(123)
    out = []
    for _ in range(steps):
        n = sum(sizes)
        x = torch.randn(n, *shape, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (n,), generator=g)
        parts, start = [], 0
        for s in sizes:
            parts.append((x[start:start + s], y[start:start + s]))
            start += s
        out.append((x, y, parts))
    return out


def build(kind: str, convert: bool, dtype=torch.float64):
    import avg_kernels as ak

    torch.manual_seed(0)
    model = MODELS[kind][0]().to(dtype)
    if convert:
        ak.nn.convert(model, warn=False)
    return model


def flat_params(model) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def same_on_every_rank(t: torch.Tensor, what: str) -> None:
    got = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(got, t)
    for r, other in enumerate(got):
        if not torch.equal(other, t):
            diff = (other - t).abs().max().item()
            raise AssertionError(f"{what}: rank {r} differs from rank {dist.get_rank()} (max |diff| {diff:.3g})")


def close(a: torch.Tensor, b: torch.Tensor, what: str, rtol=1e-9, atol=1e-12) -> None:
    if not torch.allclose(a, b, rtol=rtol, atol=atol):
        raise AssertionError(f"{what}: max |diff| {(a - b).abs().max().item():.3g} (rtol {rtol}, atol {atol})")


def close_up_to_sign_flips(model, ref, step: int, rtol=1e-9, atol=1e-12, tiny=1e-9) -> int:
    """AG-1: θ − |θ' − θ| sign(ḡ): an element whose ḡ is at rounding level may take the other sign in the two
    runs. Elements that differ (beyond ``rtol``, ``atol``) must be such elements (|ḡ| <= ``tiny`` max|ḡ| of
    their tensor in the reference), and few (<= 1%); returns their number. The reference is then set to the
    DDP run's parameters, so that one flip does not spread into the next steps."""
    flips, total = 0, 0
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        bad = ~torch.isclose(p.detach(), q.detach(), rtol=rtol, atol=atol)
        total += p.numel()
        if bad.any():
            gbar = q.grad.abs()
            small = gbar <= tiny * gbar.max()
            if not bool(small[bad].all()):
                raise AssertionError(f"step {step}: {name} differs from the single process where ḡ is not at "
                                     f"rounding level (max |diff| {(p - q).abs()[bad & ~small].max().item():.3g})")
            flips += int(bad.sum())
        with torch.no_grad():
            q.copy_(p)
    if flips > 0.01 * total:
        raise AssertionError(f"step {step}: {flips} of {total} elements differ (sign flips of rounding-level ḡ)")
    return flips


# ----------------------------------------------------------------------------------------------------------
# The checks.


def check_ag(mode: str, kind: str, sizes=(3, 3), steps: int = 3, find_unused: bool = False,
             dtype=torch.float64, convert: bool = True, **options) -> None:
    """AG over DDP: parameters bitwise equal on every rank after each step, and equal to one process on the
    concatenated batch (mean loss with equal batches; with unequal ones the sum divided by the world size,
    which is what averaging the ranks' gradients of their sums is). ``convert=False``: the model as written
    (functional activations averaged by AG's activation mode); ``options``: more AG arguments (iterations,
    linear)."""
    from avg_kernels.optim import AG

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(kind, convert=convert, dtype=dtype)
    ref = copy.deepcopy(model)
    ddp = DDP(model, find_unused_parameters=find_unused or kind == "branchy")
    tol = {} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    opt = AG(ddp, torch.optim.RMSprop(ddp.parameters(), lr=1e-2), mode=mode, **options)
    ropt = AG(ref, torch.optim.RMSprop(ref.parameters(), lr=1e-2), mode=mode, **options)
    equal = len(set(sizes)) == 1

    def loss_fn(out, y, parts):
        return F.cross_entropy(out, y) if equal else F.cross_entropy(out, y, reduction="sum") / parts

    for t, (x, y, parts) in enumerate(batches(kind, list(sizes), steps, dtype)):
        xr, yr = parts[rank]
        opt.step(lambda: loss_fn(forward_rank(kind, ddp, xr, rank), yr, 1))
        ropt.step(lambda: loss_fn(forward_all(kind, ref, x, parts), y, world))
        same_on_every_rank(flat_params(model), f"{mode} {kind}: parameters after step {t}")
        same_on_every_rank(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]),
                           f"{mode} {kind}: the gradient (ḡ) of step {t}")
        if "bn" in kind:
            continue  # per-rank batch statistics: not the single process's
        if mode in ("ag1", "agn"):  # both step by sign(ḡ)
            close_up_to_sign_flips(model, ref, t, **tol, tiny=1e-9 if dtype == torch.float64 else 1e-4)
        else:
            close(flat_params(model), flat_params(ref), f"{mode} {kind}: step {t} vs one process", **tol)
        if opt.last.plain is not ropt.last.plain or opt.last.activation_calls == 0 and not opt.last.plain:
            raise AssertionError(f"{mode}: step {t} record {opt.last.as_dict()}")
        if kind == "fn" and not opt.last.plain and opt.last.activation_calls != FN_ACTIVATIONS:
            raise AssertionError(f"{mode} fn: {opt.last.activation_calls} activations averaged in step {t}, expected "
                                 f"{FN_ACTIVATIONS} (silu, tanh and the two compounds)")
    if "bn" in kind:  # each step starts from rank 0's buffers (BatchNorm statistics and count), as DDP's forward does
        before = [b.clone() for b in model.buffers()]
        opt._replicas.broadcast_buffers()
        same_on_every_rank(torch.cat([b.double().reshape(-1) for b in model.buffers()]), "buffers after the broadcast")
        if rank == 0 and not all(torch.equal(a, b) for a, b in zip(before, model.buffers())):
            raise AssertionError("the broadcast changed rank 0's buffers")


def check_copt(name: str, kind: str, sizes=(4, 4), steps: int = 3, expect: dict = None, clip: float = 0.0,
               refresh_every: int = 1, branch=None) -> None:
    """C-SGD / C-Adam over DDP: bitwise equal parameters on every rank, equal to one process; ``expect``: the
    form (dxd / mxm) each layer must take in the run over DDP; ``clip``: clip the gradient norm to that
    (the M × M form then applies a uniform factor, found by a random probe that must be equal on every
    rank for the parameters to stay bitwise equal)."""
    from avg_kernels.optim import CAdam, CSGD

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(kind, convert=False)
    ref = copy.deepcopy(model)
    ddp = DDP(model, find_unused_parameters=kind.startswith("branchy"))
    make = {"csgd": lambda m: CSGD(m, lr=0.05, lam=1e-2, momentum=0.9, refresh_every=refresh_every),
            "cadam": lambda m: CAdam(m, lr=1e-2, lam=1e-2, refresh_every=refresh_every)}[name]
    opt, ropt = make(ddp), make(ref)
    forms = {}
    inner = opt._replicas.global_stats

    def spy(*a, **k):
        stats, bad = inner(*a, **k)
        for layer, st in (stats or {}).items():
            forms[layer.name.removeprefix("module.")] = "mxm" if st.X is not None else "dxd"
        return stats, bad

    opt._replicas.global_stats = spy
    torch.manual_seed(1000 + rank)  # the ranks' default generators differ from here on (as with per-rank seeds)
    equal = len(set(sizes)) == 1
    for t, (x, y, parts) in enumerate(batches(kind, list(sizes), steps)):
        xr, yr = parts[rank]
        opt.zero_grad()
        ropt.zero_grad()
        br = None if branch is None else (lambda r, t=t: branch(t, r))
        if equal:
            F.cross_entropy(forward_rank(kind, ddp, xr, rank, br), yr).backward()
            F.cross_entropy(forward_all(kind, ref, x, parts, br), y).backward()
        else:
            F.cross_entropy(forward_rank(kind, ddp, xr, rank, br), yr, reduction="sum").backward()
            (F.cross_entropy(forward_all(kind, ref, x, parts, br), y, reduction="sum") / world).backward()
        if clip:
            for m in (model, ref):
                if float(torch.nn.utils.clip_grad_norm_(m.parameters(), clip)) <= clip:
                    raise AssertionError("the clipping test needs a gradient norm above the clip")
        opt.step()
        ropt.step()
        same_on_every_rank(flat_params(model), f"{name} {kind}: parameters after step {t}")
        same_on_every_rank(torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None]),
                           f"{name} {kind}: preconditioned gradients of step {t}")  # before rounding into θ
        close(flat_params(model), flat_params(ref), f"{name} {kind} {sizes}: step {t} vs one process", rtol=1e-8,
              atol=1e-10)
    if expect is not None and forms != expect:
        raise AssertionError(f"{name} {kind}: forms {forms}, expected {expect}")
    if kind == "attn":  # found at the first forward inside DDP's: the same layers, in the same order, on every rank
        found = [layer.name.removeprefix("module.") for layer in opt._all_layers()]
        names_on_every_rank(found, f"{name} attn: the layers found")
        if sorted(found) != sorted(ATTN_LAYERS):
            raise AssertionError(f"{name} attn: layers found {found}, expected {ATTN_LAYERS}")
        rep = opt.report()
        missed = [e.name for e in rep if not e.preconditioned]
        if missed:
            raise AssertionError(f"{name} attn: not preconditioned: {missed}\n{rep}")


def names_on_every_rank(names: list, what: str) -> None:
    """Raises unless every rank has the same list of names."""
    got = [None] * dist.get_world_size()
    dist.all_gather_object(got, names)
    if any(g != names for g in got):
        raise AssertionError(f"{what}: per rank {got}")


# self-attention: one F.linear over the packed in_proj_weight; distinct q / k / v: one per row slice
ATTN_LAYERS = (["att1.in_proj_weight", "att1.out_proj.weight", "proj.weight"]
               + [f"att2.in_proj_weight[{a}:{a + 8}]" for a in (0, 8, 16)] + ["att2.out_proj.weight", "head"])


def attn_forms(d: int) -> dict:
    """AttnNet's forms with ``d`` rows per rank (T = 3 positions each): the D = 9 layers on positions take the
    D × D form once the global 2 × 3 d >= 9, the head (one row per sample) the M × M form."""
    return {**{n: "dxd" if 2 * 3 * d >= 9 else "mxm" for n in ATTN_LAYERS[:-1]}, "head": "mxm"}


def check_copt_amp(name: str, steps: int = 3, skip_at: int = 1) -> None:
    """C-SGD / C-Adam over DDP under fp16 autocast with torch.amp.GradScaler("cpu") (scaler.step(opt)): bitwise
    equal parameters on every rank; at step ``skip_at`` rank 1's loss alone is infinite: the averaged gradient
    is non-finite on every rank, every rank skips (parameters unchanged, the step's statistics dropped); the
    other steps equal to one process on the concatenated batch to fp16 rounding."""
    from avg_kernels.optim import CAdam, CSGD

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build("mlp", convert=False, dtype=torch.float32)
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    make = {"csgd": lambda m: CSGD(m, lr=0.05, lam=1e-2, momentum=0.9),
            "cadam": lambda m: CAdam(m, lr=1e-2, lam=1e-2)}[name]
    opt, ropt = make(ddp), make(ref)
    scaler, rscaler = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2))
    for t, (x, y, parts) in enumerate(batches("mlp", [4, 4], steps, dtype=torch.float32)):
        xr, yr = parts[rank]
        skip = t == skip_at
        before = flat_params(model).clone()
        for m, o, sc, xx, yy in ((ddp, opt, scaler, xr, yr), (ref, ropt, rscaler, x, y)):
            if skip and m is ref:
                continue
            o.zero_grad()
            with torch.autocast("cpu", dtype=torch.float16):
                loss = F.cross_entropy(m(xx).float(), yy)
            if skip and rank == 1:
                loss = loss * float("inf")
            sc.scale(loss).backward()
            sc.step(o)
            sc.update()
        same_on_every_rank(flat_params(model), f"{name} amp: parameters after step {t}")
        if skip:
            if not (opt.skipped_steps == 1 and opt.steps == t and torch.equal(before, flat_params(model))
                    and opt._collector.stats == {}):
                raise AssertionError(f"{name} amp: rank {rank} did not skip step {t} (skipped {opt.skipped_steps}, "
                                     f"steps {opt.steps})")
            rscaler.update(scaler.get_scale())  # the reference follows the scale the skip halved
        else:
            close(flat_params(model), flat_params(ref), f"{name} amp: step {t} vs one process", rtol=2e-3, atol=1e-4)
    if opt.steps != steps - 1:
        raise AssertionError(f"{name} amp: {opt.steps} steps taken, expected {steps - 1}")


def check_ag_amp(mode: str, steps: int = 3, skip_at: int = 2) -> None:
    """AG over DDP under fp16 autocast with ``opt.step(closure, scaler=)`` (ag2, ag3-1): bitwise equal parameters
    on every rank; at step ``skip_at`` rank 1's scaled gradients alone overflow (its loss × 1e36): every rank skips;
    the other steps equal to one process to fp16 rounding (AG-2 / AG-3-1: AG-1's sign(ḡ) of rounding-level
    elements would differ at fp16 rounding)."""
    from avg_kernels.optim import AG

    rank = dist.get_rank()
    model = build("mlp", convert=True, dtype=torch.float32)
    ref = copy.deepcopy(model)
    ddp = DDP(model)
    opt = AG(ddp, torch.optim.Adam(ddp.parameters(), lr=1e-2), mode=mode)
    ropt = AG(ref, torch.optim.Adam(ref.parameters(), lr=1e-2), mode=mode)
    scaler, rscaler = (torch.amp.GradScaler("cpu", init_scale=2.0 ** 10) for _ in range(2))

    def loss_of(m, xx, yy, bump=1.0):
        with torch.autocast("cpu", dtype=torch.float16):
            return F.cross_entropy(m(xx).float(), yy) * bump

    for t, (x, y, parts) in enumerate(batches("mlp", [3, 3], steps, dtype=torch.float32)):
        xr, yr = parts[rank]
        skip = t == skip_at
        before = flat_params(model).clone()
        opt.step(lambda: loss_of(ddp, xr, yr, 1e36 if skip and rank == 1 else 1.0), scaler=scaler)
        scaler.update()
        same_on_every_rank(flat_params(model), f"{mode} amp: parameters after step {t}")
        if skip:
            if not (opt.last.skipped and torch.equal(before, flat_params(model))):
                raise AssertionError(f"{mode} amp: rank {rank} did not skip step {t}: {opt.last.as_dict()}")
            continue
        ropt.step(lambda: loss_of(ref, x, y), scaler=rscaler)
        rscaler.update()
        close(flat_params(model), flat_params(ref), f"{mode} amp: step {t} vs one process", rtol=2e-3, atol=1e-4)


MLP_FORMS = {"0": "dxd", "2": "mxm", "4": "mxm"}
BRANCHY_FN_FORMS = {"a.weight": "dxd", "extra.weight": "mxm", "b.weight": "mxm"}
CNN_FORMS = {"conv1": "dxd", "conv2": "mxm", "fc": "mxm"}


def raises(exc, text, fn):
    try:
        fn()
    except exc as e:
        if text not in str(e):
            raise AssertionError(f"expected {exc.__name__} mentioning {text!r}, got: {e}") from e
        return
    raise AssertionError(f"expected {exc.__name__} ({text!r}), nothing was raised")


def check_refusals() -> None:
    """What is not supported raises, at construction or at the first forward/step, naming it."""
    from torch.distributed.fsdp import fully_shard

    from avg_kernels.optim import AG, CSGD

    rank = dist.get_rank()
    x, y = batches("mlp", [3, 3], 1)[0][2][rank]
    # the plain module given while the closure runs the DDP model: refused at the first forward, nothing changed
    model = build("mlp", convert=True)
    ddp = DDP(model)
    before = flat_params(model).clone()
    opt = AG(ddp.module, torch.optim.SGD(model.parameters(), lr=0.1))
    raises(RuntimeError, "ddp.module", lambda: opt.step(lambda: F.cross_entropy(ddp(x), y)))
    if not torch.equal(before, flat_params(model)):
        raise AssertionError("AG(ddp.module): the refused step changed the parameters")
    model = build("mlp", convert=False)
    ddp = DDP(model)
    copt = CSGD(ddp.module, lr=0.1)
    raises(RuntimeError, "ddp.module", lambda: F.cross_entropy(ddp(x), y).backward())
    # DDP options AG cannot follow; wrappers that are not DDP; a DDP inside the model
    sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1)  # noqa: E731
    static = DDP(build("mlp", convert=True), static_graph=True)
    raises(ValueError, "static_graph", lambda: AG(static, sgd(static)))
    dp = nn.DataParallel(build("mlp", convert=True))
    raises(ValueError, "DataParallel", lambda: AG(dp, sgd(dp)))
    raises(ValueError, "DataParallel", lambda: CSGD(dp, lr=0.1))
    nested = nn.Sequential(DDP(build("mlp", convert=True)))
    raises(ValueError, "inside the model", lambda: AG(nested, sgd(nested)))
    raises(ValueError, "inside the model", lambda: CSGD(nested, lr=0.1))
    sharded = build("mlp", convert=True)
    fully_shard(sharded)
    raises(ValueError, "FSDP", lambda: AG(sharded, sgd(sharded)))
    raises(ValueError, "FSDP", lambda: CSGD(sharded, lr=0.1))
    del copt
    # the ranks' optimizers over different parameters or layers: refused at the first step, on every rank
    model = build("mlp", convert=True)
    ddp = DDP(model)
    params = list(ddp.parameters())
    opt = AG(ddp, torch.optim.SGD(params if rank == 0 else params[:-1], lr=0.1))
    raises(RuntimeError, "ranks disagree", lambda: opt.step(lambda: F.cross_entropy(ddp(x), y)))
    ddp = DDP(build("mlp", convert=False))
    copt = CSGD(ddp, lr=0.1, exclude=["module.4"] if rank == 1 else [])
    F.cross_entropy(ddp(x), y).backward()
    raises(RuntimeError, "ranks disagree", copt.step)


def check_nonfinite_agreement() -> None:
    """A non-finite loss on one rank only (its gradients finite): every rank skips the step, the parameters
    stay equal (without the agreement the other rank would go on into the next collective)."""
    from avg_kernels.optim import AG, CSGD

    rank = dist.get_rank()
    x, y = batches("mlp", [3, 3], 1)[0][2][rank]
    bump = float("inf") if rank == 1 else 0.0
    model = build("mlp", convert=True)
    ddp = DDP(model)
    opt = AG(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), mode="ag1", skip_nonfinite=True)
    before = flat_params(model).clone()
    opt.step(lambda: F.cross_entropy(ddp(x), y) + bump)
    if not (opt.last.skipped and opt.skipped_steps == 1 and torch.equal(before, flat_params(model))):
        raise AssertionError(f"AG: rank {rank} did not skip: {opt.last.as_dict()}")
    opt.step(lambda: F.cross_entropy(ddp(x), y))  # the next step runs on both ranks
    same_on_every_rank(flat_params(model), "AG after a skipped step")
    model = build("mlp", convert=False)
    ddp = DDP(model)
    copt = CSGD(ddp, lr=0.1, skip_nonfinite=True)
    loss = F.cross_entropy(ddp(x), y)
    loss.backward()
    copt.step(lambda: loss.detach() + bump)
    if copt.skipped_steps != 1 or copt.steps != 0:
        raise AssertionError(f"CSGD: rank {rank} did not skip")


CHECKS = {
    **{f"{m}-{k}": (lambda m=m, k=k: check_ag(m, k)) for m in ("ag1", "ag2", "ag3-1") for k in ("mlp", "cnn")},
    "ag1-mlp-find_unused": lambda: check_ag("ag1", "mlp", find_unused=True, steps=2),
    "ag2-mlp-unequal": lambda: check_ag("ag2", "mlp", sizes=(2, 4), steps=2),
    "ag2-cnn_bn": lambda: check_ag("ag2", "cnn_bn", sizes=(2, 2), steps=2),
    "csgd-mlp": lambda: check_copt("csgd", "mlp", expect=MLP_FORMS),
    "csgd-cnn": lambda: check_copt("csgd", "cnn", sizes=(2, 2), expect=CNN_FORMS),
    "cadam-mlp": lambda: check_copt("cadam", "mlp", expect=MLP_FORMS),
    "cadam-cnn": lambda: check_copt("cadam", "cnn", sizes=(2, 2), expect=CNN_FORMS),
    "csgd-mlp-unequal": lambda: check_copt("csgd", "mlp", sizes=(3, 5), expect=MLP_FORMS),
    "ag1-cnn-float32": lambda: check_ag("ag1", "cnn", dtype=torch.float32),
    "ag2-mlp-float32": lambda: check_ag("ag2", "mlp", dtype=torch.float32),
    "ag2-branchy": lambda: check_ag("ag2", "branchy", steps=2),
    "ag3-1-branchy": lambda: check_ag("ag3-1", "branchy", steps=3),
    # extra: M × M with no columns from rank 1; then D × D from rank 0's 18 rows and a zero Gram from rank 1
    "csgd-branchy": lambda: check_copt("csgd", "branchy", steps=2, expect={"a": "dxd", "extra": "mxm", "b": "mxm"}),
    "cadam-branchy-unequal": lambda: check_copt("cadam", "branchy", sizes=(18, 4), steps=2,
                                                expect={"a": "dxd", "extra": "dxd", "b": "dxd"}),
    "csgd-cnn-clipped": lambda: check_copt("csgd", "cnn", sizes=(2, 2), steps=2, expect=CNN_FORMS, clip=1e-2),
    "cadam-cnn-refresh2": lambda: check_copt("cadam", "cnn", sizes=(2, 2), steps=3, refresh_every=2),
    # AG on the model as written: functional and compound activations averaged by AG's activation mode
    "ag1-fn-unconverted": lambda: check_ag("ag1", "fn", convert=False),
    "ag3-1-fn-unconverted": lambda: check_ag("ag3-1", "fn", convert=False),
    "agn3-mlp": lambda: check_ag("agn", "mlp", iterations=3),
    "ag1-linear-mlp": lambda: check_ag("ag1", "mlp", linear=True),
    "agn3-fn-unconverted": lambda: check_ag("agn", "fn", convert=False, iterations=3, steps=2),
    # C-optimizers on layers found by their weight (MultiheadAttention slices, HF Conv1D's addmm)
    "csgd-attn-dxd": lambda: check_copt("csgd", "attn", sizes=(2, 2), steps=2, expect=attn_forms(2)),
    "cadam-attn-mxm": lambda: check_copt("cadam", "attn", sizes=(1, 1), steps=2, expect=attn_forms(1)),
    # functional layers found on some ranks only (``extra``: rank 0's branch), or at another step on each rank
    "csgd-branchy_fn": lambda: check_copt("csgd", "branchy_fn", steps=2, expect=BRANCHY_FN_FORMS),
    "cadam-branchy_fn-late": lambda: check_copt("cadam", "branchy_fn", steps=3, branch=lambda t, r: t == r + 1,
                                                expect=BRANCHY_FN_FORMS),
    # b's second role seen on rank 0 only: b left to the base on every rank (as in one process)
    "csgd-branchy_role": lambda: check_copt("csgd", "branchy_role", steps=2,
                                            expect={"a.weight": "dxd", "extra.weight": "mxm"}),
    "ag2-amp-scaler": lambda: check_ag_amp("ag2"),
    "ag3-1-amp-scaler": lambda: check_ag_amp("ag3-1"),
    "csgd-amp-scaler": lambda: check_copt_amp("csgd"),
    "cadam-amp-scaler": lambda: check_copt_amp("cadam"),
    "refusals": check_refusals,
    "nonfinite": check_nonfinite_agreement,
}


def main(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc()
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:  # after each check: a crash loses only its own
            json.dump(results, f)
        dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
