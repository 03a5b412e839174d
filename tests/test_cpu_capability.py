"""CPU capability levels (SPEC §5): the C++ CPU kernels are compiled once per level (setup.py, flags in
avg_kernels/_cpu_levels.py) and the level is chosen when avg_kernels is imported (avg_kernels/_build.py).

* the level table agrees with torch's own flags; the choice logic on made-up CPUs;
* cpu_features() agrees with the kernel's /proc/cpuinfo; import picks the best level;
  AVG_KERNELS_CPU_CAPABILITY forces a lower one and refuses one the CPU lacks;
* a reduced parity set of every CPU op (tests/_level_smoke.py) at every level this machine supports;
* no compiled module holds an instruction above its level (disassembly), and the portable sources hold no
  x86 intrinsics outside the avx2/avx512 branches.
tests/test_cpu_emulated.py runs the parity set under qemu-user emulation of older CPUs.
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import avg_kernels as ak
from avg_kernels import _build, _cpu_levels

import _level_smoke
from conftest import cpu_level_params, hook_ops

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
needs_ext = pytest.mark.skipif(_build.extension() is None, reason=f"C++ extension: {_build.extension_error()}")

ALL = {f: True for f in {f for req in _cpu_levels.REQUIRES.values() for f in req}}
AVX2_ONLY = {**ALL, **{f: False for f in ("avx512f", "avx512dq", "avx512vl", "avx512bw", "os_avx512")}}


def test_level_flags_are_torchs():
    """avx2 / avx512 use the flags torch.compile's C++ backend uses for those levels."""
    from torch._inductor import cpu_vec_isa

    assert set(_cpu_levels.FLAGS["avx2"]) == set(cpu_vec_isa.VecAVX2._arch_flags.split())
    assert set(_cpu_levels.FLAGS["avx512"]) == set(cpu_vec_isa.VecAVX512._arch_flags.split())
    assert _cpu_levels.FLAGS["default"] == ()


@pytest.mark.parametrize("features, requested, expected", [
    (ALL, None, "avx512"), (ALL, "", "avx512"), (ALL, "avx2", "avx2"), (ALL, " AVX2 ", "avx2"),
    (ALL, "default", "default"), (AVX2_ONLY, None, "avx2"), ({}, None, "default"),
    ({**ALL, "os_avx512": False}, None, "avx2"),  # the OS does not save zmm registers
    ({**AVX2_ONLY, "f16c": False}, None, "default"),  # the avx2 level converts float16 with F16C
])
def test_choose(features, requested, expected):
    assert _cpu_levels.choose(features, _cpu_levels.LEVELS, requested) == expected


@pytest.mark.parametrize("features, built, requested, message", [
    (AVX2_ONLY, _cpu_levels.LEVELS, "avx512",
     r"AVG_KERNELS_CPU_CAPABILITY=avx512: this CPU lacks avx512f, avx512dq, avx512vl, avx512bw, os_avx512, which "
     r"the avx512 kernels use \(levels this CPU supports: default, avx2\)"),
    ({}, _cpu_levels.LEVELS, "avx2", r"this CPU lacks sse4_2, popcnt, avx, avx2, fma, f16c, os_avx"),
    (ALL, _cpu_levels.LEVELS, "sse4", r"AVG_KERNELS_CPU_CAPABILITY='sse4' is not a level; expected one of default, "
                                      r"avx2, avx512"),
    (ALL, ("default",), "avx2", r"this build of avg_kernels has no avx2 kernels \(built: default\)"),
])
def test_choose_refuses(features, built, requested, message):
    with pytest.raises(ValueError, match=message):
        _cpu_levels.choose(features, built, requested)


