"""The recorder: how x' reaches a backward that was recorded before x' existed (SPEC §4).

While an AG step runs, exactly one ``Recorder`` is active (module global ``ACTIVE``). Every averaged
activation call asks it what to do: a converted module, ``avg_kernels.nn.functional``, and -- through
``avg_kernels.nn._fnmode.ActivationMode``, active during the step's forward passes -- any other call of a
supported activation function (``F.gelu``, ``torch.tanh``, ``x.sigmoid()`` ...: a *bare* call) and the
hand-written forms of ``avg_kernels.nn._compound.FORMS`` (a *compound*: one slot for the whole form):

* ``GRAPH`` (the forward at θ that builds the graph): the call registers a ``Slot`` (in call order) and
  runs ``_SlotAct``, an autograd Function that computes f(x) with PyTorch's own op and keeps the slot in
  its context. Its backward reads the slot when it runs: empty -> PyTorch's own f' backward formula
  (``activations.native_backward``: bitwise the gradient PyTorch computes); filled -> the averaged
  backward ``grad * s(x, x')``: the same rule as the public ``avg_act`` op's backward
  (``ops.avg_act.averaged_backward``), through the op's eager fast path.
  (A post-hook on PyTorch's own autograd node would also work, but autograd cannot skip the node, so
  the averaged backward would pay for f' as well; measured ~2 % of a ResNet-18-shaped AG-3-1 step.)
* ``REPLAY`` (the no-grad forward at θ' -- or at θ_{t-1} for AG-3-1): call k checks that its input
  matches slot k (shape, dtype, device, activation) and stores it as slot k's x'. A different number of
  calls or a different shape is a ``PairingError`` naming the call index and both shapes.
* ``BACKWARD``: no activation may run while the AG step back-propagates: a call here means the model
  recomputes its forward during backward (activation checkpointing), which would break the pairing.
* ``PLAIN``: ordinary forward (the opt-in evaluation of ℓ(θ_{t+1})); nothing is recorded.

Outside AG steps ``ACTIVE`` is None and the modules call the plain ``torch.nn.functional`` op, so a
converted model computes exactly what the original did and ``torch.compile`` traces it as usual.

The recorder is process-global, not thread-local: the autograd engine runs CUDA backwards on its own
worker threads, and a recomputation there must still be seen. AG steps therefore must not run
concurrently with forwards of converted models in other threads.
"""
from __future__ import annotations

import sys
import threading
from typing import Optional, Union

import torch

from .. import activations
from ..ops.avg_act import averaged_backward
from ..activations import KernelAct

GRAPH, REPLAY, BACKWARD, PLAIN = "graph", "replay", "backward", "plain"

#: The recorder of the AG step in progress, or None.
ACTIVE: Optional["Recorder"] = None
_LOCK = threading.Lock()


class PairingError(RuntimeError):
    """The two forward passes of an AG step did not make the same averaged-activation calls."""


class ReplayComplete(BaseException):
    """Raised at the first torch call of a replay after its last averaged activation when the replay was started
    with ``stop_after_last`` (nothing after that call feeds the averaged backward); the AG step catches it.
    A BaseException, so a model's ``except Exception`` does not swallow it."""


class CheckpointingError(RuntimeError):
    """An averaged activation ran during an AG step's backward (activation checkpointing/recomputation)."""


def activations_name(k: KernelAct) -> str:
    return "gelu(approximate='tanh')" if k.name == "gelu_tanh" else k.name


def _where_text(where) -> str:
    return where if isinstance(where, str) else where._where()


class Slot:
    """One averaged-activation call of the graph pass: what it saw, and x' once the replay filled it."""

    __slots__ = ("index", "k", "where", "kind", "shape", "dtype", "device", "read", "x", "x_new", "x_new_version",
                 "recorder", "superseded")

    def __init__(self, index: int, k: KernelAct, where, x: torch.Tensor, recorder: "Recorder", kind: str):
        self.index, self.k, self.where, self.recorder, self.kind = index, k, where, recorder, kind
        self.shape, self.dtype, self.device = x.shape, x.dtype, x.device
        self.read = False  # True when a backward will read the slot (the call is part of the graph)
        self.x: Optional[torch.Tensor] = None  # the input at θ (read slots; the backward keeps it anyway)
        self.x_new: Optional[torch.Tensor] = None
        self.x_new_version = 0
        # a bare tanh/sigmoid call that turned out to be the inner call of a compound form: paired as usual,
        # but the compound's slot replaces its gradient path (not counted as an averaged activation)
        self.superseded = False

    def describe(self) -> str:
        return f"{activations_name(self.k)} at {_where_text(self.where)}"


