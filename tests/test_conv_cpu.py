"""The CPU convolution path of `jaxmamba.layers.conv`: `depth_folded_conv3d` equals
`lax.conv_general_dilated` (outputs and gradients, odd shapes, strides, kernels 1, 3 and
anisotropic, bf16), and the conv blocks take it on a CPU (checked in the compiled HLO)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxmamba.layers.conv import conv3d, depth_folded_conv3d

DN = ("NDHWC", "DHWIO", "NDHWC")

CASES = [  # (spatial, cin, cout, kernel, stride)
    ((5, 7, 6), 3, 4, (3, 3, 3), (1, 1, 1)),
    ((7, 5, 9), 4, 6, (3, 3, 3), (2, 2, 2)),
    ((6, 9, 7), 2, 5, (1, 3, 3), (1, 2, 2)),
    ((5, 6, 7), 5, 3, (3, 1, 3), (2, 1, 2)),
    ((4, 5, 3), 6, 2, (1, 1, 1), (1, 1, 1)),
    ((9, 4, 6), 3, 3, (1, 1, 1), (2, 1, 1)),
]


def _pad(kernel):
    return [((k - 1) // 2, (k - 1) // 2) for k in kernel]


def _draw(spatial, cin, cout, kernel, dtype=jnp.float32):
    kx, kw = jax.random.split(jax.random.key(0))
    x = jax.random.normal(kx, (2, *spatial, cin), jnp.float32).astype(dtype)
    w = (jax.random.normal(kw, (*kernel, cin, cout), jnp.float32) / np.sqrt(cin * np.prod(kernel)))
    return x, w.astype(dtype)


def _reference(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=DN,
                                        precision=jax.lax.Precision.HIGHEST)


@pytest.mark.parametrize("spatial,cin,cout,kernel,stride", CASES)
def test_depth_folded_equals_lax_conv(spatial, cin, cout, kernel, stride):
    """Outputs and both gradients (of `sum(y · g)`, one jitted call each way)."""
    x, w = _draw(spatial, cin, cout, kernel)
    pad = tuple(_pad(kernel))

    def value_and_grads(conv, x, w, g):
        y, vjp = jax.vjp(lambda x, w: conv(x, w, stride, pad), x, w)
        return y, *vjp(g)

    ref_y = _reference(x, w, stride, pad)
    g = jax.random.normal(jax.random.key(1), ref_y.shape)
    ours = jax.jit(value_and_grads, static_argnums=0)(depth_folded_conv3d, x, w, g)
    ref = jax.jit(value_and_grads, static_argnums=0)(_reference, x, w, g)
    for a, b in zip(ours, ref, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_depth_folded_bf16_and_asymmetric_padding():
    x, w = _draw((5, 6, 7), 4, 3, (3, 3, 3), jnp.bfloat16)
    pad = [(2, 0), (1, 1), (0, 2)]
    ours = depth_folded_conv3d(x, w, (1, 2, 1), pad, preferred_element_type=jnp.float32)
    ref = _reference(x.astype(jnp.float32), w.astype(jnp.float32), (1, 2, 1), pad)
    assert ours.dtype == jnp.float32
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)  # bf16 products are exact in f32
    y = depth_folded_conv3d(x, w, (1, 1, 1), _pad((3, 3, 3)))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(y.astype(jnp.float32),
                               _reference(x.astype(jnp.float32), w.astype(jnp.float32),
                                          (1, 1, 1), _pad((3, 3, 3))), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (1, 1, 1)), ((3, 3, 3), (2, 2, 2)),
                                           ((1, 3, 3), (1, 2, 2)), ((1, 1, 1), (1, 1, 1))])
def test_conv3d_takes_the_fast_path_on_cpu(kernel, stride):
    """Lowered for the CPU, a `conv3d` (forward and backward) holds only 2D convolutions, the
    depth-folded path; lowered for a GPU, only XLA's 3D convolution. The CPU output equals
    XLA's 3D convolution of the same parameters."""
    conv = conv3d(3, 4, kernel, stride, bias=True, dtype=None, rngs=nnx.Rngs(0))
    graph, state = nnx.split(conv)
    x = jax.random.normal(jax.random.key(2), (1, 5, 6, 7, 3))

    def fwd(state, x):
        return nnx.merge(graph, state)(x)

    def grad(state, x):
        return jax.grad(lambda s, x: jnp.sum(fwd(s, x) ** 2), (0, 1))(state, x)

    for fn in (fwd, grad):
        text = jax.jit(fn).lower(state, x).as_text()
        assert "[b, 0, 1, f]" in text, "no 2D convolution: the CPU path was not taken"
        assert "[b, 0, 1, 2, f]" not in text, "a 3D convolution is left on the CPU"
    gpu = jax.jit(fwd).trace(state, x).lower(lowering_platforms=("cuda",)).as_text()
    assert "[b, 0, 1, 2, f]" in gpu and "[b, 0, 1, f]" not in gpu  # XLA's conv on GPUs
    bias = conv.bias[...].reshape(1, 1, 1, 1, -1)
    ref = _reference(x, conv.kernel[...], stride, _pad(kernel)) + bias
    np.testing.assert_allclose(jax.jit(fwd)(state, x), ref, rtol=1e-5, atol=1e-5)
