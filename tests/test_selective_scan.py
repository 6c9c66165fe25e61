"""One contract class run against every fast selective-scan implementation (`xla`; `pallas` on
its Triton kernels in interpret mode on any machine; `pallas` on its Triton and its Mosaic GPU
kernels compiled on a GPU), with mamba_ssm's float64 fixtures and the sequential reference as
oracles; the reference against the fixtures; the XLA path's chunking and memory; the op's input
checks against every implementation. The Mosaic GPU kernels' interpret mode, ~1000x slower than
Pallas' generic interpreter, gets one case per contract feature instead
(tests/test_mosaic_selective_scan.py).

The scan's input generators are conftest's (`random_inputs`, `random_case`); `outputs_and_grads`,
`assert_close` and the tolerances here are shared with tests/test_pallas_selective_scan.py.
Interpret mode spends its time in XLA's CPU compiler, so every case runs as one jit compiled
without LLVM's expensive passes (`FAST_COMPILE`).
"""

import contextlib
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_case, random_inputs, rel_err

from jaxmamba.kernels import backends
from jaxmamba.kernels import selective_scan as ks
from jaxmamba.kernels.tiling import ScanTiling
from jaxmamba.ops import selective_scan
from jaxmamba.ops.scan_reference import selective_scan_reference
from jaxmamba.ops.scan_xla import selective_scan_xla

#: The contract class runs against each of these (`*-gpu` only where a GPU is).
IMPLEMENTATIONS = ["xla", "pallas-interpret",
                   pytest.param("pallas-triton-gpu", marks=pytest.mark.gpu),
                   pytest.param("pallas-mosaic-gpu", marks=pytest.mark.gpu)]

#: ‖out − ref‖ / ‖ref‖ bounds.
F64_TOL = 1e-10
F32_OUT_TOL = 1e-5
F32_GRAD_TOL = 1e-4
#: bf16 inputs against the fp32 reference: bf16's rounding of y and of the gradients. Measured
#: (B=1, L=40, D=N=16, 5 seeds, xla and pallas-interpret, 2026-12-02): y and the final state
#: ≤ 1.9e-3, gradients ≤ 3.4e-3.
BF16_OUT_TOL = 5e-3
BF16_GRAD_TOL = 8e-3

ARG_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

#: 2-3x faster XLA CPU compiles of interpreted kernels; they run in milliseconds regardless.
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

#: The Pallas tiling of interpret-mode tests: several chunks, sub-chunks, saved backward states
#: and two channel tiles on tiny shapes; short sub-chunks keep the unrolled replay, and so the
#: compile, small.
SMALL = ScanTiling(chunk=16, block_d=16, fwd_warps=1, bwd_block_d=16, sub_chunk=2, bwd_warps=1,
                   state_stride=2)


def load_cases(reference_dir):
    """Fixture cases in jaxmamba's channels-last layout (mamba_ssm stores (B, D, L))."""
    data = np.load(reference_dir / "selective_scan_cases.npz")
    names = sorted({k.split("/")[0] for k in data.files})
    to_cl = {"u", "delta", "z", "B", "C"}
    cases = []
    for name in names:
        def get(key, cl, name=name):
            v = data.get(f"{name}/{key}")
            return None if v is None else (np.swapaxes(v, 1, 2) if cl else v)

        inputs = {a: get(f"in_{a}", a in to_cl) for a in ARG_NAMES}
        grads = {a: get(f"grad_{a}", a in to_cl) for a in ARG_NAMES}
        cases.append(dict(name=name, inputs=inputs, grads=grads,
                          softplus=bool(data[f"{name}/delta_softplus"]),
                          y=get("y", True), last_state=get("last_state", False),
                          grad_y=get("grad_y", True)))
    return cases


def run_with_grads(impl, inputs, softplus, grad_y, dtype):
    """Output, final state and the gradients of sum(y · grad_y) for every present input."""
    present = {k: jnp.asarray(v, dtype) for k, v in inputs.items() if v is not None}

    def loss(args):
        y, h = selective_scan(**args, delta_softplus=softplus, return_final_state=True,
                              implementation=impl)
        return jnp.sum(y * jnp.asarray(grad_y, dtype)), (y, h)

    grads, (y, h) = jax.jit(jax.grad(loss, has_aux=True), compiler_options=FAST_COMPILE)(present)
    return y, h, grads


