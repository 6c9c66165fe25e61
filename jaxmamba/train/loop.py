"""The training loop: `run(config)` (big_vision-style sections, one readable function).

Order of work: decide resume or fresh (refusing to touch a run directory that does not match),
prepare the data (`jaxmamba.train.data`: build the bundled dataset if asked, preprocess, plan,
split), build the mesh, network and optimizer, restore the checkpoint, compile the step ahead of
time and check its memory, then train `iters_per_epoch` steps per epoch with nnU-Net's online
validation after each epoch, writing `latest` every epoch and `best` by the EMA of the
pseudo-Dice.

The loop prints nothing itself: its lines (formatted by `jaxmamba.console`) go to the `say` it
is given (`jaxmamba train` passes `print`), by default to the `jaxmamba.train` logger.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxmamba import console, distributed, rundir, runlock
from jaxmamba import data as jdata
from jaxmamba.config import Config, save_config
from jaxmamba.console import progress_enabled
from jaxmamba.infer.sliding_window import data_mesh
from jaxmamba.models import VARIANTS, build_model, canonical_variant
from jaxmamba.ops.spatial import check_patch_splits
from jaxmamba.plans import Plan
from jaxmamba.rundir import LATEST, PREEMPTED, RunDirError
from jaxmamba.train import finite, losses, preflight, sharding, signals, validate
from jaxmamba.train import step as steps
from jaxmamba.train.checkpoint import Checkpointer
from jaxmamba.train.data import cache_dir, prepare_data
from jaxmamba.train.finite import NonFiniteLossError
from jaxmamba.train.optim import build_recipe
from jaxmamba.train.record import StepTimes, add_session
from jaxmamba.train.writers import RunWriter

THROUGHPUT_STEPS = 10  # steps after the first whose speed is reported


# ---------------------------------------------------------------------- resume decision
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


# ---------------------------------------------------------------------- the run
def run(cfg: Config, *, max_epochs: int | None = None,
        say: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns a summary. `max_epochs` stops this call after that many
    epochs (the run resumes from there), e.g. for time-limited cluster jobs. `say` gets each
    progress line of process 0 (default: the `jaxmamba.train` logger, at level INFO).

    On several processes (`jaxmamba.distributed`) every process runs this with the same config
    (checked first); process 0 prepares the data and writes the run directory's files. SIGTERM
    or SIGINT raise `signals.Stopped` after a save at the next step boundary (see there)."""
    distributed.initialize()
    distributed.check_same_config(cfg.to_dict())
    main = distributed.is_main()
    if say is None:
        say = logging.getLogger("jaxmamba.train").info
    say = say if main else (lambda line: None)
    run_dir = Path(cfg.train.run_dir).absolute()
    inputs = {"data.raw_dir": cfg.data.raw_dir, "the preprocessing cache": cache_dir(cfg)}
    with runlock.held(run_dir, say, inputs=inputs), signals.StopOnSignal(say) as stop:
        try:
            return _run(cfg, max_epochs, stop, run_dir, main, say)
        except signals.Stopped as err:
            if err.saved:
                raise
            # stopped outside the training steps: no save is in flight, say what is on disk
            saved = console.saved_line(run_dir, rundir.steps(run_dir, LATEST),
                                       rundir.steps(run_dir, PREEMPTED))
            raise signals.Stopped(err.signum, f"{err}; {saved}") from None


