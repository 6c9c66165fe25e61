"""Mamba layers against independent float64 / explicit-flip / explicit-transpose definitions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close_to, rel_err
from flax import nnx

from jaxmamba.layers import (
    Mamba,
    MambaLayer,
    MambaOptions,
    MambaTrans,
    MultiMambaTrans,
    PanMambaTrans,
)
from jaxmamba.ops import causal_conv1d

TOL = 1e-5


def params(module):
    return {"/".join(map(str, k)): np.asarray(v[...], np.float64)
            for k, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def np_layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def np_mamba(p, x, prefix=""):
    """mamba_ssm `Mamba.forward` (slow path) in float64 NumPy, with a sequential scan."""
    g = lambda name: p[prefix + name]  # noqa: E731
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    xz = x @ g("in_proj/kernel")
    e = xz.shape[-1] // 2
    xs, z = xz[..., :e], xz[..., e:]
    w = g("conv1d/kernel")  # (W, E)
    width, length = w.shape[0], x.shape[1]
    xp = np.concatenate([np.zeros((x.shape[0], width - 1, e)), xs], axis=1)
    xc = g("conv1d/bias") + sum(w[k] * xp[:, k:k + length] for k in range(width))
    xc = xc * sig(xc)
    x_dbl = xc @ g("x_proj/kernel")
    r = g("dt_proj/kernel").shape[0]
    n = g("A_log").shape[1]
    dt_lr, bm, cm = x_dbl[..., :r], x_dbl[..., r:r + n], x_dbl[..., r + n:]
    raw = dt_lr @ g("dt_proj/kernel") + g("dt_proj/bias")
    delta = np.where(raw > 20, raw, np.log1p(np.exp(np.minimum(raw, 20))))
    a = -np.exp(g("A_log"))
    h = np.zeros((x.shape[0], e, n))
    ys = []
    for t in range(length):
        inp = (delta[:, t] * xc[:, t])[..., None] * bm[:, t, None]
        h = np.exp(delta[:, t, :, None] * a) * h + inp
        ys.append((h * cm[:, t, None]).sum(-1) + g("D") * xc[:, t])
    y = np.stack(ys, 1) * z * sig(z)
    return y @ g("out_proj/kernel")


@pytest.mark.numerics
def test_mamba_shapes_and_initialisation():
    m = Mamba(32, d_state=32, rngs=nnx.Rngs(0))
    p = params(m)
    assert sum(v.size for v in p.values()) == 12_992  # mamba_ssm Mamba(32, d_state=32)
    assert p["in_proj/kernel"].shape == (32, 128) and "in_proj/bias" not in p
    assert p["x_proj/kernel"].shape == (64, 2 + 64) and p["dt_proj/kernel"].shape == (2, 64)
    np.testing.assert_allclose(p["A_log"], np.log(np.tile(np.arange(1, 33), (64, 1))), rtol=1e-6)
    np.testing.assert_array_equal(p["D"], 1.0)
    dt = np.log1p(np.exp(p["dt_proj/bias"]))
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert dt.std() > 0.01  # log-uniform between the bounds, not a constant
    for name, bound in [("in_proj/kernel", 32**-0.5), ("out_proj/kernel", 64**-0.5),
                        ("conv1d/kernel", 0.5), ("dt_proj/kernel", 2**-0.5)]:
        assert np.abs(p[name]).max() <= bound
        assert np.abs(p[name]).max() > 0.8 * bound


@pytest.mark.numerics
def test_mamba_matches_float64_definition(key):
    m = Mamba(16, d_state=8, rngs=nnx.Rngs(1))
    x = jax.random.normal(key, (2, 24, 16))
    want = np_mamba(params(m), np.asarray(x, np.float64))
    assert rel_err(m(x), want) <= TOL
    # reverse=True is the same block on the flipped sequence
    want_rev = np_mamba(params(m), np.asarray(x, np.float64)[:, ::-1])[:, ::-1]
    assert rel_err(m(x, reverse=True), want_rev) <= TOL


@pytest.mark.numerics
@pytest.mark.parametrize("scan", ["xla", "pallas"])
def test_bf16_mamba_path(key, monkeypatch, scan):
    """`mamba_precision="bf16"`: projections on bf16 operands, a bf16 causal conv, bf16 scan inputs
    with float32 A, D and δ bias; output within bf16 rounding of the float64 definition, both
    directions, and (`xla`; the Pallas kernels' bf16 gradients are the scan contract's)
    gradients, float32 as the parameters, within bf16 rounding of the float32 path's."""
    import jaxmamba.layers.mamba as mamba_module

    seen = []

    def spy(*args, **kw):
        seen.append({k: v.dtype for k, v in zip("u delta A B C".split(), args, strict=False)}
                    | {k: kw[k].dtype for k in ("D", "z", "delta_bias")})
        return selective_scan(*args, **kw)

    from jaxmamba.ops import selective_scan
    monkeypatch.setattr(mamba_module, "selective_scan", spy)
    x = jax.random.normal(key, (2, 40, 16))
    m16 = nnx.jit(lambda: Mamba(16, d_state=8, options=MambaOptions(
        scan, mamba_precision="bf16"), rngs=nnx.Rngs(1)))()
    dots = [e for e in jax.make_jaxpr(m16)(x).eqns if e.primitive.name == "dot_general"]
    assert len(dots) == 4  # in, x, dt, out projections
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.invars)
    assert all(v.aval.dtype == jnp.bfloat16 for e in dots for v in e.outvars)
    bf16, f32 = jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)
    assert seen[-1] == dict(u=bf16, delta=bf16, A=f32, B=bf16, C=bf16, D=f32, z=bf16,
                            delta_bias=f32)
    run = nnx.jit(lambda m, x, reverse: m(x, reverse=reverse), static_argnames="reverse")
    for reverse in (False, True):
        flip = (lambda a: a[:, ::-1]) if reverse else (lambda a: a)
        want = flip(np_mamba(params(m16), flip(np.asarray(x, np.float64))))
        y = run(m16, x, reverse)
        assert y.dtype == jnp.bfloat16 and np.abs(want).max() > 0.1
        # bf16 rounding: measured 4.7e-3 to 5.1e-3 (xla, 5 seeds, L=200, 2026-12-07)
        assert rel_err(y, want) <= 1.5e-2
    if scan != "xla":
        return
    m32 = nnx.jit(lambda: Mamba(16, d_state=8, options=MambaOptions(scan), rngs=nnx.Rngs(1)))()

    def loss(m, x):
        return jnp.sum(m(x).astype(jnp.float32) ** 2)

    grad = nnx.jit(nnx.grad(loss))
    g16, g32 = grad(m16, x), grad(m32, x)
    for a, b in zip(jax.tree.leaves(g16), jax.tree.leaves(g32), strict=True):
        assert a.dtype == jnp.float32 and np.isfinite(a).all() and np.abs(b).max() > 0
        # measured 4.2e-3 to 1.2e-2 over the parameters (xla, 5 seeds, 2026-12-07)
        assert rel_err(a, b) <= 3e-2


