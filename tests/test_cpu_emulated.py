"""The C++ CPU kernels on CPUs older than this machine's, under user-mode emulation (Debian's qemu-user:
``qemu-x86_64 -cpu MODEL python ...``), where an instruction a level must not use dies with SIGILL:

* Haswell (AVX2 + FMA + F16C, no AVX-512): import picks avx2 and the reduced parity set of every CPU op
  (tests/_level_smoke.py) passes; AVG_KERNELS_CPU_CAPABILITY=avx512 is refused with the missing features.
* Nehalem (SSE4.2, no AVX; the oldest x86-64 class numpy 2 and so torch import on): import picks default
  and the parity set passes; AVG_KERNELS_CPU_CAPABILITY=avx2 is refused.

Each run imports torch under emulation (~20-40 s); the four runs go in parallel. Skipped, with the reason,
where qemu-x86_64 is not installed (README: Development) or the host is not x86-64.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from avg_kernels import _build, _cpu_levels

TESTS = Path(__file__).resolve().parent
QEMU = shutil.which("qemu-x86_64")
pytestmark = [
    pytest.mark.skipif(QEMU is None, reason="qemu-x86_64 not found (Debian: apt-get install qemu-user)"),
    pytest.mark.skipif(not _build.cpu_features(), reason="the emulated CPUs are x86-64 (C++ extension: "
                       f"{_build.extension_error() or 'built'})"),
]

RUNS = {  # name: (qemu CPU model, AVG_KERNELS_CPU_CAPABILITY or None, run the parity set?)
    "haswell": ("Haswell", None, True),
    "haswell-avx512": ("Haswell", "avx512", False),
    "nehalem": ("Nehalem", None, True),
    "nehalem-avx2": ("Nehalem", "avx2", False),
}


@pytest.fixture(scope="module")
def runs():
    procs = {}
    for name, (model, level, parity) in RUNS.items():
        env = {k: v for k, v in os.environ.items() if k != _cpu_levels.ENV}
        if level:
            env[_cpu_levels.ENV] = level
        args = [str(TESTS / "_level_smoke.py")] if parity else ["-c", "import avg_kernels"]
        procs[name] = subprocess.Popen([QEMU, "-cpu", model, sys.executable, *args], cwd=TESTS, env=env,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out = {}
    for name, proc in procs.items():
        try:
            stdout, stderr = proc.communicate(timeout=900)
        except subprocess.TimeoutExpired:
            proc.kill()
            stdout, stderr = proc.communicate()
        # qemu warns about CPUID bits TCG cannot emulate; those lines are not the program's
        stderr = "\n".join(line for line in stderr.splitlines() if "TCG doesn't support" not in line)
        out[name] = (proc.returncode, stdout, stderr)
    return out


def _parity(result, expected_level):
    rc, stdout, stderr = result
    assert "Illegal instruction" not in stderr and rc != -4, stderr[-3000:]
    assert stdout.strip(), f"no output (rc={rc}):\n{stderr[-3000:]}"
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["level"] == expected_level, report["features"]
    failures = [f"{name}: {err}" for name, err in report["results"] if err]
    assert not failures, "\n".join(failures)
    assert rc == 0, stderr[-3000:]
    return report


def test_haswell_runs_the_avx2_kernels(runs):
    report = _parity(runs["haswell"], "avx2")
    assert report["supported"] == ["default", "avx2"]


def test_nehalem_runs_the_default_kernels(runs):
    report = _parity(runs["nehalem"], "default")
    assert report["supported"] == ["default"]


@pytest.mark.parametrize("name, missing", [("haswell-avx512", "avx512f, avx512dq, avx512vl, avx512bw, os_avx512"),
                                           ("nehalem-avx2", "avx, avx2, fma, f16c, os_avx")])
def test_a_level_the_cpu_lacks_is_refused(runs, name, missing):
    rc, _, stderr = runs[name]
    assert rc == 1, stderr[-3000:]
    assert f"CpuCapabilityError: AVG_KERNELS_CPU_CAPABILITY={RUNS[name][1]}: this CPU lacks {missing}" in stderr, \
        stderr[-3000:]
