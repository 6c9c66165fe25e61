"""Pallas kernels under data parallelism: each device scans its own share of the batch.

A `pallas_call` is a custom call the SPMD partitioner cannot split; without `map_over_batch`
every device would gather and scan the whole batch. The kernel is wrapped here to record the
batch it is traced with (interpret mode on the 4 fake CPU devices).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jaxmamba.kernels.selective_scan as kernels
from jaxmamba.ops import selective_scan
from jaxmamba.ops.batch_parallel import traced_under
from jaxmamba.ops.mesh import make_mesh


@pytest.fixture
def seen_batches(monkeypatch):
    seen = []
    original = kernels.selective_scan_pallas

    def spy(u, *args, **kwargs):
        seen.append(u.shape[0])
        return original(u, *args, **kwargs)

    monkeypatch.setattr(kernels, "selective_scan_pallas", spy)
    return seen


def _inputs(key, b, l=24, d=4, n=2):
    ks = jax.random.split(key, 6)
    u, delta, z = (jax.random.normal(k, (b, l, d)) for k in ks[:3])
    B, C = (jax.random.normal(k, (b, l, n)) for k in ks[3:5])
    A = -jnp.exp(jax.random.normal(ks[5], (d, n)))
    return u, delta, A, B, C, jnp.ones((d,)), z


def _loss(implementation, reverse):
    def f(u, delta, A, B, C, D, z):
        y, h = selective_scan(u, delta, A, B, C, D, z, reverse=reverse, return_final_state=True,
                              implementation=implementation)
        return jnp.sum(y ** 2) + jnp.sum(h)
    return f


@pytest.mark.parametrize("batch,local", [(4, 1), (8, 2), (2, 2)])  # 2 does not split: no map
def test_kernel_sees_local_batch_and_matches_reference(key, seen_batches, batch, local):
    mesh = make_mesh(-1)
    args = _inputs(key, batch)
    batched = NamedSharding(mesh, P("data")) if batch % 4 == 0 else NamedSharding(mesh, P())
    placed = [jax.device_put(a, batched if a.shape[0] == batch and a.ndim == 3
                             else NamedSharding(mesh, P())) for a in args]
    grad = jax.jit(traced_under(mesh, jax.value_and_grad(_loss("pallas", True), argnums=(0, 3))))
    value, (du, dB) = grad(*placed)
    assert seen_batches and set(seen_batches) == {local}
    reference = jax.value_and_grad(_loss("reference", True), argnums=(0, 3))
    ref_value, (ref_du, ref_dB) = reference(*args)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    np.testing.assert_allclose(du, ref_du, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(dB, ref_dB, rtol=1e-4, atol=1e-5)


def test_without_a_mesh_in_context_the_kernel_sees_the_whole_batch(key, seen_batches):
    jax.jit(_loss("pallas", False))(*_inputs(key, 4))
    assert set(seen_batches) == {4}
