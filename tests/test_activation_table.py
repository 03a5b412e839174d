"""The activation table (avg_kernels/activations.py) and the header's X-macro agree, every layer that
lists activations covers the whole table, and each record's PyTorch formulas are PyTorch's."""
from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import avg_kernels
from avg_kernels import activations
from avg_kernels.activations import KERNEL_ACTS, KERNEL_IDS, TABLE, KernelAct
from avg_kernels.nn import _convert, functional as AF, modules

from _accuracy import CONFIGS, kernel_act

ROOT = Path(__file__).resolve().parents[1]
HEADER = ROOT / "csrc" / "include" / "avg_kernels" / "activations.h"
_ROW = re.compile(r'^\s*X\((\w+),\s*(\d+),\s*"(\w+)",\s*(true|false)\)\s*\\?\s*$')


def header_table() -> list[tuple[str, int, str, bool]]:
    """Rows (Enumerator, id, name, bounded) of AVG_KERNELS_ACTIVATIONS, in order."""
    lines = HEADER.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#define AVG_KERNELS_ACTIVATIONS(X)"))
    rows = []
    for line in lines[start + 1:]:
        m = _ROW.match(line)
        if m is None:
            break
        rows.append((m[1], int(m[2]), m[3], m[4] == "true"))
        if not line.rstrip().endswith("\\"):
            break
    return rows


def test_header_table_equals_python_table():
    rows = header_table()
    assert [r[2] for r in rows] == list(KERNEL_ACTS)
    assert [r[1] for r in rows] == [KERNEL_IDS[n] for n in KERNEL_ACTS] == list(range(len(KERNEL_ACTS)))
    assert [r[3] for r in rows] == [activations.is_bounded(KernelAct(n)) for n in KERNEL_ACTS]
    assert len({r[0] for r in rows}) == len(rows)


def test_cpp_lists_are_the_x_macro():
    """The enum, the dispatch switch and the CUDA instantiations expand the X-macro; none lists an
    activation by hand."""
    enumerators = [r[0] for r in header_table()]
    header = HEADER.read_text()
    assert "AVG_KERNELS_ACTIVATIONS(AK_ACT_ENUM)" in header
    for path, use in [("csrc/include/avg_kernels/dispatch.h", "AVG_KERNELS_ACTIVATIONS(AK_DISPATCH_CASE)"),
                      ("csrc/standalone/avg_act_instantiate.cu", "AVG_KERNELS_ACTIVATIONS(AK_INSTANTIATE_ALL_DTYPES)")]:
        text = (ROOT / path).read_text()
        assert use in text, path
        named = [e for e in enumerators if re.search(rf"\bAct::{e}\b|\b{e}\)", text)]
        assert not named, f"{path} names {named} by hand"


