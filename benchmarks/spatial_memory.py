"""Compiled memory per device of one train step with the volume split over `spatial` devices.

    python benchmarks/spatial_memory.py --variant segmamba --patch 32 32 32 --spatial 1 2 4 \
        --json $OUT/spatial_memory.json

For each `spatial` size, compiles the real train step (`jaxmamba.train.step`, DC+CE on the
full-resolution output, SGD) of a small plan (`--features`, `--stages`, strides 2) on a
mesh `(data=1, spatial)` and prints XLA's `memory_analysis()` per device: arguments (the state,
replicated, plus this device's block of the batch), temporaries (activations and work arrays:
what spatial parallelism divides) and the all-reduce/all-to-all/collective-permute/all-gather
counts of the program. On CPU it needs `XLA_FLAGS=--xla_force_host_platform_device_count=4` (set
here when unset). Times one step too with `--time` (use a GPU for numbers that mean anything).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                               + " --xla_force_host_platform_device_count=4").strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from jaxmamba.layers import MambaOptions  # noqa: E402
from jaxmamba.models import VARIANTS, build_model  # noqa: E402
from jaxmamba.ops.mesh import check_patch_splits, make_mesh  # noqa: E402
from jaxmamba.plans import Plan  # noqa: E402
from jaxmamba.train import sharding, step  # noqa: E402

COLLECTIVES = ("all-reduce", "all-to-all", "collective-permute", "all-gather")


def tiny_plan(patch, features, stages) -> Plan:
    strides = ((1, 1, 1),) + ((2, 2, 2),) * (stages - 1)
    return Plan(dataset_name="bench", patch_size=tuple(patch), batch_size=1,
                spacing=(1.0, 1.0, 1.0), normalization_schemes=("ZScoreNormalization",),
                use_mask_for_norm=(False,), strides=strides, kernel_sizes=((3, 3, 3),) * stages,
                n_blocks_encoder=(1,) * stages, n_blocks_decoder=(1,) * (stages - 1),
                channel_names=("MRI",), labels=(("background", 0), ("a", 1), ("b", 2)),
                base_num_features=features, max_num_features=features * 4, batch_dice=True)


def measure(variant: str, plan: Plan, spatial: int, scan: str | None, timed: bool) -> dict:
    check_patch_splits(plan.patch_size, plan.strides, spatial, devices=jax.device_count())
    mesh = make_mesh(1, spatial)
    tx = optax.sgd(1e-3)
    model = build_model(variant, plan, deep_supervision=False, mamba=MambaOptions(scan),
                        rngs=0)
    graphdef, state = step.init_state(model, tx)
    train, _ = step.jit_steps(*step.make_steps(graphdef, tx, batch_dice=True), mesh)
    rng = np.random.default_rng(0)
    shape = (plan.batch_size, *plan.patch_size)
    batch = {"image": rng.normal(size=(*shape, 1)).astype(np.float32),
             "target": (rng.integers(0, 3, shape).astype(np.int32),)}
    state, batch = sharding.replicate(state, mesh), sharding.global_batch(batch, mesh)
    t0 = time.perf_counter()
    compiled = train.lower(state, batch).compile()
    row = {"variant": variant, "patch": list(plan.patch_size), "spatial": spatial,
           "compile_s": round(time.perf_counter() - t0, 1)}
    mem = compiled.memory_analysis()
    row.update(argument_mib=mem.argument_size_in_bytes / 2**20,
               temp_mib=mem.temp_size_in_bytes / 2**20,
               output_mib=mem.output_size_in_bytes / 2**20)
    hlo = compiled.as_text()
    row.update({c: len(re.findall(rf"= \S+ {c}(-start)?\(", hlo)) for c in COLLECTIVES})
    if timed:
        state, _ = compiled(state, batch)
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        row["step_s"] = time.perf_counter() - t0
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--variant", default="segmamba", choices=sorted(VARIANTS))
    p.add_argument("--patch", type=int, nargs=3, default=(32, 32, 32))
    p.add_argument("--features", type=int, default=8, help="features of the first stage")
    p.add_argument("--stages", type=int, default=3)
    p.add_argument("--spatial", type=int, nargs="+", default=(1, 2, 4))
    p.add_argument("--scan", default=None, help="scan implementation (default: fastest)")
    p.add_argument("--time", action="store_true", help="also time one step")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    plan = tiny_plan(args.patch, args.features, args.stages)
    rows = []
    for n in args.spatial:
        row = measure(args.variant, plan, n, args.scan, args.time)
        rows.append(row)
        print(json.dumps(row), flush=True)
    base = rows[0]["temp_mib"]
    for row in rows:
        print(f"spatial={row['spatial']}: temporaries {row['temp_mib']:.1f} MiB per device "
              f"({row['temp_mib'] / base:.2f} of spatial={rows[0]['spatial']}), arguments "
              f"{row['argument_mib']:.1f} MiB")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
