"""A straightforward float64 implementation of AG steps that builds TWO separate graphs (paper 000
Alg. 1-2, paper 002 Alg. 1-2): the test oracle for avg_kernels.optim.AG, which reuses one graph.

It works on an UNconverted model (plain torch.nn activations) and replaces each activation's backward
through forward hooks in the second graph; x' is captured with forward pre-hooks in a separate pass.

Functional activations (``torch.tanh(h)``, ``F.silu(h)``, ``h * torch.sigmoid(h)``, a hand-written
tanh-GELU ...) are marked in the test model itself: its forward passes each one through
``site(model, x, y, f)`` (x the activation's input, y the value the forward computed, f the activation as
a function of x, in float64). Outside this reference ``model.site`` is None and ``site`` returns y, so
the model is exactly the functional code an AG step sees; here ``model.site`` captures x' or returns a
secant node with value y whose backward is the secant of f -- the WHOLE function for a compound form.
Nothing here shares code with avg_kernels.nn / avg_kernels.optim.
"""
from __future__ import annotations

import torch
from torch import nn

EPS = 1.1920929e-07
ACT_TYPES = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Softplus, nn.Hardtanh)


def _acts(model):
    return [m for m in model.modules() if isinstance(m, ACT_TYPES)]


def site(model: nn.Module, x: torch.Tensor, y: torch.Tensor, f) -> torch.Tensor:
    """A functional activation call site of a test model (see the module docstring)."""
    hook = getattr(model, "site", None)
    return y if hook is None else hook(x, y, f)


def _f(m: nn.Module):
    """The module's function, out of place."""
    if isinstance(m, nn.ReLU):
        return torch.relu
    if isinstance(m, nn.LeakyReLU):
        return lambda t: torch.nn.functional.leaky_relu(t, m.negative_slope)
    if isinstance(m, nn.ELU):
        return lambda t: torch.nn.functional.elu(t, m.alpha)
    if isinstance(m, nn.Hardtanh):  # nn.ReLU6 too (min_val 0, max_val 6)
        return lambda t: torch.nn.functional.hardtanh(t, m.min_val, m.max_val)
    return m.forward


class _Secant(torch.autograd.Function):
    """Output f(x) (passed in), backward: literal float64 secant (f(x') - f(x)) / (x' - x), f'(x) when |d| <= eps."""

    @staticmethod
    def forward(ctx, x, y, x_new, f):
        ctx.save_for_backward(x, x_new)
        ctx.f = f
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        x, x_new = ctx.saved_tensors
        f = ctx.f
        xd, xnd = x.detach().double(), x_new.double()
        with torch.enable_grad():
            xx = xd.clone().requires_grad_()
            (deriv,) = torch.autograd.grad(f(xx).sum(), xx)
        d = xnd - xd
        secant = (f(xnd) - f(xd)) / torch.where(d.abs() > EPS, d, torch.ones_like(d))
        s = torch.where(d.abs() > EPS, secant, deriv)
        return (g.double() * s).to(g.dtype), None, None, None


def _forward_capture(model, x, rng):
    """No-grad forward recording every activation's input; buffers restored afterwards."""
    saved = [(b, b.clone()) for b in model.buffers()]
    inputs = []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0].detach().clone())) for m in _acts(model)]
    model.site = lambda t, y, f: (inputs.append(t.detach().clone()), y)[1]
    torch.set_rng_state(rng)
    try:
        with torch.no_grad():
            out = model(x)
    finally:
        model.site = None
    for h in hooks:
        h.remove()
    for b, s in saved:
        b.copy_(s)
    return inputs, out


def _secant_loss(model, x, y, loss_fn, rng, x_new):
    """The loss of a forward whose activations back-propagate the secant with x_new (call order), RNG at rng."""
    calls = iter(range(len(x_new)))
    hooks = []
    for m in _acts(model):
        f = _f(m)
        hooks.append(m.register_forward_hook(lambda mod, a, out, f=f: _Secant.apply(a[0], out, x_new[next(calls)], f)))
    model.site = lambda t, out, f: _Secant.apply(t, out, x_new[next(calls)], f)
    torch.set_rng_state(rng)
    try:
        return loss_fn(model(x), y)
    finally:
        model.site = None
        for h in hooks:
            h.remove()