@needs_ext
def test_cpu_features_match_proc_cpuinfo():
    """cpuid as the extension reads it agrees with the kernel's view (x86 Linux)."""
    info = Path("/proc/cpuinfo")
    if not info.exists() or not _build.cpu_features():
        pytest.skip("needs x86 Linux")
    flags = set(next(line for line in info.read_text().splitlines() if line.startswith("flags")).split(":")[1].split())
    got = _build.cpu_features()
    for name in ("sse4_2", "popcnt", "avx", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512vl", "avx512bw"):
        assert got[name] == (name in flags), name


def _python(code: str, level: str | None, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != _cpu_levels.ENV}
    if level is not None:
        env[_cpu_levels.ENV] = level
    return subprocess.run([sys.executable, "-c", code], cwd=TESTS, env=env, capture_output=True, text=True,
                          timeout=timeout)


@needs_ext
def test_import_picks_the_best_supported_level():
    proc = _python("import avg_kernels as ak; print(ak.cpu_capability())", None)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[-1] == _build.supported_levels()[-1]


@needs_ext
@pytest.mark.parametrize("level", cpu_level_params())
def test_environment_forces_a_level(level):
    code = ("import torch, avg_kernels as ak; x = torch.linspace(-3, 3, 101); g = torch.ones(101);"
            "out = ak.avg_act_backward(g, x, x + 0.5, 'gelu', backend='cpu');"
            "ref = ak.avg_act_backward(g.double(), x.double(), x.double() + 0.5, 'gelu', backend='reference');"
            "print(ak.cpu_capability(), float((out.double() - ref).abs().max()))")
    proc = _python(code, level)
    assert proc.returncode == 0, proc.stderr
    got, err = proc.stdout.split()[-2:]
    assert got == level and float(err) < 1e-6


@needs_ext
@pytest.mark.parametrize("value, message", [
    ("sse4", r"CpuCapabilityError: AVG_KERNELS_CPU_CAPABILITY='sse4' is not a level"),
    *[(lvl, rf"CpuCapabilityError: AVG_KERNELS_CPU_CAPABILITY={lvl}: this CPU lacks ")
      for lvl in _cpu_levels.LEVELS if lvl not in _build.supported_levels()],
])
def test_environment_refuses_what_cannot_run(value, message):
    """A request the CPU cannot honour fails `import avg_kernels` with the reason (never runs other code
    silently). Levels above this CPU's are also checked under emulation (tests/test_cpu_emulated.py)."""
    proc = _python("import avg_kernels", value)
    assert proc.returncode != 0
    assert re.search(message, proc.stderr), proc.stderr[-2000:]


@needs_ext
def test_set_cpu_capability_switches_every_module():
    hook_ops()  # loads avg_kernels._C_testing
    before = ak.cpu_capability()
    try:
        for level in _build.supported_levels():
            assert _build.set_cpu_capability(level) in _cpu_levels.LEVELS
            assert ak.cpu_capability() == level
            assert _build.extension().cpu_capability() == level
            assert _build.testing_extension().cpu_capability() == level
        with pytest.raises(ValueError, match="is not a CPU capability level"):
            _build.set_cpu_capability("avx3")
    finally:
        _build.set_cpu_capability(before)
    assert ak.cpu_capability() == before


@needs_ext
@pytest.mark.parametrize("check", _level_smoke.CHECKS, ids=lambda c: c.__name__)
def test_reduced_parity_at_every_level(cpu_level, check, fresh_seed):
    """Every kernel of the level's table against the float64 reference (tests/_level_smoke.py)."""
    gen = torch.Generator().manual_seed(fresh_seed)
    failures = [f"{name}: {err:.3g} > {tol:.3g}" for name, err, tol in check(gen) if not err <= tol]
    assert not failures, "\n".join(failures)


# ------------------------------------------------------------------------------------------------
# What the compiled code may contain. A default-level module must run on any x86-64 CPU; the avx2 module
# on any AVX2 + FMA + F16C CPU. Hidden visibility makes each module's inline functions its own; this checks
# the result instruction by instruction.

# Instructions beyond x86-64's baseline (SSE2) that a compiler emits when allowed to: SSE3 to SSE4.2,
# POPCNT, BMI, MOVBE, and anything VEX/EVEX-encoded (AVX and above: every mnemonic starting with "v").
ABOVE_BASELINE = re.compile(
    r"^(v[a-z]|popcnt|lzcnt|tzcnt|(andn|bextr|blsi|blsr|bzhi|pdep|pext|[sh][ah][lr]x|rorx|mulx)\b|movbe|crc32|"
    r"pshufb|palignr|phadd|phsub|pabs[bwd]|psign|pmaddubsw|pmulhrsw|haddp|hsubp|addsubp|movddup|movs[hl]dup|lddqu|"
    r"ptest|pmulld|pmuldq|round[ps][sd]|blendv?p|pblend|pmin[su][bdw]|pmax[su][bdw]|pcmp[eg][qt]q|pextr[bdq]|"
    r"pinsr[bdq]|insertps|extractps|dpp[sd]|pmov[sz]x|packusdw|mpsadbw|phminposuw|movntdqa|pcmp[ei]str)")
# EVEX (AVX-512) only: zmm registers, xmm/ymm 16-31, opmask registers and masking, EVEX-only mnemonics.
AVX512_ONLY = re.compile(r"%zmm|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|%k[0-7]|\{%k|^(k[a-z]+|vpternlog|vperm[it]2|"
                         r"vrndscale|vscalef|vgetexp|vgetmant|vfixupimm|vrange|vreduce|v(p)?compress|v(p)?expand|"
                         r"vpconflict|vplzcnt|vpro[lr]|vpsraq|vcvt\w*u?qq|vcvt\w*2u|vcvtu|vpabsq|vpm(ax|in)[su]q|"
                         r"vpmullq|v(p)?blendm|vpmov\w*2m|vpmovm2|vpmovq|vpmovd[bw]|vpmovw)")


def _instructions(path: str):
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True, check=True)
    for line in out.stdout.splitlines():
        m = re.match(r"^\s*[0-9a-f]+:\s+(\S.*)$", line)
        if m:
            yield m.group(1)


