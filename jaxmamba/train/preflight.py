"""Compile-ahead memory preflight of the train step (maxtext `train_compile` style; DESIGN §7).

The step is lowered and compiled before any training; XLA's `memory_analysis()` of the compiled
executable gives the bytes one device needs (arguments + outputs + temporaries − donated
aliases). A configuration that needs more than the device has is refused with advice.
"""

from __future__ import annotations

import dataclasses

import jax

from jaxmamba.plans import Plan

GIB = 2**30


class DoesNotFitError(RuntimeError):
    """The compiled step needs more device memory than there is."""


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    arguments: int
    outputs: int
    temporaries: int
    aliased: int

    @property
    def total(self) -> int:
        return self.arguments + self.outputs + self.temporaries - self.aliased

    def __str__(self) -> str:
        return (f"{self.total / GIB:.2f} GiB per device (state and batch "
                f"{self.arguments / GIB:.2f}, temporaries {self.temporaries / GIB:.2f}, outputs "
                f"{self.outputs / GIB:.2f}, donated {self.aliased / GIB:.2f})")


def estimate(compiled: jax.stages.Compiled) -> MemoryEstimate | None:
    """XLA's per-device memory estimate of a compiled executable (None if not reported)."""
    stats = compiled.memory_analysis()
    if stats is None:
        return None
    return MemoryEstimate(stats.argument_size_in_bytes, stats.output_size_in_bytes,
                          stats.temp_size_in_bytes, stats.alias_size_in_bytes)


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
