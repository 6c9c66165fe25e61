r"""Prediction benchmark: one CT-sized case (147×512×512) at the Synapse plan, with and without
mirroring, on one GPU (issue 7; results in docs/benchmarks.md).

Run on a GPU machine from the repository root:

    python benchmarks/predict.py --variant segmamba --json predict.json

It builds the network from the reference's `Dataset090_SynapseAbdomen.nnUNetPlans.json` (in the
reference fixtures folder, README "Development"; patch 48×192×192; random weights: timing does
not depend on them), warms up (compiles) on one
window, then times `predict_logits` over a random preprocessed volume of `--shape` (default
147×512×512, the plan's median image) end to end: window gathering, the network, mirroring,
Gaussian accumulation on the device and the transfer of the logits to the host. The network runs
in bf16 convolutions with the Mamba path in float32 (`--precision float32` to change), as the
reference predicts under fp16 autocast. Also reports the median time of one network call on one
window. Neither grain nor nibabel is imported. Never run in CI.

With nnunetv2 installed (and `--variant plainconvunet` or `resencunet`), it also times nnU-Net's
own predictor (`nnUNetPredictor.predict_sliding_window_return_logits`, its defaults: float16
accumulation buffers, Gaussian, the same step and mirroring) on the same volume with the same
network and weights (jaxmamba's exported into dynamic-network-architectures' class), each
`--repeats` times back to back, alternating, and reports medians per window, wall time and the
process's CPU time of all its threads (the fairer measure on a loaded machine). On a CPU:

    python benchmarks/predict.py --variant plainconvunet --plans HIPPOCAMPUS/nnUNetPlans.json \
        --shape 54 75 52 --precision float32 --repeats 5
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
from jaxmamba.infer.sliding_window import (  # noqa: E402
    WindowOptions,
    compute_steps,
    predict_logits,
)
from jaxmamba.models import build_model  # noqa: E402
from jaxmamba.ops.mesh import make_mesh  # noqa: E402
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
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (median)")
    p.add_argument("--nnunet", choices=("auto", "on", "off"), default="auto",
                   help="also time nnU-Net's predictor (auto: when nnunetv2 is installed and the "
                        "variant is one of its networks)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args()

    plan = Plan.load(args.plans)
    if args.patch:
        plan = plan.replace(patch_size=tuple(args.patch))
    mesh = make_mesh(1)
    model = build_model(args.variant, plan, precision=args.precision, deep_supervision=False)
    nnunet = _nnunet_predictor_factory(args, model, plan)
    apply_fn = network_apply_fn(model, mesh)
    patch, k = plan.patch_size, plan.num_classes
    n_windows = math.prod(len(s) for s in compute_steps(np.maximum(args.shape, patch), patch))

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

    channels = plan.num_input_channels
    image = np.random.default_rng(1).normal(size=(*args.shape, channels)).astype(np.float32)
    results = {"variant": args.variant, "precision": args.precision, "patch": list(patch),
               "shape": list(args.shape), "windows": n_windows, "batch_size": args.batch_size,
               "network_call_ms": per_call * 1e3, "device": jax.devices()[0].device_kind,
               "jax": jax.__version__, "date": datetime.date.today().isoformat(),
               "repeats": args.repeats}
    for mirror in ("off", "on") if args.mirror == "both" else (args.mirror,):
        axes = (0, 1, 2) if mirror == "on" else None
        # warm-up on a patch-sized volume compiles gathering and accumulation for this patch
        window = WindowOptions(mirror_axes=axes, batch_size=args.batch_size, mesh=mesh)
        predict_logits(apply_fn, image[: patch[0], : patch[1], : patch[2]], patch, num_classes=k,
                       window=window)
        runs = {"jaxmamba": lambda window=window: predict_logits(
            apply_fn, image, patch, num_classes=k, window=window,
            progress="predict" if args.repeats == 1 else False)}
        if nnunet is not None:
            predictor = nnunet(mirror == "on")
            x = nnunet.torch.from_numpy(np.ascontiguousarray(np.moveaxis(image, -1, 0)))
            predictor.predict_sliding_window_return_logits(x[:, : patch[0], : patch[1],
                                                             : patch[2]])  # warm-up
            runs["nnunet"] = lambda p=predictor, x=x: p.predict_sliding_window_return_logits(x)
        seconds = {name: [] for name in runs}
        cpu_seconds = {name: [] for name in runs}
        for _ in range(args.repeats):  # back to back, alternating: both see the same load
            for name, fn in runs.items():
                t, c = time.perf_counter(), time.process_time()
                out = fn()
                seconds[name].append(time.perf_counter() - t)
                cpu_seconds[name].append(time.process_time() - c)
                assert np.isfinite(np.asarray(out, np.float32)).all(), name
        for name, values in seconds.items():
            med = float(np.median(values))
            results[f"{name}_mirror_{mirror}_s"] = med
            results[f"{name}_mirror_{mirror}_all_s"] = values
            cpu = float(np.median(cpu_seconds[name]))
            results[f"{name}_mirror_{mirror}_cpu_s"] = cpu
            print(f"{name}, mirroring {mirror}: {med:.2f} s for {n_windows} windows, "
                  f"{med / n_windows * 1e3:.0f} ms per window (median of {len(values)}: "
                  f"{', '.join(f'{v:.2f}' for v in values)} s); CPU time (all threads) "
                  f"{cpu:.2f} s, {cpu / n_windows * 1e3:.0f} ms per window")
    print(json.dumps(results, indent=1))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")


#: jaxmamba variants that are dynamic-network-architectures' own networks, as nnU-Net names them.
DNA_CLASSES = {"plainconvunet": "PlainConvUNet", "resencunet": "ResidualEncoderUNet"}


def _nnunet_predictor_factory(args, model, plan):
    """`make(use_mirroring) -> nnUNetPredictor` on CPU holding `model`'s weights in DNA's class,
    with `.torch`; None when nnU-Net is not timed."""
    if args.nnunet == "off" or (args.nnunet == "auto" and args.variant not in DNA_CLASSES):
        return None
    try:
        import torch
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
        from nnunetv2.utilities.get_network_from_plans import get_network_from_plans
        from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    except ImportError:
        if args.nnunet == "on":
            raise
        print("nnunetv2 is not installed: timing jaxmamba only")
        return None
    if args.variant not in DNA_CLASSES or args.precision != "float32":
        raise SystemExit(f"--nnunet on needs --variant in {sorted(DNA_CLASSES)} and --precision "
                         f"float32 (nnU-Net does not autocast on a CPU)")
    from jaxmamba.interop.torch import export_state_dict

    plans, dataset = plan.to_nnunet()
    cfg = plans["configurations"]["3d_fullres"]
    cfg["UNet_class_name"] = DNA_CLASSES[args.variant]
    pm = PlansManager(plans)
    cm = pm.get_configuration("3d_fullres")  # converts to the 2.4+ layout
    arch = cm.configuration["architecture"]
    arch["network_class_name"] = (
        f"dynamic_network_architectures.architectures.unet.{DNA_CLASSES[args.variant]}")
    network = get_network_from_plans(arch["network_class_name"], arch["arch_kwargs"],
                                     arch["_kw_requires_import"], plan.num_input_channels,
                                     plan.num_classes, deep_supervision=False)
    weights = {k: torch.from_numpy(np.array(v)) for k, v in export_state_dict(model).items()}
    network.load_state_dict(weights)
    torch.set_num_threads(os.cpu_count() or 1)

    def make(use_mirroring: bool):
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True,
                                    use_mirroring=use_mirroring, perform_everything_on_device=False,
                                    device=torch.device("cpu"), allow_tqdm=args.repeats == 1)
        predictor.manual_initialization(network, pm, cm, [weights], dataset, "nnUNetTrainer",
                                        (0, 1, 2))
        return predictor

    make.torch = torch
    return make


if __name__ == "__main__":
    main()
