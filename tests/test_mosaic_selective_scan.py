"""The Mosaic GPU backend of the Pallas selective scan: the scan contract in Mosaic GPU's
interpret mode, one case per feature (tests/test_selective_scan.py runs the whole contract
class against it compiled, on a GPU), each kernel phase against the jnp reference of the Triton
backend's phase, lowering for a CUDA GPU on any machine (every JAX, including 0.10 which has no
Mosaic GPU interpret mode), float64's fallback, the saved states' bytes, tiling, and which
backend a GPU gets.

GPU interpret mode runs each program of each kernel in Python callbacks (~1000x Pallas' generic
interpreter: tens of seconds per case on a 2-core CPU), so the cases are few and small. What the
contract class checks, and where it is here: outputs, final state and every gradient with an
initial state (every case); reverse; padding of L, D and N, several chunks and channel tiles,
NaN-poisoned outputs, saved-state strides and `fused_replay` (`test_padded_multi_chunk_poisoned`);
float64, bf16, no optional inputs, extreme δ (one test each); mamba_ssm's fixtures check the
reference that all of these compare with.
"""

import contextlib
import functools
import importlib
import re
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_case, random_inputs, rel_err
from test_pallas_selective_scan import kernel_output_bytes
from test_selective_scan import (
    BF16_GRAD_TOL,
    BF16_OUT_TOL,
    F32_GRAD_TOL,
    F32_OUT_TOL,
    F64_TOL,
    FAST_COMPILE,
    assert_close,
    op,
    outputs_and_grads,
)

from jaxmamba.kernels import backends, mosaic_backend
from jaxmamba.kernels import mosaic_backward as mbw
from jaxmamba.kernels import mosaic_forward as mfw
from jaxmamba.kernels import scan_backward as kb
from jaxmamba.kernels import scan_common as sc
from jaxmamba.kernels import scan_forward as kf
from jaxmamba.kernels import selective_scan as ks
from jaxmamba.kernels.mosaic_common import MosaicTiling, as_mosaic, default_mosaic_tiling
from jaxmamba.kernels.tiling import MIN_PROGRAMS, ScanTiling, default_tiling
from jaxmamba.ops import default_implementation
from jaxmamba.ops.scan_reference import selective_scan_reference

op_module = importlib.import_module("jaxmamba.ops.selective_scan")

needs_interpret = pytest.mark.skipif(
    mosaic_backend.interpret_unavailable_reason() is not None,
    reason=str(mosaic_backend.interpret_unavailable_reason()))

#: The interpret-mode tiling: 64-channel tiles (the least), 16-row chunks of two pipelined blocks
#: of 8 rows, 2-row sub-chunks, a saved state every 2 of them.
MOSAIC_SMALL = MosaicTiling(chunk=16, block_d=64, fwd_warps=4, bwd_block_d=64, sub_chunk=2,
                            bwd_warps=4, state_stride=2, block_rows=8)


def mosaic(tiling=MOSAIC_SMALL, **kw):
    return functools.partial(ks.selective_scan_pallas, backend="mosaic", interpret=True,
                             tiling=tiling, **kw)


@pytest.fixture
def mosaic_op(monkeypatch):
    """`selective_scan(implementation="pallas")` on the Mosaic kernels in interpret mode with
    `MOSAIC_SMALL` (the contract class's `impl` fixture, for this backend)."""
    monkeypatch.setattr(ks, "default_backend", lambda interpret: "mosaic")
    monkeypatch.setattr(ks, "default_mosaic_tiling", lambda *shape: MOSAIC_SMALL)
    monkeypatch.setattr(ks, "resolve_interpret", lambda interpret: True)
    return op("pallas")


