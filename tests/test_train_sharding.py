"""Data parallelism: one program on 1 and 4 (fake CPU) devices gives the same step."""

import jax
import numpy as np
import pytest

from jaxmamba import distributed
from jaxmamba.config import OptimConfig
from jaxmamba.models import build_model
from jaxmamba.plans import Plan
from jaxmamba.train import sharding, step
from jaxmamba.train.optim import build_recipe

PLAN = Plan(dataset_name="tiny", patch_size=(4, 8, 8), batch_size=4, spacing=(1.0, 1.0, 1.0),
            normalization_schemes=("ZScoreNormalization",), use_mask_for_norm=(False,),
            strides=((1, 1, 1), (2, 2, 2)), kernel_sizes=((3, 3, 3), (3, 3, 3)),
            n_blocks_encoder=(1, 1), n_blocks_decoder=(1,), channel_names=("MRI",),
            labels=(("background", 0), ("a", 1), ("b", 2)), base_num_features=4,
            max_num_features=8, batch_dice=True)


def _one_step(mesh, batch):
    recipe = build_recipe(OptimConfig(recipe="radam_cosine"), epochs=10, iters_per_epoch=5)
    graphdef, state = step.init_state(build_model("resencunet", PLAN, rngs=0), recipe.tx)
    train, _ = step.jit_steps(*step.make_steps(graphdef, recipe.tx, batch_dice=True), mesh)
    state, metrics = train(sharding.replicate(state, mesh), sharding.global_batch(batch, mesh))
    return jax.device_get(state.params), jax.device_get(metrics)


def test_four_devices_match_one():
    rng = np.random.default_rng()
    batch = {"image": rng.normal(size=(4, 4, 8, 8, 1)).astype(np.float32),
             "target": (rng.integers(0, 3, (4, 4, 8, 8)).astype(np.int32),)}
    mesh4 = sharding.make_mesh(-1)
    assert mesh4.shape["data"] == 4
    x = sharding.global_batch(batch, mesh4)["image"]
    assert {s.data.shape for s in x.addressable_shards} == {(1, 4, 8, 8, 1)}
    p1, m1 = _one_step(sharding.make_mesh(1), batch)
    p4, m4 = _one_step(mesh4, batch)
    # float32 sums in another order: equal to rounding (a wrong reduction is off by far more)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["counts"], m1["counts"])
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_mesh_and_batch_errors():
    with pytest.raises(ValueError, match="mesh.data = 5: this machine has 4 device"):
        sharding.make_mesh(5)
    mesh = sharding.make_mesh(-1)
    with pytest.raises(ValueError, match="batch size 6 is not divisible by the 4 devices.*"
                                         "batch_size=4 or 8"):
        sharding.check_batch_size(6, mesh)
    with pytest.raises(ValueError, match="batch_size=4\\b"):
        sharding.check_batch_size(2, mesh)
    sharding.check_batch_size(8, mesh)


def test_distributed_launch_needs_all_variables(monkeypatch):
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "localhost:1234")
    monkeypatch.delenv("JAX_NUM_PROCESSES", raising=False)
    with pytest.raises(ValueError, match="set JAX_NUM_PROCESSES and JAX_PROCESS_ID"):
        distributed.initialize()
    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS")
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a single task: nothing to initialise
    distributed.initialize()
    assert jax.process_count() == 1
