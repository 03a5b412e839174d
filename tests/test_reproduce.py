"""``python -m avg_kernels reproduce``: argument checks, each study's plumbing on a 2-step budget (table, JSON,
PNG), the committed learning-rate table, the AG variants (n-iteration, Linear) the studies build, and tuning a
subset of rate keys (--methods)."""
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
    (["reproduce", "p000-model-b", "--methods", "agn"], "--methods only goes with --tune"),
    (["reproduce", "p000-model-b", "--smoke", "--tune", "--methods", "agn,nope"], "--methods 'agn,nope'"),
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
                    assert rates[m.rate] > 0, (name, setting.key, m.name)
                for key in setting.tune:
                    assert rates[key] > 0, (name, setting.key, key)


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
            assert len(e["runs"]) == 2 and all(r["steps"] == 2 for r in e["runs"])
            assert " ± " in md  # two seeds: a SEM


def test_tune_runs_the_grids_and_leaves_the_package_table_alone(tmp_path, capsys):
    before = engine.RATES_FILE.read_text()
    assert main(["reproduce", "p000-model-b", "--smoke", "--tune", "--out", str(tmp_path), "--no-progress"]) == 0
    doc = json.loads((tmp_path / "p000-model-b-tune.json").read_text())
    grids = doc["settings"][0]["grids"]
    assert grids["rmsprop"]["chosen"] in [r["lr"] for r in grids["rmsprop"]["rows"]]
    assert engine.RATES_FILE.read_text() == before


def test_tune_methods_tunes_only_those_keys_and_save_rates_keeps_the_others(tmp_path, monkeypatch, capsys):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"p000-model-b": {"_from": "`earlier tune`",
                                                  "digits": {"model-b": {"rmsprop": 0.5, "ag1": 0.25, "agn": 9.0}}}}))
    monkeypatch.setattr(engine, "RATES_FILE", rates)
    argv = ["reproduce", "p000-model-b", "--smoke", "--tune", "--save-rates", "--methods", "agn",
            "--out", str(tmp_path), "--no-progress"]
    assert main(argv) == 0
    doc = json.loads((tmp_path / "p000-model-b-tune-agn.json").read_text())
    grids = doc["settings"][0]["grids"]
    assert list(grids) == ["agn"] and grids["agn"]["method"].startswith("ag5-iter/")
    entry = json.loads(rates.read_text())["p000-model-b"]
    assert entry["digits"]["model-b"]["rmsprop"] == 0.5 and entry["digits"]["model-b"]["ag1"] == 0.25
    assert entry["digits"]["model-b"]["agn"] == grids["agn"]["chosen"] != 9.0
    assert entry["_from"].startswith("`earlier tune`; agn: `") and "p000-model-b-tune-agn.md" in entry["_from"]


def test_ag_methods_build_the_n_iteration_and_linear_variants():
    """The variants are AG itself configured as the papers say: mode "agn" with n iterations (paper 000 Alg. 4),
    linear=True for AG-1/AG-2 (paper 002 Eq. 11); the n-iteration method runs at its own rate key when given."""
    import torch

    ms = {m.name: m for m in M.ag_methods("rmsprop", ("ag1", "ag2"), "rmsprop", linear=True, agn=5, agn_rate="agn")}
    assert set(ms) == {"ag1/rmsprop", "ag2/rmsprop", "ag1-linear/rmsprop", "ag2-linear/rmsprop", "ag5-iter/rmsprop"}
    assert ms["ag5-iter/rmsprop"].rate == "agn" and ms["ag1-linear/rmsprop"].rate == "rmsprop"
    for name, (mode, iterations, linear) in {"ag1/rmsprop": ("ag1", None, False),
                                             "ag2-linear/rmsprop": ("ag2", None, True),
                                             "ag1-linear/rmsprop": ("ag1", None, True),
                                             "ag5-iter/rmsprop": ("agn", 5, False)}.items():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Tanh(), torch.nn.Linear(6, 3))
        trainer = ms[name].build(model, 1e-3)
        opt = trainer.optimizer
        assert (opt.mode, opt.iterations, opt.linear) == (mode, iterations, linear), name
        assert trainer.step(torch.randn(8, 4), torch.randint(0, 3, (8,))) > 0
        assert opt.last.linear_calls == (2 if linear else 0), name  # both Linear layers averaged (Eq. 11)
    with pytest.raises(ValueError, match="agn must be an iteration count"):
        M.ag_methods("rmsprop", ("ag1",), "rmsprop", agn=1)


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
