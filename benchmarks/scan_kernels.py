"""What `benchmarks/scan.py` does kernel by kernel and on small shapes, per Pallas backend: the
inputs, each backend's phase kernels, `timed`, each kernel timed alone (`--phases`:
`time_phases`) and the correctness checks (`--check`, `--check-phases`):

- `check_phases`: each kernel (K1 chunk states, K3 outputs, B1 adjoints, B3 gradients) compiled
  alone against the jnp reference of its phase (`chunk_*_reference` in
  `jaxmamba/kernels/scan_forward.py` and `scan_backward.py`), forward and reversed;
- `check_op`: the whole op (outputs, final state, every gradient including the initial state's)
  against `selective_scan_reference`: padded L, D and N, reversed, N=256, bf16, `fused_replay`
  and float64 (the Mosaic GPU kernels refuse float64 compiled, with the documented error).

Each check is one row (errors as rows too, never fatal); `summary` says which exceed
`TOLERANCE`. Imports jaxmamba only inside the functions, so `scan.py --tree` chooses which.
"""

from __future__ import annotations

import dataclasses
import functools
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

#: Largest relative error (norm of the difference / norm of the reference) accepted per dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 8e-3, "float64": 1e-10}
#: (B, L, D, N, reverse) of the phase checks; `SMOKE_*`: interpret mode on a CPU.
PHASE_CASES = [(2, 512, 64, 16, False), (1, 768, 128, 32, True), (1, 256, 64, 256, False)]
SMOKE_PHASE_CASES = [(1, 64, 64, 16, False), (1, 64, 64, 32, True)]
#: ((B, L, D, N), reverse, dtype, selective_scan_pallas options) of the op checks.
OP_CASES = [((2, 1000, 96, 16), False, "float32", {}), ((1, 777, 64, 48), True, "float32", {}),
            ((2, 300, 32, 256), False, "float32", {}),
            ((1, 1000, 64, 32), True, "bfloat16", {}),
            ((1, 600, 64, 16), True, "float32", dict(fused_replay=True)),
            ((1, 40, 16, 8), False, "float64", {})]
SMOKE_OP_CASES = [((1, 50, 20, 16), True, "float32", {}),
                  ((1, 40, 16, 8), False, "bfloat16", {})]
GRAD_NAMES = ("du", "ddelta", "dz", "dB", "dC", "dA", "dD", "dbias")


def make_inputs(key, b, l, d, n, dtype=jnp.float32):
    """The op's inputs (z, D, delta_bias; softplus-range delta) and a cotangent g (B, L, D)."""
    k = jax.random.split(key, 9)
    return dict(
        u=jax.random.normal(k[0], (b, l, d), dtype),
        delta=(0.5 * jax.random.normal(k[1], (b, l, d)) - 3.0).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(k[2], (d, n))) * jnp.arange(1, n + 1)[None, :],
        B=jax.random.normal(k[3], (b, l, n), dtype),
        C=jax.random.normal(k[4], (b, l, n), dtype),
        D=jax.random.normal(k[5], (d,)),
        z=jax.random.normal(k[6], (b, l, d), dtype),
        delta_bias=0.5 * jax.random.uniform(k[7], (d,)),
    ), jax.random.normal(k[8], (b, l, d), dtype)


def phase_modules(backend: str):
    """(forward kernels, backward kernels, default tiling) of `backend`: the same functions
    (`chunk_states`, `chunk_outputs`, `chunk_adjoints`, `chunk_gradients`) on either."""
    if backend == "mosaic":
        from jaxmamba.kernels import mosaic_backward as bwd
        from jaxmamba.kernels import mosaic_forward as fwd
        from jaxmamba.kernels.mosaic_common import default_mosaic_tiling as tiling
    else:
        from jaxmamba.kernels import scan_backward as bwd
        from jaxmamba.kernels import scan_forward as fwd
        from jaxmamba.kernels.tiling import default_tiling as tiling
    return fwd, bwd, tiling


def statics(tiling, length, *, reverse=False, interpret=False):
    """The kernels' static arguments for an unpadded (B, `length`, D, N) case with z."""
    from jaxmamba.kernels.scan_common import ScanStatics

    return ScanStatics(tiling=tiling, length=length, padded_length=length, delta_softplus=True,
                       reverse=reverse, has_z=True, interpret=interpret)


