"""What a training run records about its cost, for `jaxmamba report` (README "Cross-validation,
postprocessing and a report"): `RUN_DIR/training.json`, and each epoch's median step time.

nnU-Net Revisited (Isensee et al., MICCAI 2024) compares networks by Dice beside GPU memory and
training time. `training.json` holds what does not change from epoch to epoch: the network's
parameter count and, per session (the first start and every resume, which may run on another
card), the device, XLA's compiled memory of the train step per device
(`jaxmamba.train.preflight.estimate`) and the compile time. The rest is in `metrics.jsonl`:
`epoch_seconds` (wall-clock of each epoch) and `step_seconds` (`StepTimes`: the median time of
one training iteration in the epoch, null with fewer than three steps).

Reading needs only the standard library (the report imports no JAX).
"""

from __future__ import annotations

import datetime
import json
import statistics
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxmamba.atomic import write_text
from jaxmamba.rundir import TRAINING_FILE

if TYPE_CHECKING:
    from jaxmamba.config import Config
    from jaxmamba.plans import Plan
    from jaxmamba.train.preflight import MemoryEstimate


class StepTimes:
    """Host times at which the steps of one epoch were seen complete (their metrics read back).

    The loop reads step k's metrics after it has loaded and dispatched step k + 1, so the
    interval between two reads is one iteration: the device's step time when the device is the
    bottleneck, the host's when data loading is. The last step of an epoch is read after the
    loop, without a next step, so its interval is left out: `median()` is the median of the
    others, in seconds, None with fewer than three steps."""

    def __init__(self):
        self.times: list[float] = []

    def tick(self) -> None:
        self.times.append(time.perf_counter())

    def median(self) -> float | None:
        inside = self.times[:-1]  # reads inside the loop
        gaps = [b - a for a, b in zip(inside, inside[1:], strict=False)]
        return statistics.median(gaps) if gaps else None


def read(run_dir: str | Path) -> dict[str, Any] | None:
    """`RUN_DIR/training.json`, or None when the run has none (trained before it was written,
    or converted from PyTorch)."""
    path = Path(run_dir) / TRAINING_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def add_session(run_dir: str | Path, cfg: Config, plan: Plan, params, *, start_epoch: int,
                compile_seconds: float, memory: MemoryEstimate | None) -> dict[str, Any]:
    """Add this session (this process's view of the devices) to `RUN_DIR/training.json`,
    atomically, and return the record; earlier sessions that started at `start_epoch` or later
    are dropped. `params`: the network's parameters (a pytree of arrays);
    `memory`: XLA's estimate for the compiled train step (None if not reported)."""
    import jax

    record = read(run_dir) or {"sessions": []}
    session = {
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "start_epoch": start_epoch, "device_kind": jax.devices()[0].device_kind,
        "devices": jax.device_count(), "processes": jax.process_count(),
        "platform": jax.default_backend(), "jax": jax.__version__,
        "compile_seconds": round(compile_seconds, 3),
        "train_step_bytes": None if memory is None else int(memory.total),
        "train_step_memory": None if memory is None else {
            k: int(getattr(memory.stats, f"{k}_size_in_bytes"))
            for k in ("argument", "output", "temp", "alias")},
    }
    # sessions that started at this epoch or later trained nothing that is kept (a fresh start
    # after a refused or failed one, a resume after one that saved no epoch): they go
    earlier = [s for s in record.get("sessions", []) if s.get("start_epoch", 0) < start_epoch]
    record.update(parameters=int(sum(x.size for x in jax.tree.leaves(params))),
                  variant=cfg.model.variant, precision=cfg.model.precision,
                  mamba_precision=cfg.model.mamba_precision,
                  patch_size=list(plan.patch_size), batch_size=plan.batch_size)
    record["sessions"] = [*earlier, session]
    write_text(Path(run_dir) / TRAINING_FILE, json.dumps(record, indent=1) + "\n")
    return record

