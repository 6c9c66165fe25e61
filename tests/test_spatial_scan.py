"""The selective scan and the causal conv with the token axis split over a `spatial` mesh axis.

On the 4 fake CPU devices: outputs, final states and every gradient with L sharded over 2 and 4
devices (and over data=2 x spatial=2) equal the unsharded op to float32 rounding.
"""

import jax
import jax.numpy as jnp
import pytest
from conftest import assert_close_to, random_case
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmamba.ops import causal_conv1d, selective_scan
from jaxmamba.ops.batch_parallel import traced_under
from jaxmamba.ops.spatial import block_start_states, token_shards


def _mesh(data, spatial):
    return jax.make_mesh((data, spatial), ("data", "spatial"),
                         axis_types=(AxisType.Auto,) * 2, devices=jax.devices()[:data * spatial])


def _placed(mesh, args):
    return [jax.device_put(a, NamedSharding(mesh, P())) for a in args]


def _inputs(key, b=2, l=16, d=3, n=2):
    args, h0, _ = random_case(key, b, l, d, n)
    return (*(args[k] for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")), h0)


def _value_and_grads(implementation, reverse, mesh=None):
    def loss(u, delta, A, B, C, D, z, bias, h0):
        y, h = selective_scan(u, delta, A, B, C, D, z, bias, reverse=reverse, initial_state=h0,
                              return_final_state=True, implementation=implementation)
        w = jnp.arange(y.size, dtype=y.dtype).reshape(y.shape) / y.size
        return jnp.sum(w * y) + jnp.sum(jnp.cos(h)), (y, h)
    fn = jax.value_and_grad(loss, argnums=tuple(range(9)), has_aux=True)
    return jax.jit(fn if mesh is None else traced_under(mesh, fn))


@pytest.mark.parametrize("implementation,reverse,shape", [
    ("xla", False, (1, 4)), ("xla", True, (1, 2)),
    pytest.param("xla", True, (2, 2), marks=pytest.mark.slow),
    pytest.param("pallas", True, (2, 2), marks=pytest.mark.slow),  # interpret mode: slow
    pytest.param("pallas", False, (1, 4), marks=pytest.mark.slow),
])
@pytest.mark.newest_jax
def test_sharded_scan_equals_unsharded(key, implementation, reverse, shape):
    args, mesh = _inputs(key), _mesh(*shape)
    (value, (y, h)), grads = _value_and_grads(implementation, reverse, mesh)(*_placed(mesh, args))
    (ref, (ref_y, ref_h)), ref_grads = _value_and_grads("reference", reverse)(*args)
    assert_close_to(y, ref_y, rtol=1e-5, atol=1e-5)
    assert_close_to(h, ref_h, rtol=1e-5, atol=1e-5)
    assert_close_to(value, ref, rtol=1e-5, atol=1e-5)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        assert_close_to(g, r, rtol=1e-4, atol=1e-5, err_msg=name)


@pytest.mark.newest_jax
def test_sharded_scan_splits_the_tokens(key):
    """The compiled program holds each device's block only and exchanges the small pairs."""
    args = _inputs(key, l=64)
    mesh = _mesh(1, 4)
    f = jax.jit(traced_under(mesh, lambda *a: selective_scan(*a[:8], implementation="xla")))
    hlo = f.lower(*_placed(mesh, args)).compile().as_text()
    assert "all-reduce" in hlo
    assert "f32[2,16,3]" in hlo  # the local block (B, L/4, D)
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
        assert token_shards(64) == 4 and token_shards(6) == 1  # 6 tokens do not split in 4


def test_block_start_states_compose_in_order(key):
    a, b = jax.random.uniform(key, (2, 3, 1, 1, 1))
    h0 = jnp.full((1, 1, 1), 2.0)
    starts, last = block_start_states(a, b, h0, reverse=False)
    assert_close_to(starts[2], a[1] * (a[0] * h0 + b[0]) + b[1], rtol=1e-6)
    starts, last = block_start_states(a, b, h0, reverse=True)
    assert_close_to(starts[0], a[1] * (a[2] * h0 + b[2]) + b[1], rtol=1e-6)
    assert_close_to(last, a[0] * starts[0] + b[0], rtol=1e-6)


@pytest.mark.newest_jax
@pytest.mark.parametrize("reverse,shape", [(False, (1, 4)), (True, (1, 4)), (True, (2, 2))])
def test_sharded_causal_conv_equals_unsharded(key, reverse, shape):
    kx, kw, kb = jax.random.split(key, 3)
    x = jax.random.normal(kx, (2, 12, 3))  # 3 tokens per device with 4: exactly the halo
    w, b = jax.random.normal(kw, (4, 3)), jax.random.normal(kb, (3,))

    def loss(x, w, b):
        y = causal_conv1d(x, w, b, activation="silu", reverse=reverse)
        return jnp.sum(y * jnp.sin(jnp.arange(y.size).reshape(y.shape))), y

    fn = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
    mesh = _mesh(*shape)
    (_, y), grads = jax.jit(traced_under(mesh, fn))(*_placed(mesh, (x, w, b)))
    (_, ref_y), ref_grads = jax.jit(fn)(x, w, b)
    assert_close_to(y, ref_y, rtol=1e-5, atol=1e-6)
    assert_close_to(grads, ref_grads, rtol=1e-5, atol=1e-5)
