"""The Pallas selective scan in interpret mode: mamba_ssm's fixtures, the foundation issue's cases,
phase kernels against their jnp references, the whole op against the sequential reference
(multi-chunk, padded L/D/N, reverse, initial and final state, bf16, N=256), finite differences in
float64, poisoned outputs, memory, tiling and dispatch.

Interpret mode spends its time in XLA's CPU compiler (seconds per kernel), so every case runs as
one top-level jit compiled without LLVM's expensive passes.
"""

import functools
import warnings

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from test_selective_scan import F32_GRAD_TOL, F32_OUT_TOL, load_cases

from jaxmamba.kernels import scan_backward as kb
from jaxmamba.kernels import scan_common as sc
from jaxmamba.kernels import scan_forward as kf
from jaxmamba.kernels import selective_scan as ks
from jaxmamba.kernels.tiling import MIN_PROGRAMS, ScanTiling, default_tiling
from jaxmamba.ops import default_implementation, selective_scan
from jaxmamba.ops.scan_reference import selective_scan_reference

#: 2-3x faster XLA CPU compiles of the interpreted kernels; they run in milliseconds regardless.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

#: A tiling that gives several chunks, several sub-chunks and two channel tiles on tiny shapes;
#: short sub-chunks keep the unrolled replay, and so the compile, small.
SMALL = ScanTiling(chunk=16, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=2, bwd_warps=1)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300)


def inputs(key, b, l, d, n, dtype=jnp.float32):
    k = jax.random.split(key, 10)
    return dict(
        u=jax.random.normal(k[0], (b, l, d), dtype),
        delta=(jax.random.normal(k[1], (b, l, d)) - 1.0).astype(dtype),
        A=-jnp.exp(jax.random.normal(k[2], (d, n))).astype(dtype),
        B=jax.random.normal(k[3], (b, l, n), dtype),
        C=jax.random.normal(k[4], (b, l, n), dtype),
        D=jax.random.normal(k[5], (d,), dtype),
        z=jax.random.normal(k[6], (b, l, d), dtype),
        delta_bias=(0.5 * jax.random.normal(k[7], (d,))).astype(dtype),
    ), jax.random.normal(k[8], (b, d, n)), jax.random.normal(k[9], (b, l, d))


