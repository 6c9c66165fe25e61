"""A network on a volume split along S0 over a `spatial` mesh axis equals one device.

One SGD step (so the parameter change is the gradient) on mesh (data, spatial) = (1, 2) and
(2, 2) against (1, 1): loss, gradient norm and every parameter to float32 rounding. The compiled
program exchanges halos (collective-permute) and never gathers a whole volume.
"""

import re

import jax
import numpy as np
import optax
import pytest

from jaxmamba.models import build_model
from jaxmamba.plans import Plan
from jaxmamba.train import sharding, step

PLAN = Plan(dataset_name="tiny", patch_size=(8, 4, 4), batch_size=2, spacing=(1.0, 1.0, 1.0),
            normalization_schemes=("ZScoreNormalization",), use_mask_for_norm=(False,),
            strides=((1, 1, 1), (2, 2, 2)), kernel_sizes=((3, 3, 3), (3, 3, 3)),
            n_blocks_encoder=(1, 1), n_blocks_decoder=(1,), channel_names=("MRI",),
            labels=(("background", 0), ("a", 1), ("b", 2)), base_num_features=4,
            max_num_features=8, batch_dice=True)


def _batch(plan):
    rng = np.random.default_rng(0)
    shape = (plan.batch_size, *plan.patch_size)
    target = rng.integers(0, 3, shape).astype(np.int32)
    return {"image": rng.normal(size=(*shape, 1)).astype(np.float32),
            "target": (target,)}


def _one_step(variant, mesh, batch, plan=PLAN):
    tx = optax.sgd(1.0)
    graphdef, state = step.init_state(build_model(variant, plan, rngs=0), tx)
    train, _ = step.jit_steps(*step.make_steps(graphdef, tx, batch_dice=True), mesh)
    state, batch = sharding.replicate(state, mesh), sharding.global_batch(batch, mesh)
    compiled = train.lower(state, batch).compile()
    new, metrics = compiled(state, batch)
    return jax.device_get(new.params), jax.device_get(metrics), compiled.as_text()


def _assert_same(a, b):
    """Loss, gradient norm and every parameter after the step, each to 1e-4 of its largest value:
    float32 sums split over slabs (norm statistics, conv partial sums, the scan's block prefix)
    differ from one device's by a few 1e-5 at these steep tiny-patch gradients (SegMamba's largest
    is 80); a wrong halo or block state is off by far more."""
    (pa, ma, _), (pb, mb, _) = a, b
    np.testing.assert_allclose(ma["loss"], mb["loss"], rtol=1e-5)
    np.testing.assert_allclose(ma["grad_norm"], mb["grad_norm"], rtol=1e-4)
    np.testing.assert_array_equal(ma["counts"], mb["counts"])
    for x, y in zip(jax.tree.leaves(pa), jax.tree.leaves(pb), strict=True):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-4 * np.abs(y).max() + 1e-6)


def _whole_volume_gathers(hlo: str, plan=PLAN) -> list[str]:
    """all-gather ops whose result holds a full-resolution S0 extent of activations."""
    s0 = plan.patch_size[0]
    return [line for line in hlo.splitlines() if re.search(r"all-gather(-start)?\(", line)
            and re.search(rf"f32\[\d+,{s0},", line)]


@pytest.mark.slow  # three train-step compiles: 5-11 min each on a loaded 2-core CPU
@pytest.mark.parametrize("variant", ["segmamba"])
def test_spatial_and_data_spatial_meshes_match_one_device(variant):
    batch = _batch(PLAN)
    one = _one_step(variant, sharding.make_mesh(1), batch)
    two = _one_step(variant, sharding.make_mesh(1, spatial=2), batch)
    four = _one_step(variant, sharding.make_mesh(2, spatial=2), batch)
    _assert_same(two, one)
    _assert_same(four, one)
    for hlo in (two[2], four[2]):
        assert "collective-permute" in hlo  # conv halos
        assert not _whole_volume_gathers(hlo)
