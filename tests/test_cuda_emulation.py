"""The CUDA kernel's logic, run on the CPU, and the CUDA kernel itself on a device.

``csrc/cuda/avg_act_kernel.cuh`` keeps everything the CUDA kernel does per element and per index
(16-byte vector loads/stores, scalar path for misaligned pointers, grid-stride loop, masked tail,
64-bit offsets, float16/bfloat16 conversions) in ``__host__ __device__`` code. The internal ops of
``csrc/testing/avg_act_cuda_emulation.cpp`` run that code on the host for every (block, thread) of a chosen
launch, through the same dtype/activation dispatch and argument setup as ``csrc/cuda/avg_act.cu``:

* ``avg_act_backward_emulated(g, x, x_new, out, act, p0, p1, eps, grid, block) -> vectorized``
* ``cuda_launch_config(n, elem_size, vectorized, num_sms, blocks_per_sm) -> [grid, block, vec]``
* ``grid_stride_check`` / ``grid_stride_ranges``: the index logic alone, for any n (> 2^32 too)
* ``emulated_bits_to_float`` / ``emulated_float_to_bits``: the kernel's 16-bit conversions

The emulation evaluates the math with the host's libm; the device's libm (CUDA's expf, erfcf, ...)
is only exercised by the ``cuda``-marked tests at the end, which skip without a device.
"""
from __future__ import annotations

import math

import pytest
import torch

import avg_kernels as ak
from avg_kernels import EPS, reference
from avg_kernels.activations import forward
from avg_kernels.ops._backend import unavailable_reason

from _accuracy import CONFIGS, config_id, kernel_act, non_finite_inputs, slope_errors, spec_inputs
from conftest import hook_ops

_CPU_REASON = unavailable_reason("cpu")
_CUDA_REASON = unavailable_reason("cuda")
needs_ext = pytest.mark.skipif(_CPU_REASON is not None, reason=f"C++ extension: {_CPU_REASON}")


def needs_cuda(fn):
    """@pytest.mark.cuda, skipped (with the reason) where the cuda backend cannot run."""
    skip = pytest.mark.skipif(_CUDA_REASON is not None, reason=f"cuda backend: {_CUDA_REASON}")
    return pytest.mark.cuda(skip(fn))


def _C():
    return hook_ops()


# An H100-like device: 132 SMs; 4 resident blocks per SM is in the range the occupancy API gives
# for these kernels (their register counts allow 3 to 8 blocks of 256 threads).
H100_SMS, BLOCKS_PER_SM = 132, 4
# (grid, block) launches; "device" is what the CUDA op would pick for the tensors at hand.
LAUNCHES = {
    "1x1": (1, 1),        # one thread does everything: the longest grid-stride loop
    "1x32": (1, 32),      # one warp
    "3x96": (3, 96),      # odd sizes, threads not a multiple of the vector count
    "device": None,
    "4096x256": (4096, 256),  # far more threads than elements
}
DTYPES = {torch.float16: "f16", torch.bfloat16: "bf16", torch.float32: "f32", torch.float64: "f64"}


def _aligned(*ts) -> bool:
    return all(t.data_ptr() % 16 == 0 for t in ts)


def _launch(name: str, n: int, dtype: torch.dtype, vectorized: bool):
    if LAUNCHES[name] is not None:
        return LAUNCHES[name]
    elem = torch.finfo(dtype).bits // 8
    grid, block, _ = _C().cuda_launch_config(max(n, 1), elem, vectorized, H100_SMS, BLOCKS_PER_SM)
    return grid, block


def emulate(g, x, xn, cfg, launch="device", out=None):
    """The CUDA op's result, computed by the host emulation; returns (out, vectorized)."""
    k = kernel_act(cfg)
    if out is None:
        out = torch.full(x.shape, math.nan, dtype=x.dtype)
    grid, block = _launch(launch, x.numel(), x.dtype, _aligned(g, x, xn, out))
    vec = _C().avg_act_backward_emulated(g, x, xn, out, k.kernel_id, k.p0, k.p1, EPS, grid, block)
    return out, vec


