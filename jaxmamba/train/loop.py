"""The training loop: `run(config)` (DESIGN §7; big_vision-style sections, one readable function).

Order of work: decide resume or fresh (refusing to touch a run directory that does not match),
prepare the data (build the bundled dataset if asked, preprocess, plan, split), build the mesh,
network and optimizer, restore the checkpoint, compile the step ahead of time and check its
memory, then train `iters_per_epoch` steps per epoch with nnU-Net's online validation after each
epoch, writing `latest` every epoch and `best` by the EMA of the pseudo-Dice.
"""

from __future__ import annotations

import functools
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from jaxmamba import data as jdata
from jaxmamba.config import Config, save_config
from jaxmamba.models import build_model
from jaxmamba.ops.spatial import check_patch_splits
from jaxmamba.plans import Plan
from jaxmamba.train import losses, preflight, sharding, validate
from jaxmamba.train import step as steps
from jaxmamba.train.checkpoint import Checkpointer, CheckpointError
from jaxmamba.train.optim import build_recipe
from jaxmamba.train.writers import RunWriter

#: Plan fields a config may override: they change the network or the batches, not preprocessing.
OVERRIDABLE = ("patch_size", "batch_size", "base_num_features", "max_num_features", "strides",
               "kernel_sizes", "n_blocks_encoder", "n_blocks_decoder", "batch_dice")
THROUGHPUT_STEPS = 10  # steps after the first whose speed is reported


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the last good checkpoint is kept."""


# ---------------------------------------------------------------------- data and plan
def apply_plan_overrides(plan: Plan, overrides: dict[str, Any]) -> Plan:
    """`plan` with `data.plan_overrides` applied; other keys are errors naming the key."""
    for key in overrides:
        if key not in OVERRIDABLE:
            raise ValueError(f"data.plan_overrides.{key}: not overridable (choose from "
                             f"{', '.join(OVERRIDABLE)}; preprocessing fields come from the plan)")
    def as_tuple(v):
        return tuple(as_tuple(x) for x in v) if isinstance(v, list | tuple) else v
    return plan.replace(**{k: as_tuple(v) for k, v in overrides.items()})


def cache_dir(cfg: Config) -> Path:
    raw = Path(cfg.data.raw_dir)
    return Path(cfg.data.preprocessed_dir) if cfg.data.preprocessed_dir else raw.with_name(
        raw.name + "_preprocessed")


def prepare_data(cfg: Config, *, progress: bool = True):
    """Build (if asked), preprocess and split the dataset: `(plan, cache, train ids, val ids)`."""
    raw = Path(cfg.data.raw_dir)
    if not (raw / "dataset.json").is_file():
        if cfg.data.build is None:
            raise FileNotFoundError(f"data.raw_dir = {raw}: no dataset.json there; give an nnU-Net "
                                    f"raw folder, or data.build=demo to build the demo dataset")
        from jaxmamba.datasets import build
        print(f"building the {cfg.data.build} dataset in {raw} ...")
        build(cfg.data.build, raw)
    given = None
    if cfg.data.plans is not None:
        given = apply_plan_overrides(Plan.load(cfg.data.plans, raw / "dataset.json"),
                                     cfg.data.plan_overrides)
    cache = cache_dir(cfg)
    plan, errors = jdata.preprocess_dataset(raw, cache, given, num_workers=cfg.data.num_workers,
                                            progress=progress)
    if errors:
        raise jdata.DataError(f"{raw}: preprocessing failed for {len(errors)} case(s): "
                              + "; ".join(errors[:5]))
    plan = apply_plan_overrides(plan, cfg.data.plan_overrides)
    train_ids, val_ids = jdata.fold_cases(cache, cfg.data.fold)
    return plan, cache, train_ids, val_ids


# ---------------------------------------------------------------------- resume decision
def _checkpoint_epochs(run_dir: Path) -> list[int]:
    latest = run_dir / "checkpoints" / "latest"
    return sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) if latest.is_dir() \
        else []


def decide_resume(cfg: Config) -> bool:
    """Resume or start fresh, per `train.resume`; never overwrite another run's checkpoints."""
    run_dir = Path(cfg.train.run_dir)
    found = _checkpoint_epochs(run_dir)
    if found and cfg.train.resume is False:
        raise CheckpointError(f"train.run_dir = {run_dir} holds a checkpoint (epoch {found[-1]}) "
                              f"and train.resume=false: choose a new train.run_dir, or resume")
    if not found and cfg.train.resume is True:
        raise CheckpointError(f"train.resume=true but {run_dir} has no checkpoint to resume")
    return bool(found)