def outputs_and_grads(fn, args, h0, g, **kw):
    """y, final state and the gradients (all inputs and h0) of `sum(y g) + sum(h_last h0)`;
    `fn` has the signature of `selective_scan_reference` (returns y and the final state)."""
    def loss(a, h0):
        y, h = fn(**a, initial_state=h0, **kw)
        return jnp.sum(y.astype(h.dtype) * g) + jnp.sum(h * h0), (y, h)

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def run(args, h0, g):
        (_, (y, h)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(args, h0)
        return y, h, grads

    return run(args, h0, g)


def assert_close(got, want, out_tol, grad_tol):
    """`outputs_and_grads` results: same shapes, relative errors within the tolerances."""
    (y, h, grads), (y_r, h_r, grads_r) = got, want
    assert y.shape == y_r.shape and h.shape == h_r.shape
    assert rel_err(y, y_r) <= out_tol and rel_err(h, h_r) <= out_tol
    for g, g_r in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_r), strict=True):
        assert np.isfinite(np.asarray(g)).all()
        assert rel_err(g, g_r) <= grad_tol


def op(impl, **fixed):
    """`selective_scan` with `implementation=impl`, returning (y, final state) like the
    reference, for `outputs_and_grads`."""
    return functools.partial(selective_scan, implementation=impl, return_final_state=True,
                             **fixed)


@pytest.fixture
def impl(request, monkeypatch):
    """The `implementation=` argument for one contract parameter, with `pallas`'s backend fixed.
    `pallas-interpret` runs the Triton kernels in interpret mode with the `SMALL` tiling, also on
    a GPU machine; `pallas-*-gpu` compiles them with the default tiling."""
    if request.param == "xla":
        return "xla"
    backend = "mosaic" if "mosaic" in request.param else "triton"
    monkeypatch.setattr(ks, "default_backend", lambda interpret: backend)
    if request.param == "pallas-interpret":
        monkeypatch.setattr(ks, "default_tiling", lambda *shape: SMALL)
        monkeypatch.setattr(ks, "resolve_interpret", lambda interpret: True)
        return "pallas"
    assert request.param.endswith("-gpu"), request.param  # `gpu` marker: skipped without one
    if reason := backends.unavailable_reason(backend):
        pytest.skip(reason)
    return "pallas"