def _run(cfg: Config, max_epochs, stop: signals.StopOnSignal, run_dir: Path, main: bool, say
         ) -> dict[str, Any]:
    # --- Resume or fresh; check the run directory before any work.
    resume = decide_resume(cfg)
    meta = {}
    if resume:
        distributed.run_once("clean checkpoints",
                             lambda: [str(p) for p in rundir.clean_stale(run_dir)])
        peek = Checkpointer(run_dir)
        meta = peek.read_meta(_resume_from(peek))
        peek.close()
        _check_same_run(meta, cfg, None, run_dir)

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.spatial)
    if "batch_size" in cfg.data.plan_overrides:  # known before any preprocessing
        sharding.check_batch_size(int(cfg.data.plan_overrides["batch_size"]), mesh)

    # --- Data and plan: built and preprocessed by process 0, then read by all.
    progress = main and progress_enabled(cfg.log.progress)  # bars: on a terminal, by default
    prepared = []
    distributed.run_once("prepare the data", lambda: prepared.append(
        prepare_data(cfg, progress=progress, say=say)))
    plan, cache, train_ids, val_ids = prepared[0] if prepared else prepare_data(cfg,
                                                                                 progress=False)
    # the run directory's plan names the network, so nnU-Net rebuilds this one from it
    plan = plan.with_network(VARIANTS[canonical_variant(cfg.model.variant)].reference_name)
    if resume:
        _check_same_run(meta, cfg, plan, run_dir)
    sharding.check_batch_size(plan.batch_size, mesh)
    check_patch_splits(plan.patch_size, plan.strides, cfg.mesh.spatial, devices=jax.device_count())
    class_names = [name for name, _ in plan.labels[1:]]
    ckpt = Checkpointer(run_dir)

    # --- Network, optimizer, state.
    t = cfg.train
    recipe = build_recipe(cfg.optim, epochs=t.epochs, iters_per_epoch=t.iters_per_epoch)
    model = build_model(cfg.model.variant, plan, precision=cfg.model.precision,
                        scan_implementation=cfg.model.scan_implementation,
                        remat=cfg.model.remat, rngs=cfg.seed)
    graphdef, state = steps.init_state(model, recipe.tx)
    del model
    state = sharding.replicate(state, mesh)
    train_it = jdata.train_iterator(cache, plan, train_ids, seed=cfg.seed + 1,
                                    batch_size=plan.batch_size, num_workers=cfg.data.num_workers,
                                    shard_index=jax.process_index(),
                                    shard_count=jax.process_count())
    start_epoch, history, best_ema, partial = 0, [], None, None
    if resume:
        which = _resume_from(ckpt)
        params, train, data_state, meta = ckpt.restore(
            state.params, {"step": state.step, "rest": state.rest, "opt": state.opt_state},
            which=which)
        state = steps.TrainState(train["step"], params, train["rest"], train["opt"])
        finite.check_restored(state, ckpt.dir / which)
        train_it.set_state(data_state)
        start_epoch, history, best_ema = meta["epoch"], meta["history"], meta["best_ema"]
        partial = meta.get("partial_epoch")  # a mid-epoch checkpoint: the epoch's sums so far
        say(console.resumed_line(run_dir, start_epoch, partial["steps"] if partial else None,
                                 int(state.step)))
        resolved = run_dir / rundir.CONFIG_FILE
        if main and resolved.is_file() and cfg.to_dict() != _read_yaml(resolved):
            save_config(cfg, run_dir / rundir.resumed_config_file(start_epoch))
    elif main:
        save_config(cfg, run_dir / rundir.CONFIG_FILE)
        plan.save(run_dir / rundir.PLANS_FILE)
    writer = RunWriter(run_dir, class_names, history=history, tensorboard=cfg.log.tensorboard,
                       plot=cfg.log.plot)

    end_epoch = t.epochs if max_epochs is None else min(t.epochs, start_epoch + max_epochs)
    if start_epoch >= end_epoch:
        writer.close()
        ckpt.close()
        summary = _summary(run_dir, start_epoch, state, graphdef, plan, writer, best_ema)
        missing = (start_epoch == t.epochs and t.final_validation and cfg.data.fold != "all"
                   and validate.done(run_dir, t.epochs) is None)
        say(console.finished_line(run_dir, start_epoch, t.epochs,
                                  final_validation_missing=missing))
        if missing:
            stop.after_training()
            summary["final_validation"] = _final_validation(cfg, state, graphdef, plan, val_ids,
                                                            run_dir, main, say)
        return summary

    # --- Compile ahead, check memory.
    train_step, eval_step = steps.jit_steps(
        *steps.make_steps(graphdef, recipe.tx, batch_dice=plan.batch_dice), mesh)
    first = sharding.global_batch(next(train_it), mesh)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, first).compile()
    compile_seconds = time.perf_counter() - t0
    say(console.compiled_line(compile_seconds, cfg.model.variant, plan.patch_size,
                              plan.batch_size, mesh.shape[sharding.DATA_AXIS], cfg.mesh.spatial,
                              jax.devices()[0].device_kind))
    memory = preflight.estimate(compiled)
    if main:  # what `jaxmamba report` reads
        add_session(run_dir, cfg, plan, state.params, start_epoch=start_epoch,
                    compile_seconds=compile_seconds, memory=memory)
    if t.preflight:
        say(preflight.check_fits(memory, plan, limit_gib=t.memory_limit_gib))
    if val_ids and t.val_iters:  # ahead too, so that no process compiles it after the barrier
        eval_step = eval_step.lower(state, first).compile()
    # Compiling takes each process its own time (cache hits, load): meet before the first step,
    # whose collectives give up when the processes arrive more than 30 s apart (gloo on CPU).
    distributed.barrier("compiled")

    # --- Train.
    throughput = _Throughput(plan.batch_size, say if not progress else
                             lambda line: say("\n" + line))  # below the bar
    step_no = int(state.step)  # host copy of the step counter
    t_run = time.perf_counter()
    stop.deferring = True  # from here a signal stops at the next step boundary
    try:
        for epoch in range(start_epoch, end_epoch):
            t_epoch = time.perf_counter()
            done = partial["steps"] if partial else 0  # steps of this epoch before a resume
            tally = _Tally.restore(partial, len(class_names))
            partial = None
            bar = tqdm(range(done, t.iters_per_epoch), desc=f"epoch {epoch + 1}/{t.epochs}",
                       disable=not progress, dynamic_ncols=True)
            pending, stopping = None, False
            for _ in bar:
                batch = first if first is not None else sharding.global_batch(next(train_it),
                                                                              mesh)
                first = None
                state, metrics = compiled(state, batch)
                if pending is not None:  # read the previous step while this one runs
                    _consume(pending, tally, writer, bar, recipe, cfg.data.raw_dir, ckpt)
                step_no += 1
                done += 1
                pending = (step_no, metrics)
                throughput.tick(metrics["loss"])
                if stop.should_stop(step_no):
                    stopping = True
                    break
            _consume(pending, tally, writer, bar, recipe, cfg.data.raw_dir, ckpt)
            finite.check_state(state, epoch=epoch + 1, step=step_no, ckpt=ckpt,
                               raw_dir=cfg.data.raw_dir)
            throughput.report()
            bar.close()
            meta = {"epoch": epoch, "variant": cfg.model.variant,
                    "processes": jax.process_count(), "plan": plan.to_record(),
                    "history": writer.history, "best_ema": best_ema, "config": cfg.to_dict()}
            train_state = {"step": state.step, "rest": state.rest, "opt": state.opt_state}
            if done < t.iters_per_epoch:  # stopped inside the epoch: save exactly here
                ckpt.save_preempted(step_no, params=state.params, train=train_state,
                                    data_state=train_it.get_state(),
                                    meta={**meta, "partial_epoch": tally.state(done)})
                raise signals.Stopped(stop.signum, f"stopped by {signals.NAMES[stop.signum]} "
                                      f"at step {step_no} ({done} of {t.iters_per_epoch} steps "
                                      f"of epoch {epoch + 1}); saved in {ckpt.dir / PREEMPTED}. "
                                      f"Run the same command again to resume from this step",
                                      saved=True)
            record = tally.record(epoch, step_no, recipe.lr(step_no - 1))
            if val_ids and t.val_iters:
                record.update(_validate(eval_step, state, cache, plan, val_ids, t.val_iters,
                                        mesh))
                mean, prev = record["val_dice_mean"], history_ema(writer.history)
                if mean is not None:  # nnU-Net: EMA 0.9·old + 0.1·new; best by the EMA
                    ema = mean if prev is None else 0.9 * prev + 0.1 * mean
                    record["val_dice_ema"] = ema
                    record["best"] = best_ema is None or ema > best_ema
                    best_ema = ema if record["best"] else best_ema
            record["epoch_seconds"] = time.perf_counter() - t_epoch
            writer.epoch(record)
            elapsed = time.perf_counter() - t_run
            eta = elapsed / (epoch + 1 - start_epoch) * (t.epochs - epoch - 1)
            say(console.epoch_line(record, class_names, eta))
            ckpt.save(epoch + 1, params=state.params, train=train_state,
                      data_state=train_it.get_state(),
                      meta={**meta, "epoch": epoch + 1, "history": writer.history,
                            "best_ema": best_ema},
                      best=record.get("best", False))
            ckpt.drop_preempted()
            if stopping:
                ckpt.wait()
                raise signals.Stopped(stop.signum, f"stopped by {signals.NAMES[stop.signum]} "
                                      f"after epoch {epoch + 1}, saved in {ckpt.dir}. Run the "
                                      f"same command again to resume", saved=True)
    finally:
        ckpt.wait()
        writer.close()
        train_it.close()
    ckpt.close()
    stop.after_training()
    summary = _summary(run_dir, end_epoch, state, graphdef, plan, writer, best_ema)
    if end_epoch == t.epochs:
        if t.final_validation:
            summary["final_validation"] = _final_validation(cfg, state, graphdef, plan, val_ids,
                                                            run_dir, main, say)
        say(console.done_line(run_dir, ckpt.dir, (rundir.CURVES_FILE, rundir.METRICS_FILE)))
    return summary