def _averaged_grads(model, x, y, loss_fn, rng, x_new):
    """Graph 2 at the model's current parameters, activations back-propagating the secant with x_new."""
    saved = [(b, b.clone()) for b in model.buffers()]
    loss = _secant_loss(model, x, y, loss_fn, rng, x_new)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for b, s in saved:
            b.copy_(s)
    return grads


@torch.no_grad()
def _load(params, values) -> None:
    """Writes ``values`` into ``params`` in place."""
    for p, t in zip(params, values):
        p.copy_(t)


def _sign(t):
    s = torch.sign(t)
    return torch.where(torch.isnan(t), t, s)


def ag_step(model, opt, x, y, loss_fn, mode: str, rng, opt_factory=None):
    """One AG-1 / AG-2 step in the papers' two-graph form. ``rng`` = CPU RNG state before the step.

    AG-2 needs ``opt_factory(params)`` to build a throw-away copy of the base optimizer at s_t.
    Returns (loss at θ, averaged grads).
    """
    params = [p for p in model.parameters() if p.requires_grad]
    # graph 1 at θ: ordinary training forward (this one updates BatchNorm statistics) and backward
    torch.set_rng_state(rng)
    loss = loss_fn(model(x), y)
    for p in params:
        p.grad = None
    loss.backward()
    theta = [p.detach().clone() for p in params]
    grads = [p.grad.clone() for p in params]
    state_t = _clone_state(opt.state_dict()) if mode == "ag2" else None
    opt.step()  # θ'
    theta_new = [p.detach().clone() for p in params]
    x_new, _ = _forward_capture(model, x, rng)
    _load(params, theta)
    gbar = _averaged_grads(model, x, y, loss_fn, rng, x_new)
    with torch.no_grad():
        if mode == "ag1":
            for p, t, tn, g in zip(params, theta, theta_new, gbar):
                if g is not None:
                    p.copy_(t - (tn - t).abs() * _sign(g))
        else:
            _ag2_update(params, theta, theta_new, gbar, opt_factory, state_t)
    for p, g in zip(params, gbar):
        p.grad = g
    return loss.detach(), gbar, grads


def ag3_step(model, opt, x, y, loss_fn, rng, prev):
    """One AG-3-1 step: segment [prev, θ], one averaged backward, base step with ḡ. Returns new prev."""
    params = [p for p in model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    if prev is None:
        torch.set_rng_state(rng)
        loss = loss_fn(model(x), y)
        for p in params:
            p.grad = None
        loss.backward()
        opt.step()
        return theta
    _load(params, prev)
    x_new, _ = _forward_capture(model, x, rng)
    _load(params, theta)
    # graph at θ_t (the ordinary training forward: updates BatchNorm statistics once)
    saved_calls = []
    loss = _secant_loss(model, x, y, loss_fn, rng, x_new)
    gbar = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, gbar):
        p.grad = g
    opt.step()
    del saved_calls
    return theta


def assert_ag3_steps_match(plain, ours, opt_ref, opt, batch, loss_fn, steps=3, seed=200, tol=1e-6):
    """``steps`` AG-3-1 steps of ``opt`` (on ``ours``) against ``ag3_step`` (on ``plain``), on ``batch(step)``
    with the same RNG state in both (dropout masks): the trainable parameters agree to ``tol`` after each."""
    prev = None
    for step in range(steps):
        x, y = batch(step)
        rng = torch.manual_seed(seed + step).get_state()
        prev = ag3_step(plain, opt_ref, x, y, loss_fn, rng, prev)
        torch.set_rng_state(rng)
        opt.step(lambda: loss_fn(ours(x), y))
        pairs = zip((p for p in ours.parameters() if p.requires_grad), (p for p in plain.parameters() if p.requires_grad))
        diff = max(float((a.detach().cpu().double() - b.detach().cpu().double()).abs().max()) for a, b in pairs)
        assert diff <= tol, (step, diff)