def test_reference_matches_mamba_ssm_fixtures(reference_dir):
    """The oracle itself: the sequential reference against mamba_ssm's float64 cases, in float64
    and float32."""
    for dtype, out_tol, grad_tol in [(jnp.float64, F64_TOL, F64_TOL),
                                     (jnp.float32, F32_OUT_TOL, F32_GRAD_TOL)]:
        with jax.enable_x64(dtype == jnp.float64):
            for case in load_cases(reference_dir):
                y, h, grads = run_with_grads("reference", case["inputs"], case["softplus"],
                                             case["grad_y"], dtype)
                assert y.dtype == dtype
                assert rel_err(y, case["y"]) <= out_tol, case["name"]
                assert rel_err(h, case["last_state"]) <= out_tol, case["name"]
                for name, g in grads.items():
                    assert rel_err(g, case["grads"][name]) <= grad_tol, (case["name"], name)


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
class TestSelectiveScan:
    """The contract every fast implementation meets, through the public op."""

    def test_fixtures_float64(self, impl, reference_dir, request, monkeypatch):
        """Compiled Mosaic GPU has no float64: there the default backend is Triton's, warned
        once (`kernels.selective_scan.resolve_backend`)."""
        expect = contextlib.nullcontext()
        if request.node.callspec.params["impl"] == "pallas-mosaic-gpu":
            if reason := backends.unavailable_reason("triton"):
                pytest.skip(f"float64 on compiled Mosaic GPU needs the Triton kernels: {reason}")
            monkeypatch.setattr(ks, "_warned_float64", False)
            expect = pytest.warns(UserWarning, match="float64.*running the Triton kernels")
        with jax.enable_x64(True), expect:
            for case in load_cases(reference_dir):
                y, h, grads = run_with_grads(impl, case["inputs"], case["softplus"],
                                             case["grad_y"], jnp.float64)
                assert y.dtype == jnp.float64
                assert rel_err(y, case["y"]) <= F64_TOL, case["name"]
                assert rel_err(h, case["last_state"]) <= F64_TOL, case["name"]
                for name, g in grads.items():
                    assert rel_err(g, case["grads"][name]) <= F64_TOL, (case["name"], name)

    def test_fixtures_float32(self, impl, reference_dir):
        for case in load_cases(reference_dir):
            y, h, grads = run_with_grads(impl, case["inputs"], case["softplus"],
                                         case["grad_y"], jnp.float32)
            assert y.dtype == jnp.float32 and h.dtype == jnp.float32
            assert rel_err(y, case["y"]) <= F32_OUT_TOL, case["name"]
            assert rel_err(h, case["last_state"]) <= F32_OUT_TOL, case["name"]
            for name, g in grads.items():
                assert rel_err(g, case["grads"][name]) <= F32_GRAD_TOL, (case["name"], name)

    @pytest.mark.parametrize("b,l,d,n", [(2, 37, 8, 16), (1, 1, 4, 1), (2, 20, 6, 48)])
    @pytest.mark.parametrize("reverse", [False, True])
    def test_matches_reference(self, impl, key, b, l, d, n, reverse):
        """Outputs, final state and the gradients of every input and the initial state."""
        args, h0, g = random_case(key, b, l, d, n)
        got = outputs_and_grads(op(impl), args, h0, g, reverse=reverse)
        assert got[1].dtype == jnp.float32 and len(jax.tree.leaves(got[2])) == 9
        assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g,
                                            reverse=reverse), F32_OUT_TOL, F32_GRAD_TOL)

    def test_reverse_is_flip(self, impl, key):
        args = random_inputs(key, 2, 19, 4, 8)
        flip = {k: (v[:, ::-1] if v.ndim == 3 else v) for k, v in args.items()}
        y_rev = selective_scan(**args, reverse=True, implementation=impl)
        y_flip = selective_scan(**flip, implementation=impl)[:, ::-1]
        assert rel_err(y_rev, y_flip) <= F32_OUT_TOL

    @pytest.mark.parametrize("dt_scale,offset,reverse", [(1.0, 30.0, False), (1e-3, -40.0, True)])
    def test_extreme_delta(self, impl, key, dt_scale, offset, reverse):
        """Large δ·|A| (exp underflows to 0) and tiny δ: finite outputs and gradients, and both
        match the reference."""
        args, h0, g = random_case(key, 1, 33, 4, 16, dt_scale=dt_scale)
        args["delta"] = args["delta"] + offset
        got = outputs_and_grads(op(impl), args, h0, g, reverse=reverse)
        assert np.isfinite(np.asarray(got[0])).all()
        assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g,
                                            reverse=reverse), F32_OUT_TOL, F32_GRAD_TOL)

    def test_without_optional_inputs(self, impl, key):
        """No z, D, delta_bias and no softplus: outputs and gradients."""
        args, h0, g = random_case(key, 2, 12, 4, 3, with_optional=False)
        args["delta"] = jnp.abs(args["delta"])  # without softplus, δ must be positive
        got = outputs_and_grads(op(impl, delta_softplus=False), args, h0, g)
        assert len(jax.tree.leaves(got[2])) == 6
        assert_close(got, outputs_and_grads(selective_scan_reference, args, h0, g,
                                            delta_softplus=False), F32_OUT_TOL, F32_GRAD_TOL)

    def test_bfloat16_inputs(self, impl, key):
        """bf16 activations (fp32 states inside): y and the gradients in bf16, within bf16's
        rounding of the fp32 reference on the same (upcast) inputs."""
        args, h0, g = random_case(key, 1, 40, 16, 16, dtype=jnp.bfloat16)
        got = outputs_and_grads(op(impl), args, h0, g)
        assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
        up = {k: v.astype(jnp.float32) for k, v in args.items()}
        assert_close(got, outputs_and_grads(selective_scan_reference, up, h0, g),
                     BF16_OUT_TOL, BF16_GRAD_TOL)


