"""Prediction benchmark: one CT-sized case (147×512×512) at the Synapse plan, with and without
mirroring, on one GPU (issue 7, DESIGN §9).

Run on a GPU machine from the repository root:

    python benchmarks/predict.py --variant segmamba --json predict.json

It builds the network from `../shared/reference/plans/Dataset090_SynapseAbdomen.nnUNetPlans.json`
(patch 48×192×192; random weights: timing does not depend on them), warms up (compiles) on one
window, then times `predict_logits` over a random preprocessed volume of `--shape` (default
147×512×512, the plan's median image) end to end: window gathering, the network, mirroring,
Gaussian accumulation on the device and the transfer of the logits to the host. The network runs
in bf16 convolutions with the Mamba path in float32 (`--precision float32` to change), as the
reference predicts under fp16 autocast. Also reports the median time of one network call on one
window. Neither grain nor nibabel is imported. Never run in CI.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import jax
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmamba.infer.network import network_apply_fn  # noqa: E402
from jaxmamba.infer.sliding_window import compute_steps, data_mesh, predict_logits  # noqa: E402
from jaxmamba.models import build_model  # noqa: E402
from jaxmamba.plans import Plan  # noqa: E402

SHARED = Path(os.environ.get("JAXMAMBA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SYNAPSE = SHARED / "reference" / "plans" / "Dataset090_SynapseAbdomen.nnUNetPlans.json"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variant", default="segmamba")
    p.add_argument("--plans", type=Path, default=SYNAPSE)
    p.add_argument("--shape", type=int, nargs=3, default=(147, 512, 512))
    p.add_argument("--patch", type=int, nargs=3, default=None, help="override the plan's patch")
    p.add_argument("--precision", default="bf16", choices=("float32", "bf16"))
    p.add_argument("--batch-size", type=int, default=1, help="windows per network call")
    p.add_argument("--mirror", choices=("both", "on", "off"), default="both")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    plan = Plan.load(args.plans)
    if args.patch:
        plan = plan.replace(patch_size=tuple(args.patch))
    mesh = data_mesh(jax.devices()[:1])
    model = build_model(args.variant, plan, precision=args.precision, deep_supervision=False)
    apply_fn = network_apply_fn(model, mesh)
    patch, k = plan.patch_size, plan.num_classes
    n_windows = math.prod(len(s) for s in compute_steps(args.shape, patch))

    window = np.random.default_rng(0).normal(size=(args.batch_size, *patch, 1)).astype(np.float32)
    apply_fn(window).block_until_ready()  # compile the network
    times = []
    for _ in range(5):
        t = time.perf_counter()
        apply_fn(window).block_until_ready()
        times.append(time.perf_counter() - t)
    per_call = float(np.median(times))
    print(f"{args.variant}: one network call ({args.batch_size} window(s) of {list(patch)}): "
          f"{per_call * 1e3:.1f} ms")

    image = np.random.default_rng(1).normal(size=(*args.shape, 1)).astype(np.float32)
    results = {"variant": args.variant, "precision": args.precision, "patch": list(patch),
               "shape": list(args.shape), "windows": n_windows, "batch_size": args.batch_size,
               "network_call_ms": per_call * 1e3, "device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "date": datetime.date.today().isoformat()}
    for mirror in ("off", "on") if args.mirror == "both" else (args.mirror,):
        axes = (0, 1, 2) if mirror == "on" else None
        # warm-up on a patch-sized volume compiles gathering and accumulation for this patch
        predict_logits(apply_fn, image[: patch[0], : patch[1], : patch[2]], patch, num_classes=k,
                       mirror_axes=axes, batch_size=args.batch_size, mesh=mesh)
        t = time.perf_counter()
        logits = predict_logits(apply_fn, image, patch, num_classes=k, mirror_axes=axes,
                                batch_size=args.batch_size, mesh=mesh, progress="predict")
        seconds = time.perf_counter() - t
        assert np.isfinite(logits).all()
        results[f"mirror_{mirror}_s"] = seconds
        print(f"mirroring {mirror}: {seconds:.1f} s for {n_windows} windows "
              f"({seconds / n_windows / (8 if axes else 1) * 1e3:.1f} ms per network pass)")
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
