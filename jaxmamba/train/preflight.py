"""Compile-ahead memory preflight (maxtext `train_compile` style): XLA's estimate of what one
device needs for a compiled program, read before anything runs.

Training lowers and compiles its whole train step (network, loss, optimizer) before step 1, and
the executable is the one that trains: `estimate(compiled)` reads its `memory_analysis()`
(arguments + outputs + temporaries − donated aliases) and `check_fits` refuses a configuration
that needs more than the device has, with advice. `memory_preflight` compiles forward + backward
of a network alone on abstract inputs (nothing is allocated or run) for the benchmarks; its loss
defaults to cross-entropy on the full-resolution output (what the PyTorch peer measurement used).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxmamba.errors import UserError
from jaxmamba.plans import Plan

GIB = 2**30

#: `loss_fn(outputs, labels) -> scalar`: outputs full resolution first, labels (B, *patch) int32.
LossFn = Callable[[Sequence[jax.Array], jax.Array], jax.Array]


class DoesNotFitError(UserError, RuntimeError):
    """The compiled step needs more device memory than there is."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """XLA's `CompiledMemoryStats` of one device, with a readable summary."""

    stats: Any

    @property
    def total(self) -> int:
        """Bytes a device needs: arguments + outputs + temporaries − donated aliases."""
        s = self.stats
        return (s.argument_size_in_bytes + s.output_size_in_bytes + s.temp_size_in_bytes
                - s.alias_size_in_bytes)

    def __str__(self) -> str:
        s = self.stats
        return (f"{self.total / GIB:.2f} GiB per device (state and batch "
                f"{s.argument_size_in_bytes / GIB:.2f}, temporaries "
                f"{s.temp_size_in_bytes / GIB:.2f}, outputs {s.output_size_in_bytes / GIB:.2f}, "
                f"donated {s.alias_size_in_bytes / GIB:.2f})")


def estimate(compiled: jax.stages.Compiled) -> MemoryEstimate | None:
    """XLA's per-device memory estimate of a compiled executable (None if not reported)."""
    stats = compiled.memory_analysis()
    return None if stats is None else MemoryEstimate(stats)


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


def compile_forward_backward(model: nnx.Module, plan: Plan, batch_size: int, *,
                             loss_fn: LossFn = cross_entropy_full_resolution
                             ) -> jax.stages.Compiled:
    """Lower and compile `f(params, rest, image, labels) -> (loss, grads)` for `batch_size`
    patches of `plan` (abstract inputs; `model` may come from `nnx.eval_shape`)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, rest, image, labels):
        return loss_fn(nnx.merge(graphdef, params, rest)(image), labels)

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), (params, rest))
    f = jax.jit(jax.value_and_grad(loss))
    return f.lower(*shapes, *abstract_batch(plan, batch_size)).compile()


def memory_preflight(model: nnx.Module, plan: Plan, batch_size: int, *,
                     loss_fn: LossFn = cross_entropy_full_resolution) -> MemoryEstimate | None:
    """`estimate` of forward + backward of `model` alone (`compile_forward_backward`)."""
    return estimate(compile_forward_backward(model, plan, batch_size, loss_fn=loss_fn))


def device_memory_bytes() -> int | None:
    """What the first local device can allocate (None on CPU, which does not say)."""
    stats = jax.local_devices()[0].memory_stats()
    return None if not stats else stats.get("bytes_limit")


def check_fits(est: MemoryEstimate | None, plan: Plan, *, limit_gib: float | None = None) -> str:
    """A one-line report; raises `DoesNotFitError` with advice when the step cannot fit."""
    limit = int(limit_gib * GIB) if limit_gib is not None else device_memory_bytes()
    if est is None:
        return "compiled memory estimate: not reported by this backend"
    report = f"compiled train step needs {est}"
    if limit is None:
        return report + "; the device does not report its memory, not checked"
    report += f"; the device has {limit / GIB:.2f} GiB"
    if est.total > limit:
        smaller, stride = list(plan.patch_size), plan.total_stride
        a = max(range(len(smaller)), key=lambda i: smaller[i] / stride[i])
        smaller[a] = max(stride[a], smaller[a] // 2 // stride[a] * stride[a])
        raise DoesNotFitError(
            f"{report}: this configuration will not fit. Use a smaller batch "
            f"(data.plan_overrides.batch_size={max(1, plan.batch_size // 2)}, now "
            f"{plan.batch_size}) or a smaller patch (e.g. data.plan_overrides.patch_size="
            f"{smaller}, now {list(plan.patch_size)}; keep it divisible by the total stride "
            f"{list(plan.total_stride)}), model.precision=bf16, or more devices (the batch is "
            f"split over mesh.data).")
    return report