@pytest.mark.numerics
@pytest.mark.parametrize("reverse", [False, True])
def test_causal_conv1d_sums_bf16_in_float32(key, reverse):
    """bf16 in, bf16 out, float32 products and sums: the float32 conv of the same bf16 values,
    rounded once."""
    x = jax.random.normal(key, (2, 33, 8)).astype(jnp.bfloat16)
    w, b = jax.random.normal(jax.random.key(1), (4, 8)), jax.random.normal(jax.random.key(2), (8,))
    got = causal_conv1d(x, w, b, activation="silu", reverse=reverse)
    want = causal_conv1d(x.astype(jnp.float32), w, b, activation="silu", reverse=reverse)
    assert got.dtype == jnp.bfloat16 and np.abs(want).max() > 0.1
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray(want.astype(jnp.bfloat16), np.float32))


@pytest.mark.numerics
@pytest.mark.parametrize("reverse", [False, True])
def test_causal_conv1d(key, reverse):
    kx, kw, kb = jax.random.split(key, 3)
    x = jax.random.normal(kx, (2, 9, 5))
    w = jax.random.normal(kw, (4, 5))
    b = jax.random.normal(kb, (5,))
    xn = np.asarray(x)[:, ::-1] if reverse else np.asarray(x)
    want = np.zeros_like(xn)
    for t in range(9):
        for k in range(4):
            src = t - 3 + k
            if src >= 0:
                want[:, t] += np.asarray(w)[k] * xn[:, src]
    want = want + np.asarray(b)
    if reverse:
        want = want[:, ::-1]
    assert_close_to(causal_conv1d(x, w, b, reverse=reverse), want, rtol=1e-5, atol=1e-6)


