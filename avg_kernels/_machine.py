"""What the numbers were measured on: machine, versions, extension build, and the source commit."""
from __future__ import annotations

import datetime
import importlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - absent or broken: report as missing
        return None
    return getattr(mod, "__version__", "?")


def source_state() -> dict:
    """HEAD, whether the tree is dirty, and the last commit that changed the C++/CUDA kernels."""
    head = _git("rev-parse", "--short=12", "HEAD")
    kernel = _git("log", "-1", "--format=%h %cs %s", "--", "csrc")
    kernel_dirty = bool(_git("status", "--porcelain", "--", "csrc", "setup.py"))
    return {
        "head": head,
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "tree_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "kernel_commit": kernel,
        "kernel_uncommitted_changes": kernel_dirty,
    }


def extension_state() -> dict:
    import avg_kernels
    from avg_kernels import _build

    ext = _build.extension()
    info: dict = {"error": _build.extension_error(), "available_backends": avg_kernels.available_backends()}
    if ext is None:
        return info
    so = Path(ext.__file__)
    modules = [so] + [Path(importlib.import_module(f"avg_kernels._cpu_{lvl}").__file__) for lvl in _build.built_levels()]
    newest = max((p.stat().st_mtime for p in (ROOT / "csrc").rglob("*") if p.is_file()), default=0.0)
    info.update(
        cpu_kernels_level=_build.cpu_capability(),
        cpu_levels_supported=_build.supported_levels(),
        built_with_cuda=ext.built_with_cuda(),
        file=str(so.relative_to(ROOT)) if so.is_relative_to(ROOT) else str(so),
        # a module is older than some csrc/ file: the kernels timed may not be the sources in the tree
        maybe_stale=min(p.stat().st_mtime for p in modules) < newest,
    )
    return info


def gpu_state() -> dict | None:
    if not torch.cuda.is_available():
        return None
    i = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(i)
    info = {"name": p.name, "capability": f"{p.major}.{p.minor}", "memory_gib": round(p.total_memory / 2**30, 1),
            "sms": p.multi_processor_count, "cuda_runtime": torch.version.cuda, "count": torch.cuda.device_count()}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem",
                              "--format=csv,noheader", "-i", str(i)], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _inductor_isa() -> str | None:
    """The vector ISA torch.compile's C++ code is generated for (``cpu_vec_isa.pick_vec_isa``: follows
    inductor's cpp.simdlen, else ATEN_CPU_CAPABILITY); "none" for scalar code."""
    try:
        from torch._inductor import cpu_vec_isa

        isa = cpu_vec_isa.pick_vec_isa()
    except Exception:  # noqa: BLE001 - inductor missing or broken: not recorded
        return None
    return str(isa) if isa else "none"


def machine_info() -> dict:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "cpu": _cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "inductor_vec_isa": _inductor_isa(),
        "cpus_usable": affinity,
        "torch_threads": torch.get_num_threads(),
        "loadavg": [round(v, 2) for v in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "gpu": gpu_state(),
        "extension": extension_state(),
        "source": source_state(),
        "env": {k: v for k, v in os.environ.items()
                if k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TRITON_INTERPRET", "AVG_KERNELS_POISON_OUTPUTS", "CUDA_VISIBLE_DEVICES",
                         "TORCHINDUCTOR_CACHE_DIR", "AVG_KERNELS_CPU_CAPABILITY", "ATEN_CPU_CAPABILITY",
                         "MKL_ENABLE_INSTRUCTIONS")},
    }


def kernel_commit_line(m: dict) -> str:
    src = m["source"]
    line = f"C++ kernels (csrc/) at commit {src['kernel_commit'] or 'unknown'}"
    if src["kernel_uncommitted_changes"]:
        line += " PLUS UNCOMMITTED CHANGES in csrc/ or setup.py"
    if m["extension"].get("maybe_stale"):
        line += " (WARNING: the built extension is older than some csrc/ file: rebuild before trusting it)"
    return line


def markdown(m: dict) -> list[str]:
    """Machine info as Markdown bullet lines."""
    ext = m["extension"]
    gpu = m["gpu"]
    src = m["source"]
    lines = [
        f"- **{kernel_commit_line(m)}**; tree at {src['head']} ({src['branch']})"
        + (", with uncommitted changes" if src["tree_dirty"] else ""),
        f"- CPU: {m['cpu']} (torch's level {m['cpu_capability']}"
        + (f", torch.compile's C++ for {m['inductor_vec_isa']}" if m.get("inductor_vec_isa") else "")
        + f"), {m['cpus_usable']} usable CPUs, torch threads "
        f"{m['torch_threads']}; {m['platform']}",
        f"- GPU: {gpu['name']} (sm {gpu['capability']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda_runtime']}"
        + (f", driver/clocks {gpu['nvidia_smi']}" if gpu.get("nvidia_smi") else "") + ")" if gpu else "- GPU: none",
        f"- Python {m['python']}, torch {m['torch']}, triton {m['triton'] or 'not installed'}",
        f"- extension avg_kernels._C: "
        + (f"CPU kernels at level {ext['cpu_kernels_level']} (this CPU supports "
           f"{', '.join(ext['cpu_levels_supported'])}), built_with_cuda={ext['built_with_cuda']}"
           if ext.get("cpu_kernels_level") else f"NOT LOADED ({ext['error']})")
        + f"; available backends {ext['available_backends']}",
        f"- measured {m['date_utc']} UTC by `{m['command']}`",
    ]
    if m["env"]:
        lines.append("- environment: " + ", ".join(f"{k}={v}" for k, v in m["env"].items()))
    return lines
