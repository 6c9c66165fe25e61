"""Training (README "Training"): `jaxmamba.train.loop.run(config)` behind `python train.py CONFIG`.

- `losses`: nnU-Net DC+CE with deep supervision, confusion counts for the pseudo-Dice.
- `optim`: the reference recipes as optax chains with per-epoch torch schedules.
- `step`: train state and the pure train/eval steps; `sharding`: the batch and the state on the
  mesh (`jaxmamba.ops.mesh`, 1..N devices); `data`: the run's dataset, plan and split.
- `checkpoint`: the train state's orbax checkpoints (`latest`, `best`, `preempted`; the run
  directory's layout is `jaxmamba.rundir`'s); `resume`: resume or start fresh, decided once;
  `preflight`: the compiled memory check; `finite`: no checkpoint of NaN; `signals`: stop at a
  step boundary; `epoch`: an epoch's tallies, online validation and best EMA; `writers`:
  metrics.jsonl, TensorBoard, curves.png; `validate`: the sliding-window validation at the end;
  `loop`: `run` (its command line is `jaxmamba.cli.train`).

Submodules are imported on use (the loop needs the networks and the data pipeline).
"""
