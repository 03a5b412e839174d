"""Builds the compiled parts of avg_kernels from csrc/ (every source listed below, nothing globbed):

  avg_kernels._C            op registration, argument checks and drivers (CPU), and the CUDA kernels
                            when built with them. Compiled once, for any CPU.
  avg_kernels._cpu_<level>  the C++ CPU kernels (csrc/cpu/kernels/), compiled once per capability level
                            with that level's flags (avg_kernels/_cpu_levels.py: default = portable C++;
                            avx2 and avx512 on x86-64 hosts), each with hidden symbols so no AVX code of
                            one level can stand in for another's. avg_kernels/_build.py picks the level
                            when the package is imported: the build never looks at the build machine's CPU.
  avg_kernels._C_testing    test hooks (host emulation of the CUDA launches, kernel probes), imported by
                            tests/ only.

Environment switches (all optional):
  AVG_KERNELS_CUDA=auto|0|1   auto (default): build CUDA kernels when torch has CUDA and nvcc is
                              found; 0: never; 1: always, failing with a clear message if impossible.
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured as in torch.utils.cpp_extension.
Install with `pip install --no-build-isolation -e .` so the build uses the torch you installed. Object
files are kept under build/ (per extension), so re-running it recompiles only what changed.
"""
import glob
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError as exc:  # pragma: no cover - only hit by an isolated build
    raise SystemExit(
        "avg_kernels builds against the installed torch: install torch first, then run "
        "`pip install --no-build-isolation -e .` (build isolation would build against another torch)."
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_levels():
    """avg_kernels/_cpu_levels.py, by path (the package itself imports the extension being built)."""
    spec = importlib.util.spec_from_file_location("_avg_kernels_cpu_levels", os.path.join(ROOT, "avg_kernels",
                                                                                          "_cpu_levels.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


LEVELS = _load_levels()
X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")

# Registration, checks and drivers (avg_kernels._C).
OPS_SOURCES = [
    "csrc/module.cpp",
    "csrc/ridge_driver.cpp",
    "csrc/cpu/capability.cpp",
    "csrc/cpu/avg_act.cpp",
    "csrc/cpu/ag_update.cpp",
    "csrc/cpu/gram.cpp",
    "csrc/cpu/ridge.cpp",
]
CUDA_SOURCES = ["csrc/cuda/avg_act.cu", "csrc/cuda/ag_update.cu", "csrc/cuda/gram.cu", "csrc/cuda/ridge.cu"]
# The CPU kernels, compiled once per level (avg_kernels._cpu_<level>).
KERNEL_SOURCES = [
    "csrc/cpu/kernels/avg_act.cpp",
    "csrc/cpu/kernels/ag_update.cpp",
    "csrc/cpu/kernels/gram.cpp",
    "csrc/cpu/kernels/ridge.cpp",
    "csrc/cpu/kernels/vec_math.cpp",
    "csrc/cpu/kernels/table.cpp",
]
# Test hooks (avg_kernels._C_testing).
TESTING_SOURCES = [
    "csrc/testing/module.cpp",
    "csrc/testing/cpu_probes.cpp",
    "csrc/testing/avg_act_cuda_emulation.cpp",
    "csrc/testing/ag_update_cuda_emulation.cpp",
    "csrc/testing/gram_cuda_emulation.cpp",
    "csrc/testing/ridge_cuda_emulation.cpp",
    "csrc/cpu/capability.cpp",
    "csrc/ridge_driver.cpp",
]
INCLUDE_DIRS = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]

# at::parallel_for is a header template: compiled without OpenMP it runs serially in our own code, whatever
# torch.set_num_threads says. With -fopenmp the extension needs libgomp.so.1, which resolves to the copy
# torch has already loaded (same SONAME): one OpenMP runtime, one thread count.
OPENMP = [] if sys.platform == "darwin" else ["-fopenmp"]
# No -std flag: torch.utils.cpp_extension adds the standard the installed torch needs (c++20 since torch
# 2.13's cpp_extension; torch 2.14's headers reject anything older). No -march: nothing depends on the
# build machine's CPU. -g0 overrides the -g of Python's own CFLAGS: debug info for these template-heavy
# sources made the build slower and the modules several times larger.
CXX = ["-O3", "-g0", "-fno-math-errno", *OPENMP]
DEFAULT_LEVEL = ["-DCPU_CAPABILITY=DEFAULT", "-DCPU_CAPABILITY_DEFAULT"]


def _nvidia_wheel_includes() -> list[str]:
    """Include folders of the nvidia-* wheels a CUDA torch depends on (cuBLAS, cuSPARSE, ... headers)."""
    try:
        import nvidia  # namespace package of the nvidia-* wheels
    except ImportError:
        return []
    return [d for base in getattr(nvidia, "__path__", []) for d in sorted(glob.glob(os.path.join(base, "*", "include")))]


def _with_header(name: str, dirs) -> str | None:
    return next((d for d in dirs if os.path.exists(os.path.join(d, name))), None)


def cuda_wanted() -> tuple[bool, list[str]]:
    """(build the CUDA kernels?, extra include folders they need)."""
    choice = os.environ.get("AVG_KERNELS_CUDA", "auto").lower()
    if choice not in ("auto", "0", "1"):
        raise SystemExit(f"AVG_KERNELS_CUDA={choice!r}: expected auto, 0 or 1")
    if choice == "0":
        return False, []
    home = cpp_extension.CUDA_HOME
    nvcc = home and os.path.exists(os.path.join(home, "bin", "nvcc"))
    problems, extra = [], []
    if torch.version.cuda is None:
        problems.append(f"the installed torch {torch.__version__} is a CPU-only build")
    if not nvcc:
        problems.append("nvcc was not found (set CUDA_HOME or put nvcc on PATH)")
    elif not os.path.exists(os.path.join(home, "include", "cuda_runtime_api.h")):
        # e.g. nvcc on PATH is a wrapper script in /usr/local/bin: torch then guesses CUDA_HOME=/usr/local
        problems.append(f"CUDA_HOME={home} is not a CUDA toolkit root (no include/cuda_runtime_api.h); "
                        "set CUDA_HOME to the folder holding bin/nvcc and include/")
    elif torch.version.cuda is not None:
        # torch's CUDA headers include cusparse.h, cublas_v2.h, ...: a toolkit without its math
        # libraries lacks them, but the nvidia-* wheels installed with torch ship them.
        toolkit_inc = os.path.join(home, "include")
        cpath = [d for d in os.environ.get("CPATH", "").split(os.pathsep) if d]
        if not _with_header("cusparse.h", [toolkit_inc, *cpath]):
            wheel_inc = _with_header("cusparse.h", _nvidia_wheel_includes())
            if wheel_inc:
                print(f"avg_kernels: cusparse.h etc. taken from {wheel_inc} (after {toolkit_inc})")
                extra = [toolkit_inc, wheel_inc]  # the toolkit's own headers keep precedence
            else:
                problems.append(f"torch's CUDA headers need cusparse.h, found neither in {toolkit_inc}, CPATH "
                                "nor the nvidia-* wheels; add the folder holding it to CPATH")
    if problems:
        if choice == "1":
            raise SystemExit("AVG_KERNELS_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(problems))
        if torch.version.cuda is not None:  # auto with a CUDA torch: say why the kernels are skipped
            print("avg_kernels: building without CUDA kernels: " + "; ".join(problems))
        return False, []
    return True, extra


def ops_extension():
    with_cuda, cuda_includes = cuda_wanted()
    cxx = CXX + DEFAULT_LEVEL
    if not with_cuda:
        return cpp_extension.CppExtension("avg_kernels._C", OPS_SOURCES, include_dirs=INCLUDE_DIRS,
                                          extra_compile_args={"cxx": cxx}, extra_link_args=OPENMP)
    nvcc = ["-O3", "-DAVG_KERNELS_WITH_CUDA", "--expt-relaxed-constexpr"]
    if os.environ.get("AVG_KERNELS_PTXAS_VERBOSE"):  # register/spill report per kernel
        nvcc.append("-Xptxas=-v")
    return cpp_extension.CUDAExtension(
        "avg_kernels._C", OPS_SOURCES + CUDA_SOURCES, include_dirs=INCLUDE_DIRS + cuda_includes,
        extra_compile_args={"cxx": cxx + ["-DAVG_KERNELS_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=OPENMP)


def kernel_extension(level: str):
    # Hidden visibility: every inline function of a header (c10::Half's F16C conversion, at::vec, ...) is
    # this module's own copy, bound inside it; no other module (or level) can use it, nor it theirs.
    name = level.upper()
    cxx = CXX + ["-fvisibility=hidden", "-fvisibility-inlines-hidden", f"-DCPU_CAPABILITY={name}",
                 f"-DCPU_CAPABILITY_{name}", *LEVELS.FLAGS[level]]
    return cpp_extension.CppExtension(LEVELS.module_name(level), KERNEL_SOURCES, include_dirs=INCLUDE_DIRS,
                                      extra_compile_args={"cxx": cxx}, extra_link_args=OPENMP)


def testing_extension():
    return cpp_extension.CppExtension("avg_kernels._C_testing", TESTING_SOURCES, include_dirs=INCLUDE_DIRS,
                                      extra_compile_args={"cxx": CXX + DEFAULT_LEVEL}, extra_link_args=OPENMP)


class BuildExt(cpp_extension.BuildExtension):
    """Keeps each extension's objects in its own folder under build/ (pip's editable builds otherwise use a
    fresh temporary folder each time, so every re-install recompiled everything; and the levels compile the
    same sources, whose objects must not overwrite each other)."""

    def build_extension(self, ext):
        tag = f"{sysconfig.get_platform()}-py{sys.version_info[0]}{sys.version_info[1]}-torch{torch.__version__}"
        self.build_temp = os.path.join(ROOT, "build", f"temp-{tag}", ext.name.split(".")[-1])
        os.makedirs(self.build_temp, exist_ok=True)
        super().build_extension(ext)


levels = [lvl for lvl in LEVELS.LEVELS if lvl == "default" or X86]
setup(
    packages=find_packages(include=["avg_kernels", "avg_kernels.*"]),
    # the committed learning-rate tables of `reproduce` and `demo` (read at run time)
    package_data={"avg_kernels.reproduce": ["rates.json"], "avg_kernels.demo": ["rates.json"]},
    ext_modules=[ops_extension(), *(kernel_extension(lvl) for lvl in levels), testing_extension()],
    cmdclass={"build_ext": BuildExt.with_options(use_ninja=bool(shutil.which("ninja")))},
)