def _check_same_run(meta: dict, cfg: Config, plan: Plan | None, run_dir: Path) -> None:
    if meta.get("variant") != cfg.model.variant:
        raise CheckpointError(f"{run_dir}: its checkpoint is of variant {meta.get('variant')!r}, "
                              f"the config asks for {cfg.model.variant!r}; use another "
                              f"train.run_dir (nothing was changed)")
    # The data loader's state holds one iterator per worker and per process: exact resume needs
    # the same numbers (grain cannot restore it into another layout).
    workers = meta.get("config", {}).get("data", {}).get("num_workers")
    if workers is not None and workers != cfg.data.num_workers:
        raise CheckpointError(f"{run_dir}: its data-loader state is of data.num_workers={workers}, "
                              f"the config asks for {cfg.data.num_workers}; resume with "
                              f"data.num_workers={workers} (nothing was changed)")
    processes = meta.get("processes", 1)
    if processes != jax.process_count():
        raise CheckpointError(f"{run_dir}: its data-loader state is of {processes} process(es), "
                              f"this run has {jax.process_count()}; resume with as many")
    if plan is not None and meta.get("plan") != plan.to_record():
        raise CheckpointError(f"{run_dir}: its checkpoint was trained with another plan (see "
                              f"{run_dir / 'nnUNetPlans.json'}); use another train.run_dir or "
                              f"the same data.plans and data.plan_overrides")


