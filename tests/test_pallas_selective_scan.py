"""The Pallas selective scan beyond the shared contract (tests/test_selective_scan.py runs that
against `pallas` in interpret mode and compiled): each kernel phase against its jnp reference,
padded multi-chunk cases with poisoned outputs and every saved-state stride, N=256 with the
default tiling, finite differences in float64, memory (no (B, L, D, N) tensor; the saved and the
backward's buffers pinned), the Triton backend's isolation, tiling and dispatch.
"""

import functools
import importlib
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_case, random_inputs, rel_err
from test_selective_scan import (
    F32_GRAD_TOL,
    F32_OUT_TOL,
    FAST_COMPILE,
    SMALL,
    assert_close,
    outputs_and_grads,
)

from jaxmamba.kernels import scan_backward as kb
from jaxmamba.kernels import scan_common as sc
from jaxmamba.kernels import scan_forward as kf
from jaxmamba.kernels import selective_scan as ks
from jaxmamba.kernels.tiling import MIN_PROGRAMS, ScanTiling, default_tiling
from jaxmamba.kernels.triton_backend import unavailable_reason
from jaxmamba.ops import default_implementation, selective_scan
from jaxmamba.ops.scan_reference import selective_scan_reference

op_module = importlib.import_module("jaxmamba.ops.selective_scan")
REPO = Path(__file__).resolve().parents[1]


def pallas(tiling=SMALL, **kw):
    return functools.partial(ks.selective_scan_pallas, interpret=True, tiling=tiling, **kw)


def _phase_case(key, reverse, b=2, l=48, d=16, n=8):
    """The phase tests' case: sizes, the inputs (u, delta, z, A, B, C, D, delta_bias), an output
    cotangent and the kernels' statics with the `SMALL` tiling."""
    a, _, g = random_case(key, b, l, d, n)
    inputs = tuple(a[k] for k in ("u", "delta", "z", "A", "B", "C", "D", "delta_bias"))
    st = sc.ScanStatics(tiling=SMALL, length=l, padded_length=l, delta_softplus=True,
                        reverse=reverse, has_z=True, interpret=True)
    return (b, l, d, n), inputs, g, st


@pytest.mark.parametrize("reverse", [False, True])
def test_phase_kernels_match_references(key, reverse):
    """K1 (chunk end states, Σδ), K3 (outputs), B1 (chunk-local adjoints) and B3 (gradients)
    against their jnp references, from random chunk start states and successor adjoints."""
    (b, l, d, n), (u, dt, z, A, B, C, D, bias), g, st = _phase_case(key, reverse)
    k_in, k_mu = jax.random.split(jax.random.fold_in(key, 1))
    n_chunks = l // SMALL.chunk
    h_in = jax.random.normal(k_in, (b, n_chunks, d, n))
    mu = jax.random.normal(k_mu, (b, n_chunks, d, n))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def phases():
        return (kf.chunk_states(st, u, dt, A, B, bias, jnp.float32),
                kf.chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in),
                kb.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, h_in),
                kb.chunk_gradients(st, u, dt, z, g, A, B, C, D, bias,
                                   kb.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, h_in)[0],
                                   mu))

    (h, s), y, (_, q), grads = phases()
    h_ref, s_ref = kf.chunk_states_reference(st, u, dt, A, B, bias, jnp.float32)
    assert h.shape == (b, n_chunks, d, n)
    assert rel_err(h, h_ref) <= F32_OUT_TOL and rel_err(s, s_ref) <= F32_OUT_TOL
    assert rel_err(y, kf.chunk_outputs_reference(st, u, dt, z, A, B, C, D, bias, h_in)) \
        <= F32_OUT_TOL
    q_ref = kb.chunk_adjoints_reference(st, dt, z, g, A, C, bias, jnp.float32)
    assert rel_err(q, q_ref) <= F32_OUT_TOL
    du, ddt, dz, db, dc, da, dd, dbias = grads
    want = kb.chunk_gradients_reference(st, u, dt, z, g, A, B, C, D, bias, h_in, mu)
    got = (du, ddt, dz, db.sum(0), dc.sum(0), da.sum((0, 1)), dd.sum((0, 1)), dbias.sum((0, 1)))
    for name, x, x_ref in zip(("du", "ddelta", "dz", "dB", "dC", "dA", "dD", "dbias"), got, want,
                              strict=True):
        assert x.shape == x_ref.shape, name
        assert rel_err(x, x_ref) <= F32_GRAD_TOL, name


