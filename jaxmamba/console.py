"""The console: progress bars only where someone watches them, and the training run's lines.

A bar redraws itself many times a second; on a terminal that is one line, in a log file it is
thousands of frames. `log.progress` (and the commands' bars) default to "auto": bars are drawn
only when the stream they go to (tqdm's: stderr) is a terminal, so `python train.py > log 2>&1`
writes plain lines. True or False forces them on or off.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Literal, TextIO

Progress = bool | Literal["auto"]


def progress_enabled(setting: Progress = "auto", stream: TextIO | None = None) -> bool:
    """Whether to draw progress bars: `setting` when it is True or False; for "auto", whether
    `stream` (default `sys.stderr`, where tqdm writes) is a terminal."""
    if setting != "auto":
        return bool(setting)
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


# ---------------------------------------------------------------------- the training run's lines
# What `jaxmamba train` (`jaxmamba.train.loop.run`) says on the console, all in one place: each
# function takes plain values and returns the line; the loop hands it to its `say`.
def building_line(name: str, raw: Path) -> str:
    return f"building the {name} dataset in {raw} ..."


def resumed_line(run_dir: Path, epoch: int, partial_steps: int | None, step: int) -> str:
    inside = f", {partial_steps} steps into it" if partial_steps is not None else ""
    return f"resumed {run_dir} at epoch {epoch}{inside} (step {step})"


def finished_line(run_dir: Path, epoch: int, epochs: int, *, final_validation_missing: bool
                  ) -> str:
    """A run started again with nothing left to train."""
    if final_validation_missing:
        return f"{run_dir} has trained all {epochs} epochs; its final validation is missing"
    return f"{run_dir} has already trained {epoch} of {epochs} epochs; nothing to do"


def compiled_line(seconds: float, variant: str, patch_size: Sequence[int], batch_size: int,
                  devices: int, spatial: int, device_kind: str) -> str:
    """`devices`: the data axis's devices, each of `spatial` devices (`mesh.spatial`) per sample."""
    return (f"compiled the train step in {seconds:.1f} s ({variant}, patch {list(patch_size)}, "
            f"batch {batch_size} over {devices} data-parallel device(s), {spatial} device(s) per "
            f"sample (mesh.spatial), {device_kind})")


def throughput_line(seconds_per_step: float, batch_size: int, steps: int) -> str:
    """The speed of steps 2..`steps` (the first compiles and loads)."""
    dt = seconds_per_step
    return (f"throughput: {1 / dt:.2f} steps/s ({1000 * dt:.0f} ms per step, "
            f"{batch_size / dt:.1f} patches/s) over steps 2-{steps}")


def epoch_line(record: dict, class_names: Sequence[str], eta_seconds: float = 0.0) -> str:
    """One epoch's record of `metrics.jsonl` (0-based `epoch`), and the run's ETA if any."""
    r = record
    line = (f"epoch {r['epoch'] + 1}: train loss {r['train_loss']:.4f}, lr {r['lr']:.3g}, "
            f"{r['epoch_seconds']:.1f} s")
    if "val_loss" in r:
        dice = ", ".join(f"{n} {d:.3f}" if d is not None else f"{n} -"
                         for n, d in zip(class_names, r["val_dice"], strict=True))
        line += f"; val loss {r['val_loss']:.4f}, pseudo-Dice {dice}"
        if r.get("val_dice_ema") is not None:
            line += f" (EMA {r['val_dice_ema']:.4f}{', best' if r.get('best') else ''})"
    return line + (f"; run ETA {hms(eta_seconds)}" if eta_seconds else "")


def hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def validation_line(results_table: str, seconds: float) -> str:
    return f"{results_table}\n(sliding-window validation took {seconds:.0f} s)"


def no_final_validation_line() -> str:
    """A run of `data.fold=all`: nothing was held out to validate."""
    return ("final validation: skipped, data.fold=all trains on every case (none is held out); "
            "validate with the runs of folds 0-4 and `jaxmamba crossval`")


def done_line(run_dir: Path, checkpoints: Path, files: Sequence[str]) -> str:
    """The last line of a run: where its checkpoints and other `files` are."""
    return f"done: {run_dir} (checkpoints in {checkpoints}, {', '.join(files)})"


def saved_line(run_dir: Path, epochs: Sequence[int], steps: Sequence[int]) -> str:
    """What a run stopped outside its training steps has on disk: its saved `epochs` and
    mid-epoch `steps`, in order."""
    saved = [f"the last complete epoch ({epochs[-1]})"] if epochs else []
    saved += [f"the state at step {steps[-1]}"] if steps else []
    return (f"{' and '.join(saved)} {'is' if len(saved) == 1 else 'are'} saved in {run_dir}; "
            f"run the same command again to go on from there" if saved
            else "no epoch was saved yet")