def _violations(path: str, pattern: re.Pattern) -> list[str]:
    return [ins for ins in _instructions(path) if pattern.search(ins.split()[0]) or pattern.search(ins)]


@needs_ext
@pytest.mark.parametrize("module, above", [
    ("avg_kernels._C", ABOVE_BASELINE), ("avg_kernels._C_testing", ABOVE_BASELINE),
    ("avg_kernels._cpu_default", ABOVE_BASELINE), ("avg_kernels._cpu_avx2", AVX512_ONLY),
])
def test_no_instruction_above_the_level(module, above):
    if shutil.which("objdump") is None or not _build.cpu_features():
        pytest.skip("needs objdump (binutils) on x86-64")
    try:
        path = importlib.util.find_spec(module).origin
    except AttributeError:
        pytest.skip(f"{module} is not built here")
    bad = _violations(path, above)
    assert not bad, f"{len(bad)} instructions above the level in {path}, e.g. {bad[:5]}"


def test_the_violation_patterns_match_what_they_must():
    """The two patterns catch real AVX / AVX-512 code (so the disassembly test can fail)."""
    for ins in ("vcvtph2ps", "popcnt", "pshufb", "andn", "pext", "roundps", "pmulld"):
        assert ABOVE_BASELINE.search(ins), ins
    for ins in ("movaps", "cvtps2pd", "andnps", "pextrw", "pinsrw", "sqrtsd", "pmuludq"):
        assert not ABOVE_BASELINE.search(ins), ins
    for ins in ("vaddps %zmm1,%zmm2,%zmm3", "vmovups %ymm17,(%rax)", "kmovw %k1,%eax", "vscalefps %xmm1,%xmm2,%xmm3",
                "vaddps %ymm1,%ymm2,%ymm3{%k1}"):
        assert AVX512_ONLY.search(ins.split()[0]) or AVX512_ONLY.search(ins), ins
    for ins in ("vfmadd231ps %ymm1,%ymm2,%ymm3", "vcvtph2ps %xmm1,%ymm2", "vpermps %ymm1,%ymm2,%ymm3"):
        assert not (AVX512_ONLY.search(ins.split()[0]) or AVX512_ONLY.search(ins)), ins


INTRINSIC = re.compile(r"\b(_mm\w*|__m(128|256|512)\w*|__mmask\d+)\b|immintrin\.h")
LEVEL_GUARD = re.compile(r"CPU_CAPABILITY_AVX(2|512)")


def _unguarded_intrinsics(text: str) -> list[int]:
    """Lines using x86 intrinsics outside an #if/#elif branch whose condition names an AVX level."""
    stack: list[bool] = []  # per open #if: is the current branch an AVX-level branch
    bad = []
    for i, line in enumerate(text.splitlines(), 1):
        d = re.match(r"\s*#\s*(if|ifdef|ifndef|elif|else|endif)\b(.*)", line)
        if d:
            kind, cond = d.groups()
            if kind in ("if", "ifdef", "ifndef"):
                stack.append(bool(LEVEL_GUARD.search(cond)) and kind != "ifndef")
            elif kind == "elif":
                stack[-1] = bool(LEVEL_GUARD.search(cond))
            elif kind == "else":
                stack[-1] = False
            else:
                stack.pop()
            continue
        if INTRINSIC.search(line.split("//")[0]) and not any(stack):
            bad.append(i)
    return bad


def test_portable_sources_have_no_unguarded_intrinsics():
    """The default level is plain C++ (it compiles on non-x86 hosts): in every CPU source, x86 intrinsics
    appear only inside `#if defined(CPU_CAPABILITY_AVX2/AVX512)` branches."""
    sources = sorted((ROOT / "csrc" / "cpu").rglob("*.[ch]*")) + [ROOT / "csrc" / "ag_lists.h", ROOT / "csrc" / "ag_entry.h"]
    assert len(sources) > 10
    bad = {str(p.relative_to(ROOT)): lines for p in sources if (lines := _unguarded_intrinsics(p.read_text()))}
    assert not bad, bad
    assert _unguarded_intrinsics("__m256 x;\n") == [1]  # the scan itself sees an unguarded use
    assert _unguarded_intrinsics("#if defined(CPU_CAPABILITY_AVX2)\n__m256 x;\n#else\n__m256 y;\n#endif\n") == [4]
