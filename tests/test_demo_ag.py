"""The AG methods of the demo registry (SPEC §7): ag1 / ag2 / ag3-1 over their bases, with RD and
relative sample efficiency in the table."""
import argparse
import json

import pytest
import torch

from avg_kernels.demo import REGISTRY, Settings, model_b, run
from avg_kernels.demo.ag_methods import AGTrainer


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    run.add_arguments(p)
    return p.parse_args(["--out", str(tmp_path), "--no-progress", "--epochs", "2", *extra])


def test_registry_has_ag_methods_with_their_bases():
    assert REGISTRY["ag1"].base == "rmsprop" and REGISTRY["ag3-1"].base == "rmsprop" and REGISTRY["ag2"].base == "adam"
    for mode in ("ag1", "ag2", "ag3-1"):
        for base in ("sgd", "adam", "rmsprop"):
            assert REGISTRY[f"{mode}/{base}"].base == base
    assert run.DEFAULT_METHODS == ["rmsprop", "ag1", "ag3-1", "adam", "ag2", "sgd", "csgd", "cnesterov", "cadam"]


def test_ag_trainer_uses_the_base_definition_and_excludes_the_rd_forward_from_timing():
    torch.manual_seed(0)
    model = model_b(depth=2)
    trainer = REGISTRY["ag1/sgd"].make(model, Settings(lr=0.01))
    assert isinstance(trainer, AGTrainer)
    base = trainer.optimizer.base
    assert isinstance(base, torch.optim.SGD) and base.param_groups[0]["momentum"] == 0.9
    assert base.param_groups[0]["lr"] == 0.01
    x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    loss = trainer.step(x, y)
    assert isinstance(loss, float) and trainer.untimed_s > 0
    assert trainer.summary()["RD"] is not None
    t3 = REGISTRY["ag3-1"].make(model_b(depth=2), Settings())
    t3.step(x, y)
    assert t3.untimed_s == 0.0 and t3.summary() == {"RD": None}


def test_demo_table_has_the_ag_columns(tmp_path, capsys):
    assert run.main(_args(tmp_path, "--methods", "rmsprop", "ag1", "ag3-1", "--depth", "2", "--protocol", "base")) == 0
    out = capsys.readouterr().out
    assert "at depth 2" in out and "python -m avg_kernels reproduce" in out  # the header says what the run is
    head = next(line for line in out.splitlines() if line.startswith("| method"))
    for col in ("rel. sample efficiency", "RD", "time vs base", "samples to loss", "train acc", "test loss"):
        assert col in head
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ag")}
    assert set(rows) == {"ag1 @base rate", "ag3-1 @base rate"}
    cells = [c.strip() for c in rows["ag1 @base rate"].split("|")[1:-1]]
    assert cells[1] == "rmsprop" and cells[-1].endswith("x")
    float(cells[8]), float(cells[9])  # relative sample efficiency and RD are numbers
    cells3 = [c.strip() for c in rows["ag3-1 @base rate"].split("|")[1:-1]]
    assert cells3[9] == "-"  # no RD for AG-3-1 (no base step on the same batch)
    results = json.loads((tmp_path / "demo.json").read_text())
    assert [r["method"] for r in results] == ["rmsprop", "ag1 @base rate", "ag3-1 @base rate"]
    assert torch.get_num_threads() >= 1
