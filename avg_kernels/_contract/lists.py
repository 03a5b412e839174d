"""Validation and preparation of the tensor lists of the multi-tensor ops (SPEC §2, §6).

``check_lists`` raises a ValueError/TypeError naming the list, the index and the offending values,
before anything is written. csrc/ag_lists.h implements the very same checks in C++ with the same
messages (the C++ version is what the compiled backends use, and what the others use when the
extension is loaded: for a model with hundreds of tensors the Python checks cost milliseconds per step,
docs/kernel_choices.md);
tests/test_ag_update.py checks that both raise identical errors.

``flat_entries`` turns every (written, read...) tuple into 1-D contiguous buffers in the written
tensor's memory order, with copies only where needed, for kernels that walk raw memory.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .dtypes import FLOAT_DTYPES, FLOAT_DTYPES_TEXT as _DTYPE_TEXT


def check_structure(op: str, names: Sequence[str], lists: Sequence, optional: Sequence[bool]) -> None:
    """Python-level checks the C++ side cannot see: lists (not tensors) of tensors (or None)."""
    for name, lst, opt in zip(names, lists, optional):
        if isinstance(lst, torch.Tensor) or not isinstance(lst, (list, tuple)):
            raise TypeError(f"{op}: {name} must be a list or tuple of tensors, got {type(lst).__name__}")
        if all(isinstance(t, torch.Tensor) for t in lst):
            continue
        for i, t in enumerate(lst):
            if not isinstance(t, torch.Tensor) and not (opt and t is None):
                what = "a Tensor or None" if opt else "a Tensor"
                raise TypeError(f"{op}: {name}[{i}] must be {what}, got {type(t).__name__}")


def _shape_text(shape) -> str:
    return str(tuple(shape))


def is_dense(t: torch.Tensor) -> bool:
    """t.is_non_overlapping_and_dense(): some permutation of its dimensions is contiguous."""
    expected = 1
    for stride, size in sorted((st, s) for s, st in zip(t.shape, t.stride()) if s != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def has_internal_overlap(t: torch.Tensor) -> bool:
    """A dimension of size > 1 with stride 0 in a tensor with elements (csrc/ag_lists.h says the same)."""
    return t.numel() > 0 and any(s > 1 and st == 0 for s, st in zip(t.shape, t.stride()))


def check_lists(op: str, names: Sequence[str], lists: Sequence[Sequence[Optional[torch.Tensor]]],
                grad_check: bool = False, memory: bool = True) -> None:
    """The checks of SPEC §6 for a multi-tensor in-place op; ``lists[0]`` is written in place.

    Raises, in this order (the first failing check wins):
    * ValueError when a list's length differs from ``names[0]``'s;
    * per index i, per list in order: TypeError for a non-floating dtype, ValueError for a shape
      different from ``names[0][i]``'s or a device different from ``names[0][0]``'s (None skipped);
    * ValueError when ``names[0][i]`` has a stride-0 dimension (cannot be written in place);
    * ValueError when a written tensor overlaps another argument in memory (other than being the
      very same memory, with the same layout and dtype, as an entry of the same index);
      (skipped with ``memory=False``, for fake tensors that have no memory);
    * with ``grad_check``: ValueError when grad mode is on and ``names[0][i]`` requires grad.
    """
    w = names[0]
    n = len(lists[0])
    for name, lst in zip(names[1:], lists[1:]):
        if len(lst) != n:
            raise ValueError(f"{op}: {name} has {len(lst)} entries but {w} has {n}")
    if n == 0:
        return
    dev = lists[0][0].device
    for i in range(n):
        ref = lists[0][i]
        for name, lst in zip(names, lists):
            t = lst[i]
            if t is None:
                continue
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(f"{op}: {name}[{i}] has dtype {t.dtype}; expected {_DTYPE_TEXT}")
            if t.shape != ref.shape:
                raise ValueError(f"{op}: {name}[{i}] has shape {_shape_text(t.shape)} but {w}[{i}] has shape "
                                 f"{_shape_text(ref.shape)}")
            if t.device != dev:
                raise ValueError(f"{op}: {name}[{i}] is on {t.device} but {w}[0] is on {dev}")
    for i, t in enumerate(lists[0]):
        if has_internal_overlap(t):
            raise ValueError(f"{op}: {w}[{i}] has internally overlapping memory (a stride-0 dimension, e.g. from "
                             "expand()), so it cannot be updated in place")
    if memory:
        _check_aliasing(op, names, lists)
    if grad_check:
        check_grad_mode(op, w, lists[0])


def check_grad_mode(op: str, name: str, params: Sequence[torch.Tensor]) -> None:
    if torch.is_grad_enabled():
        for i, t in enumerate(params):
            if t.requires_grad:
                raise ValueError(f"{op}: {name}[{i}] requires grad and grad mode is enabled; an in-place update of "
                                 "a parameter must run under torch.no_grad()")


def _check_aliasing(op: str, names, lists) -> None:
    """A written tensor may share memory with another argument only by being the same memory
    (same address, extent, strides and dtype) as an entry of the same index: then every element
    is read before it is written by the same thread. Anything else races on a GPU."""
    spans = []  # (begin, end, list rank, index, tensor)
    for rank, lst in enumerate(lists):
        for i, t in enumerate(lst):
            if t is None or t.numel() == 0 or t.device.type == "meta" or not is_dense(t):
                continue  # at::get_overlap_status: empty -> No, not dense -> TooHard (not checked)
            begin = t.data_ptr()
            spans.append((begin, begin + t.numel() * t.element_size(), rank, i, t))
    spans.sort(key=lambda s: (s[0], s[2], s[3]))
    worst = None
    for k, (b0, e0, r0, i0, t0) in enumerate(spans):
        for b1, e1, r1, i1, t1 in spans[k + 1:]:
            if b1 >= e0:
                break
            if r0 != 0 and r1 != 0:
                continue  # two read-only arguments may overlap
            same = (b0 == b1 and e0 == e1 and t0.stride() == t1.stride() and t0.dtype == t1.dtype)
            if same and i0 == i1 and r0 != r1:
                continue
            # report as (written index, other list rank, other index), the smallest first
            key = (i0, r1, i1) if r0 == 0 and (r1 != 0 or i0 < i1) else (i1, r0, i0)
            if worst is None or key < worst:
                worst = key
    if worst is not None:
        i, r, j = worst
        raise ValueError(f"{op}: {names[0]}[{i}] overlaps {names[r]}[{j}] in memory; a tensor updated in place may "
                         "share memory with another argument only by being the same tensor at the same index")


@dataclass
class FlatEntry:
    """One triple as flat contiguous buffers: ``bufs[0]`` is written; ``writeback`` is the
    user's tensor to copy ``bufs[0]`` into afterwards (None when bufs[0] is a view of it)."""

    index: int
    bufs: list
    writeback: Optional[torch.Tensor]


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.as_strided((t.numel(),), (1,))