def _clone_state(sd):
    import copy

    return copy.deepcopy(sd)


# -- n-iteration AG (paper 000 Alg. 4) and the "Linear" variants (paper 002 Eq. 11, Alg. 2 lines 10-15) ----------
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _layers(model):
    return [m for m in model.modules() if isinstance(m, LAYER_TYPES)]


def _layer_fn(m):
    """The layer as a function of (input, weight, bias)."""
    if isinstance(m, nn.Linear):
        return torch.nn.functional.linear
    return m._conv_forward


class _MeanJacobian(torch.autograd.Function):
    """Output y (passed in); backward: the literal mean of the layer's two vector-Jacobian products, at (x, W) and
    at (x', W') (Eq. 11), in float64; then, where ``norms`` is given (AG-2 Linear), the input gradient and the
    parameter gradient (weight and bias as one vector) scaled to the ordinary gradients' L2 norms."""

    @staticmethod
    def forward(ctx, x, w, b, y, x_new, w_new, m, norms):
        ctx.save_for_backward(x, w, b, x_new, w_new)
        ctx.m, ctx.norms = m, norms
        return y.clone()

    @staticmethod
    def backward(ctx, g):
        x, w, b, x_new, w_new = ctx.saved_tensors
        f = _layer_fn(ctx.m)

        def vjp(xx, ww):
            xx = xx.detach().double().requires_grad_()
            ww = ww.detach().double().requires_grad_()
            bb = b.detach().double().requires_grad_()
            with torch.enable_grad():
                return torch.autograd.grad(f(xx, ww, bb), (xx, ww, bb), g.double())

        gx0, gw0, gb0 = vjp(x, w)
        gx1, gw1, gb1 = vjp(x_new, w_new)
        gx, gw, gb = (gx0 + gx1) / 2, (gw0 + gw1) / 2, (gb0 + gb1) / 2
        if ctx.norms is not None:
            n_x, n_p = ctx.norms
            if n_x is not None and gx.norm() > 0:
                gx = gx * (n_x / gx.norm())
            n_avg = torch.cat([gw.flatten(), gb.flatten()]).norm()
            if n_avg > 0:
                gw, gb = gw * (n_p / n_avg), gb * (n_p / n_avg)
        return gx.to(x.dtype), gw.to(w.dtype), gb.to(b.dtype), None, None, None, None, None


def _capture_all(model, x, rng):
    """No-grad forward: every activation's input, every layer's input and weight; buffers restored."""
    saved = [(b, b.clone()) for b in model.buffers()]
    acts, layers = [], []
    hooks = [m.register_forward_pre_hook(lambda mod, a: acts.append(a[0].detach().clone())) for m in _acts(model)]
    hooks += [m.register_forward_pre_hook(lambda mod, a: layers.append((a[0].detach().clone(),
                                                                         mod.weight.detach().clone())))
              for m in _layers(model)]
    torch.set_rng_state(rng)
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    for b, s in saved:
        b.copy_(s)
    return acts, layers


def _gradient_norms(model, x, y, loss_fn, rng):
    """AG-2 Linear: per layer (call order) the L2 norms of ∂ℓ/∂(layer input) (None where the input needs no
    gradient) and of the layer's parameter gradient, from an ordinary forward/backward at the current θ."""
    saved = [(b, b.clone()) for b in model.buffers()]
    inputs, norms = [], []
    hooks = [m.register_forward_pre_hook(lambda mod, a: inputs.append(a[0])) for m in _layers(model)]
    torch.set_rng_state(rng)
    loss = loss_fn(model(x), y)
    for h in hooks:
        h.remove()
    layers = _layers(model)
    assert len(inputs) == len(layers), "the reference handles models calling each layer once"
    params = [q for m in layers for q in (m.weight, m.bias)]
    need = [t for t in inputs if t.requires_grad]
    grads = torch.autograd.grad(loss, need + params)
    gin = dict(zip(map(id, need), grads[:len(need)]))
    gp = grads[len(need):]
    for i, t in enumerate(inputs):
        n_x = gin[id(t)].double().norm() if id(t) in gin else None
        norms.append((n_x, torch.cat([gp[2 * i].flatten(), gp[2 * i + 1].flatten()]).double().norm()))
    with torch.no_grad():
        for b, s in saved:
            b.copy_(s)
    return norms


