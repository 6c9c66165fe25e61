"""Memory preflight and one measured train step of a network at an nnU-Net plan (DESIGN §9).

    python benchmarks/train_step.py --variant segmamba --plans PLANS.json --batch 2 \
        --patch 48 192 192 --json $OUT/train_step.json

Prints the compiled memory estimate of forward + backward (`jaxmamba.models.memory_preflight`,
what training checks before step 1) and of the whole step, then times the step on random data
(device-synchronised, warm-up excluded, median) and reads the device's peak memory. The loss and
the optimizer are looked up in `LOSSES` and `OPTIMIZERS`: the first version is the PyTorch peer
measurement's (cross-entropy on the full-resolution output, plain SGD;
`reference/peer/h100_torch_models.json`); add the training recipe there. Imports neither grain
nor nibabel, so it runs on the GPU image.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import jax
import optax
from flax import nnx

from jaxmamba.models import VARIANTS, build_model, count_parameters, memory_preflight, total_bytes
from jaxmamba.models.preflight import cross_entropy_full_resolution
from jaxmamba.plans import Plan

GIB = 2**30
LOSSES = {"ce": cross_entropy_full_resolution}
OPTIMIZERS = {"sgd": lambda: optax.sgd(1e-2)}
DEFAULT_PLANS = (Path(__file__).resolve().parents[2] / "shared" / "reference" / "plans"
                 / "Dataset090_SynapseAbdomen.nnUNetPlans.json")


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def make_step(model: nnx.Module, loss_fn, tx: optax.GradientTransformation):
    """`(state, step)`: `step(state, image, labels) -> (state, loss)`, jitted, state donated."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, image, labels):
        return loss_fn(nnx.merge(graphdef, params, rest)(image), labels)

    def step(state, image, labels):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, image, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return (params, tx.init(params)), jax.jit(step, donate_argnums=0)


def measure(args: argparse.Namespace) -> dict:
    plan = Plan.load(args.plans)
    plan = plan.replace(patch_size=tuple(args.patch or plan.patch_size),
                        batch_size=args.batch or plan.batch_size)
    batch = plan.batch_size
    kw = dict(precision=args.precision, scan_implementation=args.scan)
    device = jax.devices()[0]
    row = {"variant": args.variant, "dataset": plan.dataset_name, "patch": list(plan.patch_size),
           "batch": batch, "precision": args.precision, "scan": args.scan or "default",
           "loss": args.loss, "optimizer": args.optimizer, "device": device.device_kind,
           "jax": jax.__version__, "date": time.strftime("%Y-%m-%d")}

    abstract = nnx.eval_shape(lambda: build_model(args.variant, plan, **kw))
    row["params"] = count_parameters(abstract)
    t0 = time.perf_counter()
    stats = memory_preflight(abstract, plan, batch, loss_fn=LOSSES[args.loss])
    row["preflight_s"] = time.perf_counter() - t0
    row["preflight_fwd_bwd_GiB"] = total_bytes(stats) / GIB if stats else None
    print(f"preflight (forward + backward): {_gib(row['preflight_fwd_bwd_GiB'])}, "
          f"compiled in {row['preflight_s']:.1f} s", flush=True)

    model = nnx.jit(lambda: build_model(args.variant, plan, **kw))()
    state, step = make_step(model, LOSSES[args.loss], OPTIMIZERS[args.optimizer]())
    del model
    key_x, key_y = jax.random.split(jax.random.key(0))
    image = jax.random.normal(key_x, (batch, *plan.patch_size, plan.num_input_channels))
    labels = jax.random.randint(key_y, (batch, *plan.patch_size), 0, plan.num_classes)
    t0 = time.perf_counter()
    compiled = step.lower(state, image, labels).compile()
    row["step_compile_s"] = time.perf_counter() - t0
    step_stats = compiled.memory_analysis()
    row["preflight_step_GiB"] = total_bytes(step_stats) / GIB if step_stats else None
    print(f"train step compiled in {row['step_compile_s']:.1f} s; its estimate "
          f"{_gib(row['preflight_step_GiB'])}", flush=True)

    times, losses = [], []
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        state, value = compiled(state, image, labels)
        value = float(value)  # waits for the step
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(value)
    row["step_ms"] = 1e3 * statistics.median(times)
    row["step_ms_min"] = 1e3 * min(times)
    row["losses"] = losses
    mem = device.memory_stats() or {}
    row["peak_GiB"] = mem["peak_bytes_in_use"] / GIB if "peak_bytes_in_use" in mem else None
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="segmamba")
    parser.add_argument("--plans", type=Path, default=DEFAULT_PLANS,
                        help="nnUNetPlans.json (dataset.json beside it); default Synapse")
    parser.add_argument("--patch", type=int, nargs=3, help="patch size (default: the plan's)")
    parser.add_argument("--batch", type=int, help="batch size (default: the plan's)")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    parser.add_argument("--scan", choices=["xla", "pallas", "reference"],
                        help="selective-scan implementation (default: fastest available)")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="ce")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--json", type=Path, help="append the result as one JSON line here")
    args = parser.parse_args()
    row = measure(args)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with open(args.json, "a") as f:
            f.write(json.dumps(row) + "\n")
    print("| variant | patch | batch | precision | scan | preflight fwd+bwd | preflight step "
          "| peak | step (median) | device | jax |")
    print(f"| {row['variant']} | {row['patch']} | {row['batch']} | {row['precision']} | "
          f"{row['scan']} | {_gib(row['preflight_fwd_bwd_GiB'])} | "
          f"{_gib(row['preflight_step_GiB'])} | {_gib(row['peak_GiB'])} | "
          f"{row['step_ms']:.0f} ms | {row['device']} | {row['jax']} |")


if __name__ == "__main__":
    main()
