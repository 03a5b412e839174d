#!/usr/bin/env bash
# Installs the newest dist/avg_kernels-*.whl (from `python -m build --wheel --no-isolation`) into a fresh
# venv and runs the reduced parity set of every CPU op (tests/_level_smoke.py) there, outside the source
# tree, with the CPU kernels forced to the portable level (AVG_KERNELS_CPU_CAPABILITY=default).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
wheel=$(ls -t "$ROOT"/dist/avg_kernels-*.whl 2>/dev/null | head -n 1)
[ -n "$wheel" ] || { echo "FAIL: no dist/avg_kernels-*.whl (run: python -m build --wheel --no-isolation)"; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
# torch==2.13.0: the CPU build the README installs; pytest: tests/_level_smoke.py reuses test helpers
"$work/venv/bin/python" -m pip install -q torch==2.13.0 pytest "$wheel"
cd "$work"
AVG_KERNELS_CPU_CAPABILITY=default "$work/venv/bin/python" - "$ROOT/tests/_level_smoke.py" <<'PY'
import json, subprocess, sys
import avg_kernels
assert "site-packages" in avg_kernels.__file__, f"not the installed wheel: {avg_kernels.__file__}"
proc = subprocess.run([sys.executable, sys.argv[1]], capture_output=True, text=True)
report = json.loads(proc.stdout.strip().splitlines()[-1]) if proc.stdout.strip() else {}
failed = [r for r in report.get("results", []) if r[1]]
print(f"wheel {avg_kernels.__file__}: level {report.get('level')}, {len(report.get('results', []))} checks, "
      f"{len(failed)} failed")
for name, err in failed:
    print(f"  {name}: {err}")
sys.exit(0 if proc.returncode == 0 and report.get("level") == "default" and not failed else 1)
PY
