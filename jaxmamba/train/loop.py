"""The training loop: `run(config)` (big_vision-style sections, one readable function).

Order of work: decide resume or fresh (`jaxmamba.train.resume`, refusing a run directory that
does not match), prepare the data (`jaxmamba.train.data`: build the bundled dataset if asked,
preprocess, plan, split), build the mesh, initialise the network and optimizer on it and restore
the checkpoint, compile the step ahead of time and check its memory, then train
`iters_per_epoch` steps per epoch with nnU-Net's online validation after each epoch
(`jaxmamba.train.epoch` keeps the tallies), writing `latest` every epoch and `best` by the EMA
of the pseudo-Dice, and at the end the sliding-window validation (`jaxmamba.train.validate`).

The loop prints nothing itself: its lines (formatted by `jaxmamba.console`) go to the `say` it
is given (`jaxmamba train` passes `print`), by default to the `jaxmamba.train` logger.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
from tqdm import tqdm

from jaxmamba import console, distributed, rundir, runlock
from jaxmamba import data as jdata
from jaxmamba.config import Config
from jaxmamba.console import progress_enabled
from jaxmamba.layers import MambaOptions
from jaxmamba.models import VARIANTS, build_model, canonical_variant
from jaxmamba.ops.mesh import DATA_AXIS, check_patch_splits, make_mesh
from jaxmamba.rundir import LATEST, PREEMPTED
from jaxmamba.train import epoch as epoch_
from jaxmamba.train import finite, preflight, sharding, signals, validate
from jaxmamba.train import step as steps
from jaxmamba.train.checkpoint import Checkpointer
from jaxmamba.train.data import cache_dir, prepare_data
from jaxmamba.train.optim import build_recipe
from jaxmamba.train.record import add_session
from jaxmamba.train.resume import Resume
from jaxmamba.train.writers import RunWriter


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
    # --- Resume or fresh: decided once, the run directory checked before any work.
    start = Resume.decide(cfg, run_dir)
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.spatial)
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
    start.check(cfg, plan)
    sharding.check_batch_size(plan.batch_size, mesh)
    check_patch_splits(plan.patch_size, plan.strides, cfg.mesh.spatial, devices=jax.device_count())
    class_names = [name for name, _ in plan.labels[1:]]
    ckpt = Checkpointer(run_dir)

    # --- Network, optimizer, state: initialised on the mesh, then the checkpoint restored.
    t = cfg.train
    recipe = build_recipe(cfg.optim, epochs=t.epochs, iters_per_epoch=t.iters_per_epoch)
    graphdef, state = steps.init_on_mesh(
        lambda: build_model(cfg.model.variant, plan, precision=cfg.model.precision,
                            mamba=MambaOptions.of(cfg.model), rngs=cfg.seed), recipe.tx, mesh)
    train_it = jdata.train_iterator(cache, plan, train_ids, seed=cfg.seed + 1,
                                    batch_size=plan.batch_size, num_workers=cfg.data.num_workers,
                                    shard_index=jax.process_index(),
                                    shard_count=jax.process_count())
    state, done_so_far = start.restore(ckpt, state, train_it, say)
    start_epoch, best_ema, partial = done_so_far.epoch, done_so_far.best_ema, done_so_far.partial
    if main:
        start.record(cfg, plan, start_epoch)
    writer = RunWriter(run_dir, class_names, history=done_so_far.history,
                       tensorboard=cfg.log.tensorboard, plot=cfg.log.plot)

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
            summary["final_validation"] = validate.after_training(
                cfg, graphdef, state.params, state.rest, plan, val_ids, run_dir,
                progress=progress, say=say)
        return summary

    # --- Compile ahead, check memory.
    train_step, eval_step = steps.jit_steps(
        *steps.make_steps(graphdef, recipe.tx, batch_dice=plan.batch_dice), mesh)
    first = sharding.global_batch(next(train_it), mesh)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, first).compile()
    compile_seconds = time.perf_counter() - t0
    say(console.compiled_line(compile_seconds, cfg.model.variant, plan.patch_size,
                              plan.batch_size, mesh.shape[DATA_AXIS], cfg.mesh.spatial,
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
    throughput = epoch_.Throughput(plan.batch_size, say if not progress else
                                   lambda line: say("\n" + line))  # below the bar
    step_no = int(jax.device_get(state.step))  # host copy of the step counter
    t_run = time.perf_counter()
    stop.deferring = True  # from here a signal stops at the next step boundary
    try:
        for epoch in range(start_epoch, end_epoch):
            t_epoch = time.perf_counter()
            done = partial["steps"] if partial else 0  # steps of this epoch before a resume
            tally = epoch_.Tally.restore(partial, len(class_names))
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
                    epoch_.consume(pending, tally, writer, bar, recipe, cfg.data.raw_dir, ckpt)
                step_no += 1
                done += 1
                pending = (step_no, metrics)
                throughput.tick(metrics["loss"])
                if stop.should_stop(step_no):
                    stopping = True
                    break
            epoch_.consume(pending, tally, writer, bar, recipe, cfg.data.raw_dir, ckpt)
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
            record = tally.record(epoch, step_no, jax.device_get(recipe.lr(step_no - 1)))
            if val_ids and t.val_iters:
                record.update(epoch_.online_validation(eval_step, state, cache, plan, val_ids,
                                                       t.val_iters, mesh))
                best_ema = epoch_.update_best(record, writer.history, best_ema)
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
            summary["final_validation"] = validate.after_training(
                cfg, graphdef, state.params, state.rest, plan, val_ids, run_dir,
                progress=progress, say=say)
        say(console.done_line(run_dir, ckpt.dir, (rundir.CURVES_FILE, rundir.METRICS_FILE)))
    return summary


def _summary(run_dir, epochs, state, graphdef, plan, writer, best_ema) -> dict[str, Any]:
    """What `run` returns: where, how far, the history, and the trained state."""
    return {"run_dir": str(run_dir), "epochs": epochs, "step": int(jax.device_get(state.step)),
            "history": writer.history, "best_ema": best_ema, "plan": plan, "state": state,
            "graphdef": graphdef}
