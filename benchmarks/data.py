"""Data pipeline throughput: patches per second per worker with nnU-Net's full augmentation chain.

Setting (issue 5): the reference's Synapse plan (README "Development"; patch 48x192x192, dummy-2D
augmentation, initial patch 48x225x225, 14 labels), CT-sized cached cases of 147x512x512
(synthetic: smooth noise with 13 organ-like blobs; the cost of sampling and augmentation does
not depend on the anatomy; `--plans` and `--shape` measure other settings). Reports the mean
time per patch in one process, the same with every random transform forced on (the worst case),
the throughput of `train_iterator` with N worker processes, and the workers needed to feed a
train step of `--step-ms` at batch 2.

    python benchmarks/data.py [--patches 40] [--workers 2] [--step-ms 550]
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

SHAPE = (147, 512, 512)
PLANS = (Path(__file__).resolve().parents[2] / "shared" / "reference" / "plans" /
         "Dataset090_SynapseAbdomen.nnUNetPlans.json")


def write_case(cache: Path, case_id: str, rng: np.random.Generator, shape=SHAPE,
               channels: int = 1) -> None:
    from jaxmamba.data.io import save_npy, write_json
    from jaxmamba.data.preprocess import case_paths, class_locations
    p = case_paths(cache, case_id)
    p["data"].parent.mkdir(parents=True, exist_ok=True)
    data = np.empty((channels, *shape), np.float32)
    for c in range(channels):
        coarse = rng.normal(size=[s // 8 + 1 for s in shape])
        data[c] = ndimage.zoom(coarse, [s / n for s, n in zip(shape, coarse.shape, strict=True)],
                               order=1)
    seg = np.zeros(shape, np.int8)
    grid = np.ogrid[tuple(slice(0, s) for s in shape)]
    for label in range(1, 14):
        centre = [rng.integers(s // 5, 4 * s // 5) for s in shape]
        radius = [rng.integers(5, s // 8) for s in shape]
        dist = sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radius, strict=True))
        seg[dist < 1] = label
    table, index = class_locations(seg)
    save_npy(p["data"], data)
    save_npy(p["seg"], seg)
    save_npy(p["fg"], table)
    write_json(p["props"], {"case_id": case_id, "class_locations": index})


def time_sampler(sampler, n: int) -> tuple[float, float]:
    """`(wall, CPU)` seconds per patch over `n` patches (positions alternate 0, 1 as in a batch of
    2). CPU time is what one dedicated core needs; wall time grows when cores are shared."""
    rng = np.random.default_rng(0)
    sampler.random_map(0, rng)  # open the memory maps
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(n):
        sampler.random_map(i % 2, rng)
    return (time.perf_counter() - wall) / n, (time.process_time() - cpu) / n


def main() -> None:
    from jaxmamba.data.augment import AugmentConfig
    from jaxmamba.data.pipeline import PatchSampler, train_iterator
    from jaxmamba.plans import Plan

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patches", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--step-ms", type=float, default=550.0)
    parser.add_argument("--plans", default=str(PLANS))
    parser.add_argument("--shape", type=int, nargs=3, default=SHAPE, help="case shape")
    args = parser.parse_args()

    plan = Plan.load(args.plans)
    cfg = AugmentConfig.for_plan(plan)
    always = dataclasses.replace(cfg, p_rotation=1, p_scale=1, p_noise=1, p_blur=1, p_brightness=1,
                                 p_contrast=1, p_lowres=1, p_gamma_inverted=1, p_gamma=1)
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{os.cpu_count()} cores ({platform.machine()}), load average {load}; plan "
          f"{plan.dataset_name}, patch {list(plan.patch_size)}, initial "
          f"{list(cfg.initial_patch_size())}, dummy 2D {cfg.dummy_2d}, cases {list(args.shape)}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        rng = np.random.default_rng(0)
        ids = ["case_0", "case_1"]
        for case_id in ids:
            write_case(cache, case_id, rng, tuple(args.shape), plan.num_input_channels)
        rows = []
        for name, c in (("nnU-Net probabilities", cfg), ("every transform on", always),
                        ("no augmentation", None)):
            wall, cpu = time_sampler(PatchSampler(cache, ids, plan, 2, c), args.patches)
            rows.append((name, cpu))
            print(f"1 process, {name:22s}: CPU {1000 * cpu:7.1f} ms/patch = {1 / cpu:6.2f} "
                  f"patches/s per core (wall {1000 * wall:7.1f} ms)")
        need = 2 / (args.step_ms / 1000)
        per_worker = 1 / rows[0][1]
        print(f"a {args.step_ms:.0f} ms step at batch 2 needs {need:.2f} patches/s: "
              f"{math.ceil(need / per_worker)} worker(s) on dedicated cores")
        if args.workers:
            it = train_iterator(cache, plan, ids, seed=0, batch_size=2, num_workers=args.workers)
            next(it)
            n = max(4, args.patches // 4)
            start = time.perf_counter()
            for _ in range(n):
                next(it)
            rate = 2 * n / (time.perf_counter() - start)
            print(f"train_iterator, {args.workers} workers: {rate:.2f} patches/s")


if __name__ == "__main__":
    main()
