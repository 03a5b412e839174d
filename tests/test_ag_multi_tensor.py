"""The GPU launch logic of the multi-tensor AG ops, verified without a GPU.

* CUDA C++: csrc/cuda/multi_tensor_apply.cuh + ag_update_kernel.cuh run on the host through internal
  CPU ops (csrc/testing/ag_update_cuda_emulation.cpp) that execute the CUDA path's own planning and, for every
  block and thread, the same __host__ __device__ functions the GPU runs: chunk tables (also lists
  longer than one table, tensors carried over between tables), 64-bit offsets (plans for tensors
  beyond 2^31 and 2^32 elements by index arithmetic only), vector/tail element I/O with every
  16-bit conversion, the deterministic block reductions and the launch counts.
* Triton: the table builder and the launch count of avg_kernels/_triton/ag_update.py, and the kernels
  at small chunk/block sizes (many programs per tensor) in the interpreter.
"""
from __future__ import annotations

import math

import pytest
import torch

import avg_kernels as ak
from avg_kernels import reference
from bench import model_shapes
from avg_kernels._contract import lists as _lists

from test_ag_update import DTYPE_MIXES, ag1_lists, ag2_lists, clone_all, exact_ag1, same_bits
from conftest import hook_ops

needs_ext = pytest.mark.skipif("cpu" not in ak.available_backends(), reason="the C++ extension is not built")
needs_triton = pytest.mark.skipif("triton" not in ak.available_backends(), reason="triton cannot run here")

E = hook_ops()


def limits():
    chunk, max_tensors, max_blocks, threads, ilp, table_bytes = E.mta_limits()
    return dict(chunk=chunk, max_tensors=max_tensors, max_blocks=max_blocks, threads=threads, ilp=ilp,
                table_bytes=table_bytes)


def emulation_shapes():
    return [(), (0,), (1,), (3,), (4,), (5,), (7, 9), (33,), (2047,), (2048,), (2049,), (4, 4, 3, 3), (6001,)]


def unaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a buffer that starts one element past an aligned address."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    return out


# ---------------------------------------------------------------------------------------------
# CUDA launcher: data parity through the host emulation.
# ---------------------------------------------------------------------------------------------
LIMIT_CASES = [  # (chunk, max_tensors, max_blocks): production, and tiny tables that force many launches
    "production", (8, 1, 1), (8, 2, 3), (64, 3, 5), (2048, 320, 2048), (4, 5, 7)]


def _lim(case):
    if case == "production":
        lim = limits()
        return lim["chunk"], lim["max_tensors"], lim["max_blocks"]
    return case


@needs_ext
@pytest.mark.parametrize("case", LIMIT_CASES, ids=str)
@pytest.mark.parametrize("mix", ["f32", "mixed", "bf16", "f16", "f64"])
def test_emulated_cuda_ag1_exact(case, mix, fresh_seed):
    chunk, mt, mb = _lim(case)
    ps, qs, gs = ag1_lists(emulation_shapes(), DTYPE_MIXES[mix], torch.device("cpu"), none_every=5)
    # every third triple lives at addresses that rule out vector accesses (the element-wise path)
    for k in range(0, len(ps), 3):
        ps[k], qs[k] = unaligned(ps[k]), unaligned(qs[k])
    expected = [exact_ag1(p.clone(), q, g) for p, q, g in zip(ps, qs, gs)]
    E.ag1_update_cuda_emulated_(ps, qs, gs, chunk, mt, mb)
    for k, (p, e) in enumerate(zip(ps, expected)):
        assert same_bits(p, e), (k, tuple(p.shape), p.dtype)


@needs_ext
@pytest.mark.parametrize("case", LIMIT_CASES, ids=str)
@pytest.mark.parametrize("mix", ["f32", "mixed", "bf16"])
def test_emulated_cuda_ag2(case, mix, fresh_seed):
    chunk, mt, mb = _lim(case)
    ps, os_, ss = ag2_lists(emulation_shapes(), DTYPE_MIXES[mix], torch.device("cpu"))
    for k in range(1, len(ps), 3):
        ps[k], ss[k] = unaligned(ps[k]), unaligned(ss[k])
    n_step, n_delta = reference.ag_update.l1_norms(ps, os_, ss)
    ref = clone_all(ps)
    reference.ag2_rescale_(ref, os_, ss)
    a, b = clone_all(ps), clone_all(ps)
    norms, launches = E.ag2_rescale_cuda_emulated_(a, os_, ss, chunk, mt, mb)
    norms2, _ = E.ag2_rescale_cuda_emulated_(b, os_, ss, chunk, mt, mb)
    # per-element |a - b| in float32, summed in float64: within float32 rounding of each term
    assert norms[0].item() == pytest.approx(n_step, rel=2 ** -23)
    assert norms[1].item() == pytest.approx(n_delta, rel=2 ** -23)
    assert norms[2].item() == pytest.approx(n_step / n_delta, rel=2 ** -21)
    assert torch.equal(norms, norms2) and all(same_bits(x, y) for x, y in zip(a, b))  # bitwise reproducible
    for p, r in zip(a, ref):
        tol = 2 * torch.finfo(p.dtype).eps * r.double().abs() + 1e-6
        assert ((p.double() - r.double()).abs() <= tol).all()
    assert launches[2].item() == 1  # one final reduce per call


