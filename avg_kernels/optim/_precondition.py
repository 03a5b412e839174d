"""The preconditioned gradients P of SPEC §3, from the collected statistics, written into ``.grad``.

Per layer, one of three cases:

* D × D with this step's Gram A: ``P = G (A + λI)⁻¹``; layers of equal D share one batched
  ``ridge_solve`` (those of D <= ``MERGE_MAX_D`` share one per dtype/device, padded to the largest D);
  with ``refresh_every = k > 1`` the solve is against I and ``(A + λI)⁻¹`` is kept;
* D × D between refreshes: ``P = G · (A + λI)⁻¹`` with the kept inverse;
* M × M (the layer saw fewer positions M than D): ``P = ΔZ (XᵀX + λI)⁻¹ Xᵀ``, layers of equal M batched
  (a convolution's XᵀX from its input's pixel Gram where that is cheaper: ``_column_gram``);
  the solve takes ΔZ's C rows or X's D rows as right-hand sides, whichever are fewer (``mxm_solves_for_x``).
  The base optimizer sees ``.grad`` while this form uses ΔZ, so a probe first checks ``.grad = c·ΔZ Xᵀ``
  for one uniform factor c (gradient clipping, AMP unscaling) and applies c.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..ops import LINEAR_GRAM, RIDGE_SOLVE
from ._collect import LayerStats
from ._column_gram import MIN_IMPLICIT_M, ImplicitColumns, pixel_column_gram, pixel_route
from ._layers import Layer

#: D × D groups of D <= this (same dtypes and device) share one ridge_solve call, padded to the largest D
#: (see stack_square): for small layers one call's overhead costs more than the padded arithmetic.
MERGE_MAX_D = 64
#: ... unless the group already holds this many systems (a depthwise conv: one per channel): it is batched
#: already, and padding its systems to the merged set's largest D and row count would multiply its work
#: (measured: a MobileNet-style net's 1379 depthwise systems of D = 9, one row each, padded to D = 64 and 128
#: rows made `precondition` 417 ms of a 1.03 s step)
MERGE_MAX_SYSTEMS = 16
#: unit roundoff -> spacing of the subnormal numbers of that floating dtype (fp16: 2⁻²⁴): below the smallest
#: normal a value computed in it is rounded to that absolute spacing, not relative to its size
SUBNORMAL_SPACING = {torch.finfo(d).eps: torch.finfo(d).smallest_normal * torch.finfo(d).eps
                     for d in (torch.float16, torch.bfloat16, torch.float32, torch.float64)}


@dataclass(eq=False, slots=True)
class FreshDxD:
    """A layer in the D × D form with this step's Gram."""

    layer: Layer
    grad: torch.Tensor  # G, (groups, C/groups, D)
    gram: torch.Tensor  # A, (groups, D, D)
    bias: bool


@dataclass(eq=False, slots=True)
class ReusedDxD:
    """A layer in the D × D form between refreshes."""

    layer: Layer
    grad: torch.Tensor  # G, (groups, C/groups, D)
    inverse: torch.Tensor  # (A + λI)⁻¹ of the last refresh, (groups, D, D)
    bias: bool


@dataclass(eq=False, slots=True)
class MxMCase:
    """A layer in the M × M form before the uniform-factor probe."""

    layer: Layer
    grad: torch.Tensor  # G from .grad, (groups, C/groups, D)
    dz: torch.Tensor  # ΔZ, (groups, C/groups, M), compute dtype
    X: "torch.Tensor | ImplicitColumns"  # (groups, D, M), compute dtype; implicit where K came from the pixels
    bias: bool
    eps: float = 0.0  # unit roundoff of the lowest precision the forward computed in (autocast)
    K: Optional[torch.Tensor] = None  # XᵀX when computed from the input's pixel Gram (_column_gram), else later


@dataclass(eq=False, slots=True)
class MxMSystem:
    """A layer in the M × M form, ready to solve."""

    layer: Layer
    dz: torch.Tensor  # ΔZ, (groups, C/groups, M)
    K: torch.Tensor  # XᵀX, (groups, M, M)
    X: "torch.Tensor | ImplicitColumns"  # (groups, D, M)
    factor: float  # the uniform factor c between .grad and ΔZ Xᵀ
    bias: bool


