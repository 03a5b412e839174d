"""Builds avg_kernels._C: the C++ CPU kernels always, the CUDA kernels when possible.

Environment switches (all optional):
  AVG_KERNELS_CUDA=auto|0|1   auto (default): build CUDA kernels when torch has CUDA and nvcc is
                              found; 0: never; 1: always, failing with a clear message if impossible.
  AVG_KERNELS_CPU_ISA=auto|avx512|avx2|default
                              SIMD level of the CPU kernels; auto picks what torch.compile picks
                              on this machine (the extension is built for the machine it runs on).
  TORCH_CUDA_ARCH_LIST, MAX_JOBS are honoured as in torch.utils.cpp_extension.
Install with `pip install --no-build-isolation -e .` so the build uses the torch you installed.
"""
import glob
import os
import sys
import shutil

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
ISA_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma", "-DCPU_CAPABILITY_AVX512"],
    "avx2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "default": [],
}


def cpu_isa() -> str:
    choice = os.environ.get("AVG_KERNELS_CPU_ISA", "auto").lower()
    if choice != "auto":
        if choice not in ISA_FLAGS:
            raise SystemExit(f"AVG_KERNELS_CPU_ISA={choice!r}: expected one of auto, {', '.join(ISA_FLAGS)}")
        return choice
    try:  # the same choice torch.compile's C++ backend makes on this machine
        from torch._inductor import cpu_vec_isa

        name = str(cpu_vec_isa.pick_vec_isa())
    except Exception:  # noqa: BLE001 - any failure means: no known SIMD level
        name = ""
    return "avx512" if name.startswith("avx512") else "avx2" if name.startswith("avx2") else "default"


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


# at::parallel_for is a header template: compiled without OpenMP it runs serially in our own code, whatever
# torch.set_num_threads says. With -fopenmp the extension needs libgomp.so.1, which resolves to the copy
# torch has already loaded (same SONAME): one OpenMP runtime, one thread count.
OPENMP = [] if sys.platform == "darwin" else ["-fopenmp"]


def extension():
    isa = cpu_isa()
    # No -std flag: torch.utils.cpp_extension adds the standard the installed torch needs (c++20
    # since torch 2.13's cpp_extension; torch 2.14's headers reject anything older).
    cxx = ["-O3", "-fno-math-errno", *ISA_FLAGS[isa], *OPENMP]
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    include_dirs = [os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")]
    with_cuda, cuda_includes = cuda_wanted()
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        include_dirs += cuda_includes
        nvcc = ["-O3", "-DAVG_KERNELS_WITH_CUDA", "--expt-relaxed-constexpr"]
        if os.environ.get("AVG_KERNELS_PTXAS_VERBOSE"):  # register/spill report per kernel
            nvcc.append("-Xptxas=-v")
        return cpp_extension.CUDAExtension(
            "avg_kernels._C", sources, include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx + ["-DAVG_KERNELS_WITH_CUDA"], "nvcc": nvcc}, extra_link_args=OPENMP,
        )
    return cpp_extension.CppExtension(
        "avg_kernels._C", sources, include_dirs=include_dirs, extra_compile_args={"cxx": cxx},
        extra_link_args=OPENMP,
    )


setup(
    packages=find_packages(include=["avg_kernels", "avg_kernels.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=bool(shutil.which("ninja")))},
)