# ---- parity with the float64 reference (SPEC §1) ----------------------------------------------

@needs_ext
@pytest.mark.parametrize("launch", ["1x32", "device"])
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_emulated_float32_meets_spec_bar(cfg, launch, fresh_seed):
    k = kernel_act(cfg)
    g, x, xn = spec_inputs(20001)  # odd: a 1-element tail after 5000 float4 vectors
    out, vec = emulate(g, x, xn, cfg, launch)
    assert vec
    mask, bad, normwise, _ = slope_errors(out, g, x, xn, k)
    assert mask.sum() > 0.9 * x.numel()
    assert not bad.any(), f"{bad.sum().item()} elements over the bar, e.g. x={x[bad][:3]}, x_new={xn[bad][:3]}"
    assert normwise <= 1e-6


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=DTYPES.get)
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_emulated_reduced_precision_only_final_rounding(cfg, dtype, fresh_seed):
    k = kernel_act(cfg)
    g, x, xn = spec_inputs(5003, dtype=dtype)
    out, vec = emulate(g, x, xn, cfg, "3x96")
    assert vec and out.dtype == dtype
    ref = reference.avg_act_backward(g.double(), x.double(), xn.double(), k, EPS)
    tiny = torch.finfo(dtype).tiny
    ulp = torch.finfo(dtype).eps * ref.abs().clamp(min=tiny)
    err = (out.double() - ref).abs()
    assert (err <= 0.5 * ulp + 1e-5 * ref.abs() + 1e-6 * g.double().abs() + tiny).all()


@needs_ext
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_emulated_float64(cfg, fresh_seed):
    k = kernel_act(cfg)
    g, x, xn = spec_inputs(5003, dtype=torch.float64)
    out, vec = emulate(g, x, xn, cfg, "device")
    assert vec
    ref = reference.avg_act_backward(g, x, xn, k, EPS)
    e64 = torch.finfo(torch.float64).eps
    ref_err = 4 * e64 * (forward(x, k).abs() + forward(xn, k).abs() + x.abs() + xn.abs()) / (xn - x).abs().clamp(min=EPS)
    tol = (1e-12 * (ref / g).abs() + ref_err + 1e-300) * g.abs()
    assert ((out - ref).abs() <= tol).all()


@needs_ext
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
def test_emulated_non_finite(cfg):
    k = kernel_act(cfg)
    g, x, xn = non_finite_inputs()
    for launch in ("1x1", "device"):
        out, _ = emulate(g, x, xn, cfg, launch)
        ref = reference.avg_act_backward(g, x, xn, k, EPS)
        assert torch.equal(out.isnan(), ref.isnan()), (out, ref)
        fin = ~ref.isnan()
        torch.testing.assert_close(out[fin], ref[fin].to(out.dtype), rtol=1e-5, atol=1e-6)


# ---- sizes, launches, vector/scalar paths -----------------------------------------------------

SIZES = [0, 1, 2, 3, 7, 8, 9, 31, 33, 255, 257, 1023, 1025, 4095, 4097]
ACT_SAMPLE = [("tanh", {}), ("gelu", {}), ("softplus", {"beta": 2.0, "threshold": 10.0})]


