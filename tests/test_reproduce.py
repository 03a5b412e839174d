"""``python -m avg_kernels reproduce``: argument checks, each study's plumbing on a 2-step budget (table, JSON,
PNG), the committed learning-rate table, and the AG-variant feature detection."""
import json

import pytest

from avg_kernels.cli import main
from avg_kernels.reproduce import STUDIES, engine, load_rates
from avg_kernels.reproduce import methods as M


@pytest.mark.parametrize("argv, message", [
    (["reproduce", "p999-nope"], "unknown study 'p999-nope'"),
    (["reproduce", "p003-mlp", "--seeds", "0"], "--seeds 0"),
    (["reproduce", "p003-mlp", "--seeds", "two"], "--seeds 'two'"),
    (["reproduce", "p003-mlp", "--save-rates"], "--save-rates only goes with --tune"),
    (["reproduce", "p003-mlp", "--data", "/no/such/folder"], "--data '/no/such/folder' is not a folder"),
])
def test_bad_arguments_are_refused_before_anything_runs(argv, message, tmp_path, capsys):
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_presets_are_exclusive(capsys):
    with pytest.raises(SystemExit):
        main(["reproduce", "p003-mlp", "--quick", "--full"])


def test_committed_rates_cover_every_study_setting_and_method():
    table = load_rates()
    info = {"name": "digits", "side": 8, "pixels": 64, "classes": 10}
    for name, study in STUDIES.items():
        assert table[name]["_from"].startswith("`python -m avg_kernels reproduce"), name  # from a --tune run
        for preset in ("quick", "full"):
            for setting in study.settings(preset, info):
                rates, note = engine.rates_for(table, name, "digits", setting.key)
                assert note is None
                for m in setting.methods:
                    if not m.unavailable:
                        assert rates[m.rate] > 0, (name, setting.key, m.name)
                for key in setting.tune:
                    if key in rates:  # a rate key of a variant this build lacks may be absent
                        assert rates[key] > 0


def test_rates_for_names_what_is_missing():
    with pytest.raises(KeyError, match="no tuned learning rates for study 'x'"):
        engine.rates_for({}, "x", "digits", "s")
    rates, note = engine.rates_for({"x": {"digits": {"s": {"sgd": 0.1}}}}, "x", "mnist", "s")
    assert rates == {"sgd": 0.1} and "tuned on digits" in note


@pytest.mark.parametrize("study", list(STUDIES))
def test_each_study_runs_two_steps_per_method_and_writes_its_record(study, tmp_path, capsys):
    assert main(["reproduce", study, "--smoke", "--seeds", "2", "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / f"{study}.json").read_text())
    assert (tmp_path / f"{study}.png").stat().st_size > 0
    md = (tmp_path / f"{study}.md").read_text()
    assert "command: `" in md and doc["machine"]["source"]["head"]
    assert doc["seeds"] == [0, 1]
    for s in doc["settings"]:
        for e in s["methods"]:
            assert f"| {e['method']} |" in out and f"| {e['method']} |" in md
            if "unavailable" in e:
                assert "not available in this build" in e["unavailable"] or "iteration count" in e["unavailable"]
                continue
            assert len(e["runs"]) == 2 and all(r["steps"] == 2 for r in e["runs"])
            assert " ± " in md  # two seeds: a SEM


def test_tune_runs_the_grids_and_leaves_the_package_table_alone(tmp_path, capsys):
    before = engine.RATES_FILE.read_text()
    assert main(["reproduce", "p000-model-b", "--smoke", "--tune", "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "p000-model-b-tune.json").read_text())
    grids = doc["settings"][0]["grids"]
    assert grids["rmsprop"]["chosen"] in [r["lr"] for r in grids["rmsprop"]["rows"]]
    assert engine.RATES_FILE.read_text() == before


def test_missing_ag_variants_are_listed_not_replaced(monkeypatch):
    """A build without 'agn' / linear=True lists those methods as unavailable; it never runs another method."""
    monkeypatch.setattr(M, "ag_support", lambda: {"agn": None, "linear": False,
                                                  "why": {"agn": "not available in this build (x)",
                                                          "linear": "not available in this build (y)"}})
    ms = M.ag_methods("rmsprop", ("ag1", "ag2"), "rmsprop", linear=True, agn=5)
    names = {m.name: m for m in ms}
    assert names["ag1/rmsprop"].unavailable is None
    for n in ("ag1-linear/rmsprop", "ag2-linear/rmsprop", "ag5-iter/rmsprop"):
        assert names[n].unavailable.startswith("not available in this build") and names[n].build is None


def test_ag_support_reflects_this_build():
    from avg_kernels.optim import MODES

    sup = M.ag_support()
    assert (sup["agn"] is not None) == ("agn" in MODES and "agn" not in sup["why"])


def test_a_failed_solve_ends_the_run_as_diverged():
    """A LinAlgError from a step (a ridge solve on blown-up activations) is a diverged run, with its reason."""
    import torch

    from avg_kernels.data import Split
    from avg_kernels.reproduce.train import Budget, run

    class Failing(M.PlainTrainer):
        def step(self, x, y):
            raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")

    method = M.Method("failing", lambda model, lr: Failing(model, torch.optim.SGD(model.parameters(), lr=lr)), "sgd")
    data = Split(torch.rand(8, 4), torch.randint(0, 3, (8,)))
    r = run(method, lambda: torch.nn.Linear(4, 3), 0.1, data, None, Budget(epochs=1, batch=4, evals=1), 0)
    assert r["diverged_at"] == 1 and "LinAlgError: linalg.eigh: failed to converge" in r["failure"]
