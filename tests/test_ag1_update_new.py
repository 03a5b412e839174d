"""``ag1_update_new_``: AG-1's θ_{t+1} written over θ' (``params_new``) instead of θ (SPEC §2). The AG optimizer
uses it (its parameters hold θ' after the base step, θ is a copy), so it must be bitwise ``ag1_update_``'s
result, on every backend: against the exact emulation of the kernels' arithmetic, the float64 reference,
``ag1_update_`` itself, special values, layouts, bad input naming ``params_new`` as the written list, the
grad-mode guard, opcheck, and the CUDA launch logic through its host emulation.
"""
from __future__ import annotations

import math
import re

import pytest
import torch

import avg_kernels as ak
from avg_kernels import reference

from conftest import backend_device, hook_ops
from test_ag_update import (DTYPE_MIXES, FLOATS, _bad_cases, _check_bad, _layouts, ag1_lists,
                            assert_outside_slice_untouched, clone_all, exact_ag1, numpy_ag1, same_bits, shapes_for)


def _expected(ps, qs, gs):
    """θ_{t+1} rounded to θ''s dtype; θ' itself where ḡ is None."""
    return [q.clone() if g is None else exact_ag1(p, q, g, into=q.dtype) for p, q, g in zip(ps, qs, gs)]


@pytest.mark.parametrize("mix", list(DTYPE_MIXES))
def test_exact_arithmetic_into_params_new(backend, mix, fresh_seed):
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists(shapes_for(backend), DTYPE_MIXES[mix], dev, none_every=4)
    before = clone_all(ps)
    if backend == "reference":  # float64 arithmetic, one rounding to θ''s dtype
        expected = [q.clone() if g is None else numpy_ag1(p.double(), q.double(), g.double()).to(q.dtype)
                    for p, q, g in zip(ps, qs, gs)]
    else:
        expected = _expected(ps, qs, gs)
    ak.ag1_update_new_(ps, qs, gs, backend=backend)
    for k, (q, e) in enumerate(zip(qs, expected)):
        assert same_bits(q, e), (k, tuple(q.shape), q.dtype)
    assert all(same_bits(p, b) for p, b in zip(ps, before))  # θ is read only


@pytest.mark.parametrize("dtype", FLOATS)
def test_bitwise_the_result_of_ag1_update(backend, dtype, fresh_seed):
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists(shapes_for(backend), [(dtype,) * 3], dev, none_every=5)
    a, b = clone_all(ps), clone_all(qs)
    ak.ag1_update_(a, qs, gs, backend=backend)
    ak.ag1_update_new_(ps, b, gs, backend=backend)
    for x, y, q, g in zip(a, b, qs, gs):
        assert same_bits(y, q if g is None else x)


def test_special_values(backend):
    dev = backend_device(backend)
    inf, nan = math.inf, math.nan
    cases = [(1.5, 2.0, 0.0), (1.5, inf, -0.0), (-2.0, -1.0, nan), (1.0, 3.0, -1.0), (1.0, inf, 1.0),
             (nan, 1.0, 1.0), (inf, 1.0, 1.0), (-0.0, 0.0, -1.0), (1e38, -1e38, 1.0), (2.0, 1.0, -inf)]
    for dtype in FLOATS:
        p, q, g = (torch.tensor([c[i] for c in cases], dtype=dtype, device=dev) for i in range(3))
        a = p.clone()
        ak.ag1_update_([a], [q], [g], backend=backend)
        b = q.clone()
        ak.ag1_update_new_([p], [b], [g], backend=backend)
        assert same_bits(a, b), (dtype, a, b)


def test_layouts(backend, fresh_seed):
    """A non-contiguous θ' is written in place (same storage, memory around a slice untouched)."""
    dev = backend_device(backend)
    triples, base = _layouts(dev)
    base_before = base.clone()
    news = [t[1] for t in triples]  # the layouts' written tensors, here in the role of θ'
    olds = [t[2] for t in triples]
    gs = [t[3] for t in triples]
    ptrs = [q.data_ptr() for q in news]
    a = [o.clone() for o in olds]
    ak.ag1_update_(a, [q.clone() for q in news], gs, backend=backend)
    ak.ag1_update_new_(olds, news, gs, backend=backend)
    for (name, *_), q, e, ptr in zip(triples, news, a, ptrs):
        assert q.data_ptr() == ptr
        assert same_bits(q, e), name
    assert_outside_slice_untouched(base, base_before)


