"""jaxmamba run directories holding converted weights (the layout of `jaxmamba.train`'s runs).

```
OUT/nnUNetPlans.json, OUT/dataset.json      the plan
OUT/checkpoints/best/0/params               orbax StandardSave of nnx.state(model, nnx.Param)
OUT/checkpoints/best/0/meta                 {"epoch": 0, "variant", "precision", "plan", "source"}
```
`load_run` reads this and training's own run directories alike (their `meta` holds the variant
and the plan too), so a trained jaxmamba network can be exported back to PyTorch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxmamba.models import VARIANTS, build_model, canonical_variant
from jaxmamba.models.unet import UNet
from jaxmamba.plans import Plan, PlanError

BEST = "best"

#: Plan fields a trained network and its preprocessing depend on, with their nnU-Net keys.
NETWORK_FIELDS = {
    "patch_size": "patch_size", "spacing": "spacing",
    "normalization_schemes": "normalization_schemes", "use_mask_for_norm": "use_mask_for_norm",
    "strides": "pool_op_kernel_sizes", "kernel_sizes": "conv_kernel_sizes",
    "n_blocks_encoder": "n_conv_per_stage_encoder", "n_blocks_decoder": "n_conv_per_stage_decoder",
    "base_num_features": "UNet_base_num_features", "max_num_features": "unet_max_num_features",
    "channel_names": "dataset.json channel_names", "labels": "dataset.json labels",
    "foreground_intensity_properties": "foreground_intensity_properties_per_channel",
    "resampling": "resampling_fn_*_kwargs",
}


def plan_differences(expected: Plan, found: Plan) -> list[tuple[str, Any, Any]]:
    """`(nnU-Net key, expected value, found value)` for each of `NETWORK_FIELDS` that differs."""
    return [(key, getattr(expected, f), getattr(found, f)) for f, key in NETWORK_FIELDS.items()
            if getattr(expected, f) != getattr(found, f)]


def save_run(out_dir: str | Path, model: UNet, plan: Plan, *, source: str) -> Path:
    """Write `model`'s parameters, variant and plan as a run directory; returns its path."""
    out = Path(out_dir).absolute()
    if (out / "checkpoints").exists():
        raise FileExistsError(f"{out}: already holds checkpoints; choose a new output directory")
    # the plan names the network, so nnU-Net rebuilds this one from the run directory
    plan = plan.with_network(VARIANTS[canonical_variant(model.variant)].reference_name)
    plan.save(out / "nnUNetPlans.json", out / "dataset.json")
    meta = {"epoch": 0, "variant": model.variant, "precision": model.precision,
            "plan": plan.to_record(), "source": source}
    with ocp.CheckpointManager(out / "checkpoints" / BEST, item_names=("params", "meta"),
                               options=ocp.CheckpointManagerOptions(create=True)) as manager:
        manager.save(0, args=ocp.args.Composite(
            params=ocp.args.StandardSave(nnx.state(model, nnx.Param)),
            meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    return out


def load_run(run_dir: str | Path, *, which: str = BEST, scan_implementation: str | None = None
             ) -> tuple[UNet, Plan]:
    """The network (parameters restored) and plan of a run directory's latest `which` checkpoint."""
    run_dir = Path(run_dir).absolute()
    ckpt_dir = run_dir / "checkpoints" / which
    if not ckpt_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no checkpoints/{which}; expected a directory written "
                                f"by `jaxmamba convert-torch` or by training")
    with ocp.CheckpointManager(ckpt_dir, item_names=("params", "meta")) as manager:
        step = manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"{ckpt_dir}: no complete checkpoint")
        meta = manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        plan = Plan.from_record(meta["plan"], source=str(ckpt_dir / str(step) / "meta"))
        _check_run_plan(run_dir, plan)
        precision = meta.get("precision") or meta.get("config", {}).get("model", {}).get(
            "precision", "float32")
        model = nnx.eval_shape(lambda: build_model(meta["variant"], plan, precision=precision,
                                                   scan_implementation=scan_implementation))
        device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
                              nnx.state(model, nnx.Param))
        params = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target)))["params"]
    nnx.update(model, params)
    return model, plan


def _check_run_plan(run_dir: Path, plan: Plan) -> None:
    """The run directory's `nnUNetPlans.json` must be the plan its checkpoint was made with."""
    if not (run_dir / "nnUNetPlans.json").is_file():
        return
    differences = plan_differences(Plan.load(run_dir / "nnUNetPlans.json"), plan)
    if differences:
        raise PlanError(
            f"{run_dir / 'nnUNetPlans.json'} disagrees with the plan its checkpoint records in "
            f"{plan.source} (" + "; ".join(f"{key}: plans file {a}, checkpoint {b}"
                                           for key, a, b in differences)
            + "); restore the run's nnUNetPlans.json, or convert or train again with the new plan")
