"""The conv input Gram of a geometry whose kernel taps never meet, one tap at a time (SPEC §6: no geometry
asks for more time or memory than its output needs).

Along a spatial dim with dilation ``d >= size`` (the input's extent, after ``ops/gram.py``'s trimming), two taps
of one window read indices ``d`` or more apart, so at most one of them lies in the input: every output position
reads the input through at most one tap of that dim. Most positions may read nothing at all: kernel 3,
dilation 2**40, padding 2**41 on 5 inputs has 2**41 + 5 positions of which 15 read a value, and the kernels
(Triton's STEPS loop, the CUDA kernel's ``steps``, the CPU GEMM path's im2col chunks, the reference's unfold)
walk all N·∏out positions of the geometry they are given: work and memory proportional to the dilation.

Such a dim's Gram is block diagonal over its taps: the rows of taps ``i != j`` never share a position, so their
block is zero. The block of tap ``t`` is the Gram of a kernel-1 conv over the positions ``t`` reads (a run
``o_lo..o_hi``, the input indices ``o·s + t·d − p``: a strided slice of the input, no padding). So such a
geometry is computed as one call per combination of taps of the split dims that read something, each over
exactly its useful positions, scattered into the (G, D, D) result; the bias column of a row comes from the
one part that holds its tap, the count ``A[-1, -1]`` is set from the whole geometry. Work: the D × D output
times the positions that read the input (each counted once); every entry is the same sum as in one call.
Dims where taps do meet (``d < size``) keep their geometry: after trimming, every window of such a dim
reads the input (its taps are closer than the input is long), so nothing is wasted there.
"""
from __future__ import annotations

import itertools
import math
from typing import NamedTuple, Optional, Sequence


class TapRun(NamedTuple):
    """The output positions ``o_lo..o_hi`` at which kernel tap ``tap`` reads the input, and what they read:
    input indices ``start, start + stride, …`` (``o_hi − o_lo + 1`` of them)."""
    tap: int
    o_lo: int
    o_hi: int
    start: int
    stride: int

    @property
    def positions(self) -> int:
        return self.o_hi - self.o_lo + 1


def tap_runs(size: int, k: int, s: int, p: int, d: int, out: int) -> list[TapRun]:
    """Per kernel tap of one spatial dim, the positions where it reads the input (taps that read nothing are
    left out). Exact integer arithmetic: any size of stride/padding/dilation."""
    runs = []
    for t in range(k):
        a = t * d - p  # input index read by position o: o·s + a
        o_lo = max(0, -((a) // s)) if a < 0 else 0  # ceil(−a / s) for a < 0
        o_hi = min(out - 1, (size - 1 - a) // s) if size - 1 - a >= 0 else -1
        if o_hi >= o_lo:
            n = o_hi - o_lo + 1
            runs.append(TapRun(t, o_lo, o_hi, o_lo * s + a, s if n > 1 else 1))
    return runs


class TapPart(NamedTuple):
    """One call of a split geometry: per spatial dim, the tap it fixes (None: the dim is not split, all its
    taps) and the input slice [start, stop) with that dim's sub-geometry."""
    taps: tuple[Optional[int], ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[int, ...]
    dilation: tuple[int, ...]
    out_size: tuple[int, ...]


def split_dims(size: Sequence[int], k: Sequence[int], s: Sequence[int], p: Sequence[int], d: Sequence[int],
               out: Sequence[int]) -> tuple[bool, ...]:
    """Which dims to split: those whose taps never meet (k >= 2, d >= size). Split even where every position
    reads something: the parts need no padding (padding 2**40 with dilation 2**40 reads 5 inputs through one
    tap, but a padded input or 32-bit offsets would not survive it) and skip the zero blocks."""
    return tuple(k[i] >= 2 and d[i] >= size[i] for i in range(len(size)))


def plan(size: Sequence[int], k: Sequence[int], s: Sequence[int], p: Sequence[int], d: Sequence[int],
         out: Sequence[int]) -> Optional[list[TapPart]]:
    """The parts of a (trimmed) conv geometry; None when no dim needs splitting (run it as it is). An empty
    list: no position reads the input."""
    flags = split_dims(size, k, s, p, d, out)
    if not any(flags):
        return None
    per_dim = []
    for i, split in enumerate(flags):
        if split:
            per_dim.append([(r.tap, r.start, r.start + (r.positions - 1) * r.stride + 1, 1, r.stride, 0, 1,
                             r.positions) for r in tap_runs(size[i], k[i], s[i], p[i], d[i], out[i])])
        else:
            per_dim.append([(None, 0, size[i], k[i], s[i], p[i], d[i], out[i])])
    parts = []
    for combo in itertools.product(*per_dim):
        fields = list(zip(*combo))
        parts.append(TapPart(*(tuple(f) for f in fields)))
    return parts


def part_positions(parts: Sequence[TapPart]) -> int:
    """Positions per sample the parts compute, in all (what the kernels walk)."""
    return sum(math.prod(pt.out_size) for pt in parts)
