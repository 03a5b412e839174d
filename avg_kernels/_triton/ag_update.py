"""Triton kernels of the multi-tensor AG-1 update and AG-2 rescale (SPEC §2).

Design: a fixed number of launches per dtype group, whatever the number of tensors.

* The host turns every tensor triple into flat buffers (``_contract.lists.flat_entries``) and groups the
  triples by (dtype of each member, 16-byte alignment of every member). Each group is ONE launch
  (AG-2: one for the reduction and one for the scaling pass, plus one single-program final reduce
  for the whole call), so the launch count is independent of the number of tensors.
* What the program needs to find its data lives in one int64 tensor ``meta`` (copied to the device
  once per call, from pinned memory, without synchronising):
  rows ``[addr_0, addr_1, addr_2, numel]`` per tensor (addresses as int64 integers), then rows
  ``[row, start]`` per program: program ``pid`` of a group works on elements
  ``[start, min(start + CHUNK, numel))`` of the tensors of table row ``row``. int64 throughout, so
  tensors beyond 2^31 elements are addressed correctly.
* The kernels turn the int64 addresses back into typed pointers (``.to(tl.pointer_type(..),
  bitcast=True)``). Each program walks its chunk in BLOCK-sized steps: full blocks unmasked (with
  ``tl.multiple_of`` hints in aligned groups, so loads and stores vectorise to 128-bit accesses),
  then one masked tail.

Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) runs exactly this code: it implements
int-to-pointer casts as reinterpretations of the integer (``create_int_to_ptr = create_bitcast``)
and its loads/stores take raw host addresses, so a table of CPU tensors' ``data_ptr()`` values
works as it does on the GPU (tensor arguments are not copied for CPU tensors). Two interpreter
gaps are avoided rather than special-cased:
* bfloat16: the interpreter converts float32 -> bfloat16 by truncation (and its RTNE path does not
  carry into the exponent), so bfloat16 is loaded and stored as uint16 with the conversions written
  out in integer arithmetic (exact round-to-nearest-even, the same code on the GPU: a few integer
  ops in a memory-bound kernel);
* ``tl.fma`` is evaluated unfused by the interpreter (``x * y + z`` in numpy), so AG-2's scaled
  elements can differ in the last bit between the interpreter and a GPU; AG-1 has no product and is
  bit-exact everywhere.

Arithmetic (SPEC §2): float32, or float64 when any member of the triple is float64; the result is
rounded once to the parameter's dtype (float64 -> float16/bfloat16 goes through float32, as
PyTorch's own conversion does). AG-2's L1 norms: per-element |a - b| in that arithmetic, summed in
float64 in a fixed order (per program: fixed lanes then ``tl.sum``; then one program sums the
per-program partials in order), so results are bitwise reproducible run to run.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .._contract.lists import FlatEntry
from .._contract.outputs import new_output

# Element type codes (constexpr): which loads/stores a member uses.
F16 = tl.constexpr(0)
BF16 = tl.constexpr(1)
F32 = tl.constexpr(2)
F64 = tl.constexpr(3)
_CODE = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}
_TL = {0: tl.float16, 1: tl.bfloat16, 2: tl.float32, 3: tl.float64}


class Launch(NamedTuple):
    chunk: int  # elements per program (a multiple of block)
    block: int  # elements per step of a program
    num_warps: int


# Production configuration. A program walks CHUNK = 64 Ki elements (large enough that the per-program
# table lookups are negligible, small enough that a 60 M-value model gives ~1.4 k programs, ~10 per SM
# on an H100) in steps of 2048 elements with 8 warps (8 elements per thread: two 128-bit accesses
# per float32 tensor). Checked by tests/test_triton_aot.py.
LAUNCH = Launch(chunk=65536, block=2048, num_warps=8)
# The final reduce of AG-2 is one program summing the per-program partials.
FINAL_BLOCK = 1024


# ---------------------------------------------------------------------------------------------
# Typed access through int64 addresses.
# ---------------------------------------------------------------------------------------------
@triton.jit
def _ptr(meta, row, k: tl.constexpr, CODE: tl.constexpr, ALIGNED: tl.constexpr):
    """Typed pointer to member k of table row ``row``. In aligned groups the compiler is told the
    address is a multiple of 16 bytes, so contiguous loads and stores become 128-bit accesses. The
    hint must sit on the int -> pointer cast itself (not on an integer before it, which the alignment
    analysis does not carry through the cast, nor on a value returned by another jit function, whose
    call is inlined after the hint is lost): hence one cast per branch, here."""
    a = tl.load(meta + (row + k))
    if CODE == BF16:
        p = a.to(tl.pointer_type(tl.uint16), bitcast=True)
    elif CODE == F16:
        p = a.to(tl.pointer_type(tl.float16), bitcast=True)
    elif CODE == F32:
        p = a.to(tl.pointer_type(tl.float32), bitcast=True)
    else:
        p = a.to(tl.pointer_type(tl.float64), bitcast=True)
    if ALIGNED:
        p = tl.multiple_of(p, 16)
    return p


@triton.jit
def _widen(v, CODE: tl.constexpr, OP: tl.constexpr):
    """Loaded values -> arithmetic type OP (bfloat16 arrives as its uint16 bits: exact shift)."""
    if CODE == BF16:
        return (v.to(tl.uint32) << 16).to(tl.float32, bitcast=True).to(OP)
    else:
        return v.to(OP)


@triton.jit
def _narrow(x, CODE: tl.constexpr):
    """Arithmetic value -> stored representation, rounded to nearest even once (float64 results
    for 16-bit parameters go through float32, as PyTorch's conversion does)."""
    if CODE == BF16:
        u = x.to(tl.float32).to(tl.uint32, bitcast=True)
        r = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, (u >> 16) | 0x40, r)  # NaN stays a (quiet) NaN
        return r.to(tl.uint16)
    elif CODE == F16:
        return x.to(tl.float32).to(tl.float16)
    elif CODE == F32:
        return x.to(tl.float32)
    else:
        return x.to(tl.float64)


