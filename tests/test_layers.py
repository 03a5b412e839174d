"""Imports inside avg_kernels point down the layers (DESIGN.md "Layers"; avg_kernels/_contract/__init__.py):

    0 math         activations, _cpu_levels          (nothing of the package)
    1 contract     _contract                         (dtype rules, argument checks, lists, outputs, messages)
    2 backends     reference | _triton | _build + the compiled modules   (a backend never imports another)
    3 ops          ops                               (the only layer that knows backends exist)
    4 nn           nn
    5 models       optim | metrics
    6 apps         demo, reproduce, data, cli, _machine, __main__, the package's __init__

A module may import its own column (the same top-level name) or any lower layer; nothing imports the
repository's bench/ (not part of the package). Function-level imports and importlib.import_module calls
with a literal name count too.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "avg_kernels"

# Per layer, its columns (sets of top-level names that may import each other); layer 6's columns are not
# isolated from each other.
LAYERS = [
    [{"activations"}, {"_cpu_levels"}],
    [{"_contract"}],
    [{"reference"}, {"_triton"}, {"_build", "_C", "_C_testing", "_cpu_default", "_cpu_avx2", "_cpu_avx512"}],
    [{"ops"}],
    [{"nn"}],
    [{"optim"}, {"metrics"}],
    [{"demo", "reproduce", "data", "cli", "_machine", "__main__", "__init__"}],
]
RANK = {name: (rank, col) for rank, cols in enumerate(LAYERS) for col, names in enumerate(cols) for name in names}


def _top(module: str) -> str:
    """'avg_kernels.ops.gram' -> 'ops'; 'avg_kernels' -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) for every import in the file."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            out.append((node.lineno, node.args[0].value))  # importlib.import_module("x.y") with a literal name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            # `from . import x` / `from .. import ops` import submodules: count each name
            if node.level and not node.module:
                out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
            else:
                out.append((node.lineno, mod))
    return out


def _violations() -> list[str]:
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        me = _module_name(path)
        mine = _top(me)
        assert mine in RANK, f"{me} is in no layer: add it to LAYERS"
        rank, column = RANK[mine]
        for line, target in _imports(path):
            where = f"{path.relative_to(PACKAGE.parent)}:{line}"
            if target == "bench" or target.startswith("bench."):
                bad.append(f"{where} imports the repository's {target} (not part of the package)")
                continue
            if target != "avg_kernels" and not target.startswith("avg_kernels."):
                continue
            theirs = _top(target)
            if theirs not in RANK:
                bad.append(f"{where}: {target} is in no layer")
                continue
            their_rank, their_column = RANK[theirs]
            if their_rank > rank or (their_rank == rank and their_column != column):
                bad.append(f"{where}: {me} ({mine}, layer {rank}) imports {target} ({theirs}, layer {their_rank})")
    return bad


def test_imports_point_down():
    bad = _violations()
    assert not bad, "\n".join(bad)


def test_the_check_sees_imports(tmp_path):
    """The parser resolves relative imports (so a violation could not hide behind one)."""
    assert (1, "avg_kernels.ops") in _imports(PACKAGE / "nn" / "_recording.py") or any(
        t.startswith("avg_kernels.ops") for _, t in _imports(PACKAGE / "nn" / "_recording.py"))
    assert any(t == "avg_kernels._contract.outputs" for _, t in _imports(PACKAGE / "_triton" / "gram.py"))