@contextlib.contextmanager
def float64_everywhere():
    """float64 for the whole process: `jax.enable_x64` is thread-local, and Mosaic GPU's
    interpreter computes in host callbacks on XLA's threads (float32 results there)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@needs_interpret
def test_phase_kernels_match_references(key):
    """K1 (end states, Σδ), K3 (outputs), B1 (chunk-local adjoints) and B3 (gradients) against
    the jnp references of their phases, from random chunk start states and successor adjoints:
    2 chunks of 2 pipelined blocks, 2 channel tiles, reversed (the forward row order runs in the
    op's cases below)."""
    b, l, d, n, reverse = 1, 32, 128, 8, True
    a, _, g = random_case(key, b, l, d, n)
    u, dt, z, A, B, C, D, bias = (a[k] for k in ("u", "delta", "z", "A", "B", "C", "D",
                                                 "delta_bias"))
    st = sc.ScanStatics(tiling=MOSAIC_SMALL, length=l, padded_length=l, delta_softplus=True,
                        reverse=reverse, has_z=True, interpret=True)
    n_chunks = l // MOSAIC_SMALL.chunk
    k_in, k_mu = jax.random.split(jax.random.fold_in(key, 1))
    h_in = jax.random.normal(k_in, (b, n_chunks, d, n))
    mu = jax.random.normal(k_mu, (b, n_chunks, d, n))

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def phases():
        hf, q = mbw.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, h_in)
        return (mfw.chunk_states(st, u, dt, A, B, bias, jnp.float32),
                mfw.chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in), q,
                mbw.chunk_gradients(st, u, dt, z, g, A, B, C, D, bias, hf, mu))

    (h, s), y, q, grads = phases()
    h_ref, s_ref = kf.chunk_states_reference(st, u, dt, A, B, bias, jnp.float32)
    y_ref = kf.chunk_outputs_reference(st, u, dt, z, A, B, C, D, bias, h_in)
    q_ref = kb.chunk_adjoints_reference(st, dt, z, g, A, C, bias, jnp.float32)
    for name, x, x_ref in [("h", h, h_ref), ("sum_delta", s, s_ref), ("y", y, y_ref),
                           ("q", q, q_ref)]:
        assert x.shape == x_ref.shape and jnp.isfinite(x).all(), name
        assert rel_err(x, x_ref) <= F32_OUT_TOL, name
    du, ddt, dz, db, dc, da, dd, dbias = grads
    want = kb.chunk_gradients_reference(st, u, dt, z, g, A, B, C, D, bias, h_in, mu)
    got = (du, ddt, dz, db.sum(0), dc.sum(0), da.sum((0, 1)), dd.sum((0, 1)), dbias.sum((0, 1)))
    for name, x, x_ref in zip(("du", "ddelta", "dz", "dB", "dC", "dA", "dD", "dbias"), got, want,
                              strict=True):
        assert x.shape == x_ref.shape and float(jnp.abs(x_ref).max()) > 0, name
        assert rel_err(x, x_ref) <= F32_GRAD_TOL, name


@needs_interpret
@pytest.mark.parametrize("reverse,stride,fused", [(False, 1, True), (True, 4, False)])
def test_padded_multi_chunk_poisoned(key, reverse, stride, fused):
    """L=45 (3 chunks, 3 padding rows: last in the forward row order, first reversed), D=80
    (2 channel tiles, the second mostly padding), N=12 (padded to 16), 8 sub-chunks per chunk
    with a saved state every `stride` of them, saved by the forward (`fused_replay`) or by the
    backward; initial state and final-state gradient. Every kernel output starts as NaN
    (`poison_outputs`: interpret mode's fill)."""
    args, h0, g = random_case(key, 2, 45, 80, 12)
    tiling = MosaicTiling(chunk=16, block_d=64, fwd_warps=4, bwd_block_d=64, sub_chunk=2,
                          bwd_warps=4, state_stride=stride, block_rows=max(8, 2 * stride))
    got = outputs_and_grads(mosaic(tiling=tiling, poison_outputs=True, fused_replay=fused),
                            args, h0, g, reverse=reverse)
    assert got[1].dtype == jnp.float32 and len(jax.tree.leaves(got[2])) == 9
    assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g, reverse=reverse),
                 F32_OUT_TOL, F32_GRAD_TOL)


@needs_interpret
def test_float64_matches_reference(key, mosaic_op):
    """float64 inputs (interpret mode only: compiled Mosaic GPU has none): the kernels' maths to
    float64 rounding, reversed, 2 chunks with padding."""
    with float64_everywhere():
        args, h0, g = random_case(key, 1, 20, 8, 16, dtype=jnp.float64)
        h0, g = h0.astype(jnp.float64), g.astype(jnp.float64)
        got = outputs_and_grads(mosaic_op, args, h0, g, reverse=True)
        assert got[0].dtype == got[1].dtype == jnp.float64
        assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g, reverse=True),
                     F64_TOL, F64_TOL)