@pytest.mark.parametrize("l,chunk", [(37, 16), (64, 16), (5, 8), (100, 7)])
@pytest.mark.parametrize("reverse", [False, True])
def test_xla_chunking(key, l, chunk, reverse):
    """L not a multiple of the chunk, one short chunk, many chunks; state carried across chunks."""
    kx, kh = jax.random.split(key)
    args = random_inputs(kx, 2, l, 4, 8)
    h0 = jax.random.normal(kh, (2, 4, 8))
    run = functools.partial(selective_scan_xla, reverse=reverse, initial_state=h0)
    y, h = run(**args, chunk_size=chunk)
    y_ref, h_ref = selective_scan(**args, reverse=reverse, initial_state=h0,
                                  return_final_state=True, implementation="reference")
    assert rel_err(y, y_ref) <= F32_OUT_TOL
    assert rel_err(h, h_ref) <= F32_OUT_TOL


def test_xla_memory_is_linear_in_length():
    """Compiled fwd+bwd at (1, 2^20, 16, 16) allocates nothing of size B·L·D·N (1 GiB)."""
    b, l, d, n = 1, 2**20, 16, 16
    f32 = jax.ShapeDtypeStruct
    shapes = dict(u=f32((b, l, d), jnp.float32), delta=f32((b, l, d), jnp.float32),
                  A=f32((d, n), jnp.float32), B=f32((b, l, n), jnp.float32),
                  C=f32((b, l, n), jnp.float32), D=f32((d,), jnp.float32),
                  z=f32((b, l, d), jnp.float32), delta_bias=f32((d,), jnp.float32))

    def loss(args):
        return jnp.sum(selective_scan(**args, implementation="xla"))

    compiled = jax.jit(jax.grad(loss)).lower(shapes).compile()
    bldn = b * l * d * n
    largest = max(
        int(np.prod([int(s) for s in dims.split(",") if s]))
        for dims in re.findall(r"(?:f32|f64|bf16|pred|s32)\[([\d,]*)\]", compiled.as_text())
    )
    assert largest <= bldn // 16, f"an array of {largest} elements (B·L·D·N = {bldn})"
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < bldn * 4, f"temp {temp / 2**20:.0f} MiB vs one BLDN {bldn * 4 / 2**20:.0f} MiB"


@pytest.mark.parametrize("impl", IMPLEMENTATIONS, indirect=True)
class TestBadInput:
    """Input checks of the op, whichever implementation is asked for."""

    def base(self, key):
        return random_inputs(key, 2, 10, 4, 3)

    @pytest.mark.parametrize("name,shape", [
        ("delta", (2, 10, 5)), ("A", (5, 3)), ("B", (2, 9, 3)), ("C", (1, 10, 3)),
        ("D", (5,)), ("z", (2, 10, 3)), ("delta_bias", (4, 1)),
    ])
    def test_mismatched_shapes_name_the_argument(self, impl, key, name, shape):
        args = self.base(key)
        args[name] = jnp.ones(shape)
        with pytest.raises(ValueError, match=rf"{name} has shape \({shape[0]},.*expected"):
            selective_scan(**args, implementation=impl)

    def test_wrong_rank(self, impl, key):
        args = self.base(key)
        args["u"] = jnp.ones((10, 4))
        with pytest.raises(ValueError, match=r"u has shape \(10, 4\), expected \(batch"):
            selective_scan(**args, implementation=impl)

    def test_initial_state_shape(self, impl, key):
        with pytest.raises(ValueError, match=r"initial_state has shape \(2, 4\), expected"):
            selective_scan(**self.base(key), initial_state=jnp.ones((2, 4)),
                           implementation=impl)

    def test_integer_dtype(self, impl, key):
        args = self.base(key)
        args["u"] = jnp.ones((2, 10, 4), jnp.int32)
        with pytest.raises(ValueError, match="u has dtype int32, expected a floating dtype"):
            selective_scan(**args, implementation=impl)

    def test_positive_A_when_validating(self, impl, key):
        args = self.base(key)
        args["A"] = -args["A"]
        selective_scan(**args)  # values are not checked unless asked
        with pytest.raises(ValueError, match=r"A of shape \(4, 3\) has 12 positive entries"):
            selective_scan(**args, validate=True, implementation=impl)


def test_unknown_implementation(key):
    with pytest.raises(ValueError, match="unknown implementation='cuda'"):
        selective_scan(**random_inputs(key, 2, 10, 4, 3), implementation="cuda")
