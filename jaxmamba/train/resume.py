# Resume or start fresh, decided once: which checkpoint, whether it is this run's, restoring it.
"""Where a training run starts (README "Training": resuming continues exactly).

`Resume.decide(cfg, run_dir)` decides, per `train.resume`, before any work: start from scratch,
or continue from `latest` (or from `preempted`, when a signal stopped the epoch after the latest
one), refusing a run directory that holds another run (another variant, data-loader layout or,
once the plan is known, `check(cfg, plan)`, another plan). `restore` puts the checkpoint into
the freshly initialised state and data iterator and returns the `Progress` it holds; `record`
writes the run's config and plan (or, on a resume with another config, that config beside).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax

from jaxmamba import console, distributed, rundir
from jaxmamba.config import Config, save_config, saved_config_differs
from jaxmamba.plans import Plan
from jaxmamba.rundir import LATEST, PREEMPTED, RunDirError
from jaxmamba.train import finite
from jaxmamba.train.checkpoint import Checkpointer
from jaxmamba.train.step import TrainState


def decide_resume(cfg: Config) -> bool:
    """Resume or start fresh, per `train.resume`; never overwrite another run's checkpoints."""
    run_dir = Path(cfg.train.run_dir)
    found, preempted = rundir.steps(run_dir, LATEST), rundir.steps(run_dir, PREEMPTED)
    if (found or preempted) and cfg.train.resume is False:
        what = f"epoch {found[-1]}" if found else f"step {preempted[-1]}"
        raise RunDirError(run_dir, f"train.run_dir holds a checkpoint ({what}) and "
                                   f"train.resume=false", "choose a new train.run_dir, or resume")
    if not (found or preempted) and cfg.train.resume is True:
        raise RunDirError(run_dir, "train.resume=true but there is no checkpoint to resume",
                          "check train.run_dir, or drop train.resume=true to start it from scratch")
    return bool(found or preempted)


@dataclasses.dataclass
class Progress:
    """How far a run is: completed epochs, the logger's history, the best EMA pseudo-Dice, and
    the sums of a stopped epoch's steps (None unless resumed mid-epoch)."""

    epoch: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    best_ema: float | None = None
    partial: dict | None = None


@dataclasses.dataclass(frozen=True)
class Resume:
    """A run's start: from scratch (`which` None) or from checkpoint `which` with `meta`."""

    run_dir: Path
    which: str | None = None
    meta: dict = dataclasses.field(default_factory=dict)

    @property
    def fresh(self) -> bool:
        return self.which is None

    @classmethod
    def decide(cls, cfg: Config, run_dir: Path) -> Resume:
        """Decide (`decide_resume`); to resume, clean what killed saves left, read the
        checkpoint's meta and check it is this run's (the plan comes later: `check`)."""
        if not decide_resume(cfg):
            return cls(run_dir)
        distributed.run_once("clean checkpoints",
                             lambda: [str(p) for p in rundir.clean_stale(run_dir)])
        peek = Checkpointer(run_dir)
        which = _resume_from(peek)
        meta = peek.read_meta(which)
        peek.close()
        decision = cls(run_dir, which, meta)
        decision.check(cfg)
        return decision

    def check(self, cfg: Config, plan: Plan | None = None) -> None:
        """A resumed checkpoint must be of this variant, data-loader layout and (given) plan."""
        if not self.fresh:
            _check_same_run(self.meta, cfg, plan, self.run_dir)

    def restore(self, ckpt: Checkpointer, state: TrainState, train_it,
                say: Callable[[str], None]) -> tuple[TrainState, Progress]:
        """`state` (shapes, shardings) and `train_it` as the checkpoint left them, and the
        progress it records; fresh: as they are, at epoch 0."""
        if self.fresh:
            return state, Progress()
        params, train, data_state, meta = ckpt.restore(
            state.params, {"step": state.step, "rest": state.rest, "opt": state.opt_state},
            which=self.which)
        state = TrainState(train["step"], params, train["rest"], train["opt"])
        finite.check_restored(state, ckpt.dir / self.which)
        train_it.set_state(data_state)
        partial = meta.get("partial_epoch")  # a mid-epoch checkpoint: the epoch's sums so far
        progress = Progress(meta["epoch"], meta["history"], meta["best_ema"], partial)
        say(console.resumed_line(self.run_dir, progress.epoch,
                                 partial["steps"] if partial else None,
                                 int(jax.device_get(state.step))))
        return state, progress

    def record(self, cfg: Config, plan: Plan, epoch: int) -> None:
        """Write the run's config and plan (fresh), or the config of a resume at `epoch` that
        differs from the saved one (`config.resumed-epoch<N>.yaml`). Process 0 only."""
        if self.fresh:
            save_config(cfg, self.run_dir / rundir.CONFIG_FILE)
            plan.save(self.run_dir / rundir.PLANS_FILE)
            return
        saved = self.run_dir / rundir.CONFIG_FILE
        if saved.is_file() and saved_config_differs(cfg, saved):
            save_config(cfg, self.run_dir / rundir.resumed_config_file(epoch))


def _resume_from(ckpt: Checkpointer) -> str:
    """`latest`, or `preempted` when a signal stopped the epoch after the latest one."""
    if ckpt.latest_epoch(PREEMPTED) is None:
        return LATEST
    done = ckpt.latest_epoch()
    return PREEMPTED if done is None or ckpt.read_meta(PREEMPTED)["epoch"] >= done else LATEST


def _check_same_run(meta: dict, cfg: Config, plan: Plan | None, run_dir: Path) -> None:
    if meta.get("variant") != cfg.model.variant:
        raise RunDirError(run_dir, f"its checkpoint is of variant {meta.get('variant')!r}, the "
                                   f"config asks for {cfg.model.variant!r}",
                          "use another train.run_dir (nothing was changed)")
    # The data loader's state holds one iterator per worker and per process: exact resume needs
    # the same numbers (grain cannot restore it into another layout).
    workers = meta.get("config", {}).get("data", {}).get("num_workers")
    if workers is not None and workers != cfg.data.num_workers:
        raise RunDirError(run_dir, f"its data-loader state is of data.num_workers={workers}, the "
                                   f"config asks for {cfg.data.num_workers}",
                          f"resume with data.num_workers={workers} (nothing was changed)")
    processes = meta.get("processes", 1)
    if processes != jax.process_count():
        raise RunDirError(run_dir, f"its data-loader state is of {processes} process(es), this "
                                   f"run has {jax.process_count()}", "resume with as many")
    if plan is not None and meta.get("plan") != plan.to_record():
        raise RunDirError(run_dir, f"its checkpoint was trained with another plan (see "
                                   f"{run_dir / rundir.PLANS_FILE})",
                          "use another train.run_dir or the same data.plans and "
                          "data.plan_overrides")
