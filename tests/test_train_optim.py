"""Recipes and schedules against the closed forms of torch's schedulers and numpy transcriptions of
torch's SGD (Nesterov) and RAdam update rules."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from conftest import assert_close_to

from jaxmamba.config import OptimConfig
from jaxmamba.train import optim

ITERS = 3  # iterations per epoch in these tests


def _lr_at_epoch(recipe, epoch):
    return float(recipe.lr(jnp.asarray(epoch * ITERS + ITERS - 1)))


def test_poly_schedule_per_epoch():
    r = optim.build_recipe(OptimConfig(recipe="nnunet"), epochs=1000, iters_per_epoch=ITERS)
    for e in (0, 1, 500, 999):
        # constant within an epoch, torch PolyLRScheduler's value at the epoch
        want = 1e-2 * (1 - e / 1000) ** 0.9
        assert float(r.lr(jnp.asarray(e * ITERS))) == pytest.approx(want, rel=1e-6)
        assert _lr_at_epoch(r, e) == pytest.approx(want, rel=1e-6)


def test_cosine_is_periodic_as_torch_step_epoch():
    r = optim.build_recipe(OptimConfig(recipe="radam_cosine"), epochs=300, iters_per_epoch=ITERS)
    assert _lr_at_epoch(r, 0) == pytest.approx(3e-4, rel=1e-6)
    assert _lr_at_epoch(r, 100) == pytest.approx(5e-6, rel=1e-5)
    assert _lr_at_epoch(r, 200) == pytest.approx(3e-4, rel=1e-6)
    assert _lr_at_epoch(r, 299) == pytest.approx(5.07e-6, rel=1e-3)  # cosine, period 200 epochs
    e = 37
    want = 5e-6 + (3e-4 - 5e-6) * (1 + math.cos(math.pi * e / 100)) / 2
    assert _lr_at_epoch(r, e) == pytest.approx(want, rel=1e-5)


def test_onecycle_lr_and_beta1():
    r = optim.build_recipe(OptimConfig(recipe="radam_onecycle"), epochs=300,
                           iters_per_epoch=ITERS)
    b1 = lambda e: float(r.beta1(jnp.asarray(e * ITERS)))  # noqa: E731
    assert _lr_at_epoch(r, 0) == pytest.approx(1.2e-5, rel=1e-5)
    assert _lr_at_epoch(r, 29) == pytest.approx(3e-4, rel=1e-6)
    assert _lr_at_epoch(r, 299) == pytest.approx(1.2e-13, rel=1e-3)
    assert b1(0) == pytest.approx(0.95) and b1(29) == pytest.approx(0.85)
    assert b1(299) == pytest.approx(0.95)
    # torch _annealing_cos in phase 2 at epoch 164 (halfway): mean of the ends
    e, pct = 164, (164 - 29) / (299 - 29)
    want = 1.2e-13 + (3e-4 - 1.2e-13) / 2 * (math.cos(math.pi * pct) + 1)
    assert _lr_at_epoch(r, e) == pytest.approx(want, rel=1e-5)
    assert b1(e) == pytest.approx(0.95 + (0.85 - 0.95) / 2 * (math.cos(math.pi * pct) + 1))


def test_onecycle_rejects_too_few_epochs():
    with pytest.raises(ValueError, match="pct_start"):
        optim.build_recipe(OptimConfig(recipe="radam_onecycle"), epochs=10, iters_per_epoch=1)


# ---------------------------------------------------------------------- torch update rules
def _clip(g, max_norm):
    norm = np.sqrt(sum(float((x**2).sum()) for x in g))
    return [x * min(1.0, max_norm / norm) for x in g]


def _torch_sgd(params, grads_seq, lrs, wd, momentum, clip):
    p, buf = [x.copy() for x in params], None
    for g, lr in zip(grads_seq, lrs, strict=True):
        g = [gi + wd * pi for gi, pi in zip(_clip(g, clip), p, strict=True)]
        buf = g if buf is None else [momentum * b + gi for b, gi in zip(buf, g, strict=True)]
        d = [gi + momentum * b for gi, b in zip(g, buf, strict=True)]
        p = [pi - lr * di for pi, di in zip(p, d, strict=True)]
    return p


def _torch_radam(params, grads_seq, lrs, betas1, wd, clip, b2=0.999, eps=1e-8):
    p = [x.copy() for x in params]
    m = [np.zeros_like(x) for x in p]
    v = [np.zeros_like(x) for x in p]
    rho_inf = 2 / (1 - b2) - 1
    for t, (g, lr, b1) in enumerate(zip(grads_seq, lrs, betas1, strict=True), start=1):
        g = [gi + wd * pi for gi, pi in zip(_clip(g, clip), p, strict=True)]
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g, strict=True)]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g, strict=True)]
        bc1, bc2 = 1 - b1**t, 1 - b2**t
        rho = rho_inf - 2 * t * b2**t / bc2
        for i in range(len(p)):
            m_hat = m[i] / bc1
            if rho > 5:
                rect = math.sqrt((rho - 4) * (rho - 2) * rho_inf
                                 / ((rho_inf - 4) * (rho_inf - 2) * rho))
                p[i] = p[i] - lr * m_hat * rect * math.sqrt(bc2) / (np.sqrt(v[i]) + eps)
            else:
                p[i] = p[i] - lr * m_hat
    return p


def _run(recipe, params, grads_seq):
    tx = recipe.tx
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p))
    for g in grads_seq:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params


@pytest.mark.parametrize("recipe", ["nnunet", "radam_cosine", "radam_onecycle"])
def test_recipe_matches_torch_update_rule(recipe, rng):
    steps, epochs = 12, 40  # 12 steps over 4 epochs of 3 iterations; rho_t crosses 5 at t = 6
    params = [rng.normal(size=(4, 3)), rng.normal(size=(5,))]
    # Gradient scales straddle the clip threshold of 1.5 used here.
    grads_seq = [[rng.normal(size=x.shape) * s for x in params]
                 for s in rng.uniform(0.1, 1.5, steps)]
    cfg = OptimConfig(recipe=recipe, clip_norm=1.5, weight_decay=1e-2)
    r = optim.build_recipe(cfg, epochs=epochs, iters_per_epoch=ITERS)
    lrs = [float(r.lr(t)) for t in range(steps)]
    if recipe == "nnunet":
        want = _torch_sgd(params, grads_seq, lrs, 1e-2, 0.99, 1.5)
    else:
        betas = [float(r.beta1(t)) for t in range(steps)] if r.beta1 else [0.9] * steps
        want = _torch_radam(params, grads_seq, lrs, betas, 1e-2, 1.5)
    as32 = lambda t: [jnp.asarray(x, jnp.float32) for x in t]  # noqa: E731
    got = _run(r, as32(params), [as32(g) for g in grads_seq])
    for gi, wi, p0 in zip(got, want, params, strict=True):
        # compare the displacement, which is what the update rule determines
        assert_close_to(np.asarray(gi) - p0, wi - p0, rtol=2e-4, atol=1e-6)