def timed(fn, args, iters, warmup=2):
    """(median ms, compiled temp GiB, compile s, last result) of a jitted fn, synchronised."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = None if mem is None else mem.temp_size_in_bytes / 2**30
    for _ in range(warmup):
        out = jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        out = jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, temp, compile_s, out


def time_phases(name, b, l, d, n, iters, backend, emit, *, interpret=False, tiling=None):
    """Milliseconds of each kernel and XLA phase of `backend` alone (unpadded shapes)."""
    from jaxmamba.kernels.chunk_carries import chunk_carries, chunk_decay

    fwd, bwd, default = phase_modules(backend)
    a, g = make_inputs(jax.random.key(0), b, l, d, n)
    u, dt, z, A, B, C, D, bias = (a[k] for k in ("u", "delta", "z", "A", "B", "C", "D",
                                                 "delta_bias"))
    h0 = jnp.zeros((b, d, n))
    row = dict(phases=name, B=b, L=l, D=d, N=n, implementation="pallas", backend=backend)
    try:
        t = tiling or default(b, l, d, n)
        if backend == "mosaic":
            from jaxmamba.kernels.mosaic_common import as_mosaic

            t = as_mosaic(t)
        row["tiling"] = dataclasses.asdict(t)
        st = statics(t, l, interpret=interpret)
        h_loc, sdt = jax.jit(lambda *x: fwd.chunk_states(st, *x, jnp.float32))(u, dt, A, B, bias)
        h_in, _ = chunk_carries(chunk_decay(A, sdt), h_loc, h0, reverse=False)
        h_fine, q = jax.jit(lambda *x: bwd.chunk_adjoints(st, *x))(u, dt, z, g, A, B, C, bias,
                                                                   h_in)
    except Exception as err:
        emit(**row, error=err_text(err))
        return
    phases = {  # (function, its array arguments): arrays passed as arguments, not constants
        "K1_states": (lambda *x: fwd.chunk_states(st, *x, jnp.float32), (u, dt, A, B, bias)),
        "K2_carries": (lambda A, s, h, h0: chunk_carries(chunk_decay(A, s), h, h0,
                                                         reverse=False), (A, sdt, h_loc, h0)),
        "K3_outputs": (lambda *x: fwd.chunk_outputs(st, *x), (u, dt, z, A, B, C, D, bias, h_in)),
        "B1_adjoints": (lambda *x: bwd.chunk_adjoints(st, *x), (u, dt, z, g, A, B, C, bias,
                                                                 h_in)),
        "B3_gradients": (lambda *x: bwd.chunk_gradients(st, *x),
                         (u, dt, z, g, A, B, C, D, bias, h_fine, q)),
    }
    for key, (fn, fn_args) in phases.items():
        try:
            row[key] = timed(fn, fn_args, iters)[0]
        except Exception as err:
            row[key] = err_text(err)
    emit(**row)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def err_text(err: BaseException) -> str:
    """The exception's type and message, first and last lines (Mosaic errors are long)."""
    lines = [s for s in f"{type(err).__name__}: {err}".splitlines() if s.strip()]
    text = " | ".join(lines[:4] + (["..."] + lines[-3:] if len(lines) > 7 else lines[4:]))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "jaxmamba" in f.filename]
    where = f" @ {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return text[:900] + where


def check_phases(backend: str, *, interpret: bool, emit) -> None:
    """Each kernel of `backend` against its phase's reference; `emit(**row)` per kernel."""
    for b, l, d, n, reverse in SMOKE_PHASE_CASES if interpret else PHASE_CASES:
        _check_phase_case(backend, b, l, d, n, reverse, interpret, emit)


def _check_phase_case(backend, b, l, d, n, reverse, interpret, emit):
    from jaxmamba.kernels import scan_backward as ref_b
    from jaxmamba.kernels import scan_forward as ref_f

    fwd, bwd, default = phase_modules(backend)
    tiling = default(b, l, d, n)
    st = statics(tiling, l, reverse=reverse, interpret=interpret)
    a, g = make_inputs(jax.random.key(l + n), b, l, d, n)
    u, dt, z, A, B, C, D, bias = (a[k] for k in ("u", "delta", "z", "A", "B", "C", "D",
                                                 "delta_bias"))
    k1, k2 = jax.random.split(jax.random.key(7))
    n_chunks = l // tiling.chunk
    h_in, mu = (jax.random.normal(k, (b, n_chunks, d, n)) for k in (k1, k2))
    label = dict(check="phase", backend=backend, shape=(b, l, d, n), reverse=reverse,
                 tiling=dataclasses.asdict(tiling))

    def run(name, fn, errors):
        t = time.perf_counter()
        try:
            got = jax.block_until_ready(jax.jit(fn)())
            errs = errors(got)
            emit(**label, phase=name, compile_run_s=round(time.perf_counter() - t, 2),
                 max_rel_err=max(errs.values()), rel_errs=errs)
            return got
        except Exception as err:  # a row, and on to the next
            emit(**label, phase=name, error=err_text(err))
            return None

    run("K1_states", lambda: fwd.chunk_states(st, u, dt, A, B, bias, jnp.float32),
        lambda r: dict(zip(("h", "sum_delta"), map(rel, r, ref_f.chunk_states_reference(
            st, u, dt, A, B, bias, jnp.float32)), strict=True)))
    run("K3_outputs", lambda: fwd.chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in),
        lambda r: dict(y=rel(r, ref_f.chunk_outputs_reference(st, u, dt, z, A, B, C, D, bias,
                                                              h_in))))
    adj = run("B1_adjoints", lambda: bwd.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, h_in),
              lambda r: dict(q=rel(r[1], ref_b.chunk_adjoints_reference(
                  st, dt, z, g, A, C, bias, jnp.float32))))
    if adj is None:
        return
    want = ref_b.chunk_gradients_reference(st, u, dt, z, g, A, B, C, D, bias, h_in, mu)

    def grads_err(r):
        du, ddt, dz, db, dc, da, dd, dbias = r
        got = (du, ddt, dz, db.sum(0), dc.sum(0), da.sum((0, 1)), dd.sum((0, 1)),
               dbias.sum((0, 1)))
        return {k: rel(x, y) for k, x, y in zip(GRAD_NAMES, got, want, strict=True)}

    run("B3_gradients", lambda: bwd.chunk_gradients(st, u, dt, z, g, A, B, C, D, bias,
                                                    adj[0], mu), grads_err)