@pytest.mark.parametrize("reverse", [False, True])
def test_phase_references_match_the_sequential_reference(key, reverse):
    """The oracle for the phases' jnp references: K1's end states and K3's outputs are
    `selective_scan_reference` run on each chunk alone (from zero, and from random start states)."""
    (b, l, d, n), (u, dt, z, A, B, C, D, bias), _, st = _phase_case(key, reverse)
    t, n_chunks = SMALL.chunk, l // SMALL.chunk
    h_in = jax.random.normal(jax.random.fold_in(key, 1), (b, n_chunks, d, n))

    def per_chunk(*xs):
        return [None if x is None else x.reshape(b * n_chunks, t, x.shape[-1]) for x in xs]

    cu, cdt, cz, cb, cc = per_chunk(u, dt, z, B, C)
    _, h_zero = selective_scan_reference(cu, cdt, A, cb, cc, delta_bias=bias, reverse=reverse)
    y_ref, h_ref = selective_scan_reference(cu, cdt, A, cb, cc, D, cz, bias, reverse=reverse,
                                            initial_state=h_in.reshape(-1, d, n))
    h, s = kf.chunk_states_reference(st, u, dt, A, B, bias, jnp.float32)
    assert rel_err(h, h_zero.reshape(h.shape)) <= F32_OUT_TOL
    delta = jax.nn.softplus(dt + bias[None, None])
    assert rel_err(s, delta.reshape(b, n_chunks, t, d).sum(2)) <= F32_OUT_TOL
    y, h_end = kf.chunk_scan_reference(st, u, dt, z, A, B, C, D, bias, h_in)
    assert rel_err(y, y_ref.reshape(b, l, d)) <= F32_OUT_TOL
    assert rel_err(h_end, h_ref.reshape(h_in.shape)) <= F32_OUT_TOL


@pytest.mark.parametrize("reverse,stride,fused", [(False, 1, False), (True, 4, False),
                                                 (True, 2, True)])
def test_padded_multi_chunk_poisoned(key, reverse, stride, fused):
    """L=45 (3 chunks, 3 padding rows), D=20 (2 channel tiles), N=12 (padded to 16), 8 sub-chunks
    per chunk with a saved state every `stride` of them (the contract runs stride 2), saved by
    the backward or (`fused_replay`) by the forward, initial state and final-state gradient;
    every kernel output starts as NaN."""
    args, h0, g = random_case(key, 2, 45, 20, 12)
    tiling = ScanTiling(chunk=16, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=2,
                        bwd_warps=1, state_stride=stride)
    got = outputs_and_grads(pallas(tiling=tiling, poison_outputs=True, fused_replay=fused),
                            args, h0, g, reverse=reverse)
    assert got[1].dtype == jnp.float32 and len(jax.tree.leaves(got[2])) == 9
    assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g, reverse=reverse),
                 F32_OUT_TOL, F32_GRAD_TOL)


def test_large_state(key):
    """N=256 (the deep Synapse stages' d_state) with its default tiling (4 replayed steps)."""
    args, h0, g = random_case(key, 1, 20, 16, 256)
    assert_close(outputs_and_grads(pallas(tiling=None), args, h0, g),
                 outputs_and_grads(selective_scan_reference, args, h0, g),
                 F32_OUT_TOL, F32_GRAD_TOL)