class Preconditioner:
    """Computes and writes P for the layers; keeps the factorisations ``(A + λI)⁻¹`` reused between
    refreshes (``inverses``, per layer).

    Args:
        backend: backend of the Gram and ridge_solve ops ("auto" or a name).
    """

    def __init__(self, backend: str):
        self.backend = backend
        self.inverses: dict[Layer, torch.Tensor] = {}
        self.probe: Optional[Callable[[], torch.Generator]] = None  # DDP: probe vectors equal on every rank
        self.last_form: dict[Layer, tuple] = {}  # layer -> (form, D or M) of its last preconditioning

    def solve(self, G: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
        """``ridge_solve``: G (A + λI)⁻¹, batched, G's dtype."""
        return RIDGE_SOLVE.eager(G, A, lam, self.backend)

    def column_gram(self, X: torch.Tensor) -> torch.Tensor:
        """K = XᵀX per group, (groups, M, M), through the Gram op (the rows of X[g] are D vectors of length M;
        one triangle computed, faster than X.mT @ X)."""
        return stack_square([LINEAR_GRAM.eager(X[g], False, self.backend) for g in range(X.shape[0])], X.shape[-1])

    @torch.no_grad()
    def apply(self, layers: list[Layer], stats: dict[Layer, LayerStats], lam: float, k: int,
              dz_scale: float = 1.0) -> None:
        """Replaces the weight (and bias) gradients of ``layers`` by P.

        Args:
            layers: the preconditioned layers, in a fixed order (it fixes the batching).
            stats: what ``Collector.take()`` returned for this step.
            lam: λ >= 0.
            k: refresh_every; k > 1 keeps the D × D factorisations.
            dz_scale: factor of the collected ΔZ to the gradients' scale (1 / the GradScaler scale when the
                step unscaled .grad itself; the M × M form's probe finds any other uniform factor).
        """
        fresh: dict = {}  # (D, dtype, device) -> [FreshDxD]
        reuse: dict = {}  # (D, dtype, device) -> [ReusedDxD]
        pending: list[MxMCase] = []
        empty = LayerStats()
        for layer in layers:
            if layer.weight.grad is None:
                continue
            st = stats.get(layer, empty)
            bias = st.bias if st.m else layer.has_bias()
            G = layer.grad_matrix(bias)
            ct = torch.float64 if G.dtype == torch.float64 else torch.float32
            if st.xs or st.X is not None:
                self.inverses.pop(layer, None)  # recomputed every step while the layer is in the M × M form
                K = None
                if st.X is not None:  # several ranks' (_distributed)
                    dz, X = st.dz.to(ct), st.X.to(ct)
                else:
                    xs, dzs = layer.merge_uses(st.xs, st.dzs)
                    xs = [x.to(ct) for x in xs]  # once, for X and K (autocast's bf16/fp16 inputs)
                    dz = layer.output_grads(xs, dzs, ct)
                    if len(xs) == 1 and layer.conv_dims and pixel_route(xs[0].shape, *layer.gram_args):
                        K = pixel_column_gram(xs[0], *layer.gram_args, bias)
                        # K from the pixels: X is only needed for P = S Xᵀ and the probe, both computed from x
                        # (the solve-for-X order, D < C, and few columns build it)
                        X = ImplicitColumns(xs[0], *layer.gram_args, bias)
                        if X.shape[-1] < MIN_IMPLICIT_M or X.shape[1] < dz.shape[1]:
                            X = X.materialize()
                    else:
                        X = layer.unfold(xs, bias, ct)
                pending.append(MxMCase(layer, G, dz if dz_scale == 1.0 else dz * dz_scale, X, bias, st.eps, K))
                self.last_form[layer] = ("M×M", st.m)
            elif st.gram is not None:
                self.last_form[layer] = ("D×D", G.shape[-1])
                fresh.setdefault((G.shape[-1], G.dtype, G.device), []).append(FreshDxD(layer, G, st.gram, bias))
            elif layer in self.inverses and self.inverses[layer].shape[-1] == G.shape[-1]:
                self.last_form[layer] = ("D×D (kept factorisation)", G.shape[-1])
                reuse.setdefault((G.shape[-1], G.dtype, G.device), []).append(
                    ReusedDxD(layer, G, self.inverses[layer], bias))
            elif not G.any():  # zero_grad(set_to_none=False) and the layer sat out this step: P = 0 = G
                continue
            else:
                raise RuntimeError(
                    f"layer {layer.name} ({type(layer.module).__name__ if layer.module is not None else layer.found}) "
                    f"has a gradient but no training-mode forward with grad enabled was recorded for it since the last "
                    f"step (eval mode, no_grad, paused(), a forward that bypasses the module or the model's own "
                    f"forward, or the optimizer was built after the forward)")
        mxm: dict = {}  # (M, device, compute dtype) -> [MxMSystem]
        for case, c in zip(pending, uniform_factors(pending, self.probe() if self.probe is not None else None)):
            mxm.setdefault((case.X.shape[-1], case.X.device, case.X.dtype), []).append(
                MxMSystem(case.layer, case.dz, case.K if case.K is not None else self.column_gram(case.X), case.X, c,
                          case.bias))
        for entries in unstack_cpu(split_rows(merge_small_groups(list(fresh.values()), lam)), lambda e: e.gram):
            self._solve_fresh(entries, lam, k)
        for entries in split_rows(list(reuse.values())):
            inv = stack_square([e.inverse for e in entries], entries[0].inverse.shape[-1])  # one D per group
            G = stack_padded([e.grad for e in entries], inv.shape[-1])
            self._scatter(entries, G.to(inv.dtype) @ inv)
        for entries in unstack_cpu(split_rows(list(mxm.values()), mxm_rhs), lambda e: e.K):
            self._solve_mxm(entries, lam)

    def _solve_fresh(self, entries: list[FreshDxD], lam: float, k: int) -> None:
        d = max(e.gram.shape[-1] for e in entries)
        A = stack_square([e.gram for e in entries], d)
        G = stack_padded([e.grad for e in entries], d)
        if k > 1:  # keep (A + λI)⁻¹ for the steps until the next refresh
            eye = torch.eye(d, dtype=A.dtype, device=A.device).expand(A.shape[0], -1, -1)
            inv = self.solve(eye, A, lam)
            self._scatter(entries, G.to(inv.dtype) @ inv, store=inv)
        else:
            self._scatter(entries, self.solve(G, A, lam))

    def _solve_mxm(self, entries: list[MxMSystem], lam: float) -> None:
        """P = ΔZ (K + λI)⁻¹ Xᵀ per entry, the solve's right-hand sides chosen by ``mxm_rhs``."""
        K = stack_square([e.K for e in entries], entries[0].K.shape[-1])  # one M per group
        S = self.solve(stack_padded([mxm_rhs(e) for e in entries], K.shape[-1]), K, lam)
        start = 0
        for e in entries:
            g = e.X.shape[0]
            if mxm_solves_for_x(e):  # S = X (K + λI)⁻¹ and (K + λI)⁻¹ is symmetric: P = ΔZ Sᵀ
                a, b = e.dz, S[start:start + g, :e.X.shape[1]]
            else:  # S = ΔZ (K + λI)⁻¹
                a, b = S[start:start + g, :e.dz.shape[1]], e.X
            start += g
            out = e.layer.weight_grad_out(a.dtype)
            implicit = isinstance(b, ImplicitColumns)  # P through the convolution's weight-gradient kernel
            if implicit:
                w, bcol = b.times_t(a)
                bcol = None if bcol is None else bcol.unsqueeze(-1)
            if out is None:
                P = (w if bcol is None else torch.cat([w, bcol], dim=-1)) if implicit else matmul_t(a, b)
                e.layer.write_grad(P * e.factor if e.factor != 1.0 else P, e.bias)
                continue
            d_in = out.shape[-1]  # P's weight part straight into .grad, its bias column (b's last row) apart
            if implicit:
                out.copy_(w)
            else:
                matmul_t(a, b[:, :d_in], out=out)
            if e.factor != 1.0:
                out.mul_(e.factor)
            if e.bias:
                e.layer.write_bias_grad((bcol if implicit else matmul_t(a, b[:, d_in:])) * e.factor)

    def _scatter(self, entries: list, P: torch.Tensor, store: Optional[torch.Tensor] = None) -> None:
        """Writes the stacked P of D × D ``entries`` (FreshDxD or ReusedDxD) back, cropping the padding;
        ``store``: the stacked inverses to keep."""
        start = 0
        for e in entries:
            n, c, d = e.grad.shape
            e.layer.write_grad(P[start:start + n, :c, :d], e.bias)
            if store is not None:
                self.inverses[e.layer] = store[start:start + n, :d, :d].clone()
            start += n


def uniform_factors(cases: list[MxMCase], generator: Optional[torch.Generator] = None) -> list[float]:
    """The M × M form uses ΔZ while the base optimizer sees .grad: they must agree (G = ΔZ Xᵀ) up to one
    uniform factor c per layer (gradient clipping, AMP unscaling), returned; anything else raises.
    One random ±1 probe vector v per layer (O((C + M) D) work) and one device-to-host copy for all;
    ``generator`` (a CPU one) draws the vectors where given (DDP: equal on every rank), else the default one."""
    if not cases:
        return []
    rows = []
    for case in cases:
        X = case.X
        if generator is None:
            v = (torch.randint(0, 2, (X.shape[1], 1), device=X.device) * 2 - 1).to(X.dtype)
        else:
            v = (torch.randint(0, 2, (X.shape[1], 1), generator=generator) * 2 - 1).to(X.device, X.dtype)
        lhs = (case.grad.to(X.dtype) @ v).flatten()
        rhs = (case.dz @ (X.mT_matmul(v) if isinstance(X, ImplicitColumns) else X.mT @ v)).flatten()
        rr = rhs.dot(rhs)
        c = torch.where(rr > 0, lhs.dot(rhs) / torch.where(rr > 0, rr, 1), 1)
        rows.append(torch.stack([c, (lhs - c * rhs).norm(), lhs.norm(), (lhs - rhs).norm()]).to(torch.float64))
    host = torch.stack(rows).cpu().tolist()
    out = []
    for case, (c, res, norm, res_1) in zip(cases, host):
        # judged at the precision the gradient was computed in: autocast's output dtype (bf16/fp16) or .grad's
        tol = max(1e-3 if case.grad.dtype in (torch.float32, torch.float64) else 3e-2, 4 * case.eps)
        # fp16 without a GradScaler: gradient elements below fp16's smallest normal (6.1e-5) are rounded to its
        # subnormal spacing 2⁻²⁴ (BERT's attention query/key gradients: 1e-2 relative). Independent errors of
        # up to half that in each of the rows x D elements of .grad make ‖E v‖ (v = ±1) about
        # ½·spacing·√(rows·D) or less: 8x that is allowed on top of the relative part
        floor = 4 * SUBNORMAL_SPACING.get(case.eps, 0.0) * math.sqrt(case.grad.numel())
        if not math.isfinite(norm):
            raise FloatingPointError(f"layer {case.layer.name}: its gradient has a NaN or infinity")
        allowed = tol * norm + floor
        if not res <= allowed:
            raise RuntimeError(
                f"layer {case.layer.name}: its gradient is not ΔZ·Xᵀ of the forwards recorded since the last step "
                f"(the M × M form, used because M = {case.X.shape[2]} < D = {case.X.shape[1]}, needs them to agree "
                f"up to a uniform factor). Was .grad changed between backward and step by something other than a "
                f"uniform rescale (clipping), or not zeroed since the previous step?")
        out.append(1.0 if abs(c - 1.0) <= tol or res_1 <= allowed else c)  # c = 1 within the rounding
    return out


def matmul_t(a: torch.Tensor, b: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """a @ bᵀ for (g, n, k) and (g, m, k), into ``out`` (g, n, m) where given: one 2-D product when g = 1 (CPU
    bmm was 2x slower than mm there: ResNet-18 layer4's (512 × 64) (64 × 4608), 8.3 vs 4.1 ms, 1 thread)."""
    if a.shape[0] == 1:
        if out is None:
            return (a[0] @ b[0].mT).unsqueeze(0)
        torch.mm(a[0], b[0].mT, out=out[0])
        return out
    return torch.matmul(a, b.mT, out=out) if out is not None else a @ b.mT


def mxm_solves_for_x(e: MxMSystem) -> bool:
    """The M × M form's two orders, P = (ΔZ (K + λI)⁻¹) Xᵀ and P = ΔZ (X (K + λI)⁻¹)ᵀ, cost the same product
    (2·C·M·D) after a solve with C (ΔZ's rows) or D (X's rows) right-hand sides: solve for X when D < C
    (GPT-2's c_attn and c_fc: D = 257 against C = 768 and 1024 at M = 256)."""
    return e.X.shape[1] < e.dz.shape[1]


def mxm_rhs(e: MxMSystem) -> torch.Tensor:
    """The right-hand sides of an M × M entry's solve against K: X (groups, D, M) or ΔZ (groups, C/groups, M)."""
    return e.X if mxm_solves_for_x(e) else e.dz


def merge_small_groups(groups: list[list[FreshDxD]], lam: float) -> list[list[FreshDxD]]:
    """Groups of equal D, with those of D <= MERGE_MAX_D and fewer than MERGE_MAX_SYSTEMS systems merged per
    (G dtype, A dtype, device) (λ > 0 only: the pseudoinverse's cutoff depends on D)."""
    if lam <= 0:
        return groups
    out, small = [], {}
    for entries in groups:
        g, a = entries[0].grad, entries[0].gram
        if a.shape[-1] <= MERGE_MAX_D and sum(e.gram.shape[0] for e in entries) < MERGE_MAX_SYSTEMS:
            small.setdefault((g.dtype, a.dtype, a.device), []).extend(entries)
        else:
            out.append(entries)
    return out + list(small.values())


def split_rows(groups: list[list], rhs: Callable = lambda e: e.grad) -> list[list]:
    """Splits each group of one system size D > MERGE_MAX_D by its layers' row counts C (``rhs(entry)``: the
    right-hand sides, (n, C, D); the D × D forms' G, the M × M form's ΔZ): one call pads every right-hand side
    to the group's largest C and the solve's cost grows with C (measured: Llama's 24 layers of D = 256 with 256
    or 688 rows, padded to the LM head's 2048, made ridge_solve 357 of ~550 ms CPU of a C-SGD step). Merged
    groups of small layers keep one call (there the call's overhead dominates)."""
    out = []
    for entries in groups:
        dims = {rhs(e).shape[-1] for e in entries}
        if len(dims) > 1 or max(dims) <= MERGE_MAX_D:
            out.append(entries)
            continue
        by_rows: dict = {}
        for e in entries:
            by_rows.setdefault(rhs(e).shape[1], []).append(e)
        out.extend(by_rows.values())
    return out


#: CPU ridge systems larger than this (the fused small-system kernel's limit, kRidgeSmallMaxD) are solved one
#: entry after the other on the calling thread (csrc/ridge_driver.cpp), batched or not
CPU_SERIAL_MIN_D = 257


def unstack_cpu(groups: list[list], system: Callable) -> list[list]:
    """Splits the groups of CPU systems of size >= CPU_SERIAL_MIN_D (``system(entry)``: the (n, D, D) matrix) into
    one group per layer: the CPU driver solves such entries one after the other anyway, so one call per layer
    costs nothing and saves stacking the layers' matrices (measured: ResNet-18's three M = 1024 systems of
    layer2, 12 MB copied per step, and its D = 576 Grams: ~8 ms of `torch.cat` per step, 1 thread)."""
    out = []
    for entries in groups:
        a = system(entries[0])
        if len(entries) > 1 and a.device.type == "cpu" and a.shape[-1] >= CPU_SERIAL_MIN_D:
            out.extend([e] for e in entries)
        else:
            out.append(entries)
    return out


def stack_square(mats: list, d: int) -> torch.Tensor:
    """Concatenates (n_i, d_i, d_i) Grams along dim 0 as (n, d, d), a smaller one extended by a zero block.
    With G padded by zero columns the solve is unchanged for λ > 0: (A ⊕ 0 + λI)⁻¹ is block diagonal, and
    the zero block leaves ‖A‖₂, max|A_ii| and hence ridge_solve's Gram checks as they were for A alone."""
    if all(m.shape[-1] == d for m in mats):
        return torch.cat(mats) if len(mats) > 1 else mats[0]
    return torch.cat([F.pad(m, (0, d - m.shape[-1], 0, d - m.shape[-1])) for m in mats])


def stack_padded(mats: list, d: int) -> torch.Tensor:
    """Concatenates (n_i, C_i, d_i) along dim 0 as (n, max C_i, d), padding with zeros."""
    c = max(m.shape[1] for m in mats)
    if all(m.shape[1] == c and m.shape[2] == d for m in mats):
        return torch.cat(mats) if len(mats) > 1 else mats[0]
    return torch.cat([F.pad(m, (0, d - m.shape[2], 0, c - m.shape[1])) for m in mats])