@needs_interpret
def test_bfloat16_inputs(key, mosaic_op):
    """bf16 activations, fp32 states: within bf16's rounding of the fp32 reference."""
    args, h0, g = random_case(key, 1, 40, 16, 16, dtype=jnp.bfloat16)
    got = outputs_and_grads(mosaic_op, args, h0, g)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    up = {k: v.astype(jnp.float32) for k, v in args.items()}
    assert_close(got, outputs_and_grads(selective_scan_reference, up, h0, g),
                 BF16_OUT_TOL, BF16_GRAD_TOL)


@needs_interpret
def test_without_optional_inputs(key, monkeypatch):
    """No z, D, delta_bias and no softplus (the kernels' `has_z=False` path)."""
    monkeypatch.setattr(ks, "default_backend", lambda interpret: "mosaic")
    monkeypatch.setattr(ks, "default_mosaic_tiling", lambda *shape: MOSAIC_SMALL)
    monkeypatch.setattr(ks, "resolve_interpret", lambda interpret: True)
    args, h0, g = random_case(key, 2, 12, 4, 3, with_optional=False)
    args["delta"] = jnp.abs(args["delta"])  # without softplus, δ must be positive
    got = outputs_and_grads(op("pallas", delta_softplus=False), args, h0, g)
    assert len(jax.tree.leaves(got[2])) == 6
    assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g,
                                        delta_softplus=False), F32_OUT_TOL, F32_GRAD_TOL)


@needs_interpret
def test_extreme_delta(key, mosaic_op):
    """Large δ·|A| (the decay underflows to 0) in one batch element and tiny δ in the other,
    reversed: finite, and both match the reference."""
    args, h0, g = random_case(key, 2, 33, 4, 16)
    noise = args["delta"] + 1.0  # a standard normal
    args["delta"] = jnp.stack([noise[0] + 29.0, 1e-3 * noise[1] - 41.0])
    got = outputs_and_grads(mosaic_op, args, h0, g, reverse=True)
    assert np.isfinite(np.asarray(got[0])).all()
    assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g, reverse=True),
                 F32_OUT_TOL, F32_GRAD_TOL)


def _kernel_names(fn, args) -> set[str]:
    """Names of the Pallas kernels `fn(args)` traces (nothing lowered or run)."""
    return set(kernel_output_bytes(jax.make_jaxpr(fn)(args).jaxpr))


def test_float64_compiled_falls_back_to_triton(key, monkeypatch):
    """Compiled Mosaic GPU has no float64 (its layout inference finds no layout for float64
    tiles: "Layout inference failed", one H200, JAX 0.11.2, 2026-12-07). Asked for by name: one
    error naming the first float64 argument, before anything is traced. By default: the Triton
    kernels, with a warning once; without Triton, the error. float32 stays on Mosaic."""
    args = random_inputs(key, 1, 8, 4, 2)

    def grads(**kw):
        def loss(a):
            return jnp.sum(ks.selective_scan_pallas(**a, interpret=False, **kw)[0])
        return jax.grad(loss)

    with jax.enable_x64(True):
        wide = dict(args, initial_state=jnp.zeros((1, 4, 2), jnp.float64))
        with pytest.raises(ValueError, match=r"^selective_scan: initial_state has dtype "
                                             r"float64, which the compiled Mosaic GPU kernels "
                                             r"do not support.*backend='triton'"):
            ks.selective_scan_pallas(**wide, interpret=False, backend="mosaic")
        monkeypatch.setattr(ks, "default_backend", lambda interpret: "mosaic")
        monkeypatch.setattr(ks, "_warned_float64", False)
        monkeypatch.setattr(backends, "unavailable_reason", lambda b: None)
        f64 = {k: v.astype(jnp.float64) for k, v in args.items()}
        with pytest.warns(UserWarning, match="u has dtype float64.*running the Triton kernels "
                                             "instead"):
            names = _kernel_names(grads(), f64)
        assert names == {f"selective_scan_chunk_{k}" for k in
                         ("states", "outputs", "adjoints", "gradients")}
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*float64")  # once
            assert _kernel_names(grads(), f64) == names
            mosaic_names = _kernel_names(grads(), args)
        assert mosaic_names == {n.replace("scan_", "scan_mosaic_") for n in names}
        monkeypatch.setattr(backends, "unavailable_reason",
                            lambda b: "no Triton lowering (test)" if b == "triton" else None)
        with pytest.raises(ValueError, match="u has dtype float64"):
            ks.selective_scan_pallas(**f64, interpret=False)