def _outputs_and_grads(fn, args, h0, g, reverse):
    def loss(a, h0):
        y, h = fn(**a, reverse=reverse, initial_state=h0)
        return jnp.sum(y.astype(h.dtype) * g.astype(h.dtype)) + jnp.sum(h * h0), (y, h)

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, (y, h)), grads = jax.jit(grad)(args, h0)
    return [y, h] + jax.tree.leaves(grads)


def check_op(backend: str, *, interpret: bool, emit) -> None:
    """The op on `backend` against the sequential reference; `emit(**row)` per case."""
    from jaxmamba.kernels.selective_scan import selective_scan_pallas
    from jaxmamba.ops.scan_reference import selective_scan_reference

    for (b, l, d, n), reverse, dtype, kw in SMOKE_OP_CASES if interpret else OP_CASES:
        dtype = jnp.dtype(dtype)
        label = dict(check="op", backend=backend, shape=(b, l, d, n), reverse=reverse,
                     dtype=dtype.name, **kw)
        t = time.perf_counter()
        try:
            with jax.enable_x64(dtype == jnp.float64):
                a, g = make_inputs(jax.random.key(l), b, l, d, n, dtype)
                a = {k: v.astype(jnp.promote_types(v.dtype, dtype)) for k, v in a.items()}
                h0 = jax.random.normal(jax.random.key(1), (b, d, n), jnp.promote_types(
                    dtype, jnp.float32))
                up = {k: v.astype(jnp.promote_types(v.dtype, jnp.float32)) for k, v in a.items()}
                fn = functools.partial(selective_scan_pallas, backend=backend,
                                       interpret=interpret, **kw)
                got = _outputs_and_grads(fn, a, h0, g, reverse)
                want = _outputs_and_grads(selective_scan_reference, up, h0, g, reverse)
                errs = [rel(x, y) for x, y in zip(got, want, strict=True)]
                finite = all(bool(np.isfinite(np.asarray(x, np.float64)).all()) for x in got)
            emit(**label, compile_run_s=round(time.perf_counter() - t, 2),
                 max_rel_err=max(errs), finite=finite,
                 rel_errs=[float(f"{e:.2e}") for e in errs])
        except ValueError as err:
            if backend == "mosaic" and not interpret and "float64" in str(err):
                emit(**label, refused=err_text(err))  # documented (kernels/README.md)
            else:
                emit(**label, error=err_text(err))
        except Exception as err:
            emit(**label, error=err_text(err))


def failures(rows: list[dict]) -> list[dict]:
    """Check rows that raised or exceed `TOLERANCE` (float32's where a row has no dtype)."""
    return [r for r in rows if "check" in r and ("error" in r or not r.get("finite", True) or (
        r.get("max_rel_err", 0) > TOLERANCE.get(r.get("dtype", "float32"), 1e-4)))]


def summary(rows: list[dict]) -> str:
    checks = [r for r in rows if "check" in r]
    bad = failures(rows)
    return (f"# checks: {len(checks)} rows, {len(bad)} failed or above tolerance "
            f"({TOLERANCE}): " + "; ".join(
                f"{r['backend']} {r.get('phase', 'op')}{tuple(r['shape'])}: "
                f"{r.get('error', r.get('max_rel_err'))}"[:160] for r in bad))