def test_ci_kernel_count_follows_the_table():
    """.ci/cuda_compile_check.sh counts the X-macro's rows for its expected number of kernels, and
    .ci/ptxas_table.py reads the names from it."""
    script = (ROOT / ".ci" / "cuda_compile_check.sh").read_text()
    line = next(line for line in script.splitlines() if line.startswith("N_ACTS="))
    out = subprocess.run(["bash", "-c", f"{line}; echo $N_ACTS"], cwd=ROOT, capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(KERNEL_ACTS)
    assert "$(( (N_ACTS * 4 * 2 + 9 + 8 + 10) * 2 ))" in script
    ptxas_table = subprocess.run([sys.executable, "-c", "import ptxas_table; print(','.join(ptxas_table.ACTS))"],
                                 cwd=ROOT / ".ci", capture_output=True, text=True, check=True)
    assert ptxas_table.stdout.strip() == ",".join(KERNEL_ACTS)  # the names it prints per kernel id


def test_triton_ids_come_from_the_table():
    pytest.importorskip("triton")
    from avg_kernels._triton import avg_act as tri

    for name in KERNEL_ACTS:
        assert getattr(tri, name.upper()).value == KERNEL_IDS[name], name
        assert tri._BOUNDED[KERNEL_IDS[name]] == activations.is_bounded(KernelAct(name))
    aot_names = {c.name for c in tri.aot.configs() if c.name.startswith("avg_act_backward[")}
    assert {n[len("avg_act_backward["):].split(",")[0] for n in aot_names} == set(KERNEL_ACTS)


def test_modules_and_functional_cover_the_table():
    for spec in TABLE.values():
        cls = getattr(avg_kernels.nn, spec.module.__name__)
        assert cls.spec is spec and cls.act == spec.name and cls.__module__ == modules.__name__
        assert issubclass(cls, spec.module) and issubclass(cls, avg_kernels.nn.AveragedActivation)
        assert modules.REPLACEMENTS[spec.module] is cls and spec.module.__name__ in avg_kernels.nn.__all__
        assert inspect.signature(cls) == inspect.signature(spec.module)
        fn = getattr(AF, spec.name)
        assert spec.name in AF.__all__ and fn.__name__ == spec.name
        assert list(inspect.signature(fn).parameters) == ["input", *spec.params]
    assert len(modules.REPLACEMENTS) == len(TABLE)


def test_convert_tables_cover_the_table():
    for spec in TABLE.values():
        assert spec.module not in _convert.UNSUPPORTED_KINDS
        assert _convert._FUNC_NAMES[spec.name] == spec.name
        assert _convert._FUNCTION_ATTRS[id(spec.functional)] == f"F.{spec.name}"
        assert _convert._SOURCE_PATTERNS[0].search(f"y = F.{spec.name}(x)")
    assert _convert._FUNC_NAMES["special_expit"] == "sigmoid"
    assert _convert._SOURCE_PATTERNS[1].search("torch.special.expit(x)")
    assert _convert._SOURCE_PATTERNS[2].search("h.tanh()") and not _convert._SOURCE_PATTERNS[2].search("h.gelu()")
    assert not _convert._SOURCE_PATTERNS[0].search("F.mish(x)")


def test_tests_cover_the_table():
    """The parametrised parity tests (CONFIGS) and the module tests (test_nn.KINDS) reach every row."""
    import test_nn

    assert {kernel_act(c).name for c in CONFIGS} == set(KERNEL_ACTS)
    assert {t for t, _, _ in test_nn.KINDS} == {spec.module for spec in TABLE.values()}


# Deprecated aliases torch.nn still accepts (nn.Hardtanh's min_value / max_value for min_val / max_val); the
# averaged module takes them as its namesake does (same signature), the table does not.
_DEPRECATED = {"min_value", "max_value"}


def test_params_are_pytorch_defaults():
    for spec in TABLE.values():
        sig = inspect.signature(spec.module).parameters
        torch_params = {k: p.default for k, p in sig.items()
                        if k != "inplace" and k not in _DEPRECATED and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        assert dict(spec.params) == torch_params, spec.name
        assert spec.inplace == ("inplace" in sig)
        assert dict(avg_kernels.ACTIVATIONS[spec.name]) == torch_params


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c[0] + str(c[1]))
def test_forward_and_backward_are_pytorchs(cfg, fresh_seed):
    """Each record's forward is its torch.nn.functional call and its backward is autograd's, bitwise: with grad
    mode off as autograd runs a plain backward, and with it on as under create_graph=True (where autograd
    switches silu to its differentiable composite)."""
    spec, k = TABLE[cfg[0]], kernel_act(cfg)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.cat([torch.randn(500) * 4, torch.tensor([0.0, -0.0, 3.0, -3.0, 25.0, -25.0])]).to(dtype)
        x.requires_grad_()
        y = spec.functional(x, **cfg[1])
        assert torch.equal(activations.forward(x.detach(), k), y.detach())
        g = torch.randn_like(y)
        (gx,) = torch.autograd.grad(y, x, g, retain_graph=True)
        with torch.no_grad():
            assert torch.equal(activations.native_backward(g, x.detach(), y.detach(), k), gx)
        (gx_graph,) = torch.autograd.grad(y, x, g, create_graph=True)
        assert torch.equal(activations.native_backward(g, x.detach(), y.detach(), k), gx_graph.detach())


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c[0] + str(c[1]))
def test_asymptotic_slopes_and_boundedness(cfg):
    k = kernel_act(cfg)
    big = torch.tensor([1e7, -1e7], dtype=torch.float64)
    f = activations.forward(big, k)
    pos, neg = activations.asymptotic_slopes(k)
    torch.testing.assert_close(f / big, torch.tensor([pos, neg], dtype=torch.float64), rtol=0, atol=1e-6)
    assert activations.is_bounded(k) == bool((f.abs() < 10).all())


def test_mobilenet_v3_block_converts_completely():
    """The activations MobileNetV3 uses (Hardswish, and Hardsigmoid in squeeze-excite) are averaged."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Hardswish(inplace=True), nn.AdaptiveAvgPool2d(1),
                          nn.Conv2d(8, 8, 1), nn.ReLU(inplace=True), nn.Conv2d(8, 8, 1), nn.Hardsigmoid(inplace=True))
    _, rep = avg_kernels.nn.convert(model, example_inputs=torch.randn(2, 3, 6, 6), return_report=True)
    assert rep.complete and rep.swapped == {"Hardswish": 1, "ReLU": 1, "Hardsigmoid": 1}
    assert type(model[1]) is avg_kernels.nn.Hardswish and model[1].requested_inplace and not model[1].inplace


def test_relu6_resolves_to_the_hardtanh_kernel():
    """relu6 is a record of its own (nn.ReLU6, F.relu6) that shares hardtanh's kernel at (0, 6), as gelu's
    approximate="tanh" resolves to gelu_tanh: the kernel table lists hardtanh once, owned by hardtanh's record."""
    assert KERNEL_ACTS.count("hardtanh") == 1
    assert activations.resolve("relu6", {}) == activations.resolve("hardtanh", {"min_val": 0, "max_val": 6.0})
    assert activations.record_of(activations.resolve("relu6", {})) is TABLE["hardtanh"]
    with pytest.raises(ValueError, match="min_val=1.0 > max_val=0.5"):
        activations.resolve("hardtanh", {"min_val": 1.0, "max_val": 0.5})
    assert activations.resolve("hardtanh", {"min_val": 0.5, "max_val": 0.5}) == KernelAct("hardtanh", 0.5, 0.5)
    with pytest.raises(TypeError, match="relu6"):
        activations.resolve("relu6", {"max_val": 5.0})
