"""Data-parallel training (``torch.nn.parallel.DistributedDataParallel``) for AG and the C-optimizers
(SPEC §4 "Distributed"): every rank ends every step with bitwise identical parameters, equal (to rounding)
to one process training on the ranks' concatenated batch.

Why the optimizers must take part: DDP averages gradients in hooks on the parameters' gradient
accumulators. AG builds its graph on copies of the parameters, so those hooks never fire, and it needs two
gradients (g and ḡ) per step; the C-optimizers need the input statistics of the whole batch (the Gram of the
concatenated batch is the sum of the ranks' Grams; the M × M form needs every rank's X and ΔZ, since XᵀX has
cross-rank blocks).

* ``Replicas``: the DDP-wrapped model's process group and what AG and the C-optimizers do with it:
  ``mean_grads`` (AG: g and ḡ averaged in one flat all-reduce per dtype/device), ``broadcast_buffers``,
  ``no_sync`` (AG's passes do not drive DDP's reducer), ``global_stats`` (the C-optimizers' per-layer
  statistics of all ranks: two small all-gathers (each rank's non-finite flag and layer-list signature, then
  its positions M per layer; the ranks' functional layers aligned where the signatures differ), ONE
  all-reduce of the D × D Grams' upper triangles, one all-gather of the M × M layers' X and ΔZ, padded to
  equal size).
* ``replicas_of(model, who)``: the ``Replicas`` of a DDP-wrapped model, None for a plain model; raises for
  wrappers and setups not supported (FSDP, DataParallel, a DDP inside the model, DDP options that move the
  reduction elsewhere, several devices per rank).
* ``active_ddp()``: the DDP whose forward is running now (a plain model called through a DDP is refused).

Collective helpers (any process group): ``all_reduce_flat``, ``broadcast_flat``, ``all_gather_padded``.
NCCL is untested here (the tests run gloo on CPU).
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import nn

from ._collect import LayerStats

try:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
except ImportError:  # a torch build without distributed support
    dist, DDP = None, None


def _available() -> bool:
    return dist is not None and dist.is_available()


def active_ddp() -> Optional[nn.Module]:
    """The ``DistributedDataParallel`` whose forward is running now, or None (DDP publishes itself in
    ``_active_ddp_module`` around its module's call, for TorchDynamo)."""
    if not _available():
        return None
    return getattr(DDP, "_active_ddp_module", None)


def refuse_if_called_through(ddp: Optional[nn.Module], model: nn.Module, optimizer: str) -> None:
    """Raises when ``model`` (a plain module given to ``optimizer``) ran inside the forward of ``ddp``:
    its ``.module`` was passed instead of the DDP model, so the optimizer would not synchronise."""
    if ddp is None or ddp is model:
        return
    inner = getattr(ddp, "module", None)
    if inner is model or (isinstance(inner, nn.Module) and any(m is model for m in inner.modules())):
        raise RuntimeError(
            f"{optimizer}: the model it was built on runs inside a DistributedDataParallel forward, but the "
            f"optimizer was given the plain module (ddp.module, or a module inside it): it would not synchronise "
            f"the ranks (they would drift apart silently). Build it on the DDP model itself, e.g. "
            f"{optimizer}(ddp_model, ...)")


@contextlib.contextmanager
def refusing_outer_ddp(model: nn.Module, optimizer: str):
    """Within the block, a forward of ``model`` run by a DDP around it raises (``refuse_if_called_through``)."""
    if not _available():
        yield
        return
    handle = model.register_forward_pre_hook(OuterDDPGuard(model, optimizer))
    try:
        yield
    finally:
        handle.remove()


class OuterDDPGuard:
    """``guard()`` raises when called inside the forward of a DDP around ``model`` (``refuse_if_called_through``);
    picklable (a C-optimizer's collector holds one)."""

    def __init__(self, model: nn.Module, optimizer: str):
        self.model, self.optimizer = model, optimizer

    def __call__(self, *_) -> None:
        refuse_if_called_through(active_ddp(), self.model, self.optimizer)


def _wrapper_kinds() -> list:
    """(class, name) of the distributed wrappers the optimizers refuse, those this torch has."""
    kinds = [(nn.DataParallel, "torch.nn.DataParallel (runs replicas in threads; use DistributedDataParallel)")]
    if _available():
        try:
            from torch.distributed.fsdp import FullyShardedDataParallel
            kinds.append((FullyShardedDataParallel, "FullyShardedDataParallel (FSDP)"))
        except ImportError:
            pass
        try:
            from torch.distributed.fsdp import FSDPModule
            kinds.append((FSDPModule, "fully_shard (FSDP2)"))
        except ImportError:
            pass
    return kinds


def _composable_apis(m: nn.Module) -> list:
    """The torch.distributed composable APIs applied to ``m`` (``fully_shard``, ``replicate`` ...)."""
    if not _available():
        return []
    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:
        return []
    return sorted(_get_registry(m) or {})


def replicas_of(model: nn.Module, who: str, own_backward: bool = False) -> Optional["Replicas"]:
    """``Replicas`` for a ``DistributedDataParallel`` model, None for a plain one (trained per process, as a
    torch.optim optimizer does). Raises ``ValueError`` naming what is not supported: FSDP (1 or 2), other
    composable distributed APIs, ``nn.DataParallel``, a DDP that is not the model itself but inside it, DTensor
    parameters, and DDP with several devices per rank, ignored parameters or mixed precision; with
    ``own_backward`` (AG: the optimizer runs the backward passes, DDP's reducer stays idle) also
    ``static_graph``, delayed all-reduce and the Python reducer, which act in the backward."""
    kinds = _wrapper_kinds()
    for name, m in model.named_modules():
        what = next((what for cls, what in kinds if isinstance(m, cls)), None)
        if what is None and _composable_apis(m):
            what = f"the torch.distributed composable API {_composable_apis(m)}"
        if what is not None:
            raise ValueError(f"{who}: {what} at {name or 'the model'} is not supported; wrap the model in "
                             f"torch.nn.parallel.DistributedDataParallel instead")
        if DDP is not None and isinstance(m, DDP) and m is not model:
            raise ValueError(f"{who}: a DistributedDataParallel inside the model (at {name!r}) is not supported: "
                             f"give the optimizer the DDP model itself (the outermost module)")
    if _available():
        try:
            from torch.distributed.tensor import DTensor
            for name, p in model.named_parameters():
                if isinstance(p, DTensor):
                    raise ValueError(f"{who}: parameter {name!r} is a DTensor (tensor parallel / FSDP2): not "
                                     f"supported")
        except ImportError:
            pass
    if DDP is None or not isinstance(model, DDP):
        return None
    return Replicas(model, who, own_backward)


class Replicas:
    """The ranks of a DDP-wrapped model: its process group and the collectives the optimizers need.

    Args:
        ddp: the ``DistributedDataParallel`` model (checked: one device per rank, the reduction not delegated
            to DDP options the optimizers cannot follow).
        who: the optimizer's name, for messages.
        own_backward: the optimizer runs its own backward passes under ``no_sync`` (AG).
    """

    def __init__(self, ddp: nn.Module, who: str, own_backward: bool = False):
        self.ddp, self.who = ddp, who
        refuse = []
        if getattr(ddp, "parameters_to_ignore", None):
            refuse.append("parameters ignored by DDP (_set_params_and_buffers_to_ignore_for_model)")
        if own_backward:
            if getattr(ddp, "static_graph", False):
                refuse.append("static_graph=True")
            if getattr(ddp, "_delay_all_reduce_all_params", False) or getattr(ddp, "_delay_all_reduce_params", None):
                refuse.append("delay_all_reduce_named_params")
            if getattr(ddp, "_use_python_reducer", False):
                refuse.append("the Python reducer (compiled autograd / optimize_ddp='python_reducer')")
        if getattr(ddp, "mixed_precision", None) is not None:
            refuse.append("mixed_precision")
        devices = {p.device for p in ddp.module.parameters()} | {b.device for b in ddp.module.buffers()}
        if len(devices) > 1:
            refuse.append(f"a module on several devices per rank ({sorted(map(str, devices))})")
        if refuse:
            raise ValueError(f"{who}: DistributedDataParallel with {', '.join(refuse)} is not supported")
        self.group = ddp.process_group
        self.world = dist.get_world_size(self.group)
        self._agreed: dict = {}  # what -> ids of the tensors or layers the ranks were checked to agree on
        self._probe, self._probes = torch.Generator(), 0  # the M × M probe vectors, equal on every rank

    # -- AG ------------------------------------------------------------------------------------------
    def no_sync(self):
        """AG's passes run inside ``ddp.no_sync()``: DDP's reducer expects a backward through the real
        parameters, which AG (graph on copies, ``autograd.grad``) never runs; the gradients are averaged by
        ``mean_grads`` instead."""
        return self.ddp.no_sync()

    def check_usable(self) -> None:
        """Raises for DDP states entered after construction that the optimizers cannot follow."""
        join = getattr(self.ddp, "_join_config", None)
        if join is not None and getattr(join, "enable", False):
            raise RuntimeError(f"{self.who}: the Join context manager (uneven inputs) is not supported: its "
                               f"shadow collectives are DDP's, not the optimizer's")

    def broadcast_buffers(self) -> None:
        """Rank 0's buffers to every rank, as DDP does before each forward with ``broadcast_buffers=True``
        (AG's passes run under ``no_sync``, which stops DDP's own broadcast)."""
        if getattr(self.ddp, "broadcast_buffers", False):
            buffers = [b for b in self.ddp.module.buffers()]
            if buffers:
                broadcast_flat(buffers, self.group)

    def mean_grads(self, grads, params: list, loss: Optional[torch.Tensor] = None):
        """The gradients averaged over the ranks, in one flat all-reduce per (dtype, device).

        Args:
            grads: one gradient (or None: the loss does not depend on that parameter on this rank) per entry of
                ``params``, any float dtype.
            params: the parameters (the layout of the flat buffers; equal on every rank, checked once per
                parameter list).
            loss: this rank's loss, or None.
        Returns:
            (the averaged gradients: a tensor where any rank had one, zeros standing for the others as DDP does,
            None where none had; ``loss``, or a NaN tensor when any rank's loss is not finite, so that every rank
            takes the same decision on it).
        """
        self._check_signature(params)
        for p, g in zip(params, grads):
            if g is not None and g.layout != torch.strided:
                raise RuntimeError(f"{self.who}: parameter of shape {tuple(p.shape)} has a {g.layout} gradient; "
                                   f"only dense gradients are averaged over the ranks (sparse: not supported)")
        flag = None
        if loss is not None:
            flag = (~loss.detach().isfinite()).to(torch.float64).reshape(1).cpu()
        out, counts = all_reduce_flat(list(grads), self.group, like=params, mean=True, extra=flag)
        if loss is not None and counts is not None and float(counts[0]) > 0:
            loss = torch.full_like(loss.detach(), float("nan"))
        return out, loss

    def _check_signature(self, params: list) -> None:
        """Once per parameter list: every rank has the same parameters (count, shapes, dtypes), so the flat
        buffers line up."""
        self._agree("parameters", params, [(tuple(p.shape), str(p.dtype)) for p in params],
                    "count, total size, hash of the shapes", sum(p.numel() for p in params))

    def _agree(self, what: str, items: list, description: list, columns: str, size: int) -> None:
        """Raises unless every rank has the same ``items`` (by ``description``; checked once per list of
        ``items``: one small all-gather)."""
        ids = [id(t) for t in items]
        if self._agreed.get(what) == ids:
            return
        sig = torch.tensor([len(items), size, _stable_hash(repr(description))], dtype=torch.int64)
        rows = _all_gather_small(sig, self.group)
        if any(not torch.equal(r, rows[0]) for r in rows):
            raise RuntimeError(f"{self.who}: the ranks disagree on the optimizer's {what} ({columns}, per rank: "
                               f"{[r.tolist() for r in rows]}); every rank must build the same model and optimizer")
        self._agreed[what] = ids

    # -- the C-optimizers ---------------------------------------------------------------------------------
    def gather_objects(self, obj) -> list:
        """``obj`` (picklable) of every rank, in rank order (``dist.all_gather_object``)."""
        out = [None] * self.world
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def _layer_table(self, layers: list, bad: Optional[str]) -> torch.Tensor:
        """(world, 4): every rank's [non-finite flag, layer count, total D, hash of the names and D]."""
        dims = [layer.dim() for layer in layers]
        row = torch.tensor([int(bad is not None), len(layers), sum(dims),
                            _stable_hash(repr([(layer.name, d) for layer, d in zip(layers, dims)]))], dtype=torch.int64)
        return torch.stack(_all_gather_small(row, self.group))

    def global_stats(self, layers: list, stats: dict, gram_fn, bad: Optional[str] = None, align=None):
        """The statistics of all ranks' uses of ``layers`` since the last step, as one process training on
        the concatenated batch would have collected them.

        Args:
            layers: the preconditioned layers (``_layers.Layer``), in the same order on every rank.
            stats: this rank's ``Collector.take()`` (Layer -> ``LayerStats``).
            gram_fn: ``Collector.gram`` (layer, prepared input, bias) -> its (groups, D, D) Gram.
            bad: what holds a NaN or infinity on this rank (``Consequentialism._nonfinite``), or None.
            align: called (on every rank) when the ranks' layers differ: takes the other ranks' functional
                layers (found at a forward, so possibly on some ranks only, or in another order) and returns
                this rank's layers after that; None: a difference raises.
        Returns:
            (stats of every layer with a use on any rank: the summed Gram where the global M >= D (D × D
            form), else the gathered X (groups, D, M) and ΔZ / world (groups, C_out/groups, M) in ``X`` / ``dz``
            (M × M form; ΔZ divided by the world size because DDP averages the gradients), or None when some
            rank met a non-finite value; the message naming it (this rank's, or "on rank r") or None).
        """
        # checked at every step, not once per list: a functional layer appears at the forward that first
        # uses it, which may be on one rank only (a rank that skipped the check would mismatch collectives)
        table = self._layer_table(layers, bad)
        if any(not torch.equal(r[1:], table[0, 1:]) for r in table) and align is not None:
            layers = align()
            table = self._layer_table(layers, bad)
        if any(not torch.equal(r[1:], table[0, 1:]) for r in table):
            raise RuntimeError(f"{self.who}: the ranks disagree on the optimizer's preconditioned layers (count, "
                               f"total D, hash of the names and D, per rank: {table[:, 1:].tolist()}); every rank "
                               f"must build the same model and optimizer")
        flags = table[:, 0].tolist()
        if any(flags):
            return None, bad if bad is not None else f"a value on rank {flags.index(1)}"
        dims = [layer.dim() for layer in layers]
        local_m = torch.tensor([stats[layer].m if layer in stats else 0 for layer in layers], dtype=torch.int64)
        ms = torch.stack(_all_gather_small(local_m, self.group))  # (world, L)
        total = ms.sum(0).tolist()
        dxd, mxm = [], []
        for i, layer in enumerate(layers):
            if total[i] == 0:
                continue
            (mxm if total[i] < dims[i] else dxd).append(i)
        out = {}
        grams = []
        for i in dxd:
            layer = layers[i]
            st = stats.get(layer)
            bias = st.bias if st is not None and st.m else layer.has_bias()
            dtype = _compute_dtype(layer)
            if st is not None and st.gram is not None:
                gram = st.gram.to(dtype)
            elif st is not None and st.xs:
                gram = sum(gram_fn(layer, x, bias) for x in st.xs).to(dtype)
            else:
                gram = torch.zeros(layer.groups, dims[i], dims[i], dtype=dtype, device=layer.weight.device)
            grams.append(gram)
            out[layer] = LayerStats(m=total[i], bias=bias, eps=st.eps if st is not None else 0.0)
        for i, gram in zip(dxd, all_reduce_triu(grams, self.group)):
            out[layers[i]].gram = gram
        if mxm:
            parts, sizes = [], []
            for i in mxm:
                layer = layers[i]
                st = stats.get(layer)
                bias = st.bias if st is not None and st.m else layer.has_bias()
                ct = _compute_dtype(layer)
                g, c_out, d = layer.groups, layer.c_out, dims[i]
                if st is not None and st.xs:
                    X, dz = layer.unfold(st.xs, bias, ct), layer.output_grads(st.xs, st.dzs, ct)
                else:
                    X = torch.zeros(g, d, 0, dtype=ct, device=layer.weight.device)
                    dz = torch.zeros(g, c_out // g, 0, dtype=ct, device=layer.weight.device)
                parts += [X, dz]
                sizes += [ms[:, i].tolist()] * 2
                out[layer] = LayerStats(m=total[i], bias=bias, eps=st.eps if st is not None else 0.0)
            gathered = all_gather_padded(parts, sizes, self.group)
            for k, i in enumerate(mxm):
                st = out[layers[i]]
                st.X, st.dz = gathered[2 * k], gathered[2 * k + 1].div_(self.world)
        return out, None

    def probe_generator(self) -> torch.Generator:
        """The generator of the M × M form's probe vectors: reseeded at each call (one per step), equal on every
        rank (so the uniform factor, and hence P, is bitwise equal on every rank)."""
        self._probes += 1
        return self._probe.manual_seed(0x5EED + self._probes)


def _compute_dtype(layer) -> torch.dtype:
    """The Gram / X / ΔZ dtype of a layer (float64 for float64 weights, else float32), equal on every rank."""
    return torch.float64 if layer.weight.dtype == torch.float64 else torch.float32


def _stable_hash(text: str) -> int:
    """A hash of ``text`` equal in every process (Python's ``hash`` of a str is salted per process)."""
    h = 1469598103934665603
    for b in text.encode():
        h = ((h ^ b) * 1099511628211) % (1 << 61)
    return h


def _all_gather_small(t: torch.Tensor, group) -> list[torch.Tensor]:
    """``t`` (a small CPU tensor, equal shape on every rank) of every rank, on the group's device."""
    dev = _group_device(group)
    rows = [torch.empty_like(t, device=dev) for _ in range(dist.get_world_size(group))]
    dist.all_gather(rows, t.to(dev), group=group)
    return [r.cpu() for r in rows]


def _group_device(group) -> torch.device:
    """CPU for gloo (and mixed groups), the current CUDA device for NCCL (which takes CUDA tensors only)."""
    backend = dist.get_backend(group)
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _buckets(like: list) -> dict:
    """Indices of ``like`` grouped by (dtype, device), in order."""
    out: dict = {}
    for i, t in enumerate(like):
        out.setdefault((t.dtype, t.device), []).append(i)
    return out


def all_reduce_flat(tensors: list, group, like: Optional[list] = None, mean: bool = False,
                    extra: Optional[torch.Tensor] = None):
    """Sums (``mean``: averages) ``tensors`` over the ranks of ``group``: one all-reduce of a flat buffer per
    (dtype, device) of ``like`` (default: the tensors themselves).

    Args:
        tensors: tensors, or None for "absent on this rank" (then ``like[i]`` gives shape, dtype and device).
        like: the tensors fixing the layout (equal on every rank), e.g. the parameters of the gradients.
        mean: divide by the world size (an entry absent on some ranks counts as zeros there, as in DDP).
        extra: a small float64 CPU tensor summed along (in the first buffer; e.g. a flag per rank), or None.
    Returns:
        (the reduced tensors, in place into the given ones where present, new where absent here but present
        on another rank, None where absent on every rank; the summed ``extra`` (float64, CPU) or None).
    """
    like = tensors if like is None else like
    world = dist.get_world_size(group)
    out = list(tensors)
    extra_sum = None
    for n, ((dtype, device), idx) in enumerate(_buckets(like).items()):
        sizes = [like[i].numel() for i in idx]
        n_extra = extra.numel() if (extra is not None and n == 0) else 0
        flat = torch.zeros(sum(sizes) + len(idx) + n_extra, dtype=dtype, device=device)
        views = flat[:sum(sizes)].split(sizes)
        present = flat[sum(sizes):sum(sizes) + len(idx)]
        for k, i in enumerate(idx):
            if tensors[i] is not None:
                views[k].copy_(tensors[i].reshape(-1))
                present[k] = 1
        if n_extra:
            flat[-n_extra:] = extra.to(dtype)
        dist.all_reduce(flat, group=group)
        if mean:
            flat[:sum(sizes)].div_(world)
        has = present.cpu().tolist()
        for k, i in enumerate(idx):
            if has[k] == 0:
                out[i] = None
            elif tensors[i] is not None:
                tensors[i].copy_(views[k].view(tensors[i].shape))
                out[i] = tensors[i]
            else:
                out[i] = views[k].view(like[i].shape).clone()
        if n_extra:
            extra_sum = flat[-n_extra:].to(device="cpu", dtype=torch.float64)
    if extra is not None and extra_sum is None:  # no tensors at all: the extra alone
        extra_sum = extra.to(torch.float64).clone()
        dist.all_reduce(extra_sum, group=group)
    return out, extra_sum


def broadcast_flat(tensors: list, group, src_rank: int = 0) -> None:
    """Every rank's ``tensors`` set, in place, to those of group rank ``src_rank``: one broadcast per device of
    their bytes (buffers of several dtypes, e.g. BatchNorm's float statistics and int64 count, in one call)."""
    src = dist.get_global_rank(group, src_rank) if group is not None else src_rank
    by_device: dict = {}
    for t in tensors:
        by_device.setdefault(t.device, []).append(t)
    for ts in by_device.values():
        raw = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in ts]
        flat = torch.cat(raw)
        dist.broadcast(flat, src=src, group=group)
        with torch.no_grad():
            for t, v in zip(ts, flat.split([r.numel() for r in raw])):
                t.copy_(v.view(t.dtype).view(t.shape))


_TRIU_MASKS: dict = {}


def _triu_mask(d: int, device) -> torch.Tensor:
    key = (d, str(device))
    mask = _TRIU_MASKS.get(key)
    if mask is None:
        mask = _TRIU_MASKS[key] = torch.ones(d, d, dtype=torch.bool, device=device).triu()
    return mask


def all_reduce_triu(grams: list, group) -> list:
    """Symmetric (n, D, D) matrices summed over the ranks: their upper triangles (D(D+1)/2 numbers per
    matrix) in one flat all-reduce per (dtype, device). Returns new full symmetric matrices."""
    out = [None] * len(grams)
    for (dtype, device), idx in _buckets(grams).items():
        tri = [grams[i][:, _triu_mask(grams[i].shape[-1], device)].reshape(-1) for i in idx]
        flat = torch.cat(tri)
        dist.all_reduce(flat, group=group)
        for i, v in zip(idx, flat.split([t.numel() for t in tri])):
            n, d = grams[i].shape[0], grams[i].shape[-1]
            full = torch.zeros(n, d, d, dtype=dtype, device=device)
            full[:, _triu_mask(d, device)] = v.view(n, -1)
            out[i] = full + full.triu(1).mT
    return out


def all_gather_padded(tensors: list, sizes: list, group) -> list:
    """The ranks' ``tensors`` concatenated along their last dimension (in rank order), where rank r's
    tensor k has last dimension ``sizes[k][r]`` (all other dimensions, dtype and device equal on every
    rank): each padded to its largest size, all in one flat all-gather per (dtype, device)."""
    world = dist.get_world_size(group)
    out = [None] * len(tensors)
    for (dtype, device), idx in _buckets(tensors).items():
        padded = []
        for i in idx:
            t, mx = tensors[i], max(sizes[i])
            padded.append(torch.nn.functional.pad(t, (0, mx - t.shape[-1])).reshape(-1))
        flat = torch.cat(padded)
        got = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(got, flat, group=group)
        for k, i in enumerate(idx):
            lead, mx = tuple(tensors[i].shape[:-1]), max(sizes[i])
            start = sum(p.numel() for p in padded[:k])
            pieces = [got[r][start:start + padded[k].numel()].view(*lead, mx)[..., :sizes[i][r]] for r in range(world)]
            out[i] = torch.cat(pieces, dim=-1)
    return out


__all__ = ["OuterDDPGuard", "Replicas", "active_ddp", "all_gather_padded", "all_reduce_flat", "all_reduce_triu",
           "broadcast_flat", "refuse_if_called_through", "refusing_outer_ddp", "replicas_of"]
