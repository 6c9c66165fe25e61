"""Memory preflight and one measured train step of a network at an nnU-Net plan.

    python benchmarks/train_step.py --variant segmamba --plans PLANS.json --batch 2 \
        --patch 48 192 192

Every row runs in a child process of its own, one after another (rows compiled at once slowed
each compile 3x; each peak is the row's own), and is written, stamped with card, JAX version,
date and commit, to this run's JSON-lines file in `--out` (default benchmarks/results/,
`DATE_CARD_train-step.jsonl`: `result_rows.py`). `--variant`, `--remat` and `--mamba-precision`
take several values: one row per combination, so a table and its baseline (`--remat states
none`) are timed on the same card in the same call. A row whose child fails or outlives
`--row-timeout` is written with its `error` (a compile that did not finish is a result too); the
script then exits 1.

Prints the compiled memory estimate of forward + backward
(`jaxmamba.train.preflight.memory_preflight`) and of the whole step (what training checks before
step 1), then times the step on random data (device-synchronised, warm-up excluded, median) and
reads the device's peak memory. The loss and
the optimizer are looked up in `LOSSES` and `OPTIMIZERS`: `ce` + `sgd` is the PyTorch peer
measurement's (cross-entropy on the full-resolution output, plain SGD;
`reference/peer/h100_torch_models.json`); `dc_ce` + a recipe (`nnunet`, `radam_cosine`,
`radam_onecycle`) is what `python train.py` runs (jaxmamba.train). `--devices 1 2 4` measures
data-parallel weak scaling: the same per-device batch on a `data` mesh of each size (global batch
= batch x devices), efficiency = time on 1 device / time on n; on several devices it also times a
gradient-sized all-reduce alone. Imports neither grain nor nibabel,
so it runs on the GPU image. `--mamba-precision bf16` runs the Mamba blocks as the reference's
MultiSegMamba does (model.mamba_precision). Each row records the size of the lowered step
(`jaxmamba.kernels.lowered.module_size`) beside its compile time. The `pallas` scan runs on the
kernels a GPU gets by default (the row's `pallas_backend`); `JAXMAMBA_PALLAS_BACKEND=triton` or
`mosaic` picks them.

    python benchmarks/train_step.py --variant segmamba --precision bf16 --loss dc_ce \
        --optimizer radam_cosine --devices 1 2 4

Compiling is most of a row's time (1-3 min on a GPU). `--gate DIR --gate-count N` lets N
separately started runs compile at once and then time one at a time: each waits until all N
have compiled (or died), then times its step holding a lock in DIR, so no two steps share the
device while timed. Start them with `XLA_PYTHON_CLIENT_PREALLOCATE=false`, so that each
process's peak is its own.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

import result_rows  # noqa: E402

from jaxmamba.choices import DEFAULT_REMAT, MAMBA_PRECISIONS, RECIPES, REMAT  # noqa: E402
from jaxmamba.config import OptimConfig  # noqa: E402
from jaxmamba.kernels.backends import compiled_backend  # noqa: E402
from jaxmamba.kernels.lowered import module_size  # noqa: E402
from jaxmamba.layers import MambaOptions  # noqa: E402
from jaxmamba.models import (  # noqa: E402
    VARIANTS,
    build_model,
    count_parameters,
)
from jaxmamba.ops.batch_parallel import traced_under  # noqa: E402
from jaxmamba.ops.mesh import DATA_AXIS, batch_sharding, make_mesh  # noqa: E402
from jaxmamba.plans import Plan  # noqa: E402
from jaxmamba.train import sharding  # noqa: E402
from jaxmamba.train.losses import deep_supervision_loss  # noqa: E402
from jaxmamba.train.optim import build_recipe  # noqa: E402
from jaxmamba.train.preflight import (  # noqa: E402
    cross_entropy_full_resolution,
    estimate,
    memory_preflight,
)


def dc_ce_deep_supervision(outputs, labels):
    """nnU-Net's training loss: DC+CE on every deep-supervision output, batch dice;
    each output's target is the labels sampled with its stride (nearest neighbour)."""
    targets = [labels[(slice(None), *(slice(None, None, labels.shape[a] // out.shape[a])
                                      for a in range(1, labels.ndim)))] for out in outputs]
    return deep_supervision_loss(outputs, targets, batch_dice=True)


GIB = 2**30
LOSSES = {"ce": cross_entropy_full_resolution, "dc_ce": dc_ce_deep_supervision}
OPTIMIZERS = {"sgd": lambda: optax.sgd(1e-2), **{
    r: (lambda r=r: build_recipe(OptimConfig(recipe=r), epochs=300, iters_per_epoch=250).tx)
    for r in RECIPES}}
DEFAULT_PLANS = (Path(__file__).resolve().parents[2] / "shared" / "reference" / "plans"
                 / "Dataset090_SynapseAbdomen.nnUNetPlans.json")


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f} GiB"


