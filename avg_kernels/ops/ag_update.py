"""The multi-tensor sign-magnitude updates of SPEC §2:

* ``torch.ops.avg_kernels.ag1_update_``: θ ← θ − |θ' − θ| ⊙ sign(ḡ), in place on ``params``;
* ``torch.ops.avg_kernels.ag1_update_new_``: the same θ_{t+1}, written over ``params_new`` (θ') instead (what the AG
  optimizer wants: its parameters hold θ' and θ is a copy, so nothing is copied back afterwards);
* ``torch.ops.avg_kernels.ag2_rescale_``: θ ← θ + Δ · ‖θ' − θ‖₁ / ‖Δ‖₁ with Δ = θ'' − θ, in place on
  ``params`` (which hold θ'' on entry).

Backends: "reference" (avg_kernels/reference/ag_update.py), "cpu" (csrc/cpu/ag_update.cpp),
"triton" (avg_kernels/_triton/ag_update.py), "cuda" (csrc/cuda/ag_update.cu over the reusable
multi-tensor launcher csrc/cuda/multi_tensor_apply.cuh).

Argument checks (SPEC §6) run before anything is written: in C++ (csrc/ag_lists.h) when the
extension is loaded, else in Python (_contract/lists.py); both raise the same errors. The grad-mode
check ("a parameter that requires grad, updated with grad mode on") needs the caller's grad mode,
which the op's implementation cannot see (it runs below autograd), so it
lives in a kernel registered for the AutogradCPU/AutogradCUDA keys, ahead of everything else.
"""
from __future__ import annotations

from typing import Iterable, NamedTuple, Optional

import torch

from .. import _build, reference
from .._contract import lists as _lists
from ._registry import Op, OpSpec

AG1 = "ag1_update_"
AG1_NEW = "ag1_update_new_"
AG2 = "ag2_rescale_"
_NAMES1 = ("params", "params_new", "avg_grads")
_NAMES1_NEW = ("params_new", "params", "avg_grads")  # written first, as every backend takes them
_NAMES2 = ("params", "params_old", "params_step")
_CPP_CHECK = {AG1: "ag1_check", AG1_NEW: "ag1_new_check", AG2: "ag2_check"}


class ListsCall(NamedTuple):
    op: str
    lists: tuple  # the written list first (ag1_update_new_: params_new, params, avg_grads)


def _check(op: str, names, lists, *, fake: bool) -> ListsCall:
    """SPEC §6's checks of every list before any write: in C++ (csrc/ag_lists.h: same checks, same messages,
    ~35x faster at ResNet scale) when the extension is loaded, else in Python (_contract/lists.py). Fake
    tensors have no memory: their aliasing is not checked. ``lists`` in schema order; ``names`` and the
    returned call's lists written-first."""
    if op == AG1_NEW:
        lists = (lists[1], lists[0], lists[2])
    if not fake and _build.extension() is not None:
        getattr(torch.ops.avg_kernels_C, _CPP_CHECK[op])(*lists)
    else:
        _lists.check_lists(op, names, lists, memory=not fake)
    return ListsCall(op, lists)


def _device(c: ListsCall):
    """The written tensors' device; None for empty lists (nothing to update, and no device to choose for)."""
    return c.lists[0][0].device if len(c.lists[0]) else None


def _compiled(c: ListsCall):
    """The C++ op (csrc/cpu/ag_update.cpp or csrc/cuda/ag_update.cu)."""
    getattr(torch.ops.avg_kernels_C, c.op)(*c.lists)


def _reference(c: ListsCall):
    if c.op == AG1_NEW:
        reference.ag1_update_new_(c.lists[1], c.lists[0], c.lists[2])
    else:
        (reference.ag1_update_ if c.op == AG1 else reference.ag2_rescale_)(*c.lists)


def _triton(c: ListsCall):
    from .._triton import ag_update as tri

    entries = _lists.flat_entries(c.lists)
    if c.op in (AG1, AG1_NEW):
        tri.ag1_update_(entries, into_new=c.op == AG1_NEW)
    else:
        tri.ag2_rescale_(entries, c.lists[0][0].device)
    _lists.write_back(entries)


def _spec(op: str, schema: str, names) -> OpSpec:
    return OpSpec(schema=schema, check=lambda *lists, fake: _check(op, names, lists, fake=fake), fake=lambda c: None,
                  device=_device, backends={"reference": _reference, "cpu": _compiled, "cuda": _compiled,
                                            "triton": _triton})


AG1_UPDATE = Op(_spec(AG1, "ag1_update_(Tensor(a!)[] params, Tensor[] params_new, Tensor?[] avg_grads, "
                           "str backend='auto') -> ()", _NAMES1))
AG1_UPDATE_NEW = Op(_spec(AG1_NEW, "ag1_update_new_(Tensor[] params, Tensor(a!)[] params_new, Tensor?[] avg_grads, "
                                   "str backend='auto') -> ()", _NAMES1_NEW))
AG2_RESCALE = Op(_spec(AG2, "ag2_rescale_(Tensor(a!)[] params, Tensor[] params_old, Tensor[] params_step, "
                            "str backend='auto') -> ()", _NAMES2))


# ---------------------------------------------------------------------------------------------
# Grad-mode guard, ahead of the op on the autograd keys (see the module docstring). These ops have
# no outputs, so there is nothing to differentiate: the guard checks, bumps the version counter of
# every written tensor (an ADInplaceOrView kernel's job, in one C++ call instead of a Python call
# per tensor: docs/kernel_choices.md), then runs the op past both keys with grad mode off.
# ---------------------------------------------------------------------------------------------
_guard_lib = torch.library.Library("avg_kernels", "IMPL")