def test_poison_outputs_needs_interpret_mode(key):
    """Compiled Mosaic kernels cannot alias NaN buffers to their outputs: a clear error, before
    anything is lowered."""
    with pytest.raises(NotImplementedError, match="poison_outputs on the Mosaic GPU backend "
                                                  "needs interpret mode"):
        ks.selective_scan_pallas(**random_inputs(key, 1, 8, 4, 2), backend="mosaic",
                                 interpret=False, poison_outputs=True)


def test_kernels_lower_for_cuda():
    """Every Mosaic kernel of the fwd+bwd lowers for a CUDA GPU on any machine and any JAX
    (traced and lowered to Mosaic GPU's MLIR, not compiled: catches a primitive or a layout
    that Mosaic GPU lacks, which interpret mode never sees), padded, reversed, bf16, N=32."""
    b, l, d, n = 1, 1000, 40, 32
    shapes = dict(u=(b, l, d), delta=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n), D=(d,),
                  z=(b, l, d), delta_bias=(d,))
    args = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16 if len(s) == 3 else jnp.float32)
            for k, s in shapes.items()}

    def grads(a):
        def loss(a):
            y = ks.selective_scan_pallas(**a, interpret=False, reverse=True, backend="mosaic")[0]
            return jnp.sum(y.astype(jnp.float32))

        return jax.value_and_grad(loss)(a)

    text = jax.jit(grads).trace(args).lower(lowering_platforms=("cuda",)).as_text()
    assert len(re.findall(r"custom_call @mosaic_gpu", text)) == 4  # K1, K3, B1, B3
    assert {"selective_scan_mosaic_chunk_states", "selective_scan_mosaic_chunk_outputs",
            "selective_scan_mosaic_chunk_adjoints", "selective_scan_mosaic_chunk_gradients"} \
        <= set(re.findall(r"selective_scan_mosaic_chunk_[a-z]+", text))


@pytest.mark.parametrize("b,l,d,n", [(2, 1769472, 64, 32), (2, 442368, 128, 64),
                                     (2, 6912, 512, 256), (2, 216, 640, 256),
                                     (2, 262144, 64, 16), (1, 3, 5, 1)])