# ---------------------------------------------------------------------- the run
def run(cfg: Config, *, max_epochs: int | None = None) -> dict[str, Any]:
    """Train as `cfg` says; returns a summary. `max_epochs` stops this call after that many
    epochs (the run resumes from there), e.g. for time-limited cluster jobs."""
    sharding.initialize_distributed()
    run_dir = Path(cfg.train.run_dir).absolute()
    main = jax.process_index() == 0
    say = functools.partial(print, flush=True) if main else (lambda *a, **k: None)

    # --- Resume or fresh; check the run directory before any work.
    resume = decide_resume(cfg)
    meta = {}
    if resume:
        peek = Checkpointer(run_dir)
        meta = peek.read_meta()
        peek.close()
        _check_same_run(meta, cfg, None, run_dir)

    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.spatial)
    if "batch_size" in cfg.data.plan_overrides:  # known before any preprocessing
        sharding.check_batch_size(int(cfg.data.plan_overrides["batch_size"]), mesh)

    # --- Data and plan.
    plan, cache, train_ids, val_ids = prepare_data(cfg, progress=main and cfg.log.progress)
    if resume:
        _check_same_run(meta, cfg, plan, run_dir)
    sharding.check_batch_size(plan.batch_size, mesh)
    check_patch_splits(plan.patch_size, plan.strides, cfg.mesh.spatial)
    local_batch = sharding.local_batch_size(plan.batch_size)
    class_names = [name for name, _ in plan.labels[1:]]
    ckpt = Checkpointer(run_dir)

    # --- Network, optimizer, state.
    t = cfg.train
    recipe = build_recipe(cfg.optim, epochs=t.epochs, iters_per_epoch=t.iters_per_epoch)
    model = build_model(cfg.model.variant, plan, precision=cfg.model.precision,
                        scan_implementation=cfg.model.scan_implementation, rngs=cfg.seed)
    graphdef, state = steps.init_state(model, recipe.tx)
    del model
    state = sharding.replicate(state, mesh)
    train_it = jdata.train_iterator(cache, plan, train_ids, seed=cfg.seed + 1,
                                    batch_size=local_batch, num_workers=cfg.data.num_workers,
                                    shard_index=jax.process_index())
    start_epoch, history, best_ema = 0, [], None
    if resume:
        params, train, data_state, meta = ckpt.restore(
            state.params, {"step": state.step, "rest": state.rest, "opt": state.opt_state})
        state = steps.TrainState(train["step"], params, train["rest"], train["opt"])
        train_it.set_state(data_state)
        start_epoch, history, best_ema = meta["epoch"], meta["history"], meta["best_ema"]
        say(f"resumed {run_dir} at epoch {start_epoch} (step {int(state.step)})")
        resolved = run_dir / "config.yaml"
        if resolved.is_file() and cfg.to_dict() != _read_yaml(resolved):
            save_config(cfg, run_dir / f"config.resumed-epoch{start_epoch}.yaml")
    else:
        save_config(cfg, run_dir / "config.yaml")
        if main:
            plan.save(run_dir / "nnUNetPlans.json")
    writer = RunWriter(run_dir, class_names, history=history, tensorboard=cfg.log.tensorboard,
                       plot=cfg.log.plot)

    end_epoch = t.epochs if max_epochs is None else min(t.epochs, start_epoch + max_epochs)
    if start_epoch >= end_epoch:
        say(f"{run_dir} has already trained {start_epoch} of {t.epochs} epochs; nothing to do")
        writer.close()
        ckpt.close()
        return _summary(run_dir, start_epoch, state, graphdef, plan, writer, best_ema)

    # --- Compile ahead, check memory.
    train_step, eval_step = steps.jit_steps(
        *steps.make_steps(graphdef, recipe.tx, batch_dice=plan.batch_dice), mesh)
    first = sharding.global_batch(next(train_it), mesh)
    t0 = time.perf_counter()
    compiled = train_step.lower(state, first).compile()
    say(f"compiled the train step in {time.perf_counter() - t0:.1f} s "
        f"({cfg.model.variant}, patch {list(plan.patch_size)}, batch {plan.batch_size} over "
        f"{mesh.shape[sharding.DATA_AXIS]} device(s) x {cfg.mesh.spatial} per sample, "
        f"{jax.devices()[0].device_kind})")
    if t.preflight:
        say(preflight.check_fits(preflight.estimate(compiled), plan, limit_gib=t.memory_limit_gib))

    # --- Train.
    throughput = _Throughput(plan.batch_size, say)
    step_no = int(state.step)  # host copy of the step counter
    t_run = time.perf_counter()
    try:
        for epoch in range(start_epoch, end_epoch):
            t_epoch = time.perf_counter()
            bar = tqdm(range(t.iters_per_epoch), desc=f"epoch {epoch + 1}/{t.epochs}",
                       disable=not (main and cfg.log.progress), dynamic_ncols=True)
            tally = _Tally(len(class_names))
            pending = None
            for _ in bar:
                batch = first if first is not None else sharding.global_batch(next(train_it),
                                                                              mesh)
                first = None
                state, metrics = compiled(state, batch)
                if pending is not None:  # read the previous step while this one runs
                    _consume(pending, tally, writer, bar, recipe, run_dir, ckpt)
                step_no += 1
                pending = (step_no, metrics)
                throughput.tick(metrics["loss"])
            _consume(pending, tally, writer, bar, recipe, run_dir, ckpt)
            throughput.report()
            bar.close()
            record = tally.record(epoch, step_no, recipe.lr(step_no - 1))
            if val_ids and t.val_iters:
                record.update(_validate(eval_step, state, cache, plan, val_ids, t.val_iters,
                                        local_batch, mesh))
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
            say(_epoch_line(record, class_names) + (f"; run ETA {_hms(eta)}" if eta else ""))
            ckpt.save(epoch + 1, params=state.params,
                      train={"step": state.step, "rest": state.rest, "opt": state.opt_state},
                      data_state=train_it.get_state(),
                      meta={"epoch": epoch + 1, "variant": cfg.model.variant,
                            "processes": jax.process_count(),
                            "plan": plan.to_record(), "history": writer.history,
                            "best_ema": best_ema, "config": cfg.to_dict()},
                      best=record.get("best", False))
    except KeyboardInterrupt:
        ckpt.wait()
        say(f"\ninterrupted; the last complete epoch is saved in {run_dir}. Run the same "
            f"command again to resume.")
        raise
    finally:
        ckpt.wait()
        writer.close()
    ckpt.close()
    summary = _summary(run_dir, end_epoch, state, graphdef, plan, writer, best_ema)
    if end_epoch == t.epochs:
        if t.final_validation and jax.process_count() == 1:
            t0 = time.perf_counter()
            model = validate.merged_model(graphdef, state.params, state.rest)
            results = validate.final_validation(model, plan, cfg.data.raw_dir, val_ids, run_dir,
                                                mesh=mesh, progress=main and cfg.log.progress)
            say(validate.format_results(results)
                + f"\n(sliding-window validation took {time.perf_counter() - t0:.0f} s; "
                  f"predictions and summary.json in {run_dir / validate.FOLDER})")
            summary["final_validation"] = results
        say(f"done: {run_dir} (checkpoints in {ckpt.dir}, curves.png, metrics.jsonl)")
    return summary


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
    """Sums of one epoch's step metrics (host side)."""

    def __init__(self, n_classes: int):
        self.n, self.loss, self.grad_norm = 0, 0.0, 0.0
        self.counts = np.zeros((3, n_classes))

    def add(self, m: dict) -> None:
        self.n += 1
        self.loss += float(m["loss"])
        self.grad_norm += float(m["grad_norm"])
        self.counts += np.asarray(m["counts"])

    def dice(self) -> np.ndarray:
        return losses.pseudo_dice(self.counts)

    def record(self, epoch: int, step: int, lr) -> dict:
        return {"epoch": epoch, "step": step, "train_loss": self.loss / max(self.n, 1),
                "train_dice": _nan_to_none(self.dice()), "lr": float(lr),
                "grad_norm": self.grad_norm / max(self.n, 1)}


