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

import jax
import orbax.checkpoint as ocp
from flax import nnx

from jaxmamba.models import VARIANTS, build_model, canonical_variant
from jaxmamba.models.unet import UNet
from jaxmamba.plans import Plan

BEST = "best"


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