@needs_ext
@pytest.mark.parametrize("launch", list(LAUNCHES))
@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPES.get)
def test_emulated_sizes_and_launches_write_exactly_their_elements(dtype, launch, fresh_seed):
    """Every size (tails of every length for every vector width) and launch: each element is
    written once with the right value, nothing around the output is touched."""
    pad = 16  # elements of guard on each side; a multiple of every vector width keeps alignment
    for n in SIZES:
        g, x, xn = spec_inputs(n, dtype=dtype)
        buf = torch.full((n + 2 * pad,), -7.0, dtype=dtype)
        out = buf[pad:pad + n]
        for cfg in ACT_SAMPLE:
            out.fill_(math.nan)
            _, vec = emulate(g, x, xn, cfg, launch, out=out)
            assert vec == (n > 0)  # fresh allocations are 16-byte aligned (n == 0: nothing runs)
            ref = reference.avg_act_backward(g, x, xn, kernel_act(cfg), EPS)
            tol = dict(rtol=2e-5, atol=2e-6) if dtype in (torch.float32, torch.float64) else {}
            torch.testing.assert_close(out, ref, **tol)
            assert (buf[:pad] == -7.0).all() and (buf[pad + n:] == -7.0).all(), (n, cfg)


@needs_ext
@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPES.get)
@pytest.mark.parametrize("misaligned", ["grad_out", "x", "x_new", "out", "all"])
def test_emulated_misaligned_takes_scalar_path_bitwise_equal(dtype, misaligned, fresh_seed):
    """A view with storage offset 1 is not 16-byte aligned: the scalar path runs, and gives the
    vector path's result bit for bit (the per-element code is the same)."""
    n = 1025
    base = [t for t in spec_inputs(n + 1, dtype=dtype)]
    aligned = [t[1:].clone() for t in base]  # fresh allocations: 16-byte aligned
    g, x, xn = [(t[1:] if misaligned in (name, "all") else a)
                for t, a, name in zip(base, aligned, ("grad_out", "x", "x_new"))]
    assert torch.equal(g, aligned[0]) and torch.equal(x, aligned[1]) and torch.equal(xn, aligned[2])
    out_buf = torch.full((n + 1,), math.nan, dtype=dtype)
    out = out_buf[1:] if misaligned in ("out", "all") else out_buf[:n]
    for cfg in ACT_SAMPLE + [("elu", {"alpha": 0.5})]:
        want, vec = emulate(*aligned, cfg, "3x96")
        assert vec
        for launch in ("1x32", "device"):
            out.fill_(math.nan)
            _, vec = emulate(g, x, xn, cfg, launch, out=out)
            assert not vec
            assert torch.equal(out, want), cfg


@needs_ext
def test_emulated_result_independent_of_launch(fresh_seed):
    g, x, xn = spec_inputs(3001)
    cfg = ("silu", {})
    results = [emulate(g, x, xn, cfg, launch)[0] for launch in LAUNCHES]
    for r in results[1:]:
        assert torch.equal(r, results[0])


@needs_ext
def test_emulated_non_contiguous_inputs(fresh_seed):
    """Non-contiguous inputs are made contiguous first, as in the CUDA op."""
    base = [t.reshape(40, 60) for t in spec_inputs(2400)]
    for views in ([t.t() for t in base], [t[::2, 1::3] for t in base], [t[:1].expand(5, 60) for t in base]):
        out, _ = emulate(*views, ("sigmoid", {}), "1x32")
        ref = reference.avg_act_backward(*views, kernel_act(("sigmoid", {})), EPS)
        torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-6)


@needs_ext
def test_emulated_argument_checks():
    g, x, xn = spec_inputs(8)
    out = torch.empty(8)
    with pytest.raises(RuntimeError, match="grid must be"):
        _C().avg_act_backward_emulated(g, x, xn, out, 0, 0.0, 0.0, EPS, 0, 32)
    with pytest.raises(RuntimeError, match="block must be"):
        _C().avg_act_backward_emulated(g, x, xn, out, 0, 0.0, 0.0, EPS, 1, 1025)
    with pytest.raises(RuntimeError, match="one shape"):
        _C().avg_act_backward_emulated(g, x, xn, torch.empty(4), 0, 0.0, 0.0, EPS, 1, 32)
    with pytest.raises(ValueError, match="unknown activation"):  # std::invalid_argument
        _C().avg_act_backward_emulated(g, x, xn, out, 99, 0.0, 0.0, EPS, 1, 32)