@needs_ext
def test_emulated_cuda_matches_cpu_backend(fresh_seed):
    """Same arithmetic, different summation order: the two backends agree to float64 rounding in the
    norms and to one float32 rounding in the results."""
    ps, os_, ss = ag2_lists([(300, 70), (5,), (65537,), (3, 3)], DTYPE_MIXES["f32"], torch.device("cpu"))
    a, b = clone_all(ps), clone_all(ps)
    n_cpu = torch.ops.avg_kernels_C.ag2_rescale_(a, os_, ss)
    n_emu, _ = E.ag2_rescale_cuda_emulated_(b, os_, ss, *_lim("production"))
    torch.testing.assert_close(n_cpu, n_emu, rtol=1e-13, atol=0)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-7, atol=1e-7)


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_emulated_16bit_conversions(dtype):
    """The host versions of the GPU's float16/bfloat16 conversions against PyTorch's: every 16-bit
    pattern through load and store (ḡ = 0 keeps θ), and round-to-nearest-even of float32 values over the
    whole range (subnormals, ties, overflow to inf) through AG-1's single rounding."""
    bits = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16)
    p = bits.view(dtype).clone()
    before = p.clone()
    E.ag1_update_cuda_emulated_([p], [p.clone() + 1], [torch.zeros_like(p)], *_lim("production"))
    assert same_bits(p, before)
    fi = torch.finfo(dtype)
    mags = torch.logspace(math.log10(fi.tiny) - 4, math.log10(fi.max) + 0.2, 200001, dtype=torch.float64)
    q = torch.cat([mags, -mags]).float()
    # exact ties: the midpoints between neighbouring 16-bit values
    grid = torch.arange(0, 32000, 7, dtype=torch.int32).to(torch.int16).view(dtype).float()
    nxt = (torch.arange(0, 32000, 7, dtype=torch.int32) + 1).to(torch.int16).view(dtype).float()
    q = torch.cat([q, (grid + nxt) / 2])
    p = torch.zeros(q.shape, dtype=dtype)
    for sign in (1.0, -1.0):
        out = p.clone()
        g = torch.full(q.shape, sign)
        E.ag1_update_cuda_emulated_([out], [q], [g], *_lim("production"))
        assert same_bits(out, exact_ag1(p, q, g))


@needs_ext
@pytest.mark.parametrize("n", [5, 50, 319, 320, 321, 700])
def test_emulated_launch_count_is_fixed(n):
    """One launch per table per arithmetic group, not per tensor: a call over up to 320 tensors (2048
    chunks) is one AG-1 launch (AG-2: one reduce, one final reduce, one scale) per group."""
    lim = limits()
    ps = [torch.randn(3) for _ in range(n)]
    qs = [p + 1 for p in ps]
    gs = [torch.ones(3) for _ in range(n)]
    tables = math.ceil(n / lim["max_tensors"])
    launches = E.ag1_update_cuda_emulated_(ps, qs, gs, *_lim("production"))
    assert launches.tolist() == [tables, 0, 0, 0]
    gs[0] = torch.ones(3, dtype=torch.float64)  # one triple in float64 arithmetic: a second group
    launches = E.ag1_update_cuda_emulated_(ps, qs, gs, *_lim("production"))
    assert launches.tolist() == [math.ceil((n - 1) / lim["max_tensors"]) + 1, 0, 0, 0]
    _, launches = E.ag2_rescale_cuda_emulated_(ps, qs, [q + 1 for q in qs], *_lim("production"))
    assert launches.tolist() == [0, tables, 1, tables]


@needs_ext
def test_emulated_checks_before_writing():
    p = [torch.randn(3), torch.randn(4)]
    before = clone_all(p)
    with pytest.raises(ValueError, match=r"params_new\[1\] has shape \(5,\)"):
        E.ag1_update_cuda_emulated_(p, [torch.randn(3), torch.randn(5)], [torch.randn(3), torch.randn(4)], 8, 1, 1)
    assert all(torch.equal(x, y) for x, y in zip(p, before))


