"""DistributedDataParallel with AG and the C-optimizers (SPEC §4 "Distributed"): 2 gloo processes on CPU,
started once for the module (tests/_ddp_worker.py runs every check on both ranks); each test reports one
check. Bitwise equal parameters on every rank after every step; equal to rounding to one process training
on the concatenated batch (AG-1: up to sign flips of rounding-level ḡ); the M × M and D × D forms; unequal
per-rank batches; a non-finite loss on one rank only; AG on a model as written (functional and compound
activations), agn and linear=True; C-optimizers on layers found by their weight (MultiheadAttention slices,
HF Conv1D's addmm; on some ranks only, or first at another step), AG and C-optimizers under fp16 autocast
with GradScaler; what is refused (the plain module behind a DDP, FSDP, DataParallel, a DDP inside the model,
static_graph for AG). NCCL (GPU) is not tested here."""
from __future__ import annotations

import json
import multiprocessing
import socket

import pytest
import torch

dist = torch.distributed
if not dist.is_available():
    pytest.skip("torch.distributed is not available in this torch build", allow_module_level=True)
if not dist.is_gloo_available():
    pytest.skip("the gloo backend of torch.distributed is not available", allow_module_level=True)

import _ddp_worker  # noqa: E402  (imports DistributedDataParallel: only where torch.distributed exists)

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """rank -> {check: "ok" or its traceback}, from one run of both rank processes."""
    out = tmp_path_factory.mktemp("ddp")
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_ddp_worker.main, args=(r, WORLD, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    got = {}
    for r in range(WORLD):
        path = out / f"rank{r}.json"
        got[r] = json.loads(path.read_text()) if path.exists() else {}
    if hung:
        pytest.fail(f"rank processes {hung} did not finish (a collective waiting for the other rank?); "
                    f"results so far: {got}")
    return got


@pytest.mark.parametrize("check", list(_ddp_worker.CHECKS))
def test_ddp(results, check):
    for r in range(WORLD):
        outcome = results[r].get(check, "not run (the rank process failed before it)")
        assert outcome == "ok", f"rank {r}, check {check}:\n{outcome}"