def _register_grad_guard(op_name: str, written: int = 0, name: str = "params") -> None:
    """``written``: the position of the list the op writes (``name``)."""
    overload = getattr(torch.ops.avg_kernels, op_name).default
    below = torch._C._after_ADInplaceOrView_keyset

    def guard(keyset, *lists):
        _lists.check_grad_mode(op_name, name, lists[written])
        torch.autograd.graph.increment_version(lists[written])
        with torch.no_grad():
            return overload.redispatch(keyset & below, *lists)

    for key in ("AutogradCPU", "AutogradCUDA"):
        _guard_lib.impl(op_name, guard, key, with_keyset=True)


_register_grad_guard(AG1)
_register_grad_guard(AG1_NEW, written=1, name="params_new")
_register_grad_guard(AG2)


# ---------------------------------------------------------------------------------------------
# Public wrappers.
# ---------------------------------------------------------------------------------------------
def _as_lists(op: str, names, values, optional) -> list[list]:
    lists = []
    for name, v in zip(names, values):
        if isinstance(v, torch.Tensor) or not isinstance(v, Iterable):
            raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(v).__name__}")
        lists.append(v if isinstance(v, list) else list(v))
    _lists.check_structure(op, names, lists, optional)
    return lists


@AG1_UPDATE.public
def ag1_update_(params: Iterable[torch.Tensor], params_new: Iterable[torch.Tensor],
                avg_grads: Iterable[Optional[torch.Tensor]]):
    """AG-1 update, in place on ``params``: θ ← θ − |θ' − θ| ⊙ sign(ḡ) (SPEC §2).

    One call updates a whole model: ``params[i]`` moves against the sign of ``avg_grads[i]`` by
    the distance that the candidate step ``params_new[i]`` travelled.

    Args:
        params: θ, the tensors updated in place (e.g. ``list(model.parameters())``).
        params_new: θ', the same shapes (the base optimizer's step from the ordinary gradient).
        avg_grads: ḡ, the averaged gradients, same shapes; an entry ``None`` skips that tensor.
        backend: "reference", "cpu", "triton", "cuda" or None/"auto" (see ``use_backend``).

    Conventions: descent sign; sign(0) = 0 (ḡ = ±0 keeps the parameter exactly); a NaN in ḡ makes
    that element NaN (numpy's sign). All tensors on one device; each triple one shape; dtypes
    float16/bfloat16/float32/float64 may differ between and within triples: arithmetic in float32
    (float64 when a member of the triple is float64), rounded once to the parameter's dtype. Any
    memory layout (non-contiguous parameters are updated through a copy).

    Raises (before anything is written) ValueError/TypeError naming the list and index: lists of
    different lengths, shape or device mismatches, non-floating dtypes, parameters that overlap
    other arguments in memory, and a parameter that requires grad while grad mode is on (call it
    under ``torch.no_grad()``).
    """
    return _as_lists(AG1, _NAMES1, (params, params_new, avg_grads), (False, False, True))


@AG1_UPDATE_NEW.public
def ag1_update_new_(params: Iterable[torch.Tensor], params_new: Iterable[torch.Tensor],
                    avg_grads: Iterable[Optional[torch.Tensor]]):
    """AG-1 update written over θ': ``params_new`` ← θ − |θ' − θ| ⊙ sign(ḡ) (SPEC §2); ``params`` is not changed.

    Bitwise the θ_{t+1} of ``ag1_update_``, written into the other list. For a caller whose live parameters
    hold θ' and whose θ is a copy (the AG optimizer: the base optimizer stepped the parameters), this saves
    copying θ_{t+1} back: one read and one write of every parameter (ResNet-18, 45 MB: ~4 ms on one CPU thread).

    Args:
        params: θ, read only.
        params_new: θ', the tensors updated in place.
        avg_grads: ḡ; an entry ``None`` skips that tensor (``params_new[i]`` keeps θ').
        backend: "reference", "cpu", "triton", "cuda" or None/"auto" (see ``use_backend``).

    Conventions, dtypes (rounded once to ``params_new[i]``'s dtype) and layouts as ``ag1_update_``. Raises
    (before anything is written) as ``ag1_update_``, with ``params_new`` in the role of the written list: its
    length and shapes are the reference the others are compared with, and it must not require grad while
    grad mode is on.
    """
    return _as_lists(AG1_NEW, ("params", "params_new", "avg_grads"), (params, params_new, avg_grads),
                     (False, False, True))


@AG2_RESCALE.public
def ag2_rescale_(params: Iterable[torch.Tensor], params_old: Iterable[torch.Tensor],
                 params_step: Iterable[torch.Tensor]):
    """AG-2 rescale, in place on ``params`` (SPEC §2).

    On entry ``params`` hold θ'' (the base optimizer's step from the averaged gradient),
    ``params_old`` θ and ``params_step`` θ' (the step from the ordinary gradient). Afterwards

        params = θ + (θ'' − θ) · ‖θ' − θ‖₁ / ‖θ'' − θ‖₁

    with both L1 norms over all tensors of the call; nothing changes when ‖θ'' − θ‖₁ = 0. The norms
    are summed in float64 in a fixed order: the result is bitwise reproducible run to run. On CUDA
    the scale never leaves the device (no synchronisation). A NaN (or inf) in θ'' − θ makes the
    global scale NaN (or 0), as for any global norm.

    Dtypes, layouts and errors as ``ag1_update_`` (there are no ``None`` entries here).
    """
    return _as_lists(AG2, _NAMES2, (params, params_old, params_step), (False, False, False))