@pytest.mark.numerics
def test_mamba_trans_is_two_pre_ln_residuals(key):
    blk = MambaTrans(8, rngs=nnx.Rngs(2))
    p = params(blk)
    x = np.asarray(jax.random.normal(key, (1, 10, 8)), np.float64)
    h = np_mamba(p, np_layer_norm(x, p["norm1/scale"], p["norm1/bias"]), "mamba/") + x
    head_in = np_layer_norm(h, p["norm2/scale"], p["norm2/bias"])
    want = head_in @ p["head/kernel"] + p["head/bias"] + h
    assert rel_err(blk(jnp.asarray(x, jnp.float32)), want) <= TOL


@pytest.mark.numerics
def test_pan_mamba_trans_equals_explicit_flips(key):
    blk = PanMambaTrans(8, rngs=nnx.Rngs(3))
    x = jax.random.normal(key, (2, 11, 8))
    fwd = blk.fwd_mamba(x)
    bwd = jnp.flip(blk.bwd_mamba(jnp.flip(x, axis=1)), axis=1)
    assert rel_err(blk(x), blk.norm(fwd + bwd)) <= TOL


@pytest.mark.numerics
def test_multi_mamba_trans_equals_explicit_transposes(key):
    """Reference formulation in NCDHW: permutations [0, 1, 2, 4] of itertools over (2, 3, 4)."""
    blk = MultiMambaTrans(4, rngs=nnx.Rngs(4))
    x = jax.random.normal(key, (1, 3, 5, 7, 4))  # channels-last, non-cubic
    got = nnx.jit(lambda m, v: m(v))(blk, x)
    xt = jnp.transpose(x, (0, 4, 1, 2, 3))  # NCDHW
    perms = [p for i, p in enumerate(itertools.permutations([2, 3, 4])) if i in (0, 1, 2, 4)]
    outs = []
    for p, pan in zip(perms, blk.mambas, strict=True):
        xp = jnp.transpose(xt, (0, 1, *p))
        b, c = xp.shape[:2]
        o = nnx.jit(lambda m, v: m(v))(pan, xp.reshape(b, c, -1).transpose(0, 2, 1))
        o = o.transpose(0, 2, 1).reshape(xp.shape)
        outs.append(jnp.transpose(o, (0, 1, *(np.argsort(p) + 2))))
    want = jnp.transpose(jnp.stack(outs, 1).mean(1), (0, 2, 3, 4, 1))
    assert rel_err(got, want) <= TOL


@pytest.mark.numerics
@pytest.mark.parametrize("bidirectional", [False, True])
def test_mamba_layer_flattens_normalises_and_keeps_dtype(key, bidirectional):
    layer = MambaLayer(8, bidirectional=bidirectional, rngs=nnx.Rngs(5))
    x = jax.random.normal(key, (2, 3, 4, 5, 8))
    tokens = x.reshape(2, 60, 8)  # row-major, last spatial axis fastest
    want = nnx.jit(lambda m, t: m.mamba(m.norm(t)))(layer, tokens).reshape(x.shape)
    run = nnx.jit(lambda m, v: m(v))
    assert rel_err(run(layer, x), want) <= TOL
    y16 = run(layer, x.astype(jnp.bfloat16))
    assert y16.dtype == jnp.bfloat16
    # bf16 rounding of x and y: measured 2.1e-3 to 2.4e-3 (5 seeds, both directions, 2026-12-02)
    assert rel_err(y16, want) <= 6e-3


def test_d_state_rules():
    assert MambaLayer(320, bidirectional=False, rngs=nnx.Rngs(0)).mamba.mamba.d_state == 256
    assert MambaTrans(32, rngs=nnx.Rngs(0)).mamba.d_state == 32
    multi = nnx.eval_shape(lambda: MultiMambaTrans(128, rngs=nnx.Rngs(0)))
    assert multi.mambas[0].fwd_mamba.mamba.d_state == 64