def flat_entries(lists: Sequence[Sequence[Optional[torch.Tensor]]], skip_none: bool = True) -> list[FlatEntry]:
    """1-D contiguous buffers for each index whose entries are all present and non-empty.

    The written tensor (lists[0][i]) is used in place when it is non-overlapping and dense (any
    memory order, e.g. channels_last), else through a contiguous copy written back afterwards.
    Read tensors are used as they are when their strides equal the written buffer's, else copied
    into that layout. Element k of every buffer is the same logical element.
    """
    out = []
    for i in range(len(lists[0])):
        row = [lst[i] for lst in lists]
        if any(t is None for t in row):
            if skip_none:
                continue
        w = row[0]
        if w.numel() == 0:
            continue
        if is_dense(w):
            wb, back = w.detach(), None
        else:
            wb, back = w.detach().contiguous(), w
        bufs = [_flat(wb)]
        for t in row[1:]:
            t = t.detach()
            if t.stride() != wb.stride() and t.numel() > 1:
                c = torch.empty_like(wb, dtype=t.dtype)
                c.copy_(t)
                t = c
            bufs.append(_flat(t))
        out.append(FlatEntry(i, bufs, back))
    return out


def write_back(entries: Sequence[FlatEntry]) -> None:
    for e in entries:
        if e.writeback is not None:
            e.writeback.detach().copy_(e.bufs[0].view(e.writeback.shape))
