"""bench/ag_train.py runs through the bench harness (smoke run) and reports every method, its ratio to
the base step and the per-phase breakdown."""
import json

import torch

from bench import OPS, ag_train, runner  # conftest puts the checkout root on sys.path


def test_registered_and_smoke_run(tmp_path):
    assert OPS["ag_train"] == "bench.ag_train"
    argv = ["--ops", "ag_train", "--min-run-time", "0.01", "--rounds", "1", "--no-progress", "--out", str(tmp_path)]
    assert runner.main(argv) == 0
    doc = json.loads((tmp_path / "ag_train-cpu-quick.json").read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"rmsprop", "adam", "ag1", "ag2", "ag3-1"} and all(r["case"] == "demo" for r in rows.values())
    for mode, base in (("ag1", "rmsprop"), ("ag2", "adam"), ("ag3-1", "rmsprop")):
        r = rows[mode]
        assert r["median_s"] > 0 and set(r["ratios"]) == {base}
        assert abs(r["extra"]["x_base_step"] * r["ratios"][base] - 1) < 1e-9
        assert {"forwards", "backwards", "copies", "update", "base step"} <= set(r["extra"]["breakdown_s"])
    text = (tmp_path / "ag_train-cpu-quick-breakdown.md").read_text()
    for label in ("AG-1/RMSProp", "AG-2/Adam", "AG-3-1/RMSProp", "<= 2.1x", "<= 1.4x"):
        assert label in text


def test_resnet18_shape():
    m = ag_train.resnet18(width=8)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert sum(isinstance(x, torch.nn.SiLU) for x in m.modules()) == 17  # stem + 2 per block x 8 blocks
