"""What the AG steps need to run the closure more than once on one batch (SPEC §4):

* ``ParamSites``: where every parameter and buffer is registered, to swap them for stand-ins during a pass;
* ``RNGReplay``: the CPU/CUDA generator states before the first pass, replayed so dropout masks repeat;
* ``eager()``: AG steps run eagerly (compiled submodules fall back to eager for the step);
* ``DirectUse``: a first-step detector of parameters read through a reference the swap cannot reach;
* ``Phases``: per-phase timing of a step (``AG(profile=...)``).
"""
from __future__ import annotations

import contextlib
import time

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree


class Phases:
    """Time per phase, synchronising the device between phases (only when profiling).

    ``profile``: False (off), True (wall time) or a clock function returning seconds.
    """

    def __init__(self, profile, cuda: bool):
        self.enabled, self.cuda = bool(profile), cuda
        self.clock = profile if callable(profile) else time.perf_counter
        self.times: dict[str, float] = {}
        self._t = self._now() if self.enabled else 0.0

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return self.clock()

    def mark(self, phase: str) -> None:
        """Adds the time since the previous mark to ``phase``."""
        if self.enabled:
            t = self._now()
            self.times[phase] = self.times.get(phase, 0.0) + (t - self._t)
            self._t = t

    def now(self) -> float:
        """The clock, synchronised (used for the untimed ℓ(θ_{t+1}) pass even when not profiling)."""
        return self._now()

    def restart(self) -> None:
        """The next mark counts from now (time since the last mark is dropped)."""
        if self.enabled:
            self._t = self._now()


class ParamSites:
    """Where every parameter and buffer of a model is registered (the owning module's ``_parameters`` /
    ``_buffers`` dict and key), for swapping them for other tensors during a pass."""

    def __init__(self, model: nn.Module):
        self.sites: list[tuple[dict, str, torch.Tensor]] = []
        for m in model.modules():
            for d in (m._parameters, m._buffers):
                for k, v in d.items():
                    if v is not None:
                        self.sites.append((d, k, v))

    @contextlib.contextmanager
    def swapped(self, repl: dict[int, torch.Tensor]):
        """Within the block, every registered tensor ``t`` with ``id(t)`` in ``repl`` is replaced by
        ``repl[id(t)]`` (at every site that holds it: tied weights stay tied)."""
        done = []
        try:
            for d, k, v in self.sites:
                r = repl.get(id(v))
                if r is not None:
                    d[k] = r
                    done.append((d, k, v))
            yield
        finally:
            for d, k, v in done:
                d[k] = v


class RNGReplay:
    """The CPU and CUDA generator states when built (before the graph pass), replayed for the other passes."""

    def __init__(self, cuda_devices: list[int]):
        self.devices = cuda_devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(i) for i in cuda_devices]

    @contextlib.contextmanager
    def replay(self):
        """Within the block the generators start from the saved states; afterwards they are as before."""
        with torch.random.fork_rng(devices=self.devices):
            torch.set_rng_state(self.cpu)
            for i, s in zip(self.devices, self.cuda):
                torch.cuda.set_rng_state(s, i)
            yield


class DirectUse(TorchFunctionMode):
    """First-step check: does any torch function receive one of the REAL parameters while they are
    swapped out for other tensors? Such a parameter is read through a reference AG cannot swap (a list,
    a closure ...): its value in that pass would be wrong and, in the graph pass, its gradient lost.

    ``names``: id of each watched parameter -> its name in the model.
    """

    def __init__(self, names: dict[int, str]):
        super().__init__()
        self.names = names
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if not self.found:
            for a in _pytree.tree_leaves((args, kwargs or {})):
                if isinstance(a, torch.Tensor) and id(a) in self.names:
                    self.found.append(f"parameter {self.names[id(a)]!r} passed to {getattr(func, '__name__', func)}")
                    break
        return func(*args, **(kwargs or {}))

    def check(self, label: str) -> None:
        """Raises if a watched parameter was used during the pass at ``label``."""
        if self.found:
            raise RuntimeError(
                f"AG step: {self.found[0]} during the pass at {label} although the step had swapped that parameter "
                "for another tensor: the model reads it through a reference AG cannot swap (e.g. kept in a list or "
                "a closure instead of Module._parameters). Its value in that pass would be wrong and its gradient "
                "lost. Read parameters through their module.")


def eager():
    """AG steps run eagerly: compiled submodules called by the closure fall back to eager for the step."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    return set_stance("force_eager") if set_stance is not None else contextlib.nullcontext()
