"""What a run writes for people to read: `metrics.jsonl`, TensorBoard events, `curves.png`.

One JSON object per epoch in `metrics.jsonl` (epoch, step, train/val loss, per-class pseudo-Dice,
its EMA, lr, norms, timings), strict JSON: a NaN or infinite value is written as null.
TensorBoard scalars per step and per epoch, written with `tensorboard.summary.Writer` (no
TensorFlow); a PNG of the curves in nnU-Net's `progress.png` style, redrawn every epoch. Only
process 0 writes.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from jaxmamba.atomic import atomic_path, write_text
from jaxmamba.data.io import strict_json

METRICS_FILE, CURVES_FILE, TENSORBOARD_DIR = "metrics.jsonl", "curves.png", "tensorboard"


class RunWriter:
    """Appends epoch records and step scalars; `history` is what the curves are drawn from."""

    def __init__(self, run_dir: str | Path, class_names: Sequence[str], *,
                 history: Sequence[dict] = (), tensorboard: bool = True, plot: bool = True):
        self.dir = Path(run_dir)
        self.class_names = list(class_names)
        self.history = list(history)
        self.plot = plot
        self.active = jax.process_index() == 0
        self.tb = None
        if self.active:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._rewrite_metrics()
            if tensorboard:
                self.tb = _tensorboard_writer(self.dir / TENSORBOARD_DIR)

    def _rewrite_metrics(self) -> None:
        """Keep `metrics.jsonl` in step with `history` (a resumed run redoes later epochs)."""
        write_text(self.dir / METRICS_FILE, "".join(_line(r) for r in self.history))

    def scalars(self, step: int, values: dict[str, float], prefix: str = "train") -> None:
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{prefix}/{k}", float(v), step)

    def epoch(self, record: dict[str, Any]) -> None:
        """Add one epoch's record: `metrics.jsonl`, TensorBoard, `curves.png`."""
        self.history.append(record)
        if not self.active:
            return
        with open(self.dir / METRICS_FILE, "a") as f:
            f.write(_line(record))
        if self.tb is not None:
            for k, v in _flat(record).items():
                if k not in ("epoch", "step") and isinstance(v, int | float):
                    self.tb.add_scalar(f"epoch/{k}", float(v), record["step"])
            self.tb.flush()
        if self.plot:
            plot_curves(self.history, self.dir / CURVES_FILE, self.class_names)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _line(record: dict[str, Any]) -> str:
    """One strict-JSON line of `metrics.jsonl` (NaN and infinities as null)."""
    return json.dumps(strict_json(record), allow_nan=False) + "\n"


def _tensorboard_writer(path: Path):
    try:
        from tensorboard.summary import Writer
    except ImportError:
        warnings.warn("tensorboard is not installed: no TensorBoard event files "
                      "(pip install tensorboard, or set log.tensorboard=false)", stacklevel=3)
        return None
    return Writer(str(path))


def _flat(record: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in record.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def plot_curves(history: Sequence[dict], path: Path, class_names: Sequence[str]) -> None:
    """Loss, pseudo-Dice (per class, mean, EMA), learning rate and epoch time against epochs."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [r["epoch"] for r in history]
    fig, axes = plt.subplots(3, 1, figsize=(9, 11), sharex=True)
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train loss", color="C0")
    if any("val_loss" in r for r in history):
        ax.plot(epochs, [r.get("val_loss", math.nan) for r in history], label="val loss",
                color="C1")
    ax.set_ylabel("loss (CE + Dice)")
    ax.legend(loc="upper right")
    ax = axes[1]
    for i, name in enumerate(class_names):
        ax.plot(epochs, [r.get("val_dice", [math.nan] * len(class_names))[i] for r in history],
                lw=0.8, ls="--", label=name)
    ax.plot(epochs, [r.get("val_dice_mean", math.nan) for r in history], color="k", lw=1,
            label="mean (pseudo-Dice)")
    ax.plot(epochs, [r.get("val_dice_ema", math.nan) for r in history], color="g", lw=2,
            label="EMA")
    ax.set_ylabel("validation pseudo-Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize="small")
    ax = axes[2]
    ax.plot(epochs, [r["lr"] for r in history], color="C2", label="learning rate")
    ax.set_ylabel("learning rate")
    ax.set_xlabel("epoch")
    twin = ax.twinx()
    twin.plot(epochs, [r["epoch_seconds"] for r in history], color="C3", lw=0.8,
              label="epoch time")
    twin.set_ylabel("seconds per epoch")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