def test_finite_differences_float64(key):
    """The custom VJP against central differences along random directions (float64, reverse,
    2 chunks with padding, 4 sub-chunks each and 2 saved states, all inputs and the initial
    state)."""
    tiling = ScanTiling(chunk=8, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=2,
                        bwd_warps=1, state_stride=2)
    with jax.enable_x64(True):
        args, h0, _ = random_case(key, 1, 11, 3, 2, dtype=jnp.float64)
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
    """The fwd+bwd holds nothing near B·L·D·N elements (the largest is (B, L/(S·stride), D, N));
    the check itself sees a (B, L, D, N) product."""
    b, l, d, n = 1, 8192, 16, 16
    shapes = dict(u=(b, l, d), delta=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n), D=(d,),
                  z=(b, l, d), delta_bias=(d,))
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

    def loss(a):
        return jnp.sum(ks.selective_scan_pallas(**a, interpret=True)[0])

    largest = largest_intermediate(jax.make_jaxpr(jax.grad(loss))(args).jaxpr)
    t = default_tiling(b, l, d, n)
    assert largest * t.sub_chunk * t.state_stride <= b * l * d * n

    def materialising(a):
        return jnp.sum(jax.jit(lambda a: jnp.exp(a["delta"][..., None] * a["A"][None, None]))(a))

    assert largest_intermediate(jax.make_jaxpr(materialising)(args).jaxpr) == b * l * d * n


def kernel_output_bytes(jaxpr) -> dict[str, int]:
    """Bytes written by each Pallas kernel of `jaxpr` and its sub-jaxprs, by kernel name
    (`pallas_call`; Mosaic GPU's `plgpu.kernel` traces to `mpmd_map`)."""
    out: dict[str, int] = {}
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ("pallas_call", "mpmd_map"):
            name = str(eqn.params["name"])
            out[name] = out.get(name, 0) + sum(int(np.prod(a.shape)) * a.dtype.itemsize
                                               for a in eqn.params["out_avals"])
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else [param]:
                sub = sub.jaxpr if isinstance(sub, jax.extend.core.ClosedJaxpr) else sub
                if isinstance(sub, jax.extend.core.Jaxpr):
                    for k, v in kernel_output_bytes(sub).items():
                        out[k] = out.get(k, 0) + v
    return out


#: Synapse stage 0 (batch 2, 48x192x192 tokens, d_inner 64, d_state 32) and a small shape.
@pytest.mark.parametrize("b,l,d,n,fused", [(2, 1769472, 64, 32, False), (1, 4096, 16, 16, False),
                                           (1, 4096, 16, 16, True)])
def test_saved_and_backward_state_bytes(b, l, d, n, fused):
    """Traced, not run. The VJP saves the inputs, the zero initial state, the chunk start states
    and Σδ; the backward's adjoint kernel writes one state per `sub_chunk·state_stride` rows plus
    the local adjoints: 1.79 GiB at Synapse stage 0 (a state per sub-chunk: 3.48 GiB). With
    `fused_replay` the forward saves those states instead of the chunk start states, and the
    adjoint kernel writes only the local adjoints."""
    shapes = dict(u=(b, l, d), delta=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n), D=(d,),
                  z=(b, l, d), delta_bias=(d,))
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    t = default_tiling(b, l, d, n)
    assert l % t.chunk == 0 and d % t.bwd_block_d == 0 and n == 2 ** (n.bit_length() - 1)
    n_chunks, f32 = l // t.chunk, 4

    def scan(a):
        return ks.selective_scan_pallas(**a, interpret=True, fused_replay=fused)[0]

    saved = jax.tree.leaves(jax.eval_shape(lambda a: jax.vjp(scan, a)[1], args))
    inputs = sum(int(np.prod(s)) for s in shapes.values())
    state = b * n_chunks * d * n  # one (B, nC, D, N) array
    backward_states = state * t.saved_states
    assert sum(x.size * x.dtype.itemsize for x in saved) == f32 * (
        inputs + b * d * n + (backward_states if fused else state) + b * n_chunks * d)
    written = kernel_output_bytes(jax.make_jaxpr(jax.grad(lambda a: jnp.sum(scan(a))))(args).jaxpr)
    assert written["selective_scan_chunk_adjoints"] == f32 * (
        state + (0 if fused else backward_states))
    assert t.saved_states * t.sub_chunk * 2 <= t.chunk  # at most half a state per sub-chunk