def outputs_and_grads(fn, args, h0, g, **kw):
    """y, final state and the gradients (all inputs and h0) of `sum(y g) + sum(h_last h0)`."""
    def loss(a, h0):
        y, h = fn(**a, initial_state=h0, **kw)
        return jnp.sum(y.astype(h.dtype) * g) + jnp.sum(h * h0), (y, h)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(args, h0, g):
        (_, (y, h)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(args, h0)
        return y, h, grads

    return run(args, h0, g)


def assert_close(got, want, out_tol, grad_tol):
    (y, h, grads), (y_r, h_r, grads_r) = got, want
    assert y.shape == y_r.shape and h.shape == h_r.shape
    assert rel_err(y, y_r) <= out_tol and rel_err(h, h_r) <= out_tol
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_err(g, g_r) <= grad_tol


def pallas(tiling=SMALL, **kw):
    return functools.partial(ks.selective_scan_pallas, interpret=True, tiling=tiling, **kw)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_mamba_ssm_fixtures(reference_dir, dtype):
    """mamba_ssm's float64 cases (B, L ≤ 1000, N ≤ 32, with and without z/D/bias/softplus): the
    two smallest in float64, the other three in float32 (each case is a compile)."""
    tol = (F32_OUT_TOL, F32_GRAD_TOL) if dtype == jnp.float32 else (1e-10, 1e-10)
    cases = sorted(load_cases(reference_dir), key=lambda c: c["y"].size)
    cases = cases[:2] if dtype == jnp.float64 else cases[2:]
    with jax.enable_x64(dtype == jnp.float64):
        for case in cases:
            present = {k: jnp.asarray(v, dtype) for k, v in case["inputs"].items()
                       if v is not None}
            b, _, d = present["u"].shape
            h0 = jnp.zeros((b, d, present["A"].shape[1]), dtype)
            y, h, (grads, _) = outputs_and_grads(pallas(delta_softplus=case["softplus"]),
                                                 present, h0, jnp.asarray(case["grad_y"], dtype))
            assert rel_err(y, case["y"]) <= tol[0], case["name"]
            assert rel_err(h, case["last_state"]) <= tol[0], case["name"]
            for name, g in grads.items():
                assert rel_err(g, case["grads"][name]) <= tol[1], (case["name"], name)


@pytest.mark.parametrize("b,l,d,n,reverse,offset,optional", [
    (1, 1, 4, 1, True, 0.0, True),
    (2, 20, 6, 48, True, 0.0, True),
    (1, 33, 4, 16, False, 30.0, True),  # δ·|A| large: decays underflow to 0
    (1, 33, 4, 16, True, -40.0, True),  # tiny δ
    (2, 12, 4, 3, False, 0.0, False),  # no z, D, delta_bias, no softplus
])
def test_foundation_cases(key, b, l, d, n, reverse, offset, optional):
    args, h0, g = inputs(key, b, l, d, n)
    args["delta"] = args["delta"] + offset
    if not optional:
        args = {k: v for k, v in args.items() if k not in ("z", "D", "delta_bias")}
    kw = dict(reverse=reverse, delta_softplus=optional)
    assert_close(outputs_and_grads(pallas(**kw), args, h0, g),
                 outputs_and_grads(selective_scan_reference, args, h0, g, **kw),
                 F32_OUT_TOL, F32_GRAD_TOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_phase_kernels_match_references(key, reverse):
    """K1 (chunk end states, Σδ) and B1 (chunk-local adjoints) against per-chunk lax.scans."""
    b, l, d, n = 2, 48, 16, 8
    a, _, g = inputs(key, b, l, d, n)
    st = sc.ScanStatics(tiling=SMALL, length=l, padded_length=l, delta_softplus=True,
                        reverse=reverse, has_z=True, interpret=True)
    h, s = kf.chunk_states(st, a["u"], a["delta"], a["A"], a["B"], a["delta_bias"], jnp.float32)
    h_ref, s_ref = kf.chunk_states_reference(st, a["u"], a["delta"], a["A"], a["B"],
                                             a["delta_bias"], jnp.float32)
    assert h.shape == (b, l // SMALL.chunk, d, n)
    assert rel_err(h, h_ref) <= F32_OUT_TOL and rel_err(s, s_ref) <= F32_OUT_TOL
    h_in = jax.random.normal(key, h.shape)
    _, q = kb.chunk_adjoints(st, a["u"], a["delta"], a["z"], g, a["A"], a["B"], a["C"],
                             a["delta_bias"], h_in)
    q_ref = kb.chunk_adjoints_reference(st, a["delta"], a["z"], g, a["A"], a["C"],
                                        a["delta_bias"], jnp.float32)
    assert rel_err(q, q_ref) <= F32_OUT_TOL


@pytest.mark.parametrize("reverse", [False, True])
def test_padded_multi_chunk_poisoned(key, reverse):
    """L=45 (3 chunks, 3 padding rows), D=20 (2 channel tiles), N=12 (padded to 16), 8 sub-chunks
    per chunk, initial state and final-state gradient; every kernel output starts as NaN."""
    args, h0, g = inputs(key, 2, 45, 20, 12)
    got = outputs_and_grads(pallas(poison_outputs=True), args, h0, g,
                            reverse=reverse)
    assert got[1].dtype == jnp.float32 and len(jax.tree.leaves(got[2])) == 9
    assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g, reverse=reverse),
                 F32_OUT_TOL, F32_GRAD_TOL)


def test_bfloat16_inputs(key):
    """bf16 activations (fp32 states inside): y in bf16, within 2e-2 of the fp32 reference."""
    args, h0, g = inputs(key, 1, 40, 16, 16, jnp.bfloat16)
    got = outputs_and_grads(pallas(), args, h0, g)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    up = {k: v.astype(jnp.float32) for k, v in args.items()}
    assert_close(got, outputs_and_grads(selective_scan_reference, up, h0, g), 2e-2, 2e-2)


def test_large_state(key):
    """N=256 (the deep Synapse stages' d_state) with its default tiling (4 replayed steps)."""
    args, h0, g = inputs(key, 1, 20, 16, 256)
    assert_close(outputs_and_grads(pallas(tiling=None), args, h0, g),
                 outputs_and_grads(selective_scan_reference, args, h0, g),
                 F32_OUT_TOL, F32_GRAD_TOL)


def test_finite_differences_float64(key):
    """The custom VJP against central differences along random directions (float64, reverse,
    2 chunks with padding, 4 sub-chunks each, all inputs and the initial state)."""
    tiling = ScanTiling(chunk=8, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=2,
                        bwd_warps=1)
    with jax.enable_x64(True):
        args, h0, _ = inputs(key, 1, 11, 3, 2, jnp.float64)
        args["initial_state"] = h0.astype(jnp.float64)

        def f(a):
            y, h = pallas(reverse=True, tiling=tiling)(**a)
            return jnp.sum(jnp.sin(y)) + jnp.sum(h * h)

        f_fast = jax.jit(f, compiler_options=FAST_COMPILE)
        grad = jax.jit(jax.grad(f), compiler_options=FAST_COMPILE)(args)
        eps = 1e-6
        for k in jax.random.split(jax.random.key(1), 3):
            keys = dict(zip(args, jax.random.split(k, len(args)), strict=True))
            v = {n: jax.random.normal(keys[n], x.shape, x.dtype) for n, x in args.items()}
            shifted = [{n: args[n] + s * eps * v[n] for n in args} for s in (1.0, -1.0)]
            numeric = (f_fast(shifted[0]) - f_fast(shifted[1])) / (2 * eps)
            analytic = sum(jnp.vdot(grad[n], v[n]) for n in args)
            assert abs(float(analytic) - float(numeric)) <= 1e-7 * max(1.0, abs(float(numeric)))


def largest_intermediate(jaxpr) -> int:
    """Elements of the largest value any equation of `jaxpr` or its sub-jaxprs produces."""
    sizes = [0]
    for eqn in jaxpr.eqns:
        sizes += [int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sizes.append(largest_intermediate(sub.jaxpr))
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    sizes.append(largest_intermediate(sub))
    return max(sizes)


def test_no_length_times_state_tensor():
    """The fwd+bwd holds nothing near B·L·D·N elements (the largest is (B, L/S, D, N)); the check
    itself sees a (B, L, D, N) product."""
    b, l, d, n = 1, 8192, 16, 16
    shapes = dict(u=(b, l, d), delta=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n), D=(d,),
                  z=(b, l, d), delta_bias=(d,))
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

    def loss(a):
        return jnp.sum(ks.selective_scan_pallas(**a, interpret=True)[0])

    largest = largest_intermediate(jax.make_jaxpr(jax.grad(loss))(args).jaxpr)
    assert largest * default_tiling(b, l, d, n).sub_chunk <= b * l * d * n

    def materialising(a):
        return jnp.sum(jax.jit(lambda a: jnp.exp(a["delta"][..., None] * a["A"][None, None]))(a))

    assert largest_intermediate(jax.make_jaxpr(materialising)(args).jaxpr) == b * l * d * n


def test_dispatch_and_interpret_warning(monkeypatch):
    assert default_implementation() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    if jax.default_backend() == "gpu":
        return
    monkeypatch.setattr(ks, "_warned_interpret", False)
    a, _, _ = inputs(jax.random.key(0), 1, 8, 4, 2)

    def trace():
        jax.make_jaxpr(lambda a: selective_scan(**a, implementation="pallas"))(a)

    with pytest.warns(UserWarning, match="interpret mode"):
        trace()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trace()  # warned once only


@pytest.mark.parametrize("b,l,d,n", [(2, 1769472, 64, 32), (2, 442368, 128, 64),
                                     (2, 6912, 512, 256), (2, 216, 640, 256),
                                     (2, 262144, 64, 16), (1, 3, 5, 1)])
def test_default_tiling(b, l, d, n):
    t = default_tiling(b, l, d, n)
    assert t.chunk % t.sub_chunk == 0
    assert t.block_d <= max(16, d) and t.bwd_block_d <= max(16, d)
    if b * l * d >= 16 * MIN_PROGRAMS * 256:  # long sequences: full chunks, enough programs
        assert t.chunk == 256
        assert b * (l // t.chunk) * (d // t.block_d) >= MIN_PROGRAMS


def test_bad_tiling_is_named():
    with pytest.raises(ValueError, match="ScanTiling.block_d=24: expected a power of two"):
        ScanTiling(chunk=16, block_d=24, fwd_warps=1, bwd_block_d=16, sub_chunk=4, bwd_warps=1)
    with pytest.raises(ValueError, match="chunk=8 is not a multiple of sub_chunk=16"):
        ScanTiling(chunk=8, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=16, bwd_warps=1)
