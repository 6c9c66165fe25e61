"""Finiteness of the train state: no checkpoint is written from, or resumed into, NaN or inf.

The loss of a step is computed before its update, so a finite loss does not prove the updated
parameters finite: the last update of an epoch can make them NaN, and that epoch's checkpoint
would then be the "last good" one. `check_state` looks at the parameters, the optimizer state
and the other variables themselves (one jitted all-finite reduction, after the epoch's last
update, before its checkpoint is written).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp

from jaxmamba.errors import UserError
from jaxmamba.rundir import RunDirError


class NonFiniteLossError(UserError, RuntimeError):
    """The loss or the train state became NaN or inf; the last good checkpoint is kept."""


@jax.jit
def all_finite(tree) -> jax.Array:
    """True when every floating-point value of `tree` is finite (a scalar on the devices)."""
    leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.stack(leaves).all() if leaves else jnp.asarray(True)


def stop_message(what: str, *, last_epoch: int | None, checkpoints: Path, raw_dir: str) -> str:
    """Why training stopped, which checkpoint is kept, and what to try."""
    kept = f"epoch {last_epoch} in {checkpoints}" if last_epoch is not None else \
        "none written yet"
    return (f"{what}; training stopped. The last good checkpoint is kept ({kept}). Try a lower "
            f"optim.lr, model.precision=float32, or check the data (jaxmamba check {raw_dir})")


def check_state(state, *, epoch: int, step: int, ckpt, raw_dir: str) -> None:
    """Raise `NonFiniteLossError` if `state` (parameters, optimizer state, the rest) holds NaN or
    inf after `epoch` epochs (`step` steps): its checkpoint must not be written."""
    if not bool(jax.device_get(all_finite(state))):
        raise NonFiniteLossError(stop_message(
            f"the parameters or the optimizer state became non-finite (NaN or inf) in epoch "
            f"{epoch} (by step {step}) although the loss was finite",
            last_epoch=ckpt.latest_epoch(), checkpoints=ckpt.dir, raw_dir=raw_dir))


def check_restored(state, folder: Path) -> None:
    """Refuse to resume from a checkpoint holding NaN or inf (one written before this check)."""
    if not bool(jax.device_get(all_finite(state))):
        raise RunDirError(folder, "the checkpoint to resume from holds non-finite values (NaN or "
                                  "inf)", "delete that folder to resume from an earlier one, or "
                                  "start a new train.run_dir")