def test_triton_backend_is_imported_only_to_compile():
    """Importing jaxmamba and running the kernels in interpret mode never imports Pallas'
    Triton backend (a fresh interpreter; deprecated upstream, it may go)."""
    code = (
        "import sys, jax, jax.numpy as jnp\n"
        "import jaxmamba, jaxmamba.ops, jaxmamba.layers\n"
        "from jaxmamba.kernels.selective_scan import selective_scan_pallas as f\n"
        "u, A, b = jnp.ones((1, 8, 4)), -jnp.ones((4, 2)), jnp.ones((1, 8, 2))\n"
        "g = jax.grad(lambda u: f(u, u, A, b, b, interpret=True)[0].sum())(u)\n"
        "jax.block_until_ready(g)\n"
        "loaded = [m for m in sys.modules if m.startswith(('jax.experimental.pallas.triton',\n"
        "                                                  'jax._src.pallas.triton'))]\n"
        "print('triton modules:', loaded)\n"
        "sys.exit(1 if loaded else 0)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**os.environ,
                                                       "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stdout + proc.stderr[-2000:]


def test_gpu_without_triton_falls_back_to_xla_once(monkeypatch, key):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(op_module, "_pallas_unavailable", lambda: "no Triton here (test)")
    monkeypatch.setattr(op_module, "_warned_fallback", False)
    with pytest.warns(UserWarning, match=r"cannot compile on this GPU: no Triton here \(test\)"
                                         r".*Falling back to implementation='xla'"):
        assert default_implementation() == "xla"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_implementation() == "xla"  # warned once only
    with pytest.raises(ValueError, match="implementation='pallas' cannot compile on this GPU"):
        selective_scan(**random_inputs(key, 1, 8, 4, 2), implementation="pallas")


def test_dispatch_and_interpret_warning(monkeypatch):
    assert default_implementation() == ("pallas" if jax.default_backend() == "gpu" else "xla")
    if jax.default_backend() == "gpu":
        return
    monkeypatch.setattr(ks, "_warned_interpret", False)
    a = random_inputs(jax.random.key(0), 1, 8, 4, 2)

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
    assert t.chunk % (t.sub_chunk * t.state_stride) == 0
    assert t.block_d <= max(16, d) and t.bwd_block_d <= max(16, d)
    if b * l * d >= 16 * MIN_PROGRAMS * 256:  # long sequences: full chunks, enough programs
        assert t.chunk == 256 and t.state_stride == 2
        assert b * (l // t.chunk) * (d // t.block_d) >= MIN_PROGRAMS


def test_kernels_lower_to_triton():
    """Every kernel of the fwd+bwd lowers to Triton IR for a CUDA GPU, on any machine (traced
    and lowered, not compiled: catches a primitive or shape that Pallas' Triton lowering lacks,
    which interpret mode never sees), padded and reversed, N=32."""
    if reason := unavailable_reason():
        pytest.skip(reason)
    b, l, d, n = 1, 1000, 40, 32
    shapes = dict(u=(b, l, d), delta=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n), D=(d,),
                  z=(b, l, d), delta_bias=(d,))
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

    def grads(a):  # the value too: newer JAX drops the output kernel from a gradient alone
        return jax.value_and_grad(lambda a: jnp.sum(ks.selective_scan_pallas(
            **a, interpret=False, reverse=True)[0]))(a)

    # the target GPU, for JAX versions (>= 0.12) that ask Pallas' Triton lowering for one
    target = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        "NVIDIA H100", None, "cuda"))
    with jax.sharding.use_abstract_mesh(target):
        text = jax.jit(grads).trace(args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("__gpu$xla.gpu.triton") == 4  # K1, K3, B1, B3
    assert set(re.findall(r'name = "(selective_scan_\w+)"', text)) == {
        "selective_scan_chunk_states", "selective_scan_chunk_outputs",
        "selective_scan_chunk_adjoints", "selective_scan_chunk_gradients"}


def test_bad_tiling_is_named():
    with pytest.raises(ValueError, match="ScanTiling.block_d=24: expected a power of two"):
        ScanTiling(chunk=16, block_d=24, fwd_warps=1, bwd_block_d=16, sub_chunk=4, bwd_warps=1)
    with pytest.raises(ValueError, match="chunk=8 is not a multiple of sub_chunk=16 x "
                                         "state_stride=1"):
        ScanTiling(chunk=8, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=16, bwd_warps=1)
    with pytest.raises(ValueError, match="ScanTiling.state_stride=3: expected a power of two"):
        ScanTiling(chunk=8, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=2, bwd_warps=1,
                   state_stride=3)
