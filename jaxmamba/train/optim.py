"""Optimizer recipes of the reference trainers as optax chains.

The trainers are TamingMambas' `nnUNetTrainer` (nnU-Net's default, `configure_optimizers`) and
`nnUNetTrainer{SegMamba,PanSegMamba,SegMambaSkip,MultiSegMamba}` on `nnUNetTrainerVanillaRAdam3en4`
(`tamingmambas/nnunetv2/training/nnUNetTrainer/`).

Schedules are stepped once per epoch, as the PyTorch trainers call `scheduler.step(epoch)`: every
schedule here is a function of the optimizer step that reads `epoch = step // iters_per_epoch`
and evaluates torch's closed form at that epoch.

- `nnunet`: clip 12 → coupled L2 3e-5 → SGD Nesterov 0.99, lr `1e-2·(1 − e/E)^0.9`.
- `radam_cosine`: clip 12 → coupled L2 3e-5 → torch RAdam → lr of `CosineAnnealingLR(T_max=100,
  eta_min=5e-6)` in closed form, periodic with period 200 epochs (torch's `_get_closed_form_lr`).
- `radam_onecycle`: as above with `OneCycleLR(max_lr=3e-4, total_steps=E, pct_start=0.1,
  anneal='cos', div_factor=25, final_div_factor=1e8)`, which also cycles RAdam's β1 0.95 ↔ 0.85.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxmamba import choices
from jaxmamba.config import OptimConfig

Schedule = Callable[[jax.Array | int], jax.Array | float]


# ---------------------------------------------------------------------- per-epoch schedules
def poly_lr(base: float, epochs: int, exponent: float = 0.9) -> Callable:
    """nnU-Net `PolyLRScheduler`: `base·(1 − e/epochs)^exponent` of an epoch `e`."""
    return lambda e: base * ((epochs - e) / epochs) ** exponent


def periodic_cosine_lr(base: float, t_max: int, eta_min: float) -> Callable:
    """torch `CosineAnnealingLR` closed form, `eta_min + (base − eta_min)(1 + cos(π e/T))/2`.

    `step(epoch)` makes torch use this form for every epoch, so it rises again after `T_max`.
    """
    return lambda e: eta_min + (base - eta_min) * (1 + _cos(math.pi * e / t_max)) / 2


def _anneal_cos(start, end, pct):
    return end + (start - end) / 2 * (_cos(math.pi * pct) + 1)


def onecycle(max_value: float, total: int, pct_start: float, div_factor: float,
             final_div_factor: float, *, beta1: tuple[float, float] = (0.85, 0.95),
             ) -> tuple[Callable, Callable]:
    """torch `OneCycleLR(anneal_strategy='cos', three_phase=False)` at `last_epoch = e`.

    Returns `(lr(e), beta1(e))`: lr rises from `max/div` to `max` over epochs `[0, pct·total − 1]`
    and falls to `max/div/final_div` at `total − 1`; β1 moves the opposite way between
    `beta1 = (base, max)`.
    """
    initial = max_value / div_factor
    minimum = initial / final_div_factor
    end1, end2 = float(pct_start * total) - 1, float(total - 1)
    if end1 <= 0 or end2 <= end1:
        raise ValueError(f"OneCycle: optim.onecycle_pct_start ({pct_start}) × train.epochs "
                         f"({total}) must be > 1 and the warm-up must end before the last epoch")
    base_m, max_m = beta1

    def phase(e, a1, b1, a2, b2):
        up = _anneal_cos(a1, b1, e / end1)
        down = _anneal_cos(a2, b2, (e - end1) / (end2 - end1))
        return _where(e <= end1, up, down)

    def lr(e):
        return phase(e, initial, max_value, max_value, minimum)

    def b1(e):
        return phase(e, max_m, base_m, base_m, max_m)

    return lr, b1


def per_epoch(fn: Callable, iters_per_epoch: int) -> Schedule:
    """Turn a function of the epoch into an optax schedule of the step count."""
    def schedule(step):
        epoch = step // iters_per_epoch
        if isinstance(epoch, int):
            return fn(epoch)
        return fn(epoch.astype(jnp.float32))
    return schedule


def _cos(x):
    return math.cos(x) if isinstance(x, int | float) else jnp.cos(x)


def _where(c, a, b):
    return (a if c else b) if isinstance(c, bool) else jnp.where(c, a, b)


# ---------------------------------------------------------------------- torch RAdam
class RAdamState(NamedTuple):
    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def scale_by_torch_radam(b1: float | Schedule = 0.9, b2: float = 0.999, eps: float = 1e-8,
                         threshold: float = 5.0) -> optax.GradientTransformation:
    """`torch.optim.RAdam`'s direction (without lr), with β1 optionally a schedule of the step.

    Differs from `optax.scale_by_radam` where torch does: eps is added to `√v` (not `√v̂`), the
    rectified branch needs `ρ_t > threshold` (strictly), and β1 may vary per step as under
    `OneCycleLR(cycle_momentum=True)` (the EMA and the bias correction use the current β1).
    """
    rho_inf = 2 / (1 - b2) - 1

    def init_fn(params):
        def zeros():  # two separate trees: a shared buffer could not be donated twice
            return jax.tree.map(lambda p: jnp.zeros_like(p, jnp.float32), params)
        return RAdamState(jnp.zeros([], jnp.int32), zeros(), zeros())

    def update_fn(updates, state, params=None):
        del params
        beta1 = b1(state.count) if callable(b1) else b1
        t = (state.count + 1).astype(jnp.float32)
        mu = jax.tree.map(lambda m, g: beta1 * m + (1 - beta1) * g, state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
        bc1, bc2 = 1 - beta1**t, 1 - b2**t
        rho = rho_inf - 2 * t * b2**t / bc2
        rect = jnp.sqrt(jnp.maximum((rho - 4) * (rho - 2) * rho_inf
                                    / ((rho_inf - 4) * (rho_inf - 2) * rho), 0.0))
        adaptive = rho > threshold

        def direction(m, v):
            m_hat = m / bc1
            return jnp.where(adaptive, m_hat * jnp.sqrt(bc2) / (jnp.sqrt(v) + eps) * rect, m_hat)

        new = jax.tree.map(direction, mu, nu)
        return new, RAdamState(state.count + 1, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# ---------------------------------------------------------------------- recipes
@dataclasses.dataclass(frozen=True)
class Recipe:
    """An optax chain plus its schedules (functions of the step, for logging)."""

    tx: optax.GradientTransformation
    lr: Schedule
    beta1: Schedule | None = None


def build_recipe(cfg: OptimConfig, *, epochs: int, iters_per_epoch: int) -> Recipe:
    """The optax chain of `cfg.recipe` for a run of `epochs × iters_per_epoch` steps."""
    choices.check(cfg.recipe, choices.RECIPES, "optim.recipe")
    pre = [optax.clip_by_global_norm(cfg.clip_norm), optax.add_decayed_weights(cfg.weight_decay)]
    if cfg.recipe == "nnunet":
        lr = per_epoch(poly_lr(cfg.lr or 1e-2, epochs, cfg.poly_exponent), iters_per_epoch)
        return Recipe(optax.chain(*pre, optax.sgd(lr, momentum=cfg.momentum, nesterov=True)), lr)
    base = cfg.lr or 3e-4
    if cfg.recipe == "radam_cosine":
        lr = per_epoch(periodic_cosine_lr(base, cfg.cosine_t_max, cfg.cosine_eta_min),
                       iters_per_epoch)
        return Recipe(optax.chain(*pre, scale_by_torch_radam(),
                                  optax.scale_by_learning_rate(lr)), lr)
    if cfg.recipe == "radam_onecycle":
        lr_e, b1_e = onecycle(base, epochs, cfg.onecycle_pct_start, cfg.onecycle_div_factor,
                              cfg.onecycle_final_div_factor, beta1=cfg.onecycle_beta1)
        lr, b1 = per_epoch(lr_e, iters_per_epoch), per_epoch(b1_e, iters_per_epoch)
        return Recipe(optax.chain(*pre, scale_by_torch_radam(b1=b1),
                                  optax.scale_by_learning_rate(lr)), lr, b1)
    raise NotImplementedError(f"optim.recipe={cfg.recipe!r}: a choice without its chain here")