# ---------------------------------------------------------------------------------------------
# CUDA launcher: index logic only (any size).
# ---------------------------------------------------------------------------------------------
def _check_plan(numels, chunk, max_tensors, max_blocks):
    """Every element of every tensor in exactly one block, blocks in order and within the table
    limits, a tensor split over two tables continued in slot 0 of the next (vectorised checks)."""
    plan = E.mta_plan(numels, chunk, max_tensors, max_blocks)
    table, slot, index, begin, end, gblock = plan.unbind(1)
    assert torch.equal(gblock, torch.arange(len(plan)))  # blocks numbered consecutively across tables
    assert len(plan) == sum(-(-n // chunk) for n in numels if n > 0)
    assert torch.equal(table, table.sort().values) and (torch.bincount(table) <= max_blocks).all()
    pairs = torch.unique(torch.stack([table, slot], 1), dim=0)
    assert (torch.bincount(pairs[:, 0]) <= max_tensors).all()
    assert len(torch.unique(torch.stack([table, slot, index], 1), dim=0)) == len(pairs)  # one tensor per slot
    first = torch.nonzero(table[1:] != table[:-1]).flatten() + 1  # first row of tables 1, 2, ...
    carried = index[first] == index[first - 1]
    assert (slot[first][carried] == 0).all()
    # coverage: rows are in (index, begin) order; consecutive chunks of a tensor touch
    same = index[1:] == index[:-1]
    assert torch.equal(begin[1:][same], end[:-1][same])
    assert ((begin % chunk) == 0).all() and ((end - begin) > 0).all() and ((end - begin) <= chunk).all()
    starts = torch.cat([torch.tensor([True]), ~same])
    stops = torch.cat([~same, torch.tensor([True])])
    nonempty = [i for i, n in enumerate(numels) if n > 0]
    assert index[starts].tolist() == nonempty and (begin[starts] == 0).all()
    assert end[stops].tolist() == [numels[i] for i in nonempty]
    return plan


@needs_ext
@pytest.mark.parametrize("case", ["production", (8, 2, 3), (65536, 3, 64)], ids=str)
def test_plan_beyond_int32(case):
    """Tensors of 2^31 - 1, 2^31 + 7 and 2^32 + 5 elements: 64-bit chunk offsets, exact coverage."""
    chunk, mt, mb = _lim(case)
    if chunk < 4096:  # tiny chunks: keep the block count small, still crossing 2^31 in offsets
        numels = [5, 0, 3 * chunk + 1, 2 * chunk, 1, 7]
        _check_plan(numels, chunk, mt, mb)
        return
    numels = [2 ** 31 - 1, 0, 3, 2 ** 31 + 7, 2 ** 32 + 5, 65536, 65537]
    plan = _check_plan(numels, chunk, mt, mb)
    assert plan[:, 3].max().item() >= 2 ** 32  # offsets past 2^32 survive as int64


@needs_ext
def test_plan_resnet152():
    lim = limits()
    numels = [math.prod(s) for s in model_shapes.resnet152()]
    plan = _check_plan(numels, lim["chunk"], lim["max_tensors"], lim["max_blocks"])
    assert len(numels) == 467 and sum(numels) == 60_192_808
    assert plan[:, 0].max().item() + 1 == 2  # two tables (467 tensors > 320 per table)
    assert lim["table_bytes"] <= 32764  # the kernel-argument limit of CUDA >= 12.1


@needs_ext
@pytest.mark.parametrize("begin,end", [(0, 65536), (2 ** 31 - 65536, 2 ** 31 - 3), (2 ** 32, 2 ** 32 + 4097),
                                       (2 ** 33 + 65536, 2 ** 33 + 65536 + 2)])
@pytest.mark.parametrize("aligned", [True, False])
def test_thread_groups_cover_the_block(begin, end, aligned):
    """The thread loop of every kernel: 512 threads x 4-element groups tile [begin, end) exactly,
    vector accesses only for whole groups of an aligned tensor, int64 indices throughout."""
    lim = limits()
    rows = torch.cat([E.mta_thread_groups(begin, end, lim["threads"], t, aligned) for t in range(lim["threads"])])
    order = rows[:, 0].argsort()
    rows = rows[order]
    starts, counts, whole = rows.unbind(1)
    assert starts[0].item() == begin
    assert torch.equal(starts[1:], starts[:-1] + counts[:-1])  # no gap, no overlap
    assert (starts[-1] + counts[-1]).item() == end
    assert torch.equal(whole.bool(), (counts == lim["ilp"]) & aligned)


# ---------------------------------------------------------------------------------------------
# Triton: tables, launch count, small-chunk parity in the interpreter.
# ---------------------------------------------------------------------------------------------
@needs_triton
def test_triton_tables_cover_every_element():
    from avg_kernels._triton import ag_update as tri

    big = torch.empty(1).expand(2 ** 31 + 5)  # 2^31 + 5 elements, 4 bytes of memory
    small = torch.randn(100)
    entries = [_lists.FlatEntry(0, [small, small, small], None), _lists.FlatEntry(1, [big, big, big], None),
               _lists.FlatEntry(2, [small.double(), small, small], None)]
    meta, groups = tri.build_tables(entries, chunk=65536)
    assert meta.dtype == torch.int64
    assert len(groups) == 2  # (float32 x3) and (float64, float32, float32)
    rows = meta[: 4 * 3].view(3, 4)
    assert rows[1, 3].item() == 2 ** 31 + 5
    g0 = groups[0]
    blk = meta[g0.blk_off: g0.blk_off + 2 * g0.n_programs].view(-1, 2)
    for row_id, n in ((0, 100), (1, 2 ** 31 + 5)):
        starts = blk[blk[:, 0] == row_id][:, 1]
        assert torch.equal(starts, torch.arange(0, n, 65536))
    assert g0.n_programs == 1 + math.ceil((2 ** 31 + 5) / 65536)


@needs_triton
@pytest.mark.parametrize("n", [3, 24])
def test_triton_launch_count_is_fixed(n, monkeypatch):
    from avg_kernels._triton import ag_update as tri

    launched = []
    real = tri._launch
    def counting(kernel, grid, *args, **kw):
        launched.append(kernel)
        return real(kernel, grid, *args, **kw)

    monkeypatch.setattr(tri, "_launch", counting)
    ps = [torch.randn(2) for _ in range(n)]
    ak.ag1_update_(ps, [p + 1 for p in ps], [torch.ones(2) for _ in range(n)], backend="triton")
    assert len(launched) == 1
    launched.clear()
    ak.ag2_rescale_(ps, [p + 1 for p in ps], [p + 2 for p in ps], backend="triton")
    assert len(launched) == 3
    launched.clear()
    # bfloat16 params form a second group: one more launch per pass
    ps[0] = ps[0].bfloat16()
    ak.ag1_update_(ps, [p + 1 for p in ps], [torch.ones(2) for _ in range(n)], backend="triton")
    assert len(launched) == 2


@needs_triton
@pytest.mark.parametrize("mix", ["f32", "mixed", "bf16"])
def test_triton_small_chunks(mix, fresh_seed):
    """Many programs per tensor (chunk 32, block 8) and unaligned groups, in the interpreter."""
    from avg_kernels._triton import ag_update as tri

    launch = tri.Launch(chunk=32, block=8, num_warps=1)
    shapes = [(), (0,), (1,), (5,), (7, 9), (33,), (65,), (2, 3, 3, 3)]
    ps, qs, gs = ag1_lists(shapes, DTYPE_MIXES[mix], torch.device("cpu"), none_every=4)
    for k in range(0, len(ps), 3):
        ps[k], qs[k] = unaligned(ps[k]), unaligned(qs[k])
    expected = [exact_ag1(p.clone(), q, g) for p, q, g in zip(ps, qs, gs)]
    entries = _lists.flat_entries((ps, qs, gs))
    tri.ag1_update_(entries, launch=launch)
    assert all(same_bits(p, e) for p, e in zip(ps, expected))

    ps, os_, ss = ag2_lists(shapes, DTYPE_MIXES[mix], torch.device("cpu"))
    ref = clone_all(ps)
    reference.ag2_rescale_(ref, os_, ss)
    n_step, n_delta = reference.ag_update.l1_norms(ps, os_, ss)
    entries = _lists.flat_entries((ps, os_, ss))
    norms = tri.ag2_rescale_(entries, torch.device("cpu"), launch=launch, final_block=16)
    assert norms[0].item() == pytest.approx(n_step, rel=2 ** -23)
    assert norms[1].item() == pytest.approx(n_delta, rel=2 ** -23)
    for p, r in zip(ps, ref):
        tol = 2 * torch.finfo(p.dtype).eps * r.double().abs() + 1e-6
        assert ((p.double() - r.double()).abs() <= tol).all()


def test_triton_aot_registry_has_the_ag_kernels():
    """tests/test_triton_aot.py compiles these for sm_80/sm_90 (no spills, 128-bit loads for aligned
    groups, 64-bit offsets); this checks they are registered at all."""
    pytest.importorskip("triton")
    from avg_kernels._triton import aot

    names = {c.name for c in aot.configs()}
    for kernel in ("ag1_update", "ag2_reduce", "ag2_scale"):
        for group in ("fp32", "bf16", "fp16", "fp64", "bf16,fp32,fp32", "fp32,unaligned"):
            assert f"{kernel}[{group}]" in names
    assert "ag2_final" in names