def test_default_tiling(b, l, d, n):
    """64-channel tiles, replayed states within the register budget, groups inside a block; a
    saved backward state every 16 rows (Triton's spacing) where 4 sub-chunks reach it."""
    t = default_mosaic_tiling(b, l, d, n)
    assert t.block_d == t.bwd_block_d == 64
    assert t.chunk % t.block_rows == 0 and t.block_rows % (t.sub_chunk * t.state_stride) == 0
    assert t.sub_chunk * max(8, n) // 2 <= 128
    assert t.state_stride <= 4
    if b * l * d >= 16 * MIN_PROGRAMS * 256:
        assert t.chunk == 256 and t.sub_chunk * t.state_stride == min(16, 4 * t.sub_chunk)
        assert b * (l // t.chunk) * -(-d // 64) >= MIN_PROGRAMS


@pytest.mark.parametrize("b,l,d,n", [(2, 1769472, 64, 32), (2, 262144, 64, 16)])
def test_kernel_outputs_no_larger_than_triton(b, l, d, n):
    """Traced, not run: at Synapse stage 0 and (2, 262144, 64, 16) the Mosaic fwd+bwd's kernels
    write the Triton ones' bytes or fewer (dB/dC partials: one 64-channel tile), and B1's saved
    backward states, the largest temporary, are the same (B, L/16, D, N): 1.69 GiB at stage 0
    (a state every 8 rows gave 3.59 instead of 1.91 GiB of fwd+bwd temporaries, one H200,
    2026-12-07)."""
    shapes = dict(u=(b, l, d), delta=(b, l, d), A=(d, n), B=(b, l, n), C=(b, l, n), D=(d,),
                  z=(b, l, d), delta_bias=(d,))
    args = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

    def written(backend):
        def loss(a):
            return jnp.sum(ks.selective_scan_pallas(**a, interpret=False, backend=backend)[0])

        out = kernel_output_bytes(jax.make_jaxpr(jax.grad(loss))(args).jaxpr)
        return {k.replace("_mosaic", ""): v for k, v in out.items()}

    mosaic, triton = written("mosaic"), written("triton")
    assert set(mosaic) == set(triton) and len(mosaic) == 4
    assert all(mosaic[k] <= triton[k] for k in mosaic), (mosaic, triton)
    t, t_triton = default_mosaic_tiling(b, l, d, n), default_tiling(b, l, d, n)
    assert t.chunk == t_triton.chunk and t.saved_states == t_triton.saved_states
    local_adjoints = b * (l // t.chunk) * d * n * 4
    assert mosaic["selective_scan_chunk_adjoints"] == triton["selective_scan_chunk_adjoints"] \
        == local_adjoints + b * (l // 16) * d * n * 4


def test_bad_tiling_is_named():
    with pytest.raises(ValueError, match="block_d=32, bwd_block_d=32: expected equal multiples "
                                         "of 64"):
        as_mosaic(ScanTiling(chunk=16, block_d=32, fwd_warps=1, bwd_block_d=32, sub_chunk=2,
                             bwd_warps=1))
    with pytest.raises(ValueError, match="block_rows=4 must divide chunk=16 and be a multiple "
                                         "of sub_chunk x state_stride=8"):
        MosaicTiling(chunk=16, block_d=64, fwd_warps=4, bwd_block_d=64, sub_chunk=4,
                     bwd_warps=4, state_stride=2, block_rows=4)
    with pytest.raises(ValueError, match="unknown backend='cuda'"):
        ks.selective_scan_pallas(**random_inputs(jax.random.key(0), 1, 8, 4, 2),
                                 backend="cuda", interpret=True)


def test_gpu_without_triton_uses_mosaic_silently(monkeypatch):
    """A JAX whose Pallas lacks the Triton lowering: `pallas` stays the GPU default, on the
    Mosaic GPU kernels, with no warning; without either backend the op falls back (the Triton
    tests check that warning)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(op_module, "_warned_fallback", False)
    monkeypatch.delenv(backends.ENV, raising=False)
    reasons = {"triton": "jax.experimental.pallas.triton does not import (test)", "mosaic": None}
    monkeypatch.setattr(backends, "unavailable_reason", lambda b: reasons[b])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert default_implementation() == "pallas"
        assert ks.default_backend(interpret=False) == "mosaic"
    reasons["mosaic"] = "Mosaic GPU kernels need compute capability >= 9.0 (test)"
    assert backends.compiled_backend() is None
    assert "triton: jax.experimental" in backends.pallas_unavailable()
    assert "mosaic: Mosaic GPU kernels need" in backends.pallas_unavailable()


def test_faster_backend_is_the_default(monkeypatch):
    """With both backends available a GPU gets the one `FASTER` names for this JAX version, and
    interpret mode stays on Triton's (Pallas' generic interpreter runs on every JAX)."""
    monkeypatch.setattr(backends, "unavailable_reason", lambda b: None)
    monkeypatch.delenv(backends.ENV, raising=False)
    minor = ".".join(jax.__version__.split(".")[:2])
    for faster in backends.BACKENDS:
        monkeypatch.setitem(backends.FASTER, minor, faster)
        assert backends.compiled_backend() == faster
        assert ks.default_backend(interpret=False) == faster
        assert ks.default_backend(interpret=True) == "triton"


def test_unmeasured_jax_takes_the_newest_measurement_below():
    """JAX 0.11 was measured (Mosaic GPU faster); 0.12 and later take 0.11's choice; 0.10,
    below every measurement (Mosaic never compiled there), gets Triton."""
    assert backends.FASTER["0.11"] == "mosaic"
    assert [backends.preferred(v) for v in ("0.10.2", "0.11.2", "0.12.0.1", "0.12.1",
                                            "0.13.0.dev20270101")] == \
        ["triton", "mosaic", "mosaic", "mosaic", "mosaic"]


def test_environment_picks_the_backend(monkeypatch):
    """`JAXMAMBA_PALLAS_BACKEND` overrides the measured choice; a bad name or a backend that
    cannot compile here is one error naming the variable."""
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda b: "needs compute capability >= 9.0 (test)" if b == "mosaic"
                        else None)
    monkeypatch.setenv(backends.ENV, "triton")
    assert ks.default_backend(interpret=False) == "triton"
    monkeypatch.setenv(backends.ENV, "mosaic")
    with pytest.raises(ValueError, match=r"^JAXMAMBA_PALLAS_BACKEND=mosaic: its kernels cannot "
                                         r"compile here: needs compute capability"):
        ks.default_backend(interpret=False)
    monkeypatch.setenv(backends.ENV, "cuda")
    with pytest.raises(ValueError, match=r"JAXMAMBA_PALLAS_BACKEND='cuda': expected one of "
                                         r"triton, mosaic"):
        backends.compiled_backend()
