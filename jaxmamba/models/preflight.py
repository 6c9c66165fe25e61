"""Compile-ahead memory preflight of a network's forward + backward (maxtext-style).

`memory_preflight(model, plan, batch_size)` lowers and compiles `value_and_grad` of a loss of the
network's outputs on abstract inputs (nothing is allocated or run) and returns XLA's
`CompiledMemoryStats`. The loss defaults to cross-entropy on the full-resolution output (what the
PyTorch peer measurement used); pass the training loss to size a real step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmamba.plans import Plan

#: `loss_fn(outputs, labels) -> scalar`: outputs full resolution first, labels (B, *patch) int32.
LossFn = Callable[[Sequence[jax.Array], jax.Array], jax.Array]


def cross_entropy_full_resolution(outputs: Sequence[jax.Array], labels: jax.Array) -> jax.Array:
    """Mean voxel cross-entropy of the full-resolution logits `(B, *patch, K)` against `labels`."""
    logp = jax.nn.log_softmax(outputs[0].astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, labels[..., None], axis=-1))


def abstract_batch(plan: Plan, batch_size: int
                   ) -> tuple[jax.ShapeDtypeStruct, jax.ShapeDtypeStruct]:
    """`(image (B, *patch, C_in) float32, labels (B, *patch) int32)` as shapes only."""
    shape = (batch_size, *plan.patch_size)
    return (jax.ShapeDtypeStruct((*shape, plan.num_input_channels), jnp.float32),
            jax.ShapeDtypeStruct(shape, jnp.int32))


def loss_and_grad_fn(model: nnx.Module, loss_fn: LossFn = cross_entropy_full_resolution):
    """`(graphdef, params, rest, f)` with `f(params, rest, image, labels) -> (loss, grads)`."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, image, labels):
        return loss_fn(nnx.merge(graphdef, params, rest)(image), labels)

    return graphdef, params, rest, jax.value_and_grad(loss)


def compile_forward_backward(model: nnx.Module, plan: Plan, batch_size: int, *,
                             loss_fn: LossFn = cross_entropy_full_resolution
                             ) -> jax.stages.Compiled:
    """Lower and compile forward + backward for `batch_size` patches of `plan` (abstract inputs;
    `model` may come from `nnx.eval_shape`)."""
    _, params, rest, f = loss_and_grad_fn(model, loss_fn)
    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, rest))
    return jax.jit(f).lower(*shapes, *abstract_batch(plan, batch_size)).compile()


def memory_preflight(model: nnx.Module, plan: Plan, batch_size: int, *,
                     loss_fn: LossFn = cross_entropy_full_resolution):
    """XLA's compiled memory estimate (`CompiledMemoryStats`: argument, output, temp, alias
    bytes) of forward + backward; None where the backend reports none."""
    return compile_forward_backward(model, plan, batch_size, loss_fn=loss_fn).memory_analysis()


def total_bytes(stats) -> int:
    """Bytes a device needs for the compiled program: arguments + outputs + temporaries −
    donated aliases."""
    return (stats.argument_size_in_bytes + stats.output_size_in_bytes + stats.temp_size_in_bytes
            - stats.alias_size_in_bytes)