@triton.jit
def _row(meta, blk_off, pid, CHUNK: tl.constexpr):
    """(table row offset, first element, end element) of program ``pid``."""
    b = blk_off.to(tl.int64) + 2 * pid.to(tl.int64)
    row = tl.load(meta + b) * 4
    start = tl.multiple_of(tl.load(meta + (b + 1)), 16)
    n = tl.load(meta + (row + 3))
    end = tl.minimum(start + CHUNK, n)
    return row, start, end


@triton.jit
def _ag1_elem(t, q, g):
    d = tl.abs(q - t)
    return tl.where(g > 0, t - d, tl.where(g < 0, t + d, tl.where(g == 0, t, g)))


@triton.jit
def _ag1_wr(w, r, g, INTO_NEW: tl.constexpr):
    """Members (w, r, ḡ), w written: θ, θ' (ag1_update_) or θ', θ (INTO_NEW, ag1_update_new_); the same θ_{t+1}."""
    if INTO_NEW:
        return _ag1_elem(r, w, g)
    else:
        return _ag1_elem(w, r, g)


@triton.jit
def ag1_kernel(meta, blk_off, P: tl.constexpr, Q: tl.constexpr, G: tl.constexpr, OP: tl.constexpr,
               ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, INTO_NEW: tl.constexpr):
    """θ ← θ − |θ' − θ| ⊙ sign(ḡ) on one chunk (P, Q, G: type codes of the members; member 0 is written:
    θ, or θ' with INTO_NEW)."""
    row, start, end = _row(meta, blk_off, tl.program_id(0), CHUNK)
    p = _ptr(meta, row, 0, P, ALIGNED)
    q = _ptr(meta, row, 1, Q, ALIGNED)
    g = _ptr(meta, row, 2, G, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    full = start + (end - start) // BLOCK * BLOCK
    for base in range(start, full, BLOCK):
        idx = base + lanes
        t = _widen(tl.load(p + idx), P, OP)
        r = _ag1_wr(t, _widen(tl.load(q + idx), Q, OP), _widen(tl.load(g + idx), G, OP), INTO_NEW)
        tl.store(p + idx, _narrow(r, P))
    idx = full + lanes
    m = idx < end
    t = _widen(tl.load(p + idx, mask=m, other=0), P, OP)
    r = _ag1_wr(t, _widen(tl.load(q + idx, mask=m, other=0), Q, OP), _widen(tl.load(g + idx, mask=m, other=0), G, OP),
                INTO_NEW)
    tl.store(p + idx, _narrow(r, P), mask=m)


@triton.jit
def ag2_reduce_kernel(meta, blk_off, partials, part_off, P: tl.constexpr, O: tl.constexpr, S: tl.constexpr,
                      OP: tl.constexpr, ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """partials[part_off + pid] = (Σ|θ' − θ|, Σ|θ'' − θ|) over one chunk, in float64 (P: θ'' (params),
    O: θ (params_old), S: θ' (params_step))."""
    pid = tl.program_id(0)
    row, start, end = _row(meta, blk_off, pid, CHUNK)
    p = _ptr(meta, row, 0, P, ALIGNED)
    o = _ptr(meta, row, 1, O, ALIGNED)
    s = _ptr(meta, row, 2, S, ALIGNED)
    lanes = tl.arange(0, BLOCK)
    acc_step = tl.zeros([BLOCK], dtype=tl.float64)
    acc_delta = tl.zeros([BLOCK], dtype=tl.float64)
    full = start + (end - start) // BLOCK * BLOCK
    for base in range(start, full, BLOCK):
        idx = base + lanes
        t = _widen(tl.load(o + idx), O, OP)
        acc_step += tl.abs(_widen(tl.load(s + idx), S, OP) - t).to(tl.float64)
        acc_delta += tl.abs(_widen(tl.load(p + idx), P, OP) - t).to(tl.float64)
    idx = full + lanes
    m = idx < end
    t = _widen(tl.load(o + idx, mask=m, other=0), O, OP)
    acc_step += tl.abs(_widen(tl.load(s + idx, mask=m, other=0), S, OP) - t).to(tl.float64)
    acc_delta += tl.abs(_widen(tl.load(p + idx, mask=m, other=0), P, OP) - t).to(tl.float64)
    k = 2 * (part_off.to(tl.int64) + pid.to(tl.int64))
    tl.store(partials + k, tl.sum(acc_step, axis=0))
    tl.store(partials + (k + 1), tl.sum(acc_delta, axis=0))


@triton.jit
def _floor_log2(x):
    """floor(log2 x) of a positive finite float64 (subnormals: scaled by 2^64 first), as int64."""
    sub = x < 2.2250738585072014e-308
    y = tl.where(sub, x * 18446744073709551616.0, x)
    e = ((y.to(tl.int64, bitcast=True) >> 52) & 2047) - 1023
    return tl.where(sub, e - 64, e)


@triton.jit
def _pow2(k):
    """2^k as float64, exact, for -1074 <= k <= 1023 (subnormal powers: 2^(k+64) · 2^-64)."""
    sub = k < -1022
    v = ((tl.where(sub, k + 64, k) + 1023).to(tl.int64) << 52).to(tl.float64, bitcast=True)
    return tl.where(sub, v * 5.421010862427522e-20, v)


@triton.jit
def _ag2_factors(a, b, q):
    """The scale a / b (q, rounded) as factors (u1, u2, v) that neither overflow nor underflow, as
    csrc/include/avg_kernels/ag2_scale.h (which explains them): the update is fma((Δ·u1)·u2, v, θ)."""
    dmax = 1.7976931348623157e308
    plain = ((a <= 0) | (b <= 0) | (a > dmax) | (b > dmax) | (a != a) | (b != b)
             | ((q >= 2.2250738585072014e-308) & (q <= dmax)))
    aa = tl.where(plain, 1.0, a)  # both branches are evaluated: keep the unused one finite
    bb = tl.where(plain, 1.0, b)
    # a / b > DBL_MAX: 2^k with b·2^k in [1, 2)
    k = -_floor_log2(bb)
    k1 = tl.minimum(k, 1023)
    o_u1 = _pow2(k1)
    o_u2 = _pow2(k - k1)
    o_v = aa / (bb * o_u1 * o_u2)
    # 0 <= a / b < DBL_MIN: u1 = a·2^j / b, v = 2^-j
    j = tl.minimum(1021 - _floor_log2(aa), 1074)
    j1 = tl.minimum(j, 1023)
    s_u1 = aa * _pow2(j1) * _pow2(j - j1) / bb
    s_v = _pow2(-j)
    over = q > dmax
    u1 = tl.where(plain, 1.0, tl.where(over, o_u1, s_u1))
    u2 = tl.where(plain | ~over, 1.0, o_u2)
    v = tl.where(plain, q, tl.where(over, o_v, s_v))
    return u1, u2, v


@triton.jit
def ag2_final_kernel(partials, n_parts, norms, BLOCK: tl.constexpr):
    """One program: norms = (‖θ' − θ‖₁, ‖θ'' − θ‖₁, scale, u1, u2, v) from the partials, in a fixed order;
    (u1, u2, v): the scale as factors (``_ag2_factors``)."""
    lanes = tl.arange(0, BLOCK).to(tl.int64)
    acc_step = tl.zeros([BLOCK], dtype=tl.float64)
    acc_delta = tl.zeros([BLOCK], dtype=tl.float64)
    n = n_parts.to(tl.int64)
    for base in range(0, n, BLOCK):
        i = base + lanes
        m = i < n
        acc_step += tl.load(partials + 2 * i, mask=m, other=0.0)
        acc_delta += tl.load(partials + (2 * i + 1), mask=m, other=0.0)
    n_step = tl.sum(acc_step, axis=0)
    n_delta = tl.sum(acc_delta, axis=0)
    scale = tl.where(n_delta == 0, 0.0, n_step / tl.where(n_delta == 0, 1.0, n_delta))
    one = tl.full([], 1, tl.int64)
    tl.store(norms, n_step)
    tl.store(norms + one, n_delta)
    tl.store(norms + 2 * one, scale)
    u1, u2, v = _ag2_factors(n_step, n_delta, scale)
    tl.store(norms + 3 * one, u1)
    tl.store(norms + 4 * one, u2)
    tl.store(norms + 5 * one, v)


@triton.jit
def _ag2_elem(pv, t, scale, scale_d, u1, u2, wide, OP: tl.constexpr):
    r = tl.fma(pv - t, scale, t)
    if wide:  # a scale outside float's normal range, or the ratio outside double's (factors u1, u2 != 1):
        # multiply in float64 with the factors, round once (as the C++ kernels)
        r = tl.fma((pv - t).to(tl.float64) * u1 * u2, scale_d, t.to(tl.float64)).to(OP)
    return r


@triton.jit
def ag2_scale_kernel(meta, blk_off, norms, P: tl.constexpr, O: tl.constexpr, OP: tl.constexpr,
                     ALIGNED: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    """θ'' ← θ + (θ'' − θ) · scale on one chunk; nothing is written when ‖θ'' − θ‖₁ = 0."""
    row, start, end = _row(meta, blk_off, tl.program_id(0), CHUNK)
    p = _ptr(meta, row, 0, P, ALIGNED)
    o = _ptr(meta, row, 1, O, ALIGNED)
    one = tl.full([], 1, tl.int64)
    n_delta = tl.load(norms + one)
    u1 = tl.load(norms + 3 * one)
    u2 = tl.load(norms + 4 * one)
    scale_d = tl.load(norms + 5 * one)  # the plain scale when u1 = u2 = 1
    scale = scale_d.to(OP)
    wide = (u1 != 1.0) | (u2 != 1.0)
    if OP == tl.float32:
        wide = wide | ((scale_d != 0) & ((tl.abs(scale_d) < 1.1754943508222875e-38)
                                         | (tl.abs(scale_d) > 3.4028234663852886e38)))
    if n_delta == 0:
        end = start  # ‖Δ‖₁ = 0: leave every element as it is
    lanes = tl.arange(0, BLOCK)
    full = start + (end - start) // BLOCK * BLOCK
    for base in range(start, full, BLOCK):
        idx = base + lanes
        r = _ag2_elem(_widen(tl.load(p + idx), P, OP), _widen(tl.load(o + idx), O, OP), scale, scale_d, u1, u2, wide, OP)
        tl.store(p + idx, _narrow(r, P))
    idx = full + lanes
    m = idx < end
    r = _ag2_elem(_widen(tl.load(p + idx, mask=m, other=0), P, OP), _widen(tl.load(o + idx, mask=m, other=0), O, OP),
                  scale, scale_d, u1, u2, wide, OP)
    tl.store(p + idx, _narrow(r, P), mask=m)


# ---------------------------------------------------------------------------------------------
# Host side: groups, tables, launches.
# ---------------------------------------------------------------------------------------------
class Group(NamedTuple):
    codes: tuple  # type code of each member
    aligned: bool
    op: object  # tl.float32 / tl.float64
    blk_off: int  # offset of this group's [row, start] pairs in meta
    n_programs: int
    part_off: int  # index of this group's first partial (AG-2)


def _aligned(bufs: Sequence[torch.Tensor]) -> bool:
    return all(b.data_ptr() % 16 == 0 for b in bufs)


def build_tables(entries: Sequence[FlatEntry], chunk: int) -> tuple[torch.Tensor, list[Group]]:
    """The int64 ``meta`` tensor (on the CPU) and the launch groups for ``entries``."""
    keyed: dict[tuple, list[FlatEntry]] = {}
    for e in entries:
        codes = tuple(_CODE[b.dtype] for b in e.bufs)
        keyed.setdefault((codes, _aligned(e.bufs)), []).append(e)
    rows: list[int] = []
    n_rows = sum(len(v) for v in keyed.values())
    blk_parts = []
    groups = []
    blk_off = 4 * n_rows
    part_off = 0
    row0 = 0
    for (codes, aligned), ents in keyed.items():
        sizes = torch.tensor([e.bufs[0].numel() for e in ents], dtype=torch.int64)
        for e in ents:
            rows.extend(b.data_ptr() for b in e.bufs)
            rows.append(e.bufs[0].numel())
        n_chunks = (sizes + chunk - 1) // chunk
        total = int(n_chunks.sum())
        row_ids = torch.repeat_interleave(torch.arange(row0, row0 + len(ents), dtype=torch.int64), n_chunks)
        first = torch.repeat_interleave(torch.cumsum(n_chunks, 0) - n_chunks, n_chunks)
        starts = (torch.arange(total, dtype=torch.int64) - first) * chunk
        blk_parts.append(torch.stack([row_ids, starts], 1).reshape(-1))
        op = tl.float64 if 3 in codes else tl.float32
        groups.append(Group(codes, aligned, op, blk_off, total, part_off))
        blk_off += 2 * total
        part_off += total
        row0 += len(ents)
    meta = torch.cat([torch.tensor(rows, dtype=torch.int64).reshape(-1), *blk_parts])
    return meta, groups


def _to_device(meta: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return meta
    return meta.pin_memory().to(device, non_blocking=True)


def _launch(kernel, grid, device, *args, **kw):
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **kw)
    else:
        kernel[grid](*args, **kw)


def ag1_update_(entries: Sequence[FlatEntry], launch: Launch = LAUNCH, into_new: bool = False) -> None:
    """AG-1 on prepared entries (bufs = [θ, θ', ḡ], or [θ', θ, ḡ] with ``into_new``; flat, validated): one
    launch per group."""
    if not entries:
        return
    device = entries[0].bufs[0].device
    meta_cpu, groups = build_tables(entries, launch.chunk)
    meta = _to_device(meta_cpu, device)
    for g in groups:
        _launch(ag1_kernel, (g.n_programs,), device, meta, g.blk_off, P=g.codes[0], Q=g.codes[1], G=g.codes[2],
                OP=g.op, ALIGNED=g.aligned, CHUNK=launch.chunk, BLOCK=launch.block, INTO_NEW=into_new,
                num_warps=launch.num_warps)


def ag2_rescale_(entries: Sequence[FlatEntry], device: torch.device, launch: Launch = LAUNCH,
                 final_block: int = FINAL_BLOCK) -> torch.Tensor:
    """AG-2 on prepared entries (bufs = [θ'', θ, θ'], flat, validated). Returns the device tensor
    ``(‖θ' − θ‖₁, ‖θ'' − θ‖₁, scale)`` (float64), never read back on the host."""
    if not entries:
        return torch.zeros(3, dtype=torch.float64, device=device)
    meta_cpu, groups = build_tables(entries, launch.chunk)
    meta = _to_device(meta_cpu, device)
    n_parts = sum(g.n_programs for g in groups)
    # one allocation, no memset (NaN-filled under AVG_KERNELS_POISON_OUTPUTS=1: a program that
    # forgets its partial, or a final reduce that skips one, poisons the norms)
    buf = new_output((2 * n_parts + 6,), meta, dtype=torch.float64)  # meta lives on the device
    partials, norms = buf[: 2 * n_parts], buf[2 * n_parts:]  # norms: 3 values, then the scale's 3 factors
    for g in groups:
        _launch(ag2_reduce_kernel, (g.n_programs,), device, meta, g.blk_off, partials, g.part_off, P=g.codes[0],
                O=g.codes[1], S=g.codes[2], OP=g.op, ALIGNED=g.aligned, CHUNK=launch.chunk, BLOCK=launch.block,
                num_warps=launch.num_warps)
    _launch(ag2_final_kernel, (1,), device, partials, n_parts, norms, BLOCK=final_block, num_warps=4)
    for g in groups:
        _launch(ag2_scale_kernel, (g.n_programs,), device, meta, g.blk_off, norms, P=g.codes[0], O=g.codes[1],
                OP=g.op, ALIGNED=g.aligned, CHUNK=launch.chunk, BLOCK=launch.block, num_warps=launch.num_warps)
    return norms[:3]


# ---------------------------------------------------------------------------------------------
# Ahead-of-time compile checks (tests/test_triton_aot.py): the production launch configuration for
# the common dtype groups, aligned and not, on sm_80/sm_90.
# ---------------------------------------------------------------------------------------------
_AOT_GROUPS = {  # name -> (member type codes, aligned)
    "fp32": ((2, 2, 2), True), "bf16": ((1, 1, 1), True), "fp16": ((0, 0, 0), True),
    "fp64": ((3, 3, 3), True), "bf16,fp32,fp32": ((1, 2, 2), True), "fp32,unaligned": ((2, 2, 2), False),
}


def _register_aot() -> None:
    from . import aot

    common = dict(CHUNK=LAUNCH.chunk, BLOCK=LAUNCH.block)
    for name, (codes, aligned) in _AOT_GROUPS.items():
        op = tl.float64 if 3 in codes else tl.float32
        consts = {**common, "OP": op, "ALIGNED": aligned}
        for into_new in (False, True):  # ag1_update_ and ag1_update_new_
            aot.register(aot.KernelConfig(
                name=f"ag1_update{'_new' if into_new else ''}[{name}]", kernel=f"{__name__}:ag1_kernel",
                signature={"meta": "*i64", "blk_off": "i32", "P": "constexpr", "Q": "constexpr", "G": "constexpr",
                           "OP": "constexpr", "ALIGNED": "constexpr", "CHUNK": "constexpr", "BLOCK": "constexpr",
                           "INTO_NEW": "constexpr"},
                constexprs={**consts, "P": codes[0], "Q": codes[1], "G": codes[2], "INTO_NEW": into_new},
                aligned=("meta",), num_warps=LAUNCH.num_warps))
        aot.register(aot.KernelConfig(
            name=f"ag2_reduce[{name}]", kernel=f"{__name__}:ag2_reduce_kernel",
            signature={"meta": "*i64", "blk_off": "i32", "partials": "*fp64", "part_off": "i32", "P": "constexpr",
                       "O": "constexpr", "S": "constexpr", "OP": "constexpr", "ALIGNED": "constexpr",
                       "CHUNK": "constexpr", "BLOCK": "constexpr"},
            constexprs={**consts, "P": codes[0], "O": codes[1], "S": codes[2]},
            aligned=("meta", "partials"), num_warps=LAUNCH.num_warps))
        aot.register(aot.KernelConfig(
            name=f"ag2_scale[{name}]", kernel=f"{__name__}:ag2_scale_kernel",
            signature={"meta": "*i64", "blk_off": "i32", "norms": "*fp64", "P": "constexpr", "O": "constexpr",
                       "OP": "constexpr", "ALIGNED": "constexpr", "CHUNK": "constexpr", "BLOCK": "constexpr"},
            constexprs={**consts, "P": codes[0], "O": codes[1]},
            aligned=("meta", "norms"), num_warps=LAUNCH.num_warps))
    aot.register(aot.KernelConfig(
        name="ag2_final", kernel=f"{__name__}:ag2_final_kernel",
        signature={"partials": "*fp64", "n_parts": "i32", "norms": "*fp64", "BLOCK": "constexpr"},
        constexprs={"BLOCK": FINAL_BLOCK}, aligned=("partials", "norms"), num_warps=4))


_register_aot()
