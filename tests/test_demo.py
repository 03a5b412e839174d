"""The demo command (SPEC §7) runs end to end on the embedded digits without downloading anything."""
import argparse
import json
import os

from avg_kernels.demo import REGISTRY, run


def _args(tmp_path, *extra):
    p = argparse.ArgumentParser()
    run.add_arguments(p)
    return p.parse_args(["--out", str(tmp_path), "--no-progress", "--epochs", "1", *extra])


def test_demo_runs_and_writes_table_and_plot(tmp_path, capsys):
    assert run.main(_args(tmp_path, "--methods", "sgd", "adam")) == 0
    out = capsys.readouterr().out
    assert "| sgd |" in out and "| adam |" in out
    for name in ("demo.md", "demo.json", "demo.png"):
        assert os.path.getsize(tmp_path / name) > 0
    results = json.loads((tmp_path / "demo.json").read_text())
    assert [r["method"] for r in results] == ["sgd", "adam"]
    assert results[0]["epochs"][0]["samples"] == 1348  # 75 % of the 1797 digits


def test_same_init_and_batches_make_runs_reproducible(tmp_path):
    run.main(_args(tmp_path / "a", "--methods", "sgd"))
    run.main(_args(tmp_path / "b", "--methods", "sgd"))
    a = json.loads((tmp_path / "a" / "demo.json").read_text())[0]["curve"]
    b = json.loads((tmp_path / "b" / "demo.json").read_text())[0]["curve"]
    assert a == b


def test_registry_has_base_methods_and_rejects_duplicates():
    assert {"sgd", "adam", "rmsprop"} <= set(REGISTRY)
    import pytest

    from avg_kernels.demo import register

    with pytest.raises(ValueError, match="twice"):
        register(REGISTRY["sgd"])


def test_c_methods_are_registered_and_train(tmp_path):
    """csgd, cnesterov, cadam (paper 003) run in the demo next to their base methods."""
    assert {"csgd", "cnesterov", "cadam"} <= set(REGISTRY)
    assert REGISTRY["csgd"].base == "sgd" and REGISTRY["cadam"].base == "adam"
    assert run.main(_args(tmp_path, "--methods", "csgd", "cnesterov", "cadam")) == 0
    results = json.loads((tmp_path / "demo.json").read_text())
    for r in results:
        first, last = r["curve"][0][1], r["epochs"][-1]["train_loss"]
        assert last < first, r["method"]  # one epoch lowers the loss
