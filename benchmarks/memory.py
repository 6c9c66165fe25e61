"""Memory of the five networks and of each Mamba layer kind at an nnU-Net plan's stage shapes.

On any machine (a CPU is enough: nothing is compiled or run), the bytes each forward keeps for
the backward, per `model.remat` choice (`jaxmamba.layers.remat.saved_bytes`, the residuals of the
VJP's jaxpr beyond parameters and input):

    python benchmarks/memory.py PLANS.json --batch 2 --patch 48 192 192 --json $OUT/memory.jsonl

`--compile` (on a GPU) instead compiles forward + backward of each network (cross-entropy on the
full-resolution output, as `jaxmamba.train.preflight.memory_preflight`), prints its
`memory_analysis` total, runs it on random data and reads the device's peak
(`peak_bytes_in_use`) and its time. Each network and remat runs in its own process, so that
every peak is its own:

    python benchmarks/memory.py PLANS.json --batch 2 --patch 48 192 192 --compile \\
        --json $OUT/memory_gpu.jsonl

Defaults: bf16 convolutions, the Pallas scan (tracing it works on a CPU, its kernels are never
run there), every network, every remat choice.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from jaxmamba.choices import REMAT  # noqa: E402
from jaxmamba.layers import MambaLayer, MambaOptions, MultiMambaTrans, d_state_for  # noqa: E402
from jaxmamba.layers.remat import saved_bytes  # noqa: E402
from jaxmamba.models import VARIANTS, build_model  # noqa: E402
from jaxmamba.plans import Plan  # noqa: E402
from jaxmamba.train.preflight import (  # noqa: E402
    abstract_batch,
    compile_forward_backward,
    estimate,
)

GIB = 2**30
#: Layer kinds: (module, d_state cap) as the networks build them (jaxmamba.models.build).
LAYERS = {
    "MambaLayer uni (SegMamba)": (lambda c, **kw: MambaLayer(c, bidirectional=False, **kw), 256),
    "MambaLayer bi (BiSegMamba, SegMambaSkip)": (
        lambda c, **kw: MambaLayer(c, bidirectional=True, **kw), 256),
    "MultiMambaTrans (MultiSegMamba)": (lambda c, **kw: MultiMambaTrans(c, **kw), 64),
}
#: The issue's CPU goal for "network minus resencunet" (GiB), Synapse plan, batch 2, 48x192x192.
GOALS = {"segmamba": 4, "bisegmamba": 8, "segmambaskip": 8, "multisegmamba": 16}


def _functional(module: nnx.Module):
    """`(f(params, x), params)` of a module: what `jax.vjp` differentiates."""
    graphdef, params, rest = nnx.split(module, nnx.Param, ...)
    return (lambda p, x: nnx.merge(graphdef, p, rest)(x)), params


def network_saved(variant: str, plan: Plan, args, remat: str) -> int:
    model = nnx.eval_shape(lambda: build_model(variant, plan, precision=args.precision,
                                               mamba=MambaOptions(args.scan, remat)))
    f, params = _functional(model)
    return saved_bytes(f, params, abstract_batch(plan, plan.batch_size)[0])


def stage_shapes(plan: Plan) -> list[tuple[int, tuple[int, ...]]]:
    """`(channels, (B, S0, S1, S2))` of each encoder stage's output."""
    shapes, spatial = [], list(plan.patch_size)
    for c, stride in zip(plan.features_per_stage, plan.strides, strict=True):
        spatial = [s // t for s, t in zip(spatial, stride, strict=True)]
        shapes.append((c, (plan.batch_size, *spatial)))
    return shapes


def layer_saved(kind: str, channels: int, shape, args, remat: str) -> int:
    make, cap = LAYERS[kind]
    layer = nnx.eval_shape(lambda: make(channels, d_state=d_state_for(channels, cap),
                                        options=MambaOptions(args.scan, remat),
                                        rngs=nnx.Rngs(0)))
    f, params = _functional(layer)
    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32  # what the convs hand on
    return saved_bytes(f, params, jax.ShapeDtypeStruct((*shape, channels), dtype))


def traced(plan: Plan, args) -> list[dict]:
    rows = []
    base = {"dataset": plan.dataset_name, "patch": list(plan.patch_size),
            "batch": plan.batch_size, "precision": args.precision, "scan": args.scan,
            "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"\nSaved for the backward (GiB), {plan.dataset_name}, batch {plan.batch_size}, patch "
          f"{list(plan.patch_size)}, {args.precision} convolutions, {args.scan} scan, traced")
    print("| network | " + " | ".join(f"remat={r}" for r in args.remat)
          + " | minus resencunet (" + ", ".join(args.remat) + ") | goal |")
    print("|---" * (len(args.remat) + 3) + "|")
    unet = network_saved("resencunet", plan, args, "none")
    for variant in args.variants:
        remats = ("none",) if variant == "resencunet" else args.remat
        saved = {r: unet if variant == "resencunet" else network_saved(variant, plan, args, r)
                 for r in remats}
        for r, b in saved.items():
            rows.append({**base, "kind": "network", "name": variant, "remat": r,
                         "saved_GiB": b / GIB, "minus_resencunet_GiB": (b - unet) / GIB})
        cells = [f"{saved[r] / GIB:.2f}" if r in saved else "" for r in args.remat]
        above = [f"{(saved[r] - unet) / GIB:.2f}" for r in args.remat if r in saved]
        goal = GOALS.get(variant)
        print(f"| {variant} | " + " | ".join(cells) + f" | {' / '.join(above)} | "
              + (f"≤ {goal}" if goal else "") + " |", flush=True)
    if not args.layers:
        return rows
    print(f"\nOne layer, saved for the backward (GiB) beyond its input, at each stage's shape; "
          f"remat {' / '.join(args.remat)}")
    shapes = stage_shapes(plan)
    print("| layer | " + " | ".join(f"stage {s}: {c}×{list(sh[1:])}"
                                     for s, (c, sh) in enumerate(shapes)) + " |")
    print("|---" * (len(shapes) + 1) + "|")
    for kind in LAYERS:
        cells = []
        for s, (c, shape) in enumerate(shapes):
            per = {r: layer_saved(kind, c, shape, args, r) for r in args.remat}
            for r, b in per.items():
                rows.append({**base, "kind": "layer", "name": kind, "stage": s, "channels": c,
                             "shape": list(shape), "remat": r, "saved_GiB": b / GIB})
            cells.append(" / ".join(f"{b / GIB:.2f}" for b in per.values()))
        print(f"| {kind} | " + " | ".join(cells) + " |", flush=True)
    return rows


def compiled_row(variant: str, remat: str, plan: Plan, args) -> dict:
    """Compiled forward + backward of one network: XLA's estimate, then the measured peak and
    time of running it on random data (median of `args.steps` after one warm-up)."""
    model = build_model(variant, plan, precision=args.precision,
                        mamba=MambaOptions(args.scan, remat))
    compiled = compile_forward_backward(model, plan, plan.batch_size)
    est = estimate(compiled)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    del model, graphdef
    image_s, labels_s = abstract_batch(plan, plan.batch_size)
    k1, k2 = jax.random.split(jax.random.key(0))
    image = jax.random.normal(k1, image_s.shape, image_s.dtype)
    labels = jax.random.randint(k2, labels_s.shape, 0, plan.num_classes)
    times = []
    for i in range(1 + args.steps):
        t0 = time.perf_counter()
        loss, grads = compiled(params, rest, image, labels)
        jax.block_until_ready((loss, grads))
        if i:
            times.append(time.perf_counter() - t0)
        del grads
    mem = jax.devices()[0].memory_stats() or {}
    peak = mem.get("peak_bytes_in_use")
    return {"kind": "compiled", "name": variant, "remat": remat, "dataset": plan.dataset_name,
            "patch": list(plan.patch_size), "batch": plan.batch_size,
            "precision": args.precision, "scan": args.scan,
            "compiled_GiB": est.total / GIB if est else None,
            "peak_GiB": peak / GIB if peak is not None else None,
            "fwd_bwd_ms": 1e3 * statistics.median(times),
            "device": jax.devices()[0].device_kind, "jax": jax.__version__,
            "date": time.strftime("%Y-%m-%d")}


def compiled(args) -> list[dict]:
    """Every (network, remat) in a child process of this script (`--one`)."""
    rows = []
    print("| network | remat | compiled fwd+bwd | measured peak | fwd+bwd ms | device |")
    print("|---|---|---|---|---|---|")
    for variant in args.variants:
        for remat in ("none",) if variant == "resencunet" else args.remat:
            cmd = [sys.executable, __file__, str(args.plans), "--one", variant, remat,
                   "--batch", str(args.batch), "--precision", args.precision, "--scan", args.scan,
                   "--steps", str(args.steps), *(["--patch", *map(str, args.patch)]
                                                 if args.patch else [])]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                tail = (out.stderr or out.stdout).strip().splitlines()[-1:]
                print(f"| {variant} | {remat} | failed: {tail} | | | |", flush=True)
                continue
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            fmt = lambda v: "n/a" if v is None else f"{v:.2f} GiB"  # noqa: E731
            print(f"| {variant} | {remat} | {fmt(row['compiled_GiB'])} | {fmt(row['peak_GiB'])} "
                  f"| {row['fwd_bwd_ms']:.0f} | {row['device']} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("plans", type=Path, help="nnUNetPlans.json (dataset.json beside it)")
    parser.add_argument("--patch", type=int, nargs=3, help="patch size (default: the plan's)")
    parser.add_argument("--batch", type=int, help="batch size (default: the plan's)")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="bf16")
    parser.add_argument("--scan", choices=["xla", "pallas", "reference"], default="pallas")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--remat", nargs="+", choices=REMAT, default=list(REMAT))
    parser.add_argument("--layers", action=argparse.BooleanOptionalAction, default=True,
                        help="also each layer kind at each stage shape (traced mode)")
    parser.add_argument("--compile", action="store_true",
                        help="compile and run forward + backward on this machine's device")
    parser.add_argument("--steps", type=int, default=3, help="timed runs per network (--compile)")
    parser.add_argument("--one", nargs=2, metavar=("VARIANT", "REMAT"), help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help="append every row as one JSON line here")
    args = parser.parse_args()
    if not args.plans.is_file():
        parser.error(f"plans file not found: {args.plans}")
    plan = Plan.load(args.plans)
    plan = plan.replace(patch_size=tuple(args.patch or plan.patch_size),
                        batch_size=args.batch or plan.batch_size)
    if args.one:
        print(json.dumps(compiled_row(*args.one, plan, args)))
        return
    rows = compiled(args) if args.compile else traced(plan, args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


if __name__ == "__main__":
    main()
