"""``AG(track_replay_loss=False)``: the replay stops at the model's first torch call after its last averaged
activation (the model's tail, e.g. a language model's head and loss, is skipped). Nothing after that call
feeds ḡ, so the parameters must be bitwise those of a run whose replay goes to the end; only the replay's loss
(``loss_new`` / ``loss_prev``) is lost. Default: ``track_replay_loss = track_loss_after`` (metrics.RD reads ℓ(θ')
and ℓ(θ_{t+1})).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import avg_kernels
from avg_kernels.optim import AG

from _hf_models import batch, build, loss_of


class TailNet(nn.Module):
    """Activations written as a module, a function call and a hand-written compound (its last one), then a
    tail whose calls are counted: the head's forward hook, and a tail that catches ``Exception``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(5, 12), nn.Linear(12, 12), nn.Linear(12, 12)
        self.act = nn.Tanh()
        self.head = nn.Linear(12, 3)
        self.head_calls = 0
        self.head.register_forward_hook(self._count)

    def _count(self, mod, args, out):
        self.head_calls += 1

    def forward(self, x):
        h = self.act(self.a(x))
        h = F.silu(self.b(h))
        h = self.c(h)
        h = h * torch.sigmoid(h)  # compound SiLU: the last averaged activation
        try:  # a tail that swallows Exception must not swallow the stop
            h = h + 0.0
        except Exception:  # noqa: BLE001 - the point of the test
            pass
        return self.head(h)


def _run(mode, track, steps, seed=0, model_fn=None, data=None, **ag_kw):
    torch.manual_seed(seed)
    model = avg_kernels.nn.convert(model_fn() if model_fn else TailNet(), warn=False)
    if data is None:
        g = torch.Generator().manual_seed(seed + 1)
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        closure = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    else:
        inputs, target = data
        closure = lambda: loss_of(model, inputs, target)  # noqa: E731
    base = torch.optim.RMSprop(model.parameters(), lr=1e-2)
    opt = AG(model, base, mode=mode, track_replay_loss=track, **ag_kw)
    infos = []
    for _ in range(steps):
        opt.step(closure)
        infos.append(opt.last)
    return model, opt, infos


@pytest.mark.parametrize("mode", ["ag1", "ag2", "ag3-1", "agn"])
def test_stopped_replay_gives_the_same_parameters(mode):
    kw = {"iterations": 3} if mode == "agn" else {}
    full, _, infos_full = _run(mode, True, 4, **kw)
    stopped, _, infos = _run(mode, False, 4, **kw)
    for a, b in zip(full.parameters(), stopped.parameters()):
        assert torch.equal(a, b)
    key = "loss_prev" if mode == "ag3-1" else "loss_new"
    # the first replay always runs to the end (it checks for unaveraged calls); AG-3-1's first step has none
    first = 1 if mode == "ag3-1" else 0
    assert getattr(infos[first], key) is not None
    assert all(getattr(i, key) is None for i in infos[first + 1:])
    assert all(math.isfinite(float(getattr(i, key))) for i in infos_full[first:])
    assert [i.activation_calls for i in infos] == [i.activation_calls for i in infos_full]
    if mode == "agn":  # its further replays stop too
        assert all(t is not None for t in infos_full[-1].loss_iterates)
        assert infos[-1].loss_iterates == (None,) and infos[-1].as_dict()["loss_iterates"] == [None]


def test_the_tail_is_skipped_and_the_default_follows_track_loss_after():
    _, opt, _ = _run("ag3-1", None, 4)
    assert opt.track_replay_loss is False
    # steps: plain (1 forward), first replay to the end (2), then graph pass only (1 each)
    assert opt.model.head_calls == 1 + 2 + 1 + 1
    _, opt, infos = _run("ag1", None, 3)
    assert opt.track_replay_loss is False and opt.model.head_calls == 2 + 1 + 1
    assert infos[0].loss_new is not None and infos[1].loss_new is None
    _, opt, infos = _run("ag1", True, 3)
    assert opt.model.head_calls == 3 * 2 and all(i.loss_new is not None for i in infos)
    _, opt, infos = _run("ag1", None, 3, track_loss_after=True)  # what metrics.RD needs: both losses
    assert opt.track_replay_loss is True and opt.model.head_calls == 3 * 3
    rd = avg_kernels.metrics.RD()
    for i in infos:
        rd.update_from(i)
    assert rd.n == 3


def test_hf_gpt2_ag3_stopped_replay_matches():
    """GPT-2 (tanh-GELU written by hand: a compound; Conv1D layers; tied LM head after the last activation)."""
    data = batch("gpt2")
    full, _, _ = _run("ag3-1", True, 3, model_fn=lambda: build("gpt2"), data=data)
    stopped, _, infos = _run("ag3-1", None, 3, model_fn=lambda: build("gpt2"), data=data)
    assert infos[-1].loss_prev is None and infos[-1].activation_calls > 0
    for a, b in zip(full.parameters(), stopped.parameters()):
        assert torch.equal(a, b)


def test_bad_track_replay_loss():
    m = avg_kernels.nn.convert(TailNet(), warn=False)
    with pytest.raises(TypeError, match="track_replay_loss must be a bool or None, got int"):
        AG(m, torch.optim.SGD(m.parameters(), lr=0.1), track_replay_loss=1)
    with pytest.raises(ValueError, match="track_replay_loss=False .* linear=True"):
        AG(m, torch.optim.SGD(m.parameters(), lr=0.1), linear=True, track_replay_loss=False)
    AG(m, torch.optim.SGD(m.parameters(), lr=0.1), linear=True)  # the default keeps the replay whole
