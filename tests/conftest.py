"""Shared test setup.

Without a CUDA device the Triton backend runs in Triton's interpreter on CPU tensors, so the
same parity tests cover it: TRITON_INTERPRET=1 must be set before triton is first imported.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

# The benchmarks (bench/, at the repository root, not part of the package) are tested too: importable as `bench`.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.append(str(ROOT))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Every kernel output is allocated NaN-filled ("poisoned") before the launch, so an element a
# kernel forgets to write cannot pass a parity test (see avg_kernels/_contract/outputs.py).
os.environ.setdefault("AVG_KERNELS_POISON_OUTPUTS", "1")

import avg_kernels  # noqa: E402
from avg_kernels import _build  # noqa: E402

try:  # property-based tests (tests/test_properties.py): a bounded budget by default, --hypothesis-profile=long for more
    from hypothesis import HealthCheck, settings

    _checks = [HealthCheck.too_slow, HealthCheck.data_too_large]
    settings.register_profile("ci", deadline=None, max_examples=40, suppress_health_check=_checks)
    settings.register_profile("long", deadline=None, max_examples=800, suppress_health_check=_checks)
    settings.load_profile("ci")
except ImportError:  # test_properties.py then fails to import, naming hypothesis
    pass


def hook_ops():
    """``torch.ops.avg_kernels_testing``: the test hooks of avg_kernels._C_testing (host emulations of the
    CUDA launches, probes into the CPU kernels of the active capability level), or None when the C++
    extension is not built."""
    return torch.ops.avg_kernels_testing if _build.testing_extension() is not None else None


def backend_params():
    """Every backend, skipped with the reason when it cannot run here."""
    out = []
    for name in ("reference", "cpu", "triton", "cuda"):
        from avg_kernels.ops._backend import unavailable_reason

        reason = unavailable_reason(name)
        marks = [pytest.mark.skip(reason=f"{name}: {reason}")] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


def backend_device(backend: str) -> torch.device:
    """Where tensors for ``backend`` live: CUDA for cuda/triton when a GPU exists, else CPU."""
    if backend == "cuda" or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    if backend == "reference" and torch.cuda.is_available() and os.environ.get("AVG_KERNELS_TEST_REFERENCE_ON_CUDA"):
        return torch.device("cuda")
    return torch.device("cpu")


def interpreted(backend: str) -> bool:
    """True when ``backend`` runs in the (slow) Triton interpreter: keep those tests small."""
    return backend == "triton" and not torch.cuda.is_available()


@pytest.fixture(params=backend_params())
def backend(request):
    return request.param


def cpu_level_params():
    """Every CPU capability level (avg_kernels/_cpu_levels.py); the ones this machine or build cannot run are
    skipped with the reason."""
    from avg_kernels import _cpu_levels

    supported = _build.supported_levels()
    out = []
    for level in _cpu_levels.LEVELS:
        if level in supported:
            marks = []
        elif _build.extension() is None:
            marks = [pytest.mark.skip(reason=f"C++ extension: {_build.extension_error()}")]
        elif level not in _build.built_levels():
            marks = [pytest.mark.skip(reason=f"{level} kernels are not built on this platform")]
        else:
            lacks = ", ".join(_cpu_levels.missing(level, _build.cpu_features()))
            marks = [pytest.mark.skip(reason=f"this CPU lacks {lacks} (tests/test_cpu_emulated.py covers {level} "
                                             "under emulation where qemu can)")]
        out.append(pytest.param(level, marks=marks, id=level))
    return out


@pytest.fixture(params=cpu_level_params())
def cpu_level(request):
    """Runs the test with the C++ CPU kernels of one capability level (switched in-process), then restores."""
    previous = _build.set_cpu_capability(request.param)
    try:
        yield request.param
    finally:
        _build.set_cpu_capability(previous)


@pytest.fixture
def fresh_seed():
    """A fresh seed per test run (printed on failure by pytest's captured output)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed={seed}")
    torch.manual_seed(seed)
    return seed


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count (e.g. ``python -m avg_kernels reproduce --threads`` run in-process)
    must not change the numerics of the tests after it: the count is put back after every test."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


_ = avg_kernels
