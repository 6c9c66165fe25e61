"""Compile-ahead memory preflight of the train step (maxtext `train_compile` style).

The whole train step (network, loss, optimizer) is lowered and compiled before any training, and
the executable is the one that trains; XLA's `memory_analysis()` gives the bytes one device needs
(`jaxmamba.models.total_bytes`: arguments + outputs + temporaries − donated aliases). A
configuration that needs more than the device has is refused with advice.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from jaxmamba.errors import UserError
from jaxmamba.models import total_bytes
from jaxmamba.plans import Plan

GIB = 2**30


class DoesNotFitError(UserError, RuntimeError):
    """The compiled step needs more device memory than there is."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """XLA's `CompiledMemoryStats` of one device, with a readable summary."""

    stats: Any

    @property
    def total(self) -> int:
        return total_bytes(self.stats)

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