def make_step(model: nnx.Module, loss_fn, tx: optax.GradientTransformation, mesh):
    """`(state, step)`: `step(state, image, labels) -> (state, loss)`, jitted, state donated,
    traced under `mesh` so that Pallas kernels split the batch over its devices."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params, image, labels):
        return loss_fn(nnx.merge(graphdef, params, rest)(image), labels)

    def step(state, image, labels):
        params, opt_state = state
        value, grads = jax.value_and_grad(loss)(params, image, labels)
        updates, opt_state = tx.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), value

    return (params, tx.init(params)), jax.jit(traced_under(mesh, step), donate_argnums=0)


@contextlib.contextmanager
def timing_gate(gate: Path | None, count: int, timeout_s: float = 900.0):
    """Mark this process compiled, wait until `count` processes have (or `timeout_s`), then hold
    an exclusive lock in `gate` while the body times its step; a no-op without `gate`."""
    if gate is None:
        yield
        return
    gate.mkdir(parents=True, exist_ok=True)
    (gate / f"{os.getpid()}.compiled").touch()
    deadline = time.monotonic() + timeout_s
    while len(list(gate.glob("*.compiled"))) < count and time.monotonic() < deadline:
        time.sleep(1.0)
    with open(gate / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def measure(args: argparse.Namespace, n_devices: int = 1) -> dict:
    """One row: `args.batch` (or the plan's) patches per device on a mesh of `n_devices`."""
    plan = Plan.load(args.plans)
    plan = plan.replace(patch_size=tuple(args.patch or plan.patch_size),
                        batch_size=args.batch or plan.batch_size)
    batch = plan.batch_size * n_devices  # weak scaling: the per-device batch stays
    kw = dict(precision=args.precision,
              mamba=MambaOptions(args.scan, args.remat, args.mamba_precision))
    device = jax.devices()[0]
    mesh = make_mesh(n_devices)
    row = {"variant": args.variant, "dataset": plan.dataset_name, "patch": list(plan.patch_size),
           "batch": batch, "devices": n_devices, "precision": args.precision,
           "mamba_precision": args.mamba_precision,
           "scan": args.scan or "default", "remat": args.remat, "loss": args.loss,
           "optimizer": args.optimizer, "pallas_backend": (  # pallas' kernels, where it runs
               compiled_backend() if jax.default_backend() == "gpu" else None)}

    abstract = nnx.eval_shape(lambda: build_model(args.variant, plan, **kw))
    row["params"] = count_parameters(abstract)
    if n_devices == 1 and args.preflight:
        t0 = time.perf_counter()
        est = memory_preflight(abstract, plan, batch, loss_fn=LOSSES[args.loss])
        row["preflight_s"] = time.perf_counter() - t0
        row["preflight_fwd_bwd_GiB"] = est.total / GIB if est else None
        print(f"preflight (forward + backward): {_gib(row['preflight_fwd_bwd_GiB'])}, "
              f"compiled in {row['preflight_s']:.1f} s", flush=True)

    model = nnx.jit(lambda: build_model(args.variant, plan, **kw))()
    state, step = make_step(model, LOSSES[args.loss], OPTIMIZERS[args.optimizer](), mesh)
    del model
    state = sharding.replicate(state, mesh)  # the step follows its inputs' shardings
    key_x, key_y = jax.random.split(jax.random.key(0))
    image = jax.random.normal(key_x, (batch, *plan.patch_size, plan.num_input_channels))
    labels = jax.random.randint(key_y, (batch, *plan.patch_size), 0, plan.num_classes)
    image, labels = jax.device_put((image, labels), batch_sharding(mesh))
    t0 = time.perf_counter()
    lowered = step.lower(state, image, labels)
    lower_s = time.perf_counter() - t0
    compiled = lowered.compile()
    row["step_compile_s"] = time.perf_counter() - t0  # lowering included
    row["step_lower_s"] = lower_s
    row["step_module"] = module_size(lowered.as_text()).as_dict()  # what XLA was handed
    step_est = estimate(compiled)
    row["preflight_step_GiB"] = step_est.total / GIB if step_est else None
    print(f"train step ({row['step_module']['operations']} operations) lowered and compiled in "
          f"{row['step_compile_s']:.1f} s; its estimate "
          f"{_gib(row['preflight_step_GiB'])}", flush=True)

    times, losses = [], []
    with timing_gate(args.gate, args.gate_count):
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
    if n_devices > 1:
        row["allreduce_ms"] = allreduce_ms(row["params"], mesh, args.warmup + args.steps)
    return row


def allreduce_ms(n_values: int, mesh, repeats: int) -> float:
    """Median time of one float32 all-reduce of `n_values` (the gradients) over `mesh`: the
    collective's cost if the step did not overlap it with computation."""
    n = mesh.shape[DATA_AXIS]
    spec = PartitionSpec(DATA_AXIS)
    reduce = jax.jit(jax.shard_map(lambda v: jax.lax.psum(v, DATA_AXIS), mesh=mesh,
                                   in_specs=spec, out_specs=spec))
    x = jax.device_put(jnp.ones((n, n_values), jnp.float32), NamedSharding(mesh, spec))
    reduce(x).block_until_ready()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        reduce(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def measure_rows(args: argparse.Namespace) -> list[dict]:
    """The rows of one child: its combination on each mesh size of `args.devices`."""
    rows = []
    for n in args.devices:
        row = measure(args, n)
        row["efficiency"] = rows[0]["step_ms"] / row["step_ms"] if rows else 1.0
        rows.append(row)
    return rows


def run_child(argv: list[str], combo: dict, timeout_s: float) -> list[dict]:
    """Run one combination in a child process, its output passed on as it comes; its rows, or
    one row with its `error`."""
    tail = [f"--{k.replace('_', '-')}={v}" for k, v in combo.items()]
    timed_out = threading.Event()
    rows, card = [], "unknown (the process ended before starting JAX's backend)"
    with tempfile.TemporaryFile("w+") as err, \
            subprocess.Popen([sys.executable, __file__, *argv, *tail, "--child"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=err, text=True) as child:
        timer = threading.Timer(timeout_s, lambda: (timed_out.set(), child.kill()))
        timer.start()
        for line in child.stdout:
            if line.startswith(ROW):
                rows.append(json.loads(line[len(ROW):]))
            elif line.startswith(CARD):
                card = line[len(CARD):].strip()
            else:
                print(line, end="", flush=True)
        child.wait()
        timer.cancel()
        err.seek(0)
        errors = err.read()
    if timed_out.is_set():
        return [{**combo, "card": card, "error": f"not finished in {timeout_s:.0f} s"}]
    if child.returncode != 0 or not rows:
        print(errors[-3000:], file=sys.stderr)
        last = (errors.strip().splitlines() or ["no output"])[-1]
        return [{**combo, "card": card, "error": f"exit code {child.returncode}: {last}"}]
    return [{**row, "card": card} for row in rows]


def print_table(rows: list[dict]) -> None:
    print("| variant | patch | batch | devices | precision (Mamba) | scan | remat | "
          "loss + optimizer | preflight fwd+bwd | preflight step | peak | step (median) | "
          "compile | all-reduce | efficiency | card | jax |")
    for row in rows:
        head = (f"| {row['variant']} | {row.get('patch', '')} | {row.get('batch', '')} | "
                f"{row.get('devices', '')} | ")
        if "error" in row:
            print(f"{head}({row['mamba_precision']}) | | {row['remat']} | | "
                  f"{row['error']} | | | | | | | {row['card']} | {row['jax']} |")
            continue
        print(f"{head}{row['precision']} ({row['mamba_precision']}) | {row['scan']} | "
              f"{row['remat']} | {row['loss']} + {row['optimizer']} | "
              f"{_gib(row.get('preflight_fwd_bwd_GiB'))} | {_gib(row['preflight_step_GiB'])} | "
              f"{_gib(row['peak_GiB'])} | {row['step_ms']:.0f} ms | "
              f"{row['step_compile_s']:.0f} s | {row.get('allreduce_ms', 0):.1f} ms | "
              f"{row['efficiency']:.2f} | {row['card']} | {row['jax']} |")


#: how a child hands its card and its rows to the parent: one stdout line each
CARD, ROW = "CARD ", "ROW "
#: the options with one row per value
SWEPT = ("variant", "remat", "mamba_precision")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=sorted(VARIANTS), nargs="+", default=["segmamba"],
                        help="one row per network")
    parser.add_argument("--plans", type=Path, default=DEFAULT_PLANS,
                        help="nnUNetPlans.json (dataset.json beside it); default Synapse")
    parser.add_argument("--patch", type=int, nargs=3, help="patch size (default: the plan's)")
    parser.add_argument("--batch", type=int, help="batch size (default: the plan's)")
    parser.add_argument("--precision", choices=["float32", "bf16"], default="float32")
    parser.add_argument("--mamba-precision", choices=MAMBA_PRECISIONS, nargs="+",
                        default=["float32"],
                        help="the Mamba blocks' computation (model.mamba_precision): bf16 "
                             "projections, conv and scan inputs with float32 state, or float32; "
                             "one row per value")
    parser.add_argument("--scan", choices=["xla", "pallas", "reference"],
                        help="selective-scan implementation (default: fastest available)")
    parser.add_argument("--remat", choices=REMAT, nargs="+", default=[DEFAULT_REMAT],
                        help="what the Mamba layers keep for the backward (model.remat); one "
                             "row per value")
    parser.add_argument("--loss", choices=sorted(LOSSES), default="ce")
    parser.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgd")
    parser.add_argument("--devices", type=int, nargs="+", default=[1],
                        help="data-parallel weak scaling: one row per mesh size (e.g. 1 2 4)")
    parser.add_argument("--preflight", action=argparse.BooleanOptionalAction, default=True,
                        help="also compile forward + backward alone for the memory preflight "
                             "(a second compile; the step's own estimate is always printed)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=result_rows.RESULTS, help="folder for this "
                        "run's JSON-lines file (default: benchmarks/results/)")
    parser.add_argument("--commit", help="what tree is measured, for the rows (default: its git "
                        "branch@sha, +uncommitted when tracked files changed)")
    parser.add_argument("--row-timeout", type=float, default=1800.0,
                        help="seconds one row's process may take (an error row after that)")
    parser.add_argument("--gate", type=Path, help="compile alongside other processes, then time "
                        "one at a time (a folder they share; see the module docstring)")
    parser.add_argument("--gate-count", type=int, default=1,
                        help="how many processes share --gate")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:  # one combination (the last value of each swept option): rows on stdout
        for name in SWEPT:
            setattr(args, name, getattr(args, name)[-1])
        print(CARD + result_rows.card(), flush=True)
        for row in measure_rows(args):
            print(ROW + json.dumps(row), flush=True)
        return 0
    # the file is named after the first child's card: this process leaves the GPU to the
    # children (starting JAX's backend here would take its memory)
    commit, out, rows = args.commit or result_rows.commit_of(ROOT), None, []
    for values in itertools.product(*(getattr(args, name) for name in SWEPT)):
        combo = dict(zip(SWEPT, values, strict=True))
        print(f"== {', '.join(f'{k} {v}' for k, v in combo.items())}", flush=True)
        for row in run_child(sys.argv[1:], combo, args.row_timeout):
            out = out or result_rows.RunFile(args.out, "train-step", commit, row["card"])
            rows.append(out.write(row))
    print(f"rows: {out.close()}")
    print_table(rows)
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