# ---- float16 / bfloat16 conversions -----------------------------------------------------------

def _all_bits():
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)


@needs_ext
@pytest.mark.parametrize("dtype,kind", [(torch.float16, 0), (torch.bfloat16, 1)], ids=["f16", "bf16"])
def test_conversions_match_pytorch(dtype, kind):
    bits = _all_bits()
    # 16 bits -> float: every pattern.
    got = _C().emulated_bits_to_float(bits, kind)
    want = bits.view(dtype).float()
    assert torch.equal(got.isnan(), want.isnan())
    fin = ~want.isnan()
    assert torch.equal(got[fin].view(torch.int32), want[fin].view(torch.int32))  # signed zeros too
    # float -> 16 bits: every representable value, every midpoint between neighbours (ties to
    # even) and the floats just either side of it, plus random float32 bit patterns.
    vals = want[fin].double().unique()
    mids = ((vals[1:] + vals[:-1]) / 2).float()
    probes = torch.cat([
        vals.float(), mids, torch.nextafter(mids, torch.tensor(-math.inf)), torch.nextafter(mids, torch.tensor(math.inf)),
        torch.randint(-2**31, 2**31, (1 << 20,), dtype=torch.int64).to(torch.int32).view(torch.float32),
        torch.tensor([65504.0, 65519.996, 65520.0, 1e30, -1e30, 2.0**-25, 2.0**-24, 1e-30, -0.0, math.inf, -math.inf]),
    ])
    got = _C().emulated_float_to_bits(probes, kind).view(dtype)
    want = probes.to(dtype)
    assert torch.equal(got.isnan(), want.isnan())
    fin = ~want.isnan()
    mismatch = got[fin].view(torch.int16) != want[fin].view(torch.int16)
    assert not mismatch.any(), probes[fin][mismatch][:5]


# ---- launch configuration and index coverage --------------------------------------------------

