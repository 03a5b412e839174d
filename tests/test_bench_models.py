"""bench/models.py runs through the bench harness (smoke run on ONE tiny GPT-2 config): every method gets a
row, the targets' ratios are inverse to the rows' ratios, and the AG rows say how many activations the step
averaged (a step that averaged none is an error row, not a timing)."""
import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import OPS, models, runner  # conftest puts the checkout root on sys.path

tf = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent


def tiny_cases(names):
    desc = "GPT-2: 1 layer, width 32, vocab 64, batch 2 x seq 128 (test size)"
    return {"gpt2": (desc, *models._lm(tf.GPT2Config, tf.GPT2LMHeadModel, n_layer=1, n_embd=32, n_head=2,
                                        vocab_size=64, n_positions=128))}


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_registered_and_smoke_run(tmp_path, monkeypatch, clock):
    assert OPS["models"] == "bench.models"
    monkeypatch.setattr(models, "cases", tiny_cases)
    argv = ["--ops", "models", "--model-set", "gpt2", "--min-run-time", "0.01", "--rounds", "1", "--threads", "1",
            "--no-progress", "--out", str(tmp_path), "--tag", "smoke", "--models-clock", clock,
            "--models-malloc", "default"]  # steady_malloc would stay set for the rest of this test process
    threads = torch.get_num_threads()
    try:
        assert runner.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    doc = json.loads((tmp_path / "models-cpu-quick-smoke.json").read_text())
    rows = {r["impl"]: r for r in doc["rows"]}
    assert set(rows) == {"rmsprop", "sgd", "ag1", "ag3-1", "csgd"}
    assert all(r["case"] == "gpt2" and r["median_s"] > 0 for r in rows.values())
    for k, (peer, _) in models.TARGETS.items():
        r = rows[k]
        assert not r.get("error") and set(r["ratios"]) == {peer}
        assert abs(r["extra"]["x_base_step"] * r["ratios"][peer] - 1) < 1e-9
    for mode in ("ag1", "ag3-1"):  # gelu_new's hand-written tanh form, averaged as one activation per layer
        assert rows[mode]["extra"]["activation_calls"] >= 1 and rows[mode]["extra"]["compound_calls"] >= 1
    assert doc["config"]["threads"] == 1 and doc["config"]["clock"] == clock
    text = (tmp_path / "models-cpu-quick-smoke.md").read_text()
    assert "target <= 2.1x" in text and "C-SGD step" in text


def test_unknown_model_refused():
    with pytest.raises(SystemExit, match="unknown"):
        runner.main(["--ops", "models", "--model-set", "gpt3", "--no-progress"])


def test_steady_malloc_in_a_subprocess():
    """glibc: both mallopt calls accepted, said in the note; elsewhere the note says nothing was done."""
    code = "from bench import models; print(models.steady_malloc())"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    if platform.libc_ver()[0] == "glibc":
        assert "M_TRIM_THRESHOLD = 1 GiB" in out.stdout
    else:
        assert "defaults" in out.stdout
