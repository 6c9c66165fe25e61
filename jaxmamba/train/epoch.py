# One epoch's bookkeeping: step-metric sums, online validation, the pseudo-Dice EMA, throughput.
"""What the training loop adds up per epoch (host side), as nnU-Net's trainer does.

`Tally` sums the step metrics (`consume` reads one step's while the next runs) and the steps'
times (`jaxmamba.train.record.StepTimes`) and becomes the epoch's record; `online_validation`
is nnU-Net's pseudo-Dice on fixed validation patches; `update_best` keeps its EMA (0.9 old +
0.1 new) and whether this epoch is the best; `Throughput` says the steps' speed once. Records
are JSON-able (NaN becomes None).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import numpy as np

from jaxmamba import console
from jaxmamba import data as jdata
from jaxmamba.train import finite, losses, sharding
from jaxmamba.train.finite import NonFiniteLossError
from jaxmamba.train.record import StepTimes

THROUGHPUT_STEPS = 10  # steps after the first whose speed is reported


class Tally:
    """Sums of one epoch's step metrics (host side), and when each step was seen done."""

    def __init__(self, n_classes: int):
        self.n, self.loss, self.grad_norm = 0, 0.0, 0.0
        self.counts = np.zeros((3, n_classes))
        self.times = StepTimes()

    def add(self, m: dict) -> None:
        self.times.tick()
        self.n += 1
        self.loss += float(m["loss"])
        self.grad_norm += float(m["grad_norm"])
        self.counts += np.asarray(m["counts"])

    def dice(self) -> np.ndarray:
        return losses.pseudo_dice(self.counts)

    def state(self, steps: int) -> dict:
        """JSON-able sums after `steps` steps of the epoch (for a mid-epoch checkpoint)."""
        return {"steps": steps, "n": self.n, "loss": self.loss, "grad_norm": self.grad_norm,
                "counts": self.counts.tolist()}

    @classmethod
    def restore(cls, state: dict | None, n_classes: int) -> Tally:
        tally = cls(n_classes)
        if state:
            tally.n, tally.loss, tally.grad_norm = state["n"], state["loss"], state["grad_norm"]
            tally.counts = np.asarray(state["counts"], np.float64)
        return tally

    def record(self, epoch: int, step: int, lr) -> dict:
        return {"epoch": epoch, "step": step, "train_loss": self.loss / max(self.n, 1),
                "train_dice": nan_to_none(self.dice()), "lr": float(lr),
                "grad_norm": self.grad_norm / max(self.n, 1),
                "step_seconds": self.times.median()}


def consume(pending, tally: Tally, writer, bar, recipe, raw_dir: str, ckpt) -> None:
    """Read step `pending = (step number, metrics)`'s metrics into `tally`, `writer` and the
    progress bar; a non-finite loss stops training (`NonFiniteLossError`)."""
    step_no, metrics = pending  # metrics of step number `step_no` (1-based)
    m = jax.device_get(metrics)
    loss = float(m["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLossError(finite.stop_message(
            f"the loss became {loss} at step {step_no}", last_epoch=ckpt.latest_epoch(),
            checkpoints=ckpt.dir, raw_dir=raw_dir))
    tally.add(m)
    lr = float(jax.device_get(recipe.lr(step_no - 1)))
    writer.scalars(step_no, {"loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]),
                             "param_norm": float(m["param_norm"]),
                             "update_norm": float(m["update_norm"])})
    dice = tally.dice()
    bar.set_postfix(loss=f"{tally.loss / tally.n:.4f}",
                    dice=f"{np.nanmean(dice):.3f}" if np.isfinite(dice).any() else "-",
                    lr=f"{lr:.2e}", refresh=False)


def online_validation(eval_step: Callable, state, cache, plan, val_ids, n_batches: int,
                      mesh) -> dict:
    """nnU-Net's online validation: summed tp/fp/fn over `n_batches` fixed validation patches
    (global batches: each process loads its share)."""
    counts, loss, n = 0.0, 0.0, 0
    for b in jdata.val_iterator(cache, plan, val_ids, num_batches=n_batches, seed=0,
                                batch_size=plan.batch_size, shard_index=jax.process_index(),
                                shard_count=jax.process_count()):
        m = jax.device_get(eval_step(state, sharding.global_batch(b, mesh)))
        counts, loss, n = counts + np.asarray(m["counts"]), loss + float(m["loss"]), n + 1
    dice = losses.pseudo_dice(counts)
    mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else None
    return {"val_loss": loss / max(n, 1), "val_dice": nan_to_none(dice), "val_dice_mean": mean}


def update_best(record: dict, history: list[dict], best_ema: float | None) -> float | None:
    """nnU-Net: the EMA `0.9·old + 0.1·new` of the validation pseudo-Dice, and the best epoch by
    it; sets `record["val_dice_ema"]` and `record["best"]`, returns the best EMA so far."""
    mean, prev = record["val_dice_mean"], history_ema(history)
    if mean is None:
        return best_ema
    ema = mean if prev is None else 0.9 * prev + 0.1 * mean
    record["val_dice_ema"] = ema
    record["best"] = best_ema is None or ema > best_ema
    return ema if record["best"] else best_ema


def history_ema(history: list[dict]) -> float | None:
    """The last EMA of the validation pseudo-Dice in `history` (None before the first)."""
    for r in reversed(history):
        if r.get("val_dice_ema") is not None:
            return r["val_dice_ema"]
    return None


class Throughput:
    """Says the speed of the steps after the first, once, after `THROUGHPUT_STEPS` of them
    (or at the end of the first epoch if that comes sooner)."""

    def __init__(self, batch_size: int, say):
        self.batch_size, self.say, self.n, self.t0, self.done = batch_size, say, 0, None, False

    def tick(self, loss: jax.Array) -> None:
        self.n += 1
        if self.n == 1:
            loss.block_until_ready()
            self.t0 = time.perf_counter()
        elif self.n == THROUGHPUT_STEPS + 1:
            loss.block_until_ready()
            self.report()

    def report(self) -> None:
        if self.done or self.n < 2:
            return
        self.done = True
        dt = (time.perf_counter() - self.t0) / (self.n - 1)
        self.say(console.throughput_line(dt, self.batch_size, self.n))


def nan_to_none(values) -> list:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]
