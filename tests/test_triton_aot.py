"""Ahead-of-time compile of every registered Triton production configuration (avg_kernels/_triton/aot.py)
for sm_80 and sm_90, without a GPU: each must compile, use no stack/local memory (no register spills),
and, for avg_act_backward and the AG multi-tensor kernels, load 128-bit vectors (AG: in groups of
16-byte-aligned tensors) and address with 64-bit offsets.

Compiling is impossible while TRITON_INTERPRET=1 (conftest sets it when there is no GPU), so ONE
subprocess without it compiles everything (`python -m avg_kernels._triton.aot --json`); the tests
below only read its results. A second subprocess compiles two deliberately bad kernels
(tests/_aot_bad_kernels.py) to show the check fails when it should.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

import avg_kernels  # noqa: E402
from avg_kernels._triton import aot  # noqa: E402
from avg_kernels.activations import KERNEL_ACTS  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(avg_kernels.__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))
CONFIGS = aot.configs()
CCS = aot.DEFAULT_CCS


def _compile_env(*extra_paths: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *extra_paths, env.get("PYTHONPATH", "")])
    return env


def _run(args: list[str], env: dict[str, str], timeout: int) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def results():
    jobs = str(min(2, os.cpu_count() or 1))
    proc = _run(["-m", "avg_kernels._triton.aot", "--json", "--jobs", jobs, "--cc", *map(str, CCS)], _compile_env(),
                timeout=900)
    if proc.returncode not in (0, 1) or not proc.stdout.strip().startswith("["):
        pytest.fail(f"AOT subprocess failed (rc={proc.returncode}):\n{proc.stderr[-4000:]}")
    rows = json.loads(proc.stdout)
    print(aot.format_table(rows))
    return {(r["name"], r["cc"]): r for r in rows}


def test_registry_covers_the_gram_kernel():
    names = {c.name for c in CONFIGS}
    for t in ("fp16", "bf16", "fp32", "fp64"):
        for variant in ("nobias", "bias", "bias,wide"):
            assert f"im2col_gram[{t},{variant}]" in names


def test_registry_covers_every_activation_and_dtype():
    names = {c.name for c in CONFIGS}
    for act in KERNEL_ACTS:
        for t in ("fp16", "bf16", "fp32", "fp64"):
            assert f"avg_act_backward[{act},{t}]" in names


@pytest.mark.parametrize("cc", CCS)
@pytest.mark.parametrize("name", [c.name for c in CONFIGS])
def test_compiles_without_spills(results, name, cc):
    r = results[(name, cc)]
    assert r["ok"], f"{name} sm_{cc}: {r['error']}"
    assert r["stack"] == 0 and r["local"] == 0, f"{name} sm_{cc} spills to local memory: {r}"
    multi = ("ag1_update[", "ag1_update_new[", "ag2_reduce[", "ag2_scale[")
    if name.startswith("avg_act_backward[") or (name.startswith(multi) and "unaligned" not in name):
        assert r["max_load_bits"] == 128, f"{name} sm_{cc}: loads are not 128-bit vectors: {r}"
    if name.startswith(("avg_act_backward[", "ag1_update", "ag2_")):
        assert r["offsets_i64"], f"{name} sm_{cc}: some pointer offsets are not 64-bit"
    if name.startswith("im2col_gram["):  # gathers (no vector loads), but 64-bit addressing throughout
        assert r["offsets_i64"], f"{name} sm_{cc}: some pointer offsets are not 64-bit"


def test_check_fails_on_spills_and_compile_errors():
    """The checker is not vacuous: a kernel that keeps 512 floats per thread live spills (stack > 0),
    and a kernel with a type error reports ok=False instead of raising."""
    code = ("import json, _aot_bad_kernels as b\n"
            "from avg_kernels._triton import aot\n"
            "print(json.dumps([aot.compile_config(c, 80) for c in b.CONFIGS]))\n")
    proc = _run(["-c", code], _compile_env(TESTS), timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    spill, type_error = json.loads(proc.stdout)
    assert spill["ok"] and spill["stack"] + spill["local"] > 0, spill
    assert not type_error["ok"] and "Error" in type_error["error"], type_error
