"""Consequentialism optimizers (paper 003, SPEC §3): C-SGD, C-Nesterov (``CSGD(nesterov=True)``), C-Adam.

Every ``nn.Linear`` / ``nn.Conv1d`` / ``nn.Conv2d`` layer's weight gradient (the bias as a trailing column)
is replaced by the preconditioned gradient

    P = G (X Xᵀ + λI)⁻¹             (D × D form, G = ΔZ Xᵀ the ordinary gradient, from ``.grad``)
      = ΔZ (XᵀX + λI)⁻¹ Xᵀ          (M × M form, used when the layer saw fewer positions M than D)

before the base optimizer's own step (torch.optim.SGD / Adam, unchanged: momentum, Nesterov, weight
decay added to P, maximize, ...). Other parameters pass through unchanged.

What is collected, by forward hooks, for the next ``step()``: every forward of a hooked layer made in
training mode with grad enabled adds its input Gram (``avg_kernels.im2col_gram`` / ``linear_gram``) to
the layer's statistics; while the layer has seen fewer positions M than D it instead keeps the inputs
(references, no copy) and the gradient w.r.t. its output (a tensor hook), for the M × M form. Several
forwards add up (gradient accumulation, a layer used twice); eval-mode and no-grad forwards are ignored;
``step()`` consumes and clears. A forward whose output gradient never arrives counts with ΔZ = 0, which
is what the D × D form does with it too.

Layers of equal D (D × D form) or equal M (M × M form) share one batched ``avg_kernels.ridge_solve``
(their output-channel counts padded with zero rows to the largest).

``refresh_every = k > 1``: the D × D factorisation is refreshed on steps 0, k, 2k, ... only (Grams are
collected only for those steps) and ``(A + λI)⁻¹`` is kept and reused in between, as K-FAC libraries
reuse their inverses. Layers in the M × M form recompute every step (their X is the batch's own).
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Iterable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import IM2COL_GRAM, LINEAR_GRAM, RIDGE_SOLVE, check_backend

_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


class UnsupportedLayerError(ValueError):
    """A layer the C-optimizers cannot precondition correctly (see the message; ``exclude=`` skips it)."""


@dataclass
class _Layer:
    name: str
    module: nn.Module
    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    conv_dims: int  # 0 for Linear, 1 or 2 for ConvNd
    groups: int = 1
    kernel_size: tuple = ()
    stride: tuple = ()
    dilation: tuple = ()
    padding: tuple = ()  # symmetric zero padding handed to the Gram/unfold (manual_pad is None)
    manual_pad: Optional[tuple] = None  # (F.pad argument, mode) when padding is asymmetric or not zeros
    d_in: int = 0  # C_in/groups · ∏kernel (Linear: in_features)
    c_out: int = 0

    def __post_init__(self):
        self.c_out = self.weight.shape[0]
        self.d_in = self.weight.numel() // max(1, self.c_out)
        self.gram_args = [list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation),
                          self.groups]

    def has_bias(self) -> bool:
        return self.bias is not None and self.bias.requires_grad

    def dim(self) -> int:
        return self.d_in + int(self.has_bias())


@dataclass
class _Stats:
    """What the forwards since the last step recorded for one layer."""

    gram: Optional[torch.Tensor] = None  # (groups, D, D), D × D form
    xs: list = field(default_factory=list)  # kept (padded) inputs, M × M form
    dzs: list = field(default_factory=list)  # their output gradients (None until the backward)
    m: int = 0  # positions seen
    bias: bool = False  # the Gram/inputs include the trailing 1


def _as_pair_list(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class _Consequential:
    """Mixin holding the hooks, the statistics and the preconditioning; the base torch.optim class
    (second base) does the update."""

    def _c_setup(self, model: nn.Module, lam: float, refresh_every: int, exclude, backend: Optional[str]):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the C-optimizers hook its layers), got "
                            f"{type(model).__name__}")
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not math.isfinite(lam) or lam < 0:
            raise ValueError(f"lam={lam!r} must be a finite number >= 0")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"refresh_every={refresh_every!r} must be an int >= 1")
        for group in self.param_groups:
            group.setdefault("lam", float(lam))
            group.setdefault("refresh_every", refresh_every)
        self.defaults.update(lam=float(lam), refresh_every=refresh_every)
        if backend is not None:
            check_backend(backend)
        self._backend = backend
        self._backend_name = backend or "auto"
        self._layers = self._find_layers(model, exclude)
        self._stats = [_Stats() for _ in self._layers]
        self._inverses: dict[int, torch.Tensor] = {}  # layer index -> (groups, D, D) (A + λI)⁻¹, k > 1
        self._c_steps = 0
        self._paused = 0
        self._handles = [layer.module.register_forward_hook(self._make_hook(i)) for i, layer in
                         enumerate(self._layers)]
        self._hooked = True

    # ------------------------------------------------------------------------------------------
    # Layers.

    @staticmethod
    def _find_layers(model: nn.Module, exclude) -> list[_Layer]:
        excluded = set()
        names = dict((m, n) for n, m in model.named_modules())
        for e in exclude:
            if isinstance(e, str):
                mods = dict(model.named_modules())
                if e not in mods:
                    raise ValueError(f"exclude: the model has no module named {e!r}")
                excluded.add(mods[e])
            elif isinstance(e, nn.Module):
                if e not in names:
                    raise ValueError(f"exclude: {type(e).__name__} is not a module of the model")
                excluded.add(e)
            else:
                raise TypeError(f"exclude entries must be modules or module names, got {type(e).__name__}")
        layers, owner = [], {}
        for name, mod in model.named_modules():
            if mod in excluded or not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
                continue
            where = f"layer {name or '(the model)'} ({type(mod).__name__})"
            hint = "; pass exclude=[...] to leave it to the base optimizer"
            if not isinstance(mod, _SUPPORTED) or isinstance(mod, nn.modules.conv._ConvTransposeNd):
                raise UnsupportedLayerError(f"{where}: the C-optimizers precondition nn.Linear, nn.Conv1d and "
                                            f"nn.Conv2d layers only{hint}")
            if isinstance(mod, nn.modules.lazy.LazyModuleMixin) and mod.has_uninitialized_params():
                raise UnsupportedLayerError(f"{where} is not initialised yet: run one forward before building "
                                            f"the optimizer")
            if torch.nn.utils.parametrize.is_parametrized(mod) or not isinstance(mod.weight, nn.Parameter):
                raise UnsupportedLayerError(f"{where}: its weight is computed (parametrization or weight norm), "
                                            f"so its gradient is not ΔZ·Xᵀ of a plain weight{hint}")
            if mod.weight.is_complex():
                raise UnsupportedLayerError(f"{where}: complex weights are not supported{hint}")
            for pname, p in (("weight", mod.weight), ("bias", mod.bias)):
                if p is None:
                    continue
                if id(p) in owner:
                    raise UnsupportedLayerError(f"{where}: its {pname} is shared with layer {owner[id(p)]}; shared "
                                                f"parameters are not supported{hint}")
                owner[id(p)] = name
            if isinstance(mod, nn.Linear):
                layers.append(_Layer(name, mod, mod.weight, mod.bias, 0))
                continue
            n = 1 if isinstance(mod, nn.Conv1d) else 2
            k, s, d = (_as_pair_list(v, n) for v in (mod.kernel_size, mod.stride, mod.dilation))
            rp = tuple(mod._reversed_padding_repeated_twice)  # F.pad argument, last dim first
            lows, highs = [rp[2 * (n - 1 - i)] for i in range(n)], [rp[2 * (n - 1 - i) + 1] for i in range(n)]
            if mod.padding_mode == "zeros" and lows == highs:
                layers.append(_Layer(name, mod, mod.weight, mod.bias, n, mod.groups, k, s, d, tuple(lows)))
            else:  # 'same' with an even kernel, or reflect/replicate/circular: pad as the module does
                mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
                layers.append(_Layer(name, mod, mod.weight, mod.bias, n, mod.groups, k, s, d, (0,) * n, (rp, mode)))
        return layers

    # ------------------------------------------------------------------------------------------
    # Collection.

    def _collecting(self, i: int) -> bool:
        if self._paused:
            return False
        k = self.param_groups[0]["refresh_every"]
        return self._c_steps % k == 0 or i not in self._inverses

    def _make_hook(self, i: int):
        def hook(module, inputs, output):
            if not (module.training and torch.is_grad_enabled()) or not self._collecting(i):
                return None
            layer = self._layers[i]
            if not layer.weight.requires_grad or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            self._record(i, layer, inputs[0].detach(), output)
            return None

        return hook

    def _positions(self, layer: _Layer, x: torch.Tensor) -> int:
        if layer.conv_dims == 0:
            return x.numel() // max(1, x.shape[-1])
        out = 1
        for j in range(layer.conv_dims):
            size = x.shape[2 + j] + 2 * layer.padding[j]
            out *= (size - layer.dilation[j] * (layer.kernel_size[j] - 1) - 1) // layer.stride[j] + 1
        return x.shape[0] * out

    def _gram(self, layer: _Layer, x: torch.Tensor, bias: bool) -> torch.Tensor:
        """The layer input's Gram (arguments prepared once)."""
        if layer.conv_dims == 0:
            return LINEAR_GRAM.eager(x, bias, self._backend_name)
        return IM2COL_GRAM.eager(x, *layer.gram_args, bias, self._backend_name)

    def _solve(self, G: torch.Tensor, A: torch.Tensor, lam: float) -> torch.Tensor:
        return RIDGE_SOLVE.eager(G, A, lam, self._backend_name)

    def _record(self, i: int, layer: _Layer, x: torch.Tensor, output: torch.Tensor) -> None:
        st = self._stats[i]
        bias = layer.has_bias()
        if st.m and st.bias != bias:
            raise RuntimeError(f"layer {layer.name}: its bias changed requires_grad between two forwards of one step")
        st.bias = bias
        if layer.manual_pad is not None:
            x = F.pad(x, layer.manual_pad[0], mode=layer.manual_pad[1])
        m = self._positions(layer, x)
        if st.gram is None and st.m + m < layer.dim():  # M × M form (so far): keep x, catch ΔZ
            slot = len(st.dzs)
            st.xs.append(x)
            st.dzs.append(None)
            output.register_hook(self._make_dz_hook(st, slot))
        else:
            gram = self._gram(layer, x, bias)
            for old in st.xs:  # switch this step to the D × D form
                gram = gram + self._gram(layer, old, bias)
            st.xs.clear()
            st.dzs.clear()
            st.gram = gram if st.gram is None else st.gram.add_(gram)
        st.m += m

    @staticmethod
    def _make_dz_hook(st: _Stats, slot: int):
        xs = st.xs  # the list of this step: a hook firing after step() finds a fresh one

        def hook(grad):
            if st.xs is xs and slot < len(st.dzs):
                st.dzs[slot] = grad if st.dzs[slot] is None else st.dzs[slot] + grad
            return None

        return hook

    def clear_statistics(self) -> None:
        """Forgets what the forwards since the last step recorded (step() does this itself)."""
        self._stats = [_Stats() for _ in self._layers]

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside the block are not recorded (like eval mode, without changing the model)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    def remove_hooks(self) -> None:
        """Removes the forward hooks from the model (step() then raises: nothing can be collected)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._hooked = False
        self.clear_statistics()

    # ------------------------------------------------------------------------------------------
    # Preconditioning.

    def _grad_matrix(self, layer: _Layer, bias: bool) -> torch.Tensor:
        """(groups, C_out/groups, D): W.grad.view(C_out, -1) with the bias gradient as last column."""
        w, c_out = layer.weight, layer.c_out
        g = w.grad.reshape(c_out, -1)
        if bias:
            gb = layer.bias.grad if layer.bias.grad is not None else torch.zeros_like(layer.bias)
            g = torch.cat([g, gb.reshape(c_out, 1).to(g.dtype)], dim=1)
        return g.reshape(layer.groups, c_out // layer.groups, -1)

    @staticmethod
    def _write(layer: _Layer, P: torch.Tensor, bias: bool) -> None:
        w, d_in = layer.weight, layer.d_in
        P = P.reshape(layer.c_out, -1)
        if w.grad.is_contiguous():
            w.grad.view(layer.c_out, d_in).copy_(P[:, :d_in] if bias else P)
        else:
            w.grad.copy_(P[:, :d_in].reshape(w.shape))
        if bias:
            if layer.bias.grad is None:
                layer.bias.grad = P[:, d_in].to(layer.bias.dtype).clone()
            else:
                layer.bias.grad.copy_(P[:, d_in])

    def _unfolded(self, layer: _Layer, bias: bool, xs: list, ct: torch.dtype) -> torch.Tensor:
        """X of the kept inputs: (groups, D, M) in the compute dtype, columns in ΔZ's order."""
        cols = []
        for x in xs:
            x = x.to(ct)
            if layer.conv_dims == 0:
                c = x.reshape(-1, x.shape[-1]).T.unsqueeze(0)  # (1, D_in, M_i)
            else:
                x4, k, s, p, d = x, layer.kernel_size, layer.stride, layer.padding, layer.dilation
                if layer.conv_dims == 1:
                    x4, k, s, p, d = x.unsqueeze(2), (1, *k), (1, *s), (0, *p), (1, *d)
                u = F.unfold(x4, k, dilation=d, padding=p, stride=s)  # (N, C·K, L)
                n, _, L = u.shape
                c = u.view(n, layer.groups, -1, L).permute(1, 2, 0, 3).reshape(layer.groups, -1, n * L)
            cols.append(c)
        X = torch.cat(cols, dim=2)
        if bias:
            X = torch.cat([X, X.new_ones(X.shape[0], 1, X.shape[2])], dim=1)
        return X

    def _output_grads(self, layer: _Layer, st: _Stats, ct: torch.dtype) -> torch.Tensor:
        """ΔZ of the kept forwards: (groups, C_out/groups, M), zeros where no gradient arrived."""
        c_out, g = layer.weight.shape[0], layer.groups
        parts = []
        for x, dz in zip(st.xs, st.dzs):
            m = self._positions(layer, x)
            if dz is None:
                parts.append(torch.zeros(g, c_out // g, m, dtype=ct, device=layer.weight.device))
            elif layer.conv_dims == 0:
                parts.append(dz.reshape(-1, c_out).T.to(ct).unsqueeze(0))
            else:
                n = dz.shape[0]
                parts.append(dz.reshape(n, g, c_out // g, -1).permute(1, 2, 0, 3).reshape(g, c_out // g, -1).to(ct))
        return torch.cat(parts, dim=2)

    def _column_gram(self, X: torch.Tensor) -> torch.Tensor:
        """K = XᵀX per group, (groups, M, M), through the Gram op (the rows of X[g] are D vectors of length M;
        one triangle computed, about 1.4x faster than X.mT @ X at M ~ D ~ 1000 on this CPU)."""
        return torch.cat([LINEAR_GRAM.eager(X[g], False, self._backend_name) for g in range(X.shape[0])])

    @staticmethod
    def _uniform_factors(checks: list) -> list:
        """The M × M form uses ΔZ while the base optimizer sees .grad: they must agree (G = ΔZ Xᵀ) up to one
        uniform factor c per layer (gradient clipping, AMP unscaling), returned; anything else raises.
        One random ±1 probe vector v per layer (O((C + M) D) work) and one device-to-host copy for all."""
        if not checks:
            return []
        rows = []
        for layer, G, dZ, X in checks:
            v = (torch.randint(0, 2, (X.shape[1], 1), device=X.device) * 2 - 1).to(X.dtype)
            lhs = (G.to(X.dtype) @ v).flatten()
            rhs = (dZ @ (X.mT @ v)).flatten()
            rr = rhs.dot(rhs)
            c = torch.where(rr > 0, lhs.dot(rhs) / torch.where(rr > 0, rr, 1), 1)
            rows.append(torch.stack([c, (lhs - c * rhs).norm(), lhs.norm()]).to(torch.float64))
        host = torch.stack(rows).cpu().tolist()
        out = []
        for (layer, G, dZ, X), (c, res, norm) in zip(checks, host):
            tol = 1e-3 if G.dtype in (torch.float32, torch.float64) else 3e-2
            if not res <= tol * norm:
                raise RuntimeError(
                    f"layer {layer.name}: its gradient is not ΔZ·Xᵀ of the forwards recorded since the last step "
                    f"(the M × M form, used because M = {X.shape[2]} < D = {X.shape[1]}, needs them to agree up to a "
                    f"uniform factor). Was .grad changed between backward and step by something other than a "
                    f"uniform rescale (clipping), or not zeroed since the previous step?")
            out.append(1.0 if abs(c - 1.0) <= tol else c)
        return out

    @torch.no_grad()
    def precondition_(self) -> None:
        """Replaces the weight (and bias) gradients of the hooked layers by P and clears the statistics.
        Called by step(); public for inspection (a second call without new forwards raises)."""
        if not self._hooked:
            raise RuntimeError("remove_hooks() was called: this optimizer can no longer collect statistics")
        group = self.param_groups[0]
        lam, k = float(group["lam"]), int(group["refresh_every"])
        dd: dict = {}  # (D, dtype, device) -> [(i, G, A, bias)]           D × D with a fresh Gram
        mm: dict = {}  # (M, device, ct) -> [(i, dZ, K, X, c, bias)]       M × M
        reuse: dict = {}  # (D, dtype, device) -> [(i, G, inverse, bias)]  k > 1 between refreshes
        stats, self._stats = self._stats, [_Stats() for _ in self._layers]
        pending = []  # M × M layers: (i, G, dZ, X, bias)
        for i, (layer, st) in enumerate(zip(self._layers, stats)):
            if layer.weight.grad is None:
                continue
            bias = st.bias if st.m else layer.has_bias()
            G = self._grad_matrix(layer, bias)
            ct = torch.float64 if G.dtype == torch.float64 else torch.float32
            if st.xs:
                self._inverses.pop(i, None)  # recomputed every step while the layer is in the M × M form
                pending.append((i, G, self._output_grads(layer, st, ct), self._unfolded(layer, bias, st.xs, ct), bias))
            elif st.gram is not None:
                dd.setdefault((G.shape[-1], G.dtype, G.device), []).append((i, G, st.gram, bias))
            elif i in self._inverses and self._inverses[i].shape[-1] == G.shape[-1]:
                reuse.setdefault((G.shape[-1], G.dtype, G.device), []).append((i, G, self._inverses[i], bias))
            elif not G.any():  # zero_grad(set_to_none=False) and the layer sat out this step: P = 0 = G
                continue
            else:
                raise RuntimeError(
                    f"layer {layer.name} ({type(layer.module).__name__}) has a gradient but no training-mode forward "
                    f"with grad enabled was recorded for it since the last step (eval mode, no_grad, paused(), a "
                    f"forward that bypasses the module, or the optimizer was built after the forward)")
        factors = self._uniform_factors([(self._layers[i], G, dZ, X) for i, G, dZ, X, _ in pending])
        for (i, G, dZ, X, bias), c in zip(pending, factors):
            mm.setdefault((X.shape[-1], X.device, X.dtype), []).append((i, dZ, self._column_gram(X), X, c, bias))
        for entries in _merge_small_groups(list(dd.values()), lam):
            d = max(a.shape[-1] for _, _, a, _ in entries)
            A = _stack_square([a for _, _, a, _ in entries], d)
            G = _stack_padded([g for _, g, _, _ in entries], d)
            if k > 1:  # keep (A + λI)⁻¹ for the steps until the next refresh
                eye = torch.eye(d, dtype=A.dtype, device=A.device).expand(A.shape[0], -1, -1)
                inv = self._solve(eye, A, lam)
                self._scatter(entries, G.to(inv.dtype) @ inv, store=inv)
            else:
                self._scatter(entries, self._solve(G, A, lam))
        for entries in reuse.values():
            inv = torch.cat([v for _, _, v, _ in entries])
            G = _stack_padded([g for _, g, _, _ in entries], inv.shape[-1])
            self._scatter(entries, G.to(inv.dtype) @ inv)
        for entries in mm.values():
            K = torch.cat([e[2] for e in entries])
            dZ = _stack_padded([e[1] for e in entries], K.shape[-1])
            S = self._solve(dZ, K, lam)
            start = 0
            for i, dz, _, X, c, bias in entries:
                g = X.shape[0]
                P = S[start:start + g, :dz.shape[1]] @ X.mT
                self._write(self._layers[i], P * c if c != 1.0 else P, bias)
                start += g

    def _scatter(self, entries, P: torch.Tensor, store: Optional[torch.Tensor] = None) -> None:
        start = 0
        for i, g, _, bias in entries:
            n, c, d = g.shape
            self._write(self._layers[i], P[start:start + n, :c, :d], bias)
            if store is not None:
                self._inverses[i] = store[start:start + n, :d, :d].clone()
            start += n

    def _c_step(self, base_step, closure):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.precondition_()
        base_step()
        self._c_steps += 1
        return loss

    # ------------------------------------------------------------------------------------------
    # State.

    def state_dict(self):
        sd = super().state_dict()
        sd["consequentialism"] = {
            "steps": self._c_steps,
            "inverses": {self._layers[i].name: v for i, v in self._inverses.items()},
        }
        return sd

    def load_state_dict(self, state_dict):
        state_dict = dict(state_dict)
        extra = state_dict.pop("consequentialism", None)
        super().load_state_dict(state_dict)
        self._inverses = {}
        if extra is not None:
            self._c_steps = int(extra["steps"])
            index = {layer.name: i for i, layer in enumerate(self._layers)}
            for name, v in extra["inverses"].items():
                if name not in index:
                    raise ValueError(f"load_state_dict: the saved state has a factorisation for layer {name!r}, "
                                     f"which this optimizer does not precondition")
                w = self._layers[index[name]].weight
                self._inverses[index[name]] = v.to(device=w.device)
        self.clear_statistics()


#: D × D groups of D <= this (same dtypes and device) share one ridge_solve call, padded to the largest D
#: (see _stack_square): for small layers one call's overhead costs more than the padded arithmetic.
MERGE_MAX_D = 64


def _merge_small_groups(groups: list, lam: float) -> list:
    """Groups of equal D, with those of D <= MERGE_MAX_D merged per (G dtype, A dtype, device) (λ > 0 only:
    the pseudoinverse's cutoff depends on D)."""
    if lam <= 0:
        return groups
    out, small = [], {}
    for entries in groups:
        _, g, a, _ = entries[0]
        if a.shape[-1] <= MERGE_MAX_D:
            small.setdefault((g.dtype, a.dtype, a.device), []).extend(entries)
        else:
            out.append(entries)
    return out + list(small.values())


def _stack_square(mats: list, d: int) -> torch.Tensor:
    """Concatenates (n_i, d_i, d_i) Grams along dim 0 as (n, d, d), a smaller one extended by a zero block.
    With G padded by zero columns the solve is unchanged for λ > 0: (A ⊕ 0 + λI)⁻¹ is block diagonal, and
    the zero block leaves ‖A‖₂, max|A_ii| and hence ridge_solve's Gram checks as they were for A alone."""
    if all(m.shape[-1] == d for m in mats):
        return torch.cat(mats) if len(mats) > 1 else mats[0]
    return torch.cat([F.pad(m, (0, d - m.shape[-1], 0, d - m.shape[-1])) for m in mats])


def _stack_padded(mats: list, d: int) -> torch.Tensor:
    """Concatenates (n_i, C_i, d_i) along dim 0 as (n, max C_i, d), padding with zeros."""
    c = max(m.shape[1] for m in mats)
    if all(m.shape[1] == c and m.shape[2] == d for m in mats):
        return torch.cat(mats) if len(mats) > 1 else mats[0]
    return torch.cat([F.pad(m, (0, d - m.shape[2], 0, c - m.shape[1])) for m in mats])


class CSGD(_Consequential, torch.optim.SGD):
    """C-SGD / C-Nesterov (paper 003): SGD on the consequentialism-preconditioned gradient (SPEC §3).

    Args:
        model: the module whose parameters are optimised; its nn.Linear / nn.Conv1d / nn.Conv2d layers are
            hooked (stride, padding incl. 'same' and non-zero padding modes, dilation, groups, bias).
        lr, momentum, dampening, weight_decay, nesterov, maximize, foreach: as torch.optim.SGD
            (``nesterov=True`` is C-Nesterov; weight decay is added to the preconditioned gradient).
        lam: λ >= 0, absolute, added to each layer's summed input Gram (the paper uses 1e-3 ... 0.03).
        refresh_every: k >= 1; refresh the D × D factorisations every k steps only (k = 1: the paper's method).
        exclude: modules (or their names in ``model.named_modules()``) left to the plain base update.
        backend: backend of the Gram and ridge_solve ops (None: "auto").
    """

    def __init__(self, model: nn.Module, lr: float, lam: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, *, refresh_every: int = 1,
                 exclude: Iterable[Union[nn.Module, str]] = (), backend: Optional[str] = None, maximize: bool = False,
                 foreach: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the C-optimizers hook its layers), got "
                            f"{type(model).__name__}")
        torch.optim.SGD.__init__(self, model.parameters(), lr=lr, momentum=momentum, dampening=dampening,
                                 weight_decay=weight_decay, nesterov=nesterov, maximize=maximize, foreach=foreach)
        self._c_setup(model, lam, refresh_every, exclude, backend)

    def step(self, closure=None):
        return self._c_step(lambda: torch.optim.SGD.step(self), closure)


class CAdam(_Consequential, torch.optim.Adam):
    """C-Adam (paper 003): Adam on the consequentialism-preconditioned gradient (SPEC §3).

    Args:
        model, lam, refresh_every, exclude, backend: as for ``CSGD``.
        lr, betas, eps, weight_decay, amsgrad, maximize, foreach: as torch.optim.Adam (L2 weight decay,
            added to the preconditioned gradient).
    """

    def __init__(self, model: nn.Module, lr: float = 1e-3, lam: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, *, amsgrad: bool = False, refresh_every: int = 1,
                 exclude: Iterable[Union[nn.Module, str]] = (), backend: Optional[str] = None, maximize: bool = False,
                 foreach: Optional[bool] = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the C-optimizers hook its layers), got "
                            f"{type(model).__name__}")
        torch.optim.Adam.__init__(self, model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                  amsgrad=amsgrad, maximize=maximize, foreach=foreach)
        self._c_setup(model, lam, refresh_every, exclude, backend)

    def step(self, closure=None):
        return self._c_step(lambda: torch.optim.Adam.step(self), closure)