def _swap_names(msg: str) -> str:
    return re.sub(r"params(_new)?\b", lambda m: "params" if m.group(1) else "params_new", msg)


@pytest.mark.parametrize("case", [c[0] for c in _bad_cases("cpu") if c[2] is not None])
def test_bad_input_names_params_new(backend, case):
    """The checks of ag1_update_ with params_new as the written list: the same cases, the lists' names swapped."""
    dev = backend_device(backend)
    _, (written, other, grads), exc, msg = next(c for c in _bad_cases(dev) if c[0] == case)
    _check_bad(lambda p, q, g, backend: ak.ag1_update_new_(p, q, g, backend=backend), (other, written, grads), exc,
               "ag1_update_new_: .*" + _swap_names(msg), backend)


def test_grad_mode_guard(backend):
    dev = backend_device(backend)
    w = torch.nn.Parameter(torch.randn(4, device=dev))
    other = torch.randn(4, device=dev)
    msg = r"ag1_update_new_: params_new\[1\] requires grad and grad mode is enabled"
    with pytest.raises(ValueError, match=msg):
        ak.ag1_update_new_([other, other + 1], [other.clone(), w], [other, other - 1], backend=backend)
    with pytest.raises(ValueError, match=msg):
        torch.ops.avg_kernels.ag1_update_new_([other, other + 1], [other.clone(), w], [other, other - 1], backend)
    theta = torch.nn.Parameter(torch.randn(4, device=dev))  # θ requiring grad is only read: allowed
    new = torch.randn(4, device=dev)
    ones = torch.ones(4, device=dev)
    expected = (numpy_ag1(theta.detach().double(), new.double(), ones.double()).to(new.dtype)
                if backend == "reference" else exact_ag1(theta.detach(), new, ones))
    v = new._version
    ak.ag1_update_new_([theta], [new], [ones], backend=backend)
    assert same_bits(new, expected)
    assert new._version > v  # the written list's version counter is bumped (autograd sees the write)


def test_schema_and_opcheck(backend, fresh_seed):
    s = str(torch.ops.avg_kernels.ag1_update_new_.default._schema)
    assert s == ('avg_kernels::ag1_update_new_(Tensor[] params, Tensor(a!)[] params_new, Tensor?[] avg_grads, '
                 'str backend="auto") -> ()')
    dev = backend_device(backend)
    ps, qs, gs = ag1_lists([(3, 4), (), (5,), (0,)], DTYPE_MIXES["mixed"], dev, none_every=3)
    torch.library.opcheck(torch.ops.avg_kernels.ag1_update_new_.default, (ps, qs, gs, backend))


@pytest.mark.skipif("cpu" not in ak.available_backends(), reason="the C++ extension is not built")
@pytest.mark.parametrize("case", ["production", (8, 1, 1), (64, 3, 5)], ids=str)
@pytest.mark.parametrize("mix", ["f32", "mixed", "bf16"])
def test_emulated_cuda(case, mix, fresh_seed):
    """csrc/cuda/ag_update_kernel.cuh's kIntoNew path through the host emulation of its launches."""
    from test_ag_multi_tensor import _lim, emulation_shapes, unaligned

    chunk, mt, mb = _lim(case)
    ps, qs, gs = ag1_lists(emulation_shapes(), DTYPE_MIXES[mix], torch.device("cpu"), none_every=5)
    for k in range(0, len(ps), 3):
        ps[k], qs[k] = unaligned(ps[k]), unaligned(qs[k])
    expected = _expected(ps, qs, gs)
    before = clone_all(ps)
    hook_ops().ag1_update_new_cuda_emulated_(qs, ps, gs, chunk, mt, mb)
    for k, (q, e) in enumerate(zip(qs, expected)):
        assert same_bits(q, e), (k, tuple(q.shape), q.dtype)
    assert all(same_bits(p, b) for p, b in zip(ps, before))


def test_reference_is_the_formula():
    p, q, g = torch.tensor([1.0, 1.0, 1.0]), torch.tensor([3.0, 3.0, 3.0]), torch.tensor([2.0, -2.0, 0.0])
    reference.ag1_update_new_([p], [q], [g])
    assert q.tolist() == [-1.0, 3.0, 1.0] and p.tolist() == [1.0, 1.0, 1.0]
