"""The rank processes of tests/test_ddp.py: one gloo process group (2 ranks on CPU), every check run in turn.

Each check runs on every rank (the collectives must match), returns None or raises; ``main`` records "ok" or
the traceback per check in ``<out>/rank<r>.json``. Models are float64 so that "equal to one process on the
concatenated batch" can be checked tightly (the sums run in another order: equal to rounding only).
"""
from __future__ import annotations

import copy
import json
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


MODELS = {"mlp": (mlp, (6,)), "cnn": (CNN, (2, 6, 6)), "cnn_bn": (lambda: CNN(bn=True), (2, 6, 6)),
          "branchy": (Branchy, (6,))}


def forward_rank(kind: str, model, x, rank: int):
    """This rank's forward (Branchy: the branch on rank 0 only)."""
    return model(x, branch=rank == 0) if kind == "branchy" else model(x)


def forward_all(kind: str, model, x, parts):
    """The single process's forward of the concatenated batch (Branchy: each rank's part as that rank runs it)."""
    if kind == "branchy":
        return torch.cat([model(xp, branch=r == 0) for r, (xp, _) in enumerate(parts)])
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
             dtype=torch.float64) -> None:
    """AG over DDP: parameters bitwise equal on every rank after each step, and equal to one process on the
    concatenated batch (mean loss with equal batches; with unequal ones the sum divided by the world size,
    which is what averaging the ranks' gradients of their sums is)."""
    from avg_kernels.optim import AG

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(kind, convert=True, dtype=dtype)
    ref = copy.deepcopy(model)
    ddp = DDP(model, find_unused_parameters=find_unused or kind == "branchy")
    tol = {} if dtype == torch.float64 else {"rtol": 2e-5, "atol": 2e-6}
    opt = AG(ddp, torch.optim.RMSprop(ddp.parameters(), lr=1e-2), mode=mode)
    ropt = AG(ref, torch.optim.RMSprop(ref.parameters(), lr=1e-2), mode=mode)
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
        if mode == "ag1":
            close_up_to_sign_flips(model, ref, t, **tol, tiny=1e-9 if dtype == torch.float64 else 1e-4)
        else:
            close(flat_params(model), flat_params(ref), f"{mode} {kind}: step {t} vs one process", **tol)
        if opt.last.plain is not ropt.last.plain or opt.last.activation_calls == 0 and not opt.last.plain:
            raise AssertionError(f"{mode}: step {t} record {opt.last.as_dict()}")
    if "bn" in kind:  # each step starts from rank 0's buffers (BatchNorm statistics and count), as DDP's forward does
        before = [b.clone() for b in model.buffers()]
        opt._replicas.broadcast_buffers()
        same_on_every_rank(torch.cat([b.double().reshape(-1) for b in model.buffers()]), "buffers after the broadcast")
        if rank == 0 and not all(torch.equal(a, b) for a, b in zip(before, model.buffers())):
            raise AssertionError("the broadcast changed rank 0's buffers")


def check_copt(name: str, kind: str, sizes=(4, 4), steps: int = 3, expect: dict = None, clip: float = 0.0,
               refresh_every: int = 1) -> None:
    """C-SGD / C-Adam over DDP: bitwise equal parameters on every rank, equal to one process; ``expect``: the
    form (dxd / mxm) each layer must take in the run over DDP; ``clip``: clip the gradient norm to that
    (the M × M form then applies a uniform factor, found by a random probe that must be equal on every
    rank for the parameters to stay bitwise equal)."""
    from avg_kernels.optim import CAdam, CSGD

    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(kind, convert=False)
    ref = copy.deepcopy(model)
    ddp = DDP(model, find_unused_parameters=kind == "branchy")
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
        if equal:
            F.cross_entropy(forward_rank(kind, ddp, xr, rank), yr).backward()
            F.cross_entropy(forward_all(kind, ref, x, parts), y).backward()
        else:
            F.cross_entropy(forward_rank(kind, ddp, xr, rank), yr, reduction="sum").backward()
            (F.cross_entropy(forward_all(kind, ref, x, parts), y, reduction="sum") / world).backward()
        if clip:
            for m in (model, ref):
                if float(torch.nn.utils.clip_grad_norm_(m.parameters(), clip)) <= clip:
                    raise AssertionError("the clipping test needs a gradient norm above the clip")
        opt.step()
        ropt.step()
        same_on_every_rank(flat_params(model), f"{name} {kind}: parameters after step {t}")
        same_on_every_rank(torch.cat([p.grad.reshape(-1) for p in model.parameters()]),
                           f"{name} {kind}: preconditioned gradients of step {t}")  # before rounding into θ
        close(flat_params(model), flat_params(ref), f"{name} {kind} {sizes}: step {t} vs one process", rtol=1e-8,
              atol=1e-10)
    if expect is not None and forms != expect:
        raise AssertionError(f"{name} {kind}: forms {forms}, expected {expect}")


MLP_FORMS = {"0": "dxd", "2": "mxm", "4": "mxm"}
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
