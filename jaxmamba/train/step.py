"""The train state and the pure, jitted train and eval steps (big_vision style).

The network is initialised on the devices (`init_on_mesh`) and split once into a static graph
and two pytrees: parameters (trained) and the rest (non-parameter variables, carried unchanged).
The steps are pure functions of `(TrainState, batch)`; `jit_steps` jits them with the state
replicated and the batch sharded over the `data` mesh axis, so one program serves 1..N devices.
Batches are `{"image": (B, *patch, C), "target": tuple of (B, *patch_s) int, full resolution
first}`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from jaxmamba.ops.batch_parallel import traced_under
from jaxmamba.ops.conv3d import cpu_compiler_options
from jaxmamba.ops.mesh import SPATIAL_AXIS, batch_sharding, replicated
from jaxmamba.ops.spatial import split_volume
from jaxmamba.train import losses


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: optimizer steps taken
    params: nnx.State  # trained variables (nnx.Param)
    rest: nnx.State  # other variables of the network, carried unchanged
    opt_state: optax.OptState


def init_state(model: nnx.Module, tx: optax.GradientTransformation,
               ) -> tuple[nnx.GraphDef, TrainState]:
    """`model` split into its graph and a train state at step 0 (fresh optimizer state)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, TrainState(jnp.zeros((), jnp.int32), params, rest, tx.init(params))


def init_on_mesh(build: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                 ) -> tuple[nnx.GraphDef, TrainState]:
    """`init_state` of the network `build()` makes, as one jitted program whose outputs are
    replicated over `mesh` (big_vision, the flax examples): the parameters are drawn on the
    devices, nothing is built eagerly or copied from the host. `build` is traced once."""
    graphdefs = []

    def init() -> TrainState:
        graphdef, state = init_state(build(), tx)
        graphdefs.append(graphdef)  # static: the same for every call
        return state

    state = jax.jit(init, out_shardings=replicated(mesh))()
    return graphdefs[0], state


def make_steps(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *, batch_dice: bool,
               ) -> tuple[Callable, Callable]:
    """`(train_step, eval_step)`, pure functions.

    `train_step(state, batch) -> (state, metrics)`: one optimizer update on the DC+CE
    deep-supervision loss (`jaxmamba.train.losses`); metrics hold `loss`, `grad_norm`, `param_norm`,
    `update_norm` and the `(3, K-1)` confusion counts of the full-resolution output.
    `eval_step(state, batch) -> metrics` with `loss` and `counts` (nnU-Net's online pseudo-Dice).
    """

    def forward(params, rest, batch):
        model = nnx.merge(graphdef, params, rest)
        outputs = model(split_volume(batch["image"]))
        loss = losses.deep_supervision_loss(outputs, batch["target"], batch_dice=batch_dice)
        return loss, losses.confusion_counts(outputs[0], batch["target"][0])

    def train_step(state: TrainState, batch: dict[str, Any]):
        (loss, counts), grads = jax.value_and_grad(forward, has_aux=True)(
            state.params, state.rest, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "counts": counts, "grad_norm": optax.tree.norm(grads),
                   "param_norm": optax.tree.norm(params),
                   "update_norm": optax.tree.norm(updates)}
        return TrainState(state.step + 1, params, state.rest, opt_state), metrics

    def eval_step(state: TrainState, batch: dict[str, Any]):
        loss, counts = forward(state.params, state.rest, batch)
        return {"loss": loss, "counts": counts}

    return train_step, eval_step


def jit_steps(train_step: Callable, eval_step: Callable, mesh: Mesh) -> tuple[Callable, Callable]:
    """Jit with the state replicated (and donated) and the batch sharded over `data` (and, with
    a `spatial` axis, as `sharding.global_batch` places it: volumes split along S0); on a CPU
    with `jaxmamba.ops.conv3d.cpu_compiler_options`."""
    repl = replicated(mesh)
    data = batch_sharding(mesh) if mesh.shape.get(SPATIAL_AXIS, 1) == 1 else None
    train = jax.jit(traced_under(mesh, train_step), in_shardings=(repl, data),
                    out_shardings=(repl, repl), donate_argnums=(0,),
                    compiler_options=cpu_compiler_options(mesh, gradients=True))
    evaluate = jax.jit(traced_under(mesh, eval_step), in_shardings=(repl, data),
                       out_shardings=repl,
                       compiler_options=cpu_compiler_options(mesh, gradients=False))
    return train, evaluate
