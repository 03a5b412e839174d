"""What the C-optimizers precondition (SPEC §3): a ``Layer`` is one weight used as a linear map z = W u of
im2col columns u, with its geometry; ``find_layers`` finds them in a model.

A ``Layer`` knows how its tensors map onto the matrices of SPEC §3 (per group g of ``groups``):

* ``grad_matrix``: G, (groups, C_out/groups, D), the weight gradient with the bias gradient as last column;
* ``unfold``: X, (groups, D, M), the kept inputs as columns (a trailing row of ones with a bias);
* ``output_grads``: ΔZ, (groups, C_out/groups, M), columns in X's order;
* ``merge_uses``: a convolution's uses of one input shape as one batch (its K then comes from one pixel Gram);
* ``write_grad``: P (the same shape as G) back into ``.grad``.

Two ways of finding layers feed the same ``Layer`` records (``_collect`` takes one use at a time):

* ``find_layers`` (here): modules of exactly the classes ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d``
  whose parameters are registered once, hooked per module (``found = "module"``);
* ``_functional``: every other parameter is watched during the model's forward, and a layer is made for each
  weight (or slice of rows of it) used as z = W u by ``F.linear`` / ``F.conv*`` / ``addmm`` / ``mm`` / ``matmul``
  (subclasses of Linear/Conv, ``nn.MultiheadAttention``, HF ``Conv1D`` ...). Such a layer may view its weight
  transposed (``transposed``: stored (in, out), as HF ``Conv1D``) and use only some rows of it (``rows``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn


_SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}


def conv_out_sizes(spatial, kernel_size, stride, padding, dilation) -> list:
    """Output extents of a convolution over inputs of extents ``spatial`` (symmetric zero padding)."""
    return [(n + 2 * p - d * (k - 1) - 1) // s + 1
            for n, k, s, p, d in zip(spatial, kernel_size, stride, padding, dilation)]


def conv_columns(x: torch.Tensor, kernel_size, stride, padding, dilation, groups: int) -> torch.Tensor:
    """X of one convolution input x (N, C, *spatial): (groups, C/groups · ∏kernel, ∏out · N), rows in the order
    of ``W.view(C_out, -1)`` (channel, then kernel offsets row-major), columns (output position, image) with the
    image fastest. One strided view of the padded input with the image as its innermost dim, copied once: the
    copy runs over contiguous rows of (out width · N) elements (F.unfold + a permute to this order moved
    (N, D, L) single elements: ResNet-18's layer2 3.2 -> 0.54 ms, layer4 0.89 -> 0.41 ms, 1 thread)."""
    nd = x.dim() - 2
    outs = conv_out_sizes(x.shape[2:], kernel_size, stride, padding, dilation)
    if any(padding):
        x = F.pad(x, [q for p in reversed(padding) for q in (p, p)])
    t = x.movedim(0, -1).contiguous()  # (C, *padded spatial, N)
    st = t.stride()
    view = t.as_strided((t.shape[0], *kernel_size, *outs, t.shape[-1]),
                        (st[0], *(st[1 + j] * dilation[j] for j in range(nd)),
                         *(st[1 + j] * stride[j] for j in range(nd)), 1))
    return view.reshape(groups, -1, math.prod(outs) * t.shape[-1])


class UnsupportedLayerError(ValueError):
    """A layer the C-optimizers cannot precondition correctly (see the message; ``exclude=`` skips it)."""


@dataclass(frozen=True)
class ManualPad:
    """Padding the Gram op cannot express (asymmetric, or not zeros), applied to the input first."""

    pad: tuple  # F.pad argument, last dimension first
    mode: str  # F.pad mode: "constant", "reflect", "replicate", "circular"


@dataclass(eq=False)  # compared and hashed by identity: a Layer keys per-layer dicts
class Layer:
    """One preconditioned layer: its weight (and bias) and, for convolutions, the im2col geometry."""

    name: str  # the module's name (module path) or the weight's, with [start:stop] for a slice of rows
    module: Optional[nn.Module]  # the hooked module (module path); None on the functional path
    weight: nn.Parameter
    bias: Optional[nn.Parameter]
    conv_dims: int  # 0 for Linear, 1, 2 or 3 for ConvNd
    groups: int = 1
    kernel_size: tuple = ()
    stride: tuple = ()
    dilation: tuple = ()
    padding: tuple = ()  # symmetric zero padding handed to the Gram/unfold (zeros when manual_pad is set)
    manual_pad: Optional[ManualPad] = None
    transposed: bool = False  # Linear only: the map is weight.T (weight stored (in, out), HF Conv1D, x @ W)
    rows: Optional[tuple] = None  # Linear only: (start, stop) rows of the map used (a q/k/v slice); None: all
    bias_rows: Optional[tuple] = None  # (start, stop) of the bias used; None: all of it
    found: str = "module"  # how the layer was found: "module" or the function ("linear", "addmm", "conv2d", ...)
    d_in: int = field(init=False)  # C_in/groups · ∏kernel (Linear: in_features)
    c_out: int = field(init=False)
    gram_args: list = field(init=False)  # im2col_gram's (kernel_size, stride, padding, dilation, groups)

    def __post_init__(self):
        if self.is_view():
            w = self.weight.T if self.transposed else self.weight
            r0, r1 = self.rows if self.rows is not None else (0, w.shape[0])
            self.c_out, self.d_in = r1 - r0, w.shape[1]
        else:
            self.c_out = self.weight.shape[0]
            self.d_in = self.weight.numel() // max(1, self.c_out)
        self.gram_args = [list(self.kernel_size), list(self.stride), list(self.padding), list(self.dilation),
                          self.groups]

    def is_view(self) -> bool:
        """Whether the map is a transposed view or a row slice of the weight (then ``grad_matrix`` and
        ``write_grad`` work on that view of ``.grad``)."""
        return self.transposed or self.rows is not None or self.bias_rows is not None

    def weight_view(self, t: torch.Tensor) -> torch.Tensor:
        """The part of ``t`` (the weight or its gradient) that is the map: (C_out, D_in), a view."""
        if self.transposed:
            t = t.T
        return t if self.rows is None else t[self.rows[0]:self.rows[1]]

    def bias_view(self, t: torch.Tensor) -> torch.Tensor:
        """The part of ``t`` (the bias or its gradient) this layer adds: (C_out,), a view."""
        return t if self.bias_rows is None else t[self.bias_rows[0]:self.bias_rows[1]]

    def has_bias(self) -> bool:
        """Whether the bias is trained (then it is the trailing column of G and P)."""
        return self.bias is not None and self.bias.requires_grad

    def dim(self) -> int:
        """D: the length of a column u (with the trailing 1 of a trained bias)."""
        return self.d_in + int(self.has_bias())

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input as the Gram op and ``unfold`` take it (manual padding applied)."""
        return x if self.manual_pad is None else F.pad(x, self.manual_pad.pad, mode=self.manual_pad.mode)

    def positions(self, x: torch.Tensor) -> int:
        """M: the number of columns u of a prepared input (Linear: rows; ConvNd: N · output positions)."""
        if self.conv_dims == 0:
            return x.numel() // max(1, x.shape[-1])
        return x.shape[0] * math.prod(conv_out_sizes(x.shape[2:], self.kernel_size, self.stride, self.padding,
                                                     self.dilation))

    def grad_matrix(self, bias: bool) -> torch.Tensor:
        """G: (groups, C_out/groups, D), ``W.grad.view(C_out, -1)`` with the bias gradient as last column."""
        c_out = self.c_out
        if self.is_view():
            g = self.weight_view(self.weight.grad)
            if bias:
                gb = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
                g = torch.cat([g, self.bias_view(gb).reshape(c_out, 1).to(g.dtype)], dim=1)
            return g.reshape(1, c_out, -1)
        g = self.weight.grad.reshape(c_out, -1)
        if bias:
            gb = self.bias.grad if self.bias.grad is not None else torch.zeros_like(self.bias)
            g = torch.cat([g, gb.reshape(c_out, 1).to(g.dtype)], dim=1)
        return g.reshape(self.groups, c_out // self.groups, -1)

    def write_grad(self, P: torch.Tensor, bias: bool) -> None:
        """Writes P (G's shape, any float dtype) into the weight's (and bias's) ``.grad``."""
        w, d_in = self.weight, self.d_in
        P = P.reshape(self.c_out, -1)
        if self.is_view():
            self.weight_view(w.grad).copy_(P[:, :d_in])
        elif w.grad.is_contiguous():
            w.grad.view(self.c_out, d_in).copy_(P[:, :d_in] if bias else P)
        else:
            w.grad.copy_(P[:, :d_in].reshape(w.shape))
        if bias:
            self.write_bias_grad(P[:, d_in])

    def write_bias_grad(self, p: torch.Tensor) -> None:
        """Writes the bias part of P (C_out elements, any shape and float dtype) into the bias's ``.grad``."""
        p = p.reshape(-1)
        if self.bias.grad is None:
            self.bias.grad = torch.zeros_like(self.bias)
        self.bias_view(self.bias.grad).copy_(p)

    def weight_grad_out(self, dtype: torch.dtype) -> Optional[torch.Tensor]:
        """The weight's ``.grad`` as G's weight part, (groups, C_out/groups, D_in), a view P can be computed into
        (no fresh P, no copy: a fresh 9 MB P of ResNet-18's layer4 took 4.9 -> 11.2 ms with its first-touch
        page faults and copy), or None where that view does not exist (a sliced or transposed map, a
        non-contiguous gradient, or a gradient in another dtype than ``dtype``)."""
        g = self.weight.grad
        if self.is_view() or g is None or not g.is_contiguous() or g.dtype != dtype:
            return None
        return g.view(self.groups, self.c_out // self.groups, self.d_in)

    def unfold(self, xs: list, bias: bool, ct: torch.dtype) -> torch.Tensor:
        """X of prepared inputs ``xs``: (groups, D, M) in the compute dtype ``ct``, columns in ΔZ's order: use
        after use; within a convolution's use (output position, image), the image fastest (the order of
        ``_column_gram``'s K)."""
        cols = []
        for x in xs:
            x = x.to(ct)
            if self.conv_dims == 0:
                c = x.reshape(-1, x.shape[-1]).T.unsqueeze(0)  # (1, D_in, M_i)
            else:
                c = conv_columns(x, self.kernel_size, self.stride, self.padding, self.dilation, self.groups)
            cols.append(c)
        X = cols[0] if len(cols) == 1 and cols[0].is_contiguous() else torch.cat(cols, dim=2)  # (no copy of one)
        if bias:
            X = torch.cat([X, X.new_ones(X.shape[0], 1, X.shape[2])], dim=1)
        return X

    def merge_uses(self, xs: list, dzs: list) -> tuple:
        """Several uses of a convolution on inputs of one shape whose output gradients all arrived as one use
        of their concatenated batch (what ``_column_gram`` needs: one pixel Gram); otherwise as they are."""
        if (self.conv_dims == 0 or len(xs) < 2 or any(dz is None for dz in dzs)
                or len({(x.shape[1:], x.dtype) for x in xs}) > 1 or len({(dz.shape[1:], dz.dtype) for dz in dzs}) > 1):
            return xs, dzs
        return [torch.cat(xs)], [torch.cat(dzs)]

    def output_grads(self, xs: list, dzs: list, ct: torch.dtype) -> torch.Tensor:
        """ΔZ of the uses with prepared inputs ``xs`` and output gradients ``dzs``: (groups, C_out/groups, M)
        in ``ct``, zeros for a use whose output gradient never arrived (None)."""
        c_out, g = self.c_out, self.groups
        parts = []
        for x, dz in zip(xs, dzs):
            m = self.positions(x)
            if dz is None:
                parts.append(torch.zeros(g, c_out // g, m, dtype=ct, device=self.weight.device))
            elif self.conv_dims == 0:
                parts.append(dz.reshape(-1, c_out).T.to(ct).unsqueeze(0))
            else:
                n = dz.shape[0]
                parts.append(dz.reshape(n, g, c_out // g, -1).permute(1, 2, 3, 0).reshape(g, c_out // g, -1).to(ct))
        return torch.cat(parts, dim=2)


def _as_tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def _excluded_modules(model: nn.Module, exclude) -> set:
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
    return excluded


@dataclass(eq=False)
class Found:
    """What ``find_layers`` found."""

    layers: list  # the module-path Layers, in ``model.named_modules()`` order
    left_out: dict  # id of each parameter of a layer-kind module left out because the base does not
    #                 optimise it -> that module's name (add_param_group must not add it silently)
    watched: dict  # id -> (name, parameter): the base's other parameters, whose uses the functional path finds
    excluded: dict  # id of each parameter of an excluded module -> that module's name


def param_names(model: nn.Module) -> dict:
    """id of each parameter -> every name it is registered under (a tied parameter has several)."""
    names: dict = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    return names


def find_layers(model: nn.Module, exclude, owned: set) -> Found:
    """The modules of ``model`` preconditioned through module hooks, and the parameters left to the functional
    path (``_functional``), which finds their uses as linear maps during the forward.

    Module path: modules of exactly the classes ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Conv3d`` whose
    weight and bias are registered nowhere else. A subclass (its forward may differ, e.g. attention's
    ``out_proj`` is never called) or a module with a tied parameter is left to the functional path.

    Args:
        model: the module searched (``named_modules()``).
        exclude: modules, or their names in ``model.named_modules()``, left to the plain base update.
        owned: ids of the parameters the base optimizer holds; a layer none of whose parameters it holds is
            someone else's and left out; one it holds only partly is an error.

    Raises ``UnsupportedLayerError`` for a layer-kind module (Linear, ConvNd) that is owned and not
    excluded but cannot be preconditioned correctly (transposed convolutions, lazy and not initialised, a
    computed weight, complex, a weight shared by two such modules, only partly owned).
    """
    excluded = _excluded_modules(model, exclude)
    names = param_names(model)
    layers, left_out, owner, module_path = [], {}, {}, set()
    excluded_params = {}
    for name, mod in model.named_modules():
        if mod in excluded:
            excluded_params.update((id(p), name) for p in mod.parameters())
    for name, mod in model.named_modules():
        if mod in excluded or not isinstance(mod, (nn.Linear, nn.modules.conv._ConvNd)):
            continue
        where = f"layer {name or '(the model)'} ({type(mod).__name__})"
        hint = "; pass exclude=[...] to leave it to the base optimizer"
        params = list(mod.parameters())  # with a parametrization's originals
        mine = [id(p) in owned for p in params]
        if params and not any(mine):
            left_out.update((id(p), name) for p in params)
            continue
        if not all(m or not p.requires_grad for p, m in zip(params, mine)):
            raise UnsupportedLayerError(f"{where}: the base optimizer holds only some of its trained parameters; "
                                        f"it must hold all or none{hint}")
        if isinstance(mod, nn.modules.conv._ConvTransposeNd):
            # its weight gradient is ΔZ Xᵀ over the columns of the stride-dilated (zero-inserted) input with a
            # flipped kernel and a (C_in, C_out/groups, ...) weight layout: not an im2col Gram of x as it is
            raise UnsupportedLayerError(f"{where}: transposed convolutions are not supported (their weight "
                                        f"gradient is not an im2col Gram of the input as stored){hint}")
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
        tied = any(p is not None and len(names[id(p)]) > 1 for p in (mod.weight, mod.bias))
        if type(mod) not in _SUPPORTED or tied or any(id(p) in excluded_params for p in params):
            continue  # the functional path finds how its weight is used
        module_path.update(id(p) for p in params)
        if isinstance(mod, nn.Linear):
            layers.append(Layer(name, mod, mod.weight, mod.bias, 0))
            continue
        n = _CONV_DIMS[type(mod)]
        k, s, d = (_as_tuple(v, n) for v in (mod.kernel_size, mod.stride, mod.dilation))
        rp = tuple(mod._reversed_padding_repeated_twice)  # F.pad argument, last dim first
        lows, highs = [rp[2 * (n - 1 - i)] for i in range(n)], [rp[2 * (n - 1 - i) + 1] for i in range(n)]
        if mod.padding_mode == "zeros" and lows == highs:
            layers.append(Layer(name, mod, mod.weight, mod.bias, n, mod.groups, k, s, d, tuple(lows)))
        else:  # 'same' with an even kernel, or reflect/replicate/circular: pad as the module does
            mode = "constant" if mod.padding_mode == "zeros" else mod.padding_mode
            layers.append(Layer(name, mod, mod.weight, mod.bias, n, mod.groups, k, s, d, (0,) * n,
                                ManualPad(rp, mode)))
    watched = {}
    for n, p in model.named_parameters():
        if id(p) in owned and id(p) not in module_path and id(p) not in excluded_params and id(p) not in left_out:
            watched[id(p)] = (n, p)
    return Found(layers, left_out, watched, excluded_params)