class Recorder:
    """Slots of one AG step. Created and driven by ``avg_kernels.optim.AG``."""

    def __init__(self, eps: float, backend: Optional[str]):
        self.eps = float(eps)
        self.backend = backend or "auto"
        self.phase = PLAIN
        self.slots: list[Slot] = []
        self.cursor = 0
        self.replay_label = "θ'"
        self.replays = 0  # replays started in this step (other slot kinds, e.g. Linear layers, reset by it)
        self.busy = False  # inside ``call``: the activation's own torch calls are not calls of the model
        self.plain_calls = 0  # activation calls seen in PLAIN phase (the first AG-3-1 step counts them)
        self.stop_after_last = False  # this replay ends after its last averaged activation (start_replay)
        self.replay_complete = False  # ... and that activation has run: the function mode raises ReplayComplete

    # -- lifecycle ---------------------------------------------------------------------------------
    def __enter__(self) -> "Recorder":
        global ACTIVE
        with _LOCK:
            if ACTIVE is not None:
                raise RuntimeError("an AG step is already in progress: AG steps cannot nest (is the closure "
                                   "calling another AG optimizer's step?)")
            ACTIVE = self
        return self

    def __exit__(self, *exc) -> None:
        global ACTIVE
        with _LOCK:
            ACTIVE = None
        self.clear()

    def clear(self) -> None:
        """Empties every slot (a graph still alive then back-propagates with f' again)."""
        for s in self.slots:
            s.x = s.x_new = None
        self.slots = []
        self.cursor = 0

    def start_replay(self, label: str, stop_after_last: bool = False) -> None:
        """``stop_after_last``: the function mode ends the replay (``ReplayComplete``) at its first torch call
        after the last slot's partner (the model's tail, e.g. a language model's head and loss, is skipped)."""
        self.phase, self.cursor, self.replay_label = REPLAY, 0, label
        self.stop_after_last, self.replay_complete = bool(stop_after_last) and bool(self.slots), False
        self.replays += 1

    def finish_replay(self) -> None:
        """Checks the replay paired every slot."""
        self.stop_after_last = self.replay_complete = False
        n = len(self.slots)
        if self.cursor != n:
            s = self.slots[self.cursor]
            raise PairingError(
                f"AG step: the pass at {self.replay_label} made {self.cursor} averaged-activation calls but the "
                f"pass at θ made {n}; call {s.index} ({s.describe()}, input shape {tuple(s.shape)}) has no "
                "partner. Calls are paired by order: the closure must run the same computation on the same "
                "batch in both passes.")

    def check_unmodified(self) -> None:
        """Every x' is still what the replay recorded (not modified in place by the model afterwards)."""
        for s in self.slots:
            if s.x_new is not None and s.x_new._version != s.x_new_version:
                raise RuntimeError(
                    f"AG step: the input of averaged-activation call {s.index} ({s.describe()}) in the pass at "
                    f"{self.replay_label} was modified in place after the activation read it; the averaged "
                    "backward needs it unchanged (use an out-of-place op in the model).")

    # -- the call ----------------------------------------------------------------------------------
    def averaged(self) -> list[Slot]:
        """The slots that are averaged activations (not the superseded inner calls of compound forms)."""
        return [s for s in self.slots if not s.superseded]

    def fallback_counts(self, every_dtype: bool) -> Optional[tuple[int, int]]:
        """(elements with |x' − x| <= eps, elements) over the slots a backward reads: the share of the
        averaged backward that is f'(x) (under bf16/fp16 x and x' often round to the same value). Counted
        when a read slot is bf16/fp16 or ``every_dtype`` (four elementwise passes per slot); else None."""
        read = [s for s in self.slots if not s.superseded and s.x is not None and s.x_new is not None]
        if not read or not (every_dtype or any(s.dtype in (torch.bfloat16, torch.float16) for s in read)):
            return None
        fell, total = [], 0
        with torch.no_grad():
            for s in read:
                if s.x.dtype in (torch.float32, torch.float64):
                    d = torch.sub(s.x_new, s.x).abs_()
                else:
                    d = (s.x_new.to(torch.float32) - s.x.to(torch.float32)).abs_()
                fell.append(torch.count_nonzero(d <= self.eps))
                total += s.x.numel()
        return int(sum(int(f) for f in fell)), total

    def call(self, x: torch.Tensor, k: KernelAct, where: Union[str, object], value: Optional[torch.Tensor] = None,
             kind: str = "module") -> torch.Tensor:
        """One averaged-activation call; ``where`` is a string or an object with ``_where()``. ``value``:
        f(x) as the model computed it (a compound form: its result is kept as the forward value);
        ``kind``: "module", "functional", "bare" or "compound" (for reports)."""
        self.busy = True
        try:
            return self._call(x, k, where, value, kind)
        finally:
            self.busy = False

    def _call(self, x, k, where, value, kind) -> torch.Tensor:
        phase = self.phase
        if phase == GRAPH:
            slot = Slot(len(self.slots), k, where, x, self, kind)
            self.slots.append(slot)
            if torch.is_grad_enabled() and x.requires_grad:
                # a compound's value goes in detached: the hand-written ops' graph is dropped, not handed
                # zero gradients (a Function materialises None grads as zeros, and the engine would run
                # every op of the form's backward, and its inner tanh's slot, on them: measured 8 ms of
                # GPT-2's 60 ms averaged backward)
                return _SlotAct.apply(x, slot, None if value is None else value.detach())
            if not torch.is_grad_enabled() and _inside_checkpoint():
                raise CheckpointingError(
                    f"AG step: averaged-activation call {slot.index} ({slot.describe()}) runs inside "
                    "torch.utils.checkpoint. Activation checkpointing recomputes the forward during backward, "
                    "which breaks the pairing of the two passes (and hides the parameters inside from the "
                    "step); AG steps reject it. Disable checkpointing for AG training.")
            # no backward reaches it (no grad needed, or a torch.no_grad() block): paired, never read
            return activations.forward(x, k) if value is None else value
        if phase == REPLAY:
            i = self.cursor
            slots = self.slots
            if i >= len(slots):
                raise PairingError(
                    f"AG step: averaged-activation call {i} ({activations_name(k)} at {_where_text(where)}, input "
                    f"shape {tuple(x.shape)}) in the pass at {self.replay_label} has no partner: the pass at θ made "
                    f"only {len(slots)} calls. Calls are paired by order: the closure must run the same "
                    "computation on the same batch in both passes.")
            s = slots[i]
            if x.shape != s.shape or k != s.k:
                raise PairingError(
                    f"AG step: averaged-activation call {i} is {activations_name(k)} at {_where_text(where)} with "
                    f"input shape {tuple(x.shape)} in the pass at {self.replay_label} but {s.describe()} with "
                    f"input shape {tuple(s.shape)} in the pass at θ. Calls are paired by order: the closure must "
                    "run the same computation on the same batch in both passes.")
            if x.dtype != s.dtype or x.device != s.device:
                raise PairingError(
                    f"AG step: averaged-activation call {i} ({s.describe()}) has input dtype {x.dtype} on "
                    f"{x.device} in the pass at {self.replay_label} but {s.dtype} on {s.device} in the pass at θ.")
            if s.read:
                x_new = x.detach()
                s.x_new, s.x_new_version = x_new, x_new._version
            self.cursor = i + 1
            if self.stop_after_last and self.cursor == len(slots):
                self.replay_complete = True
            return activations.forward(x, k) if value is None else value
        if phase == BACKWARD:
            raise CheckpointingError(
                f"AG step: an averaged activation ({activations_name(k)} at {_where_text(where)}) ran during the "
                "backward pass. This happens with activation checkpointing (torch.utils.checkpoint), which "
                "recomputes the forward during backward and would break the pairing of the two passes; AG "
                "steps reject it. Disable checkpointing for AG training.")
        self.plain_calls += 1
        return activations.forward(x, k) if value is None else value


def _native_needs_output(k: KernelAct) -> bool:
    return k.name in ("tanh", "sigmoid", "relu")  # PyTorch's backward formula reads f(x)


class _SlotAct(torch.autograd.Function):
    """f(x) whose backward reads its slot when it runs (see the module docstring)."""

    @staticmethod
    def forward(ctx, x, slot, value=None):  # noqa: D401 - autograd signature
        k = slot.k
        y = activations.forward(x, k) if value is None else value.detach()
        if _native_needs_output(k):
            ctx.save_for_backward(x, y)
        else:
            ctx.save_for_backward(x)
        ctx.slot = slot
        slot.read = True
        slot.x = x.detach()
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        slot = ctx.slot
        rec = slot.recorder
        return averaged_backward(grad, saved[0], saved[1] if len(saved) > 1 else None, slot.x_new, slot.k, rec.eps,
                                 rec.backend, eager=True), None, None


def _inside_checkpoint() -> bool:
    f = sys._getframe(2)
    while f is not None:
        if f.f_code.co_filename.replace("\\", "/").endswith("torch/utils/checkpoint.py"):
            return True
        f = f.f_back
    return False
