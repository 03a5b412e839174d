"""What a new user runs is what CI runs, and what the build compiles is what the tree holds:

* every command of the README's bash blocks (the venv, install + main job, install + tests, and the
  Development commands) appears in .ci/run word for word, except the main job (the benchmark; too long
  for CI: tests/test_bench_*.py cover its code);
* the Triton range declared in pyproject.toml is the one the README's oldest-Triton command tests, and the
  installed Triton is inside it;
* setup.py lists every C++/CUDA source of csrc/ (nothing globbed, nothing forgotten).
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _bash_commands(text: str) -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]


def test_readme_leads_with_a_venv_and_two_commands():
    first = _bash_commands(README.split("## ", 1)[0])
    assert len(first) == 3
    venv, main_job, tests = first
    assert venv.startswith("python3 -m venv ")
    install = 'pip install torch==2.13.0 setuptools wheel ninja && pip install --no-build-isolation -e ".[dev]"'
    assert main_job == install + " && python -m avg_kernels bench --quick"
    assert tests == install + " && python -m pytest -q"


def test_ci_runs_the_readme_commands_word_for_word():
    commands = _bash_commands(README)
    assert len(commands) >= 6
    missing = [c for c in commands if c not in CI and not c.endswith("python -m avg_kernels bench --quick")]
    assert not missing, f".ci/run lacks these README commands: {missing}"


def test_ci_installs_nothing_the_readme_does_not():
    """Every pip/apt install in .ci/run is a README command (no extra pin, flag or package)."""
    readme = set(_bash_commands(README))
    for line in CI.splitlines():
        if re.search(r"\b(pip|apt-get) install\b", line) and "wheel_check" not in line:
            cmd = line.strip().split(" > /dev/null")[0].split(" || ")[0]
            assert cmd in readme or "apt-get install -y qemu-user" in README, line


def _triton_spec() -> str:
    specs = {r for r in PYPROJECT["project"]["optional-dependencies"]["dev"] if r.startswith("triton")}
    specs |= {r for r in PYPROJECT["project"]["optional-dependencies"]["triton"] if r.startswith("triton")}
    assert len(specs) == 1, specs
    return specs.pop()


def test_the_oldest_triton_tested_is_the_declared_lower_bound():
    lower = re.search(r">=([0-9.]+)", _triton_spec()).group(1)
    pinned = re.search(r"--target build/triton-oldest triton==([0-9.]+)", README).group(1)
    assert pinned == lower
    assert f"triton>={lower}" in README


def test_installed_triton_is_in_the_declared_range():
    triton = pytest.importorskip("triton")
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(_triton_spec().removeprefix("triton"))
    assert triton.__version__ in spec, f"triton {triton.__version__} is outside the tested range {spec}"


def test_setup_lists_every_source():
    setup = (ROOT / "setup.py").read_text()
    listed = set(re.findall(r'"(csrc/[^"]+\.(?:cpp|cu))"', setup))
    on_disk = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.suffix in (".cpp", ".cu")}
    standalone = {p for p in on_disk if p.startswith("csrc/standalone/")}  # CMakeLists.txt builds those
    assert listed == on_disk - standalone, (sorted(on_disk - standalone - listed), sorted(listed - on_disk))


def test_the_main_job_writes_outside_the_tracked_tree():
    """`python -m avg_kernels bench` writes its tables to bench/out/ by default, which git ignores (the
    committed tables in bench/results/ are only written with an explicit --out)."""
    import shutil
    import subprocess

    from bench import runner

    assert runner.DEFAULT_OUT == ROOT / "bench" / "out"
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    probe = runner.DEFAULT_OUT / "avg_act-cpu-quick.md"
    proc = subprocess.run(["git", "check-ignore", "-q", str(probe)], cwd=ROOT)
    assert proc.returncode == 0, f"{probe} is not git-ignored"
