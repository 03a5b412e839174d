"""The benchmark harness (bench/) and the `python -m avg_kernels bench` command: fast checks only."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from avg_kernels import cli
from avg_kernels.cli import bench as cli_bench

if isinstance(cli_bench.locate_bench(), str):
    pytest.skip(f"bench/ not available: {cli_bench.locate_bench()}", allow_module_level=True)

from bench import harness, results, runner  # noqa: E402  (conftest puts the checkout root on sys.path)


def test_parse_sizes():
    assert harness.parse_sizes("16,20") == [2 ** 16, 2 ** 20]
    assert harness.parse_sizes("10-14/2") == [2 ** 10, 2 ** 12, 2 ** 14]
    assert harness.parse_sizes("3-4,3") == [8, 16]


def _row(impl, t, **kw):
    base = dict(op="op", case="c", inputs="i", size=8, dtype="float32", device="cpu")
    base.update(kw)
    return harness.Row(impl=impl, median_s=t, bytes=32, **base)


def test_add_ratios_within_groups_only():
    rows = [_row("ours", 1.0), _row("eager", 4.0), _row("copy", 0.5),
            _row("ours", 2.0, size=16), _row("eager", 3.0, size=16), _row("copy", None, size=16)]
    harness.add_ratios(rows, ["eager", "copy"])
    assert rows[0].ratios == {"eager": 4.0, "copy": 0.5}
    assert rows[1].ratios == {"copy": 0.125}
    assert rows[3].ratios == {"eager": 1.5}  # the failed copy gives no ratio


def test_writers(tmp_path):
    rows = [_row("ours", 1e-3, accuracy=1e-7), _row("eager", 4e-3, accuracy=1e-2), _row("copy", 5e-4)]
    harness.add_ratios(rows, ["eager", "copy"])
    rows.append(harness.Row(op="op", case="c", inputs="i", size=16, dtype="float32", device="cpu", impl="ours",
                            error="RuntimeError: boom"))
    report = harness.Report(op="op", title="T", rows=rows, subjects=["ours"], peers=["eager", "copy"],
                            ceiling="copy", notes=["a note"])
    from bench import machine

    info = machine.machine_info()
    paths = results.write_all(report, info, tmp_path, "op-cpu-quick", wall_s=1.0)
    md = paths["md"].read_text()
    assert "C++ kernels (csrc/) at commit" in md and "a note" in md
    assert "| float32 | 2^3 | 1.00 ms | 4.00 ms | 500 µs | 0.0 | 50 % | 4.00× | 1.0e-07 | 1.0e-02 |" in md
    assert "RuntimeError: boom" in md
    doc = json.loads(paths["json"].read_text())
    assert doc["rows"][0]["ratios"] == {"eager": 4.0, "copy": 0.5} and doc["machine"]["torch_threads"] >= 1
    assert paths["png"].stat().st_size > 0


def test_cli_runs_the_checkouts_bench_with_every_argument(capfd):
    """`python -m avg_kernels bench ARGS` runs `python -m bench ARGS` in the checkout (not an import: the
    package does not depend on its benchmarks); --help reaches bench's own parser."""
    assert cli.main(["bench", "--help"]) == 0
    out = capfd.readouterr().out
    assert "--ops" in out and "--out" in out


def test_cli_bench_clear_error_outside_a_checkout(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cli_bench, "ROOT", tmp_path)
    assert cli.main(["bench", "--quick"]) == 2
    assert "source checkout" in capsys.readouterr().err


def test_tiny_end_to_end_run(tmp_path):
    argv = ["--ops", "avg_act", "--sizes", "10", "--dtypes", "float32", "--acts", "tanh", "--inputs", "train", "--no-compile",
            "--min-run-time", "0.01", "--rounds", "2", "--no-progress", "--out", str(tmp_path)]
    assert runner.main(argv) == 0
    doc = json.loads((tmp_path / "avg_act-cpu-quick.json").read_text())
    by_impl = {r["impl"]: r for r in doc["rows"]}
    assert {"cpu", "eager", "native", "copy"} <= set(by_impl)
    assert all(r["median_s"] > 0 for r in by_impl.values())
    assert by_impl["cpu"]["accuracy"] < 1e-6 and set(by_impl["cpu"]["ratios"]) == {"eager", "native", "copy"}
    assert Path(tmp_path / "avg_act-cpu-quick.png").exists()
