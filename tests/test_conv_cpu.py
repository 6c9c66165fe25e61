"""The CPU convolution path of `jaxmamba.ops.conv3d`: `depth_folded_conv3d` equals
`lax.conv_general_dilated` (outputs and gradients, odd shapes, strides, kernels 1, 3 and
anisotropic, bf16), the conv blocks take it on a CPU (checked in the compiled HLO), and the
jitted train step and network keep its convolutions off YNNPACK (`cpu_compiler_options`)."""

import re
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import tiny_plan
from flax import nnx

from jaxmamba.layers.conv import conv3d
from jaxmamba.ops import conv3d as conv_module
from jaxmamba.ops.conv3d import cpu_compiler_options, depth_folded_conv3d
from jaxmamba.ops.mesh import make_mesh

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


def _fake_mesh(platform):
    return SimpleNamespace(devices=np.array([SimpleNamespace(platform=platform)]))


def _ynnpack_ops(compiled_text: str) -> dict[str, int]:
    """How often each HLO op occurs inside the YNNPACK fusions (`__ynn_fusion`) of a compiled
    CPU program."""
    ops: dict[str, int] = {}
    for called in re.findall(r"kind=kCustom, calls=(%[\w.\-]+)[^\n]*__ynn_fusion", compiled_text):
        body = re.search(re.escape(called) + r" [^\n]*\{(.*?)\n\}", compiled_text, re.S).group(1)
        for op in re.findall(r"= \S+ ([a-z][\w-]*)\(", body):
            ops[op] = ops.get(op, 0) + 1
    return ops


def test_cpu_compiler_options_keep_convolutions_off_ynnpack():
    """The train step as `jit_steps` compiles it holds no convolution inside a YNNPACK fusion,
    where XLA's defaults put some, and this jaxlib accepts the option; GPUs get XLA's
    defaults."""
    import optax

    from jaxmamba.models import build_model
    from jaxmamba.train import step

    mesh = make_mesh(1)
    graphdef, state = step.init_state(build_model("plainconvunet", tiny_plan(), rngs=0),
                                      optax.sgd(0.1))
    train_step, eval_step = step.make_steps(graphdef, optax.sgd(0.1), batch_dice=True)
    batch = {"image": np.zeros((2, 8, 16, 16, 1), np.float32),
             "target": (np.zeros((2, 8, 16, 16), np.int32),)}
    train, _ = step.jit_steps(train_step, eval_step, mesh)
    ours = _ynnpack_ops(train.lower(state, batch).compile().as_text())
    default = _ynnpack_ops(jax.jit(train_step).lower(state, batch).compile().as_text())
    assert default.get("convolution", 0) > 0, f"XLA gives YNNPACK no convolution: {default}"
    assert "convolution" not in ours and "reduce" in ours, ours  # the rest stays on YNNPACK
    assert cpu_compiler_options(mesh, gradients=True) == conv_module.NO_YNNPACK_CONVOLUTIONS
    for gradients in (True, False):
        assert cpu_compiler_options(_fake_mesh("gpu"), gradients=gradients) is None


@pytest.mark.parametrize("jaxlib_version,forward", [("0.10.2", True), ("0.11.2", True),
                                                     ("0.12.0", False), ("1.0.0", False)])
def test_forward_keeps_xla_defaults_from_jaxlib_0_12(jaxlib_version, forward, monkeypatch):
    monkeypatch.setattr(conv_module.jaxlib, "__version__", jaxlib_version)
    mesh = _fake_mesh("cpu")
    assert (cpu_compiler_options(mesh, gradients=False) is not None) == forward
    assert cpu_compiler_options(mesh, gradients=True) == conv_module.NO_YNNPACK_CONVOLUTIONS
