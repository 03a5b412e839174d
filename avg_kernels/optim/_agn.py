"""n-iteration AG (``AG(..., mode="agn", iterations=n)``; paper 000 Alg. 4, SPEC §4).

One step: the base optimizer's step with g gives θ' (= θ_0); then n − 1 averaged backwards over the SAME
graph at θ, backward k averaging over [θ, θ_{k−1}] and giving

    θ_k = θ − |θ' − θ| ⊙ sign(ḡ_k),          k = 1 … n − 1,   θ_{t+1} = θ_{n−1}

always restarting from θ. Forwards: one with the graph, n − 1 replays without; backwards: n. n = 2 is AG-1
exactly (the same code path; nothing here runs).

The magnitude. Alg. 4 as printed takes it from the previous iterate, |θ_{k−1} − θ|; as θ_{k−1} − θ is
±|θ' − θ| or 0, the two differ only where some earlier ḡ_j was exactly 0: as printed such an element then
stays at θ for the rest of the step whatever the later ḡ say. We keep |θ' − θ| throughout: the paper's premise
is that the base step's magnitudes are retained and only the directions are searched ("after the first
iteration ... only the negations of the directions of changes in each parameter are possible", 000 §5), and an
exact zero of ḡ_j (a dead ReLU over the whole range, for one) says nothing about the sign on the refined
range of iteration j + 1. It also needs one copy of θ' instead of one per iterate.

The AG step runs steps 1-4 of AG-1 (``AG._segment_step``; its last backward keeps the graph when more
iterations follow), calls ``refine`` for iterations 2 … n − 1, then AG-1's update with the last ḡ.
"""
from __future__ import annotations

import numbers

import torch

from ..nn._recording import BACKWARD


def check_iterations(mode: str, iterations) -> int | None:
    """The validated iteration count: an int >= 2 with mode="agn", None otherwise (ValueError naming it)."""
    if mode != "agn":
        if iterations is not None:
            raise ValueError(f"iterations={iterations!r} is for mode='agn' (n-iteration AG over AG-1, paper 000 "
                             f"Alg. 4); mode={mode!r} has a fixed number of backwards (AG-2 and AG-3-1 have no "
                             "n-iteration form in the papers). Leave iterations unset or use mode='agn'")
        return None
    if iterations is None:
        raise ValueError("mode='agn' needs iterations=n (an int >= 2: n backwards per step; n = 2 is AG-1)")
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise ValueError(f"iterations must be an int >= 2, got {type(iterations).__name__} {iterations!r}")
    if iterations < 2:
        raise ValueError(f"iterations={iterations}: n-iteration AG needs n >= 2 (n backwards per step, n = 2 is "
                         "AG-1; n = 1 would be the base optimizer alone)")
    return int(iterations)


def refine(ag, closure, params, sites, buffers, rng, rec, loss, inputs: list, gbar: tuple, ph, grad) -> tuple:
    """Iterations 2 … n − 1 of an n-iteration step (module docstring). On entry the parameters hold θ' and
    ``gbar`` is ḡ_1 (over [θ, θ']); on return the parameters hold θ' again and the result is
    ``(ḡ_{n−1}, (ℓ(θ_1), …, ℓ(θ_{n−2})))``. ``inputs``: the leaf copies of θ the graph was built on (never
    written here); ``grad(loss, inputs, retain_graph)`` the step's backward."""
    n = ag.iterations
    if n <= 2:
        return gbar, ()
    from .ag import _ag1_by_device  # the step's own AG-1 update (one call per device)

    live = [p.detach() for p in params]
    theta = [t.detach() for t in inputs]
    with torch.no_grad():
        if len(ag._spare) != len(params):
            ag._spare = [torch.empty_like(p, memory_format=torch.preserve_format) for p in params]
        theta_new = ag._spare
        torch._foreach_copy_(theta_new, live)  # θ'
    ph.mark("copies")
    losses = []
    for k in range(2, n):
        with torch.no_grad():  # θ_{k−1} = θ − |θ' − θ| ⊙ sign(ḡ_{k−1}), into the parameters
            torch._foreach_copy_(live, theta)
            _ag1_by_device(live, theta_new, list(gbar), ag.backend)
        ph.mark("update")
        losses.append(ag._replay(closure, sites, ag._buffer_stand_ins(buffers), rng, rec, f"θ_{k - 1}", params,
                                 swapped_params=False))
        ph.mark("forward_replay")
        rec.check_unmodified()
        rec.phase = BACKWARD
        gbar = grad(loss, inputs, retain_graph=k < n - 1)
        ph.mark("backward_avg")
        ag._check_finite(list(zip(params, gbar)), f"the averaged gradient ḡ_{k} (segment [θ, θ_{k - 1}])")
    with torch.no_grad():
        torch._foreach_copy_(live, theta_new)  # θ' back: AG-1's update reads |θ' − θ|
    ph.mark("copies")
    return gbar, tuple(losses)