def _averaged_grads_linear(model, x, y, loss_fn, rng, acts_new, layers_new, norms):
    """Graph at the current θ: activations back-propagate the secant, layers the mean Jacobian of Eq. 11."""
    saved = [(b, b.clone()) for b in model.buffers()]
    calls = iter(range(len(layers_new)))

    def hook(mod, a, out):
        i = next(calls)
        xn, wn = layers_new[i]
        return _MeanJacobian.apply(a[0], mod.weight, mod.bias, out, xn, wn, mod, None if norms is None else norms[i])

    hooks = [m.register_forward_hook(hook) for m in _layers(model)]
    try:
        loss = _secant_loss(model, x, y, loss_fn, rng, acts_new)
    finally:
        for h in hooks:
            h.remove()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    with torch.no_grad():
        for b, s in saved:
            b.copy_(s)
    return grads


def variant_step(model, opt, x, y, loss_fn, rng, mode="ag1", iterations=2, linear=False, magnitude="base",
                 opt_factory=None):
    """One AG step in the papers' separate-graph form, for the variants: ``iterations`` = n of paper 000 Alg. 4
    (AG-1 only for n > 2; segment k is [θ, θ_{k-1}], θ_0 = θ'), ``linear`` = paper 002 Eq. 11 (AG-2: rescaled
    per layer to the ordinary gradients' norms). ``magnitude``: "base" keeps |θ' − θ| in every iteration,
    "printed" takes |θ_{k-1} − θ| as Alg. 4 is printed. Returns (loss at θ, last averaged grads)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norms = _gradient_norms(model, x, y, loss_fn, rng) if (linear and mode == "ag2") else None
    torch.set_rng_state(rng)
    loss = loss_fn(model(x), y)  # the ordinary training forward (updates BatchNorm statistics once)
    for p in params:
        p.grad = None
    loss.backward()
    theta = [p.detach().clone() for p in params]
    state_t = _clone_state(opt.state_dict()) if mode == "ag2" else None
    opt.step()
    theta_new = [p.detach().clone() for p in params]
    prev = theta_new
    for k in range(1, iterations):
        _load(params, prev)
        acts_new, layers_new = _capture_all(model, x, rng)
        _load(params, theta)
        if linear:
            gbar = _averaged_grads_linear(model, x, y, loss_fn, rng, acts_new, layers_new, norms)
        else:
            gbar = _averaged_grads(model, x, y, loss_fn, rng, acts_new)
        mag_from = theta_new if magnitude == "base" else prev
        prev = [t - (m - t).abs() * _sign(g) if g is not None else t.clone()
                for t, m, g in zip(theta, mag_from, gbar)]
    with torch.no_grad():
        if mode == "ag1":
            _load(params, prev)
        else:
            _ag2_update(params, theta, theta_new, gbar, opt_factory, state_t)
    for p, g in zip(params, gbar):
        p.grad = g
    return loss.detach(), gbar


def _ag2_update(params, theta, theta_new, gbar, opt_factory, state_t) -> None:
    """AG-2's update into ``params``: θ'' = a twin of the base optimizer stepped from the pre-step state s_t
    with ḡ at θ, then θ + (θ'' − θ)·‖θ' − θ‖₁ / ‖θ'' − θ‖₁ (under no_grad)."""
    _load(params, theta)
    twin = opt_factory(params)
    twin.load_state_dict(state_t)
    for p, g in zip(params, gbar):
        p.grad = g.clone() if g is not None else None
    twin.step()  # θ''
    delta = [p.detach() - t for p, t in zip(params, theta)]
    l1_step = sum((tn - t).abs().sum() for tn, t in zip(theta_new, theta))
    l1_delta = sum(d.abs().sum() for d in delta)
    scale = l1_step / l1_delta if l1_delta != 0 else 1.0
    for p, t, d in zip(params, theta, delta):
        p.copy_(t + d * scale)