def _final_validation(cfg, state, graphdef, plan, val_ids, run_dir, main, say) -> dict:
    """Sliding-window validation of the held-out cases, split over the processes."""
    if cfg.data.fold == "all":
        say(console.no_final_validation_line())
        return {}
    t0 = time.perf_counter()
    model = validate.merged_model(graphdef, state.params, state.rest)
    results = validate.final_validation(model, plan, cfg.data.raw_dir, val_ids, run_dir,
                                        epoch=cfg.train.epochs,
                                        mesh=data_mesh(spatial=cfg.mesh.spatial),
                                        progress=main and progress_enabled(cfg.log.progress))
    say(console.validation_line(validate.format_results(results, run_dir),
                                time.perf_counter() - t0))
    return results


def history_ema(history: list[dict]) -> float | None:
    """The last EMA of the validation pseudo-Dice in `history` (None before the first)."""
    for r in reversed(history):
        if r.get("val_dice_ema") is not None:
            return r["val_dice_ema"]
    return None


# ---------------------------------------------------------------------- helpers
def _summary(run_dir, epochs, state, graphdef, plan, writer, best_ema) -> dict[str, Any]:
    """What `run` returns: where, how far, the history, and the trained state."""
    return {"run_dir": str(run_dir), "epochs": epochs, "step": int(state.step),
            "history": writer.history, "best_ema": best_ema, "plan": plan, "state": state,
            "graphdef": graphdef}


