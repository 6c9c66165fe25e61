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
from jaxmamba.jsonfile import flatten
from jaxmamba.rundir import CURVES_FILE, METRICS_FILE, TENSORBOARD_DIR


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
            for k, v in flatten(record, "/").items():
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



def plot_curves(history: Sequence[dict], path: Path, class_names: Sequence[str]) -> None:
    """Write `curves_figure(history, class_names)` as a PNG at `path`, atomically."""
    fig = curves_figure(history, class_names)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)


def curves_figure(history: Sequence[dict], class_names: Sequence[str]):
    """Loss, pseudo-Dice (per class, mean, EMA), learning rate and epoch time against the epoch,
    counted from 1 as the console counts it (Agg canvas; `record["epoch"]` is 0-based)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] + 1 for r in history]
    dots = {"marker": "o", "ms": 3} if len(epochs) <= 10 else {}  # a line needs two points
    fig = Figure(figsize=(9, 11), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(3, 1, sharex=True)
    ax = axes[0]
    ax.plot(epochs, [r["train_loss"] for r in history], label="train loss", color="C0", **dots)
    if any("val_loss" in r for r in history):
        ax.plot(epochs, [r.get("val_loss", math.nan) for r in history], label="val loss",
                color="C1", **dots)
    ax.axhline(0.0, color="0.6", lw=0.6)
    ax.set_ylabel("loss (CE \N{MINUS SIGN} soft Dice)")
    ax.set_title("nnU-Net's loss: cross-entropy plus the negative soft Dice of the foreground "
                 "classes, so it falls below 0 (down to \N{MINUS SIGN}1)", fontsize=9)
    ax.legend(loc="upper right")
    ax = axes[1]
    for i, name in enumerate(class_names):
        ax.plot(epochs, [_nan((r.get("val_dice") or [None] * len(class_names))[i])
                         for r in history],
                lw=0.8, ls="--", label=name, **dots)
    ax.plot(epochs, [_nan(r.get("val_dice_mean")) for r in history], color="k", lw=1,
            label="mean (pseudo-Dice)", **dots)
    ax.plot(epochs, [_nan(r.get("val_dice_ema")) for r in history], color="g", lw=2,
            label="EMA", **dots)
    ax.set_ylabel("validation pseudo-Dice")
    ax.set_ylim(0, 1)
    ax.legend(loc="lower right", fontsize="small")
    ax = axes[2]
    lr = ax.plot(epochs, [r["lr"] for r in history], color="C2", label="learning rate (left)",
                 **dots)
    ax.set_ylabel("learning rate")
    ax.ticklabel_format(axis="y", useOffset=False)  # the values, not "1e-8 + 3e-4"
    ax.set_xlabel("epoch")
    twin = ax.twinx()
    seconds = twin.plot(epochs, [r["epoch_seconds"] for r in history], color="C3", lw=0.8,
                        label="seconds per epoch (right)", **dots)
    twin.set_ylabel("seconds per epoch")
    top = max((r["epoch_seconds"] for r in history), default=1.0)
    twin.set_ylim(0, 1.3 * top if top > 0 else 1.0)  # room below the curve for the legend
    twin.legend(handles=lr + seconds, loc="lower left", fontsize="small")  # twin: drawn on top
    ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def _nan(value) -> float:
    return math.nan if value is None else value
