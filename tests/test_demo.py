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


def test_both_protocols_come_from_the_committed_grid(tmp_path):
    """A method with a base runs at the base's rate and at its own tuned rate (one row when they are equal);
    the own rates come from a committed --tune run."""
    from avg_kernels.demo import own_rates

    table = own_rates.load()
    assert table["_from"].startswith("`python -m avg_kernels demo --tune") and table["config"]["depth"] == 4
    args = _args(tmp_path)
    rows = run.plan(args, ["sgd", "csgd", "ag1"])
    labels = [label for _, _, label in rows]
    assert labels[0] == "sgd"
    csgd_own = table["rates"]["csgd"]
    if csgd_own != REGISTRY["sgd"].default_lr:
        assert ("csgd", REGISTRY["sgd"].default_lr, "csgd @base rate") in rows
        assert ("csgd", csgd_own, "csgd @own rate") in rows
    assert sum(label.startswith("ag1 @") for label in labels) == (1 if table["rates"]["ag1"] == 0.005 else 2)
    assert run.plan(_args(tmp_path, "--protocol", "base"), ["csgd"]) == [("csgd", 0.05, "csgd @base rate")]
    assert run.plan(_args(tmp_path, "--lr", "0.1"), ["csgd"]) == [("csgd", None, "csgd")]


def test_demo_save_rates_needs_tune(tmp_path):
    import pytest

    with pytest.raises(SystemExit, match="--save-rates only goes with --tune"):
        run.main(_args(tmp_path, "--save-rates"))