class _Tally:
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
    def restore(cls, state: dict | None, n_classes: int) -> _Tally:
        tally = cls(n_classes)
        if state:
            tally.n, tally.loss, tally.grad_norm = state["n"], state["loss"], state["grad_norm"]
            tally.counts = np.asarray(state["counts"], np.float64)
        return tally

    def record(self, epoch: int, step: int, lr) -> dict:
        return {"epoch": epoch, "step": step, "train_loss": self.loss / max(self.n, 1),
                "train_dice": _nan_to_none(self.dice()), "lr": float(lr),
                "grad_norm": self.grad_norm / max(self.n, 1),
                "step_seconds": self.times.median()}


def _consume(pending, tally: _Tally, writer: RunWriter, bar, recipe, raw_dir: str, ckpt):
    step_no, metrics = pending  # metrics of step number `step_no` (1-based)
    m = jax.device_get(metrics)
    loss = float(m["loss"])
    if not math.isfinite(loss):
        raise NonFiniteLossError(finite.stop_message(
            f"the loss became {loss} at step {step_no}", last_epoch=ckpt.latest_epoch(),
            checkpoints=ckpt.dir, raw_dir=raw_dir))
    tally.add(m)
    lr = float(recipe.lr(step_no - 1))
    writer.scalars(step_no, {"loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]),
                                    "param_norm": float(m["param_norm"]),
                                    "update_norm": float(m["update_norm"])})
    dice = tally.dice()
    bar.set_postfix(loss=f"{tally.loss / tally.n:.4f}",
                    dice=f"{np.nanmean(dice):.3f}" if np.isfinite(dice).any() else "-",
                    lr=f"{lr:.2e}", refresh=False)


def _validate(eval_step, state, cache, plan, val_ids, n_batches, mesh) -> dict:
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
    return {"val_loss": loss / max(n, 1), "val_dice": _nan_to_none(dice), "val_dice_mean": mean}


class _Throughput:
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


def _nan_to_none(values) -> list:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def _read_yaml(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())