@needs_ext
def test_launch_config():
    for n in [1, 255, 256, 257, 4096, 1 << 20, 1 << 28, (1 << 32) + 3, 1 << 40]:
        for elem, vectorized in [(2, True), (4, True), (8, True), (4, False)]:
            grid, block, vec = _C().cuda_launch_config(n, elem, vectorized, H100_SMS, BLOCKS_PER_SM)
            assert vec == (16 // elem if vectorized else 1) and block == 256
            assert grid == min(-(-n // (block * vec)), H100_SMS * BLOCKS_PER_SM)
    with pytest.raises(RuntimeError, match="n must be > 0"):
        _C().cuda_launch_config(0, 4, True, H100_SMS, BLOCKS_PER_SM)


def _expected_visits(n: int, vec: int, tid: int, nthreads: int) -> list[tuple[int, int]]:
    """What thread ``tid`` must be handed: vectors tid, tid + T, ... < n // vec, then the tail."""
    nvec = n // vec if vec > 1 else 0
    out = [(v * vec, vec) for v in range(tid, nvec, nthreads)]
    return out + [(i, 1) for i in range(nvec * vec + tid, n, nthreads)]


def _count(lo: int, hi: int, step: int) -> int:
    return max(0, -(-(hi - lo) // step))


@needs_ext
@pytest.mark.parametrize("n", [(1 << 31) + 7, (1 << 32) + 3], ids=["2^31+7", "2^32+3"])
def test_index_coverage_beyond_2_31(n):
    """The grid-stride logic over more than 2^31 (2^32) elements, without allocating them:
    * every thread of a production-like launch, 16-byte vectors of halves (n / 8 visits), checked
      in C++ against its arithmetic progression: together they cover [0, n) exactly once;
    * sampled threads for the other vector widths and the scalar path, element counts checked
      against the arithmetic here;
    * the ranges of single threads (with the largest legal grid too) equal Python's big-int
      arithmetic, past 2^32: no offset is computed in 32 bits."""
    C = _C()
    for vec in (8, 4, 2, 1):
        grid, block, v = C.cuda_launch_config(n, 16 // vec if vec > 1 else 4, vec > 1, H100_SMS, BLOCKS_PER_SM)
        assert v == vec
        T = grid * block
        if vec == 8:
            elements, visits, errors, max_end = C.grid_stride_check(n, vec, grid, block, 0, T)
            assert (elements, errors, max_end) == (n, 0, n)
            assert visits == n // 8 + n % 8
        nvec = n // vec if vec > 1 else 0
        for lo, hi in [(0, 512), (T // 2 - 256, T // 2 + 256), (T - 512, T)]:
            elements, visits, errors, max_end = C.grid_stride_check(n, vec, grid, block, lo, hi)
            want = sum(_count(t, nvec, T) * vec + _count(nvec * vec + t, n, T) for t in range(lo, hi))
            assert errors == 0 and elements == want
        # The last thread's ranges, in full (a few thousand), against big-int arithmetic.
        got = C.grid_stride_ranges(n, vec, grid, block, grid - 1, block - 1, 1 << 16)
        want = _expected_visits(n, vec, T - 1, T)
        assert [tuple(r) for r in got.tolist()] == want
        # it reaches the last grid stride: for n = 2^32 + 3 that is past 2^31 (past 2^32 for the
        # scalar path), which int32 offsets could not express
        top = max(s for s, _ in want)
        assert top >= (nvec * vec if vec > 1 else n) - T * vec
        assert n < 1 << 32 or top > 1 << 31
    # The largest legal grid (2^31 - 1 blocks of 1024 threads, ids beyond 2^40): the thread of the
    # last element, one past it, the last thread of the grid.
    G, B = (1 << 31) - 1, 1024
    T = G * B
    for vec in (1, 4):
        nvec = n // vec if vec > 1 else 0
        # thread 0 (for vec 4 also the tail element at 2^32 or 2^31 + 4), the owners of the last
        # vector and of the last element, one past them, the grid's last thread (id > 2^41)
        for tid in {0, 1, 2, nvec - 1 if vec > 1 else 0, n - 1, n, T - 1}:
            got = C.grid_stride_ranges(n, vec, G, B, tid // B, tid % B, 8)
            assert [tuple(r) for r in got.tolist()] == _expected_visits(n, vec, tid, T), tid
        elements, _, errors, _ = C.grid_stride_check(n, vec, G, B, T - 3, T)
        assert errors == 0 and elements == 0
        lo = n - 2000 if vec == 1 else nvec - 2000
        elements, _, errors, _ = C.grid_stride_check(n, vec, G, B, lo, lo + 4000)
        assert errors == 0
        assert elements == sum(_count(t, nvec, T) * vec + _count(nvec * vec + t, n, T) for t in range(lo, lo + 4000))


@needs_ext
def test_index_coverage_exhaustive_small():
    """For small n, the union of every thread's ranges, counted element by element."""
    C = _C()
    for n in [0, 1, 7, 8, 9, 255, 257, 1031]:
        for vec in (1, 2, 4, 8):
            for grid, block in [(1, 1), (1, 32), (3, 96), (7, 256)]:
                hits = torch.zeros(n + 8, dtype=torch.int64)
                for b in range(grid):
                    for t in range(block):
                        for s, ln in C.grid_stride_ranges(n, vec, grid, block, b, t, 4096).tolist():
                            hits[s:s + ln] += 1
                assert (hits[:n] == 1).all() and (hits[n:] == 0).all(), (n, vec, grid, block)
                assert C.grid_stride_check(n, vec, grid, block, 0, grid * block)[0::2] == [n, 0]


# ---- on a CUDA device -------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPES.get)
@pytest.mark.parametrize("cfg", CONFIGS, ids=config_id)
@needs_cuda
def test_cuda_matches_emulation(cfg, dtype, fresh_seed):
    """The device kernel and its host emulation run the same code; they differ only by the two
    libms (a few float32 ulps of s, final rounding for 16-bit types)."""
    g, x, xn = spec_inputs(1 << 16 | 5, dtype=dtype)
    got = ak.avg_act_backward(g.cuda(), x.cuda(), xn.cuda(), cfg[0], backend="cuda", **cfg[1]).cpu()
    emu, _vec = emulate(g, x, xn, cfg)
    assert torch.equal(got.isnan(), emu.isnan())
    if dtype == torch.float64:
        torch.testing.assert_close(got, emu, rtol=1e-12, atol=1e-300)
    elif dtype == torch.float32:
        torch.testing.assert_close(got, emu, rtol=2e-6, atol=1e-7)
    else:
        torch.testing.assert_close(got.float(), emu.float(), rtol=2 * torch.finfo(dtype).eps, atol=1e-6)


@pytest.mark.parametrize("dtype", list(DTYPES), ids=DTYPES.get)
@needs_cuda
def test_cuda_misaligned_and_poisoned(dtype, fresh_seed):
    """Storage offset 1 takes the scalar path on the device; every element of a NaN-poisoned
    output is written; a view of a larger buffer leaves its neighbours untouched."""
    n = (1 << 20) + 3
    g, x, xn = (t.cuda() for t in spec_inputs(n + 1, dtype=dtype))
    k = kernel_act(("tanh", {}))
    ref = reference.avg_act_backward(g[1:].cpu(), x[1:].cpu(), xn[1:].cpu(), k, EPS)
    got = ak.avg_act_backward(g[1:], x[1:], xn[1:], "tanh", backend="cuda").cpu()
    tol = dict(rtol=2e-5, atol=2e-6) if dtype in (torch.float32, torch.float64) else {}
    torch.testing.assert_close(got, ref, **tol)
    buf = torch.full((n + 2,), -7.0, dtype=dtype, device="cuda")
    out = buf[1:n + 1]
    out.fill_(math.nan)
    torch.ops.avg_kernels_C.avg_act_backward_out(g[1:], x[1:], xn[1:], out, k.kernel_id, 0.0, 0.0, EPS)
    torch.testing.assert_close(out.cpu(), ref, **tol)
    assert buf[0].item() == -7.0 and buf[-1].item() == -7.0


@needs_cuda
def test_cuda_side_stream_and_device_guard(fresh_seed):
    g, x, xn = (t.cuda() for t in spec_inputs(100003))
    want = ak.avg_act_backward(g, x, xn, "gelu", backend="cuda")
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        got = ak.avg_act_backward(g, x, xn, "gelu", backend="cuda")
    s.synchronize()
    assert torch.equal(got, want)


@pytest.mark.slow
@needs_cuda
def test_cuda_beyond_2_31_elements():
    """2^31 + 7 float16 elements (4 x 4 GiB on the device): sampled elements around the 2^31
    boundary and the tail match the reference."""
    n = (1 << 31) + 7
    free, _total = torch.cuda.mem_get_info()
    if free < 5 * 2 * n:
        pytest.skip(f"needs {5 * 2 * n / 2**30:.0f} GiB free on the device, {free / 2**30:.0f} GiB are")
    torch.manual_seed(0)
    x = torch.empty(n, dtype=torch.float16, device="cuda").uniform_(-4, 4)
    xn = x + torch.empty_like(x).uniform_(-1, 1)
    g = torch.ones_like(x)
    out = ak.avg_act_backward(g, x, xn, "sigmoid", backend="cuda")
    idx = torch.cat([torch.arange(0, 1000), torch.arange((1 << 31) - 1000, n)]).cuda()
    k = kernel_act(("sigmoid", {}))
    ref = reference.avg_act_backward(g[idx].cpu(), x[idx].cpu(), xn[idx].cpu(), k, EPS)
    torch.testing.assert_close(out[idx].cpu(), ref)