def _consume(pending, tally: _Tally, writer: RunWriter, bar, recipe, run_dir: Path, ckpt):
    step_no, metrics = pending  # metrics of step number `step_no` (1-based)
    m = jax.device_get(metrics)
    loss = float(m["loss"])
    if not math.isfinite(loss):
        last = ckpt.latest_epoch()
        kept = f"epoch {last} in {ckpt.dir}" if last is not None else "none written yet"
        raise NonFiniteLossError(
            f"the loss became {loss} at step {step_no}; training stopped. The last good "
            f"checkpoint is kept ({kept}). Try a lower optim.lr, model.precision=float32, or "
            f"check the data (jaxmamba check {run_dir})")
    tally.add(m)
    lr = float(recipe.lr(step_no - 1))
    writer.scalars(step_no, {"loss": loss, "lr": lr, "grad_norm": float(m["grad_norm"]),
                                    "param_norm": float(m["param_norm"]),
                                    "update_norm": float(m["update_norm"])})
    dice = tally.dice()
    bar.set_postfix(loss=f"{tally.loss / tally.n:.4f}",
                    dice=f"{np.nanmean(dice):.3f}" if np.isfinite(dice).any() else "-",
                    lr=f"{lr:.2e}", refresh=False)


def _validate(eval_step, state, cache, plan, val_ids, n_batches, local_batch, mesh) -> dict:
    """nnU-Net's online validation: summed tp/fp/fn over `n_batches` fixed validation patches."""
    counts, loss, n = 0.0, 0.0, 0
    # each process draws its own share of the global batch (seed 0 on one process)
    for b in jdata.val_iterator(cache, plan, val_ids, num_batches=n_batches,
                                batch_size=local_batch, seed=jax.process_index()):
        m = jax.device_get(eval_step(state, sharding.global_batch(b, mesh)))
        counts, loss, n = counts + np.asarray(m["counts"]), loss + float(m["loss"]), n + 1
    dice = losses.pseudo_dice(counts)
    mean = float(np.nanmean(dice)) if np.isfinite(dice).any() else None
    return {"val_loss": loss / max(n, 1), "val_dice": _nan_to_none(dice), "val_dice_mean": mean}


class _Throughput:
    """Prints the speed of the steps after the first, once, after `THROUGHPUT_STEPS` of them
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
        self.say(f"\nthroughput: {1 / dt:.2f} steps/s ({1000 * dt:.0f} ms per step, "
                 f"{self.batch_size / dt:.1f} patches/s) over steps 2-{self.n}")


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _epoch_line(r: dict, class_names: list[str]) -> str:
    line = (f"epoch {r['epoch'] + 1}: train loss {r['train_loss']:.4f}, lr {r['lr']:.3g}, "
            f"{r['epoch_seconds']:.1f} s")
    if "val_loss" in r:
        dice = ", ".join(f"{n} {d:.3f}" if d is not None else f"{n} -"
                         for n, d in zip(class_names, r["val_dice"], strict=True))
        line += f"; val loss {r['val_loss']:.4f}, pseudo-Dice {dice}"
        if r.get("val_dice_ema") is not None:
            line += f" (EMA {r['val_dice_ema']:.4f}{', best' if r.get('best') else ''})"
    return line


def _nan_to_none(values) -> list:
    return [None if not math.isfinite(float(v)) else float(v) for v in values]


def _read_yaml(path: Path) -> dict:
    import yaml
    return yaml.safe_load(path.read_text())


