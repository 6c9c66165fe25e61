"""Data parallelism: one program on 1 and 4 (fake CPU) devices gives the same step."""

import jax
import numpy as np
import optax
import pytest
from conftest import rel_err, tiny_plan

from jaxmamba import distributed
from jaxmamba.config import OptimConfig
from jaxmamba.models import build_model
from jaxmamba.ops.mesh import make_mesh
from jaxmamba.train import sharding, step
from jaxmamba.train.optim import build_recipe

PLAN = tiny_plan(patch_size=(4, 8, 8), batch_size=4, batch_dice=True)


def _scale_one_leaf(index: int, factor: float) -> optax.GradientTransformation:
    """Multiplies the gradient of one parameter (leaf `index`) by `factor`: a wrong update."""
    def update(grads, state, params=None):
        leaves, treedef = jax.tree.flatten(grads)
        leaves[index] = leaves[index] * factor
        return jax.tree.unflatten(treedef, leaves), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _displacements(mesh, batch, rng_seed, wrong_leaf=None):
    """One train step from the initial parameters plus a seeded N(0, 0.1²) perturbation (so
    that no norm scale is 0 and every parameter gets a gradient): (after − before per parameter,
    metrics). SGD with lr 1 makes the displacement −1.99·(clipped gradient + L2), far above
    float32 rounding of the parameters."""
    tx = build_recipe(OptimConfig(recipe="nnunet", lr=1.0), epochs=10, iters_per_epoch=5).tx
    if wrong_leaf is not None:
        tx = optax.chain(_scale_one_leaf(wrong_leaf, 1.01), tx)
    graphdef, state = step.init_state(build_model("resencunet", PLAN, rngs=0), tx)
    draw = np.random.default_rng(rng_seed)
    params = jax.tree.map(lambda p: p + 0.1 * draw.standard_normal(p.shape).astype(p.dtype),
                          state.params)
    before = jax.device_get(params)  # the step donates its state
    state = state._replace(params=params, opt_state=tx.init(params))
    train, _ = step.jit_steps(*step.make_steps(graphdef, tx, batch_dice=True), mesh)
    state, metrics = train(sharding.replicate(state, mesh), sharding.global_batch(batch, mesh))
    after = jax.tree_util.tree_flatten_with_path(jax.device_get(state.params))[0]
    return ({jax.tree_util.keystr(k): a - b
             for (k, a), b in zip(after, jax.tree.leaves(before), strict=True)},
            jax.device_get(metrics))


#: Relative error of a parameter's displacement, 4 devices against 1: measured 1e-7 to 5e-7
#: (float32 sums in another order); a 1 % error in one parameter's gradient is 1e-2.
DISPLACEMENT_TOL = 1e-5
#: The bias of a conv followed by an instance norm has no gradient (the norm removes it): its
#: displacement is the L2 term alone plus rounding noise, compared absolutely.
NO_GRADIENT = "['conv']['bias']"


def test_four_devices_match_one(rng, seed):
    batch = {"image": rng.normal(size=(4, 4, 8, 8, 1)).astype(np.float32),
             "target": (rng.integers(0, 3, (4, 4, 8, 8)).astype(np.int32),)}
    mesh4 = make_mesh(-1)
    assert mesh4.shape["data"] == 4
    x = sharding.global_batch(batch, mesh4)["image"]
    assert {s.data.shape for s in x.addressable_shards} == {(1, 4, 8, 8, 1)}
    d1, m1 = _displacements(make_mesh(1), batch, seed)
    d4, m4 = _displacements(mesh4, batch, seed)
    # float32 sums in another order: equal to rounding (a wrong reduction is off by far more)
    np.testing.assert_allclose(m4["loss"], m1["loss"], rtol=1e-5)
    np.testing.assert_allclose(m4["counts"], m1["counts"])
    np.testing.assert_allclose(m4["grad_norm"], m1["grad_norm"], rtol=1e-4)
    assert all(np.abs(d).max() > 0 for d in d1.values()), "a parameter did not move"
    errors = {k: rel_err(d4[k], d) for k, d in d1.items() if NO_GRADIENT not in k}
    assert len(errors) >= 0.75 * len(d1) and max(errors.values()) <= DISPLACEMENT_TOL, errors
    scale = max(np.abs(d).max() for d in d1.values())
    for k in set(d1) - set(errors):
        np.testing.assert_allclose(d4[k], d1[k], rtol=0, atol=1e-6 * scale, err_msg=k)
    # The comparison sees a wrong update: 1 % more gradient on one parameter fails it.
    first = "['encoder']['stem']['convs'][0]['conv']['kernel'].value"
    wrong, _ = _displacements(mesh4, batch, seed, wrong_leaf=list(d1).index(first))
    assert rel_err(wrong[first], d1[first]) > 100 * DISPLACEMENT_TOL


def test_mesh_and_batch_errors():
    with pytest.raises(ValueError, match="mesh.data = 5: this machine has 4 device"):
        make_mesh(5)
    mesh = make_mesh(-1)
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
