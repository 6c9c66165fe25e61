"""The Mosaic GPU selective-scan kernels on a GPU: compile, check, time (one run, < 4 minutes).

Run from the repository root on a Hopper GPU (JAX >= 0.10.2 with its CUDA plugin):

    MOSAIC_GPU_DUMP_PTXAS=1 python benchmarks/mosaic_check.py --out DIR

In order, each section printing one JSON line per item (errors as one line, never fatal):
1. `phase`: each Mosaic kernel (K1, K3, B1, B3) compiled alone against its jnp reference
   (`chunk_*_reference`, the Triton backend's oracles) on small shapes, forward and reversed;
2. `op`: the whole op (outputs, final state, all gradients incl. the initial state) against
   `selective_scan_reference` in fp32 (padded L, D, N; reversed; N=256), bf16, float64 and with
   `fused_replay`;
3. `time`: fwd and fwd+bwd, Mosaic and Triton, at (2, 262144, 64, 16) and Synapse stage 0
   (2, 1769472, 64, 32), with the relative difference of Mosaic's y and gradients from Triton's;
4. `phase_time`: each Mosaic kernel alone at those shapes; then, while time is left, Mosaic
   with the Lane lowering semantics (the default of JAX 0.10; Warpgroup from 0.11), with 16-row
   pipelined blocks (half the shared memory) and with `approx_math`.
A table of the timings comes last. `--out DIR` also writes every row to DIR/mosaic_check.json.
Imports only jax, numpy and jaxmamba's `kernels` and `ops`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmamba.kernels import backends  # noqa: E402
from jaxmamba.kernels import mosaic_backend as mb  # noqa: E402
from jaxmamba.kernels import mosaic_backward as mbw  # noqa: E402
from jaxmamba.kernels import mosaic_forward as mfw  # noqa: E402
from jaxmamba.kernels import scan_backward as kb  # noqa: E402
from jaxmamba.kernels import scan_common as sc  # noqa: E402
from jaxmamba.kernels import scan_forward as kf  # noqa: E402
from jaxmamba.kernels import selective_scan as ks  # noqa: E402
from jaxmamba.kernels.chunk_carries import chunk_carries, chunk_decay  # noqa: E402
from jaxmamba.kernels.mosaic_common import default_mosaic_tiling  # noqa: E402
from jaxmamba.ops.scan_reference import selective_scan_reference  # noqa: E402

#: name: (B, L, D, N) timed for both backends.
TIMED = {"std_L256k_N16": (2, 262144, 64, 16), "synapse_s0": (2, 1769472, 64, 32)}
#: `--smoke`: tiny shapes in interpret mode, to try this script on a CPU (JAX >= 0.11).
SMOKE = dict(timed={"smoke_a": (1, 512, 64, 16), "smoke_b": (1, 256, 64, 32)},
             phases=[(1, 64, 64, 16, False), (1, 64, 64, 32, True)],
             op=[((1, 50, 20, 16), True, "float32", {}), ((1, 40, 16, 8), False, "bfloat16", {})])
INTERPRET = False
ROWS: list[dict] = []
T0 = time.perf_counter()


def emit(**row):
    row["t_s"] = round(time.perf_counter() - T0, 1)
    print(json.dumps(row, default=str), flush=True)
    ROWS.append(row)


def starting(what: str):
    """A line before each compile: if the process dies (a GPU fault), the last one says where."""
    print(f"# start {what} ({time.perf_counter() - T0:.0f} s)", flush=True)


def err_text(err: BaseException) -> str:
    """The exception's type and message, first and last lines (Mosaic errors are long)."""
    lines = [s for s in f"{type(err).__name__}: {err}".splitlines() if s.strip()]
    text = " | ".join(lines[:4] + (["..."] + lines[-3:] if len(lines) > 7 else lines[4:]))
    frames = [f for f in traceback.extract_tb(err.__traceback__) if "jaxmamba" in f.filename]
    where = f" @ {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return text[:900] + where


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def inputs(key, b, l, d, n, dtype=jnp.float32):
    k = jax.random.split(key, 10)
    return dict(
        u=jax.random.normal(k[0], (b, l, d), dtype),
        delta=(0.5 * jax.random.normal(k[1], (b, l, d)) - 3.0).astype(dtype),
        A=-jnp.exp(0.5 * jax.random.normal(k[2], (d, n))) * jnp.arange(1, n + 1)[None, :],
        B=jax.random.normal(k[3], (b, l, n), dtype),
        C=jax.random.normal(k[4], (b, l, n), dtype),
        D=jax.random.normal(k[5], (d,)),
        z=jax.random.normal(k[6], (b, l, d), dtype),
        delta_bias=0.5 * jax.random.uniform(k[7], (d,)),
    ), jax.random.normal(k[8], (b, l, d), dtype), jax.random.normal(k[9], (b, d, n))


def check_phases():
    """Section 1: each Mosaic kernel against the jnp reference of its phase."""
    cases = [(2, 512, 64, 16, False), (1, 768, 128, 32, True), (1, 256, 64, 256, False)]
    for (b, l, d, n, reverse) in SMOKE["phases"] if INTERPRET else cases:
        check_phase_case(b, l, d, n, reverse)


def check_phase_case(b, l, d, n, reverse):
    tiling = default_mosaic_tiling(b, l, d, n)
    st = sc.ScanStatics(tiling=tiling, length=l, padded_length=l, delta_softplus=True,
                        reverse=reverse, has_z=True, interpret=INTERPRET)
    a, g, _ = inputs(jax.random.key(l + n), b, l, d, n)
    u, dt, z, A, B, C, D, bias = (a[k] for k in ("u", "delta", "z", "A", "B", "C", "D",
                                                 "delta_bias"))
    nc = l // tiling.chunk
    k1, k2 = jax.random.split(jax.random.key(7))
    h_in, mu = jax.random.normal(k1, (b, nc, d, n)), jax.random.normal(k2, (b, nc, d, n))
    shape = dict(shape=(b, l, d, n), reverse=reverse, tiling=dataclasses.asdict(tiling))

    def run(name, fn, ref):
        starting(f"phase {name} {(b, l, d, n)} reverse={reverse}")
        t = time.perf_counter()
        try:
            got = jax.block_until_ready(jax.jit(fn)())
            errs = ref(got)
            emit(phase=name, **shape, compile_run_s=round(time.perf_counter() - t, 2),
                 max_rel_err=max(errs.values()), rel_errs=errs)
            return got
        except Exception as err:  # report and go on
            emit(phase=name, **shape, error=err_text(err))
            return None

    run("K1_states", lambda: mfw.chunk_states(st, u, dt, A, B, bias, jnp.float32),
        lambda r: dict(zip(("h", "sum_delta"), map(rel, r, kf.chunk_states_reference(
            st, u, dt, A, B, bias, jnp.float32)), strict=True)))
    run("K3_outputs", lambda: mfw.chunk_outputs(st, u, dt, z, A, B, C, D, bias, h_in),
        lambda r: dict(y=rel(r, kf.chunk_outputs_reference(st, u, dt, z, A, B, C, D, bias,
                                                           h_in))))
    adj = run("B1_adjoints", lambda: mbw.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, h_in),
              lambda r: dict(q=rel(r[1], kb.chunk_adjoints_reference(
                  st, dt, z, g, A, C, bias, jnp.float32))))
    if adj is None:
        return
    names = ("du", "ddelta", "dz", "dB", "dC", "dA", "dD", "dbias")
    want = kb.chunk_gradients_reference(st, u, dt, z, g, A, B, C, D, bias, h_in, mu)

    def grads_err(r):
        du, ddt, dz, db, dc, da, dd, dbias = r
        got = (du, ddt, dz, db.sum(0), dc.sum(0), da.sum((0, 1)), dd.sum((0, 1)),
               dbias.sum((0, 1)))
        return {k: rel(x, y) for k, x, y in zip(names, got, want, strict=True)}

    run("B3_gradients", lambda: mbw.chunk_gradients(st, u, dt, z, g, A, B, C, D, bias,
                                                    adj[0], mu), grads_err)


def _op_grads(fn, args, h0, g, reverse):
    def loss(a, h0):
        y, h = fn(**a, reverse=reverse, initial_state=h0)
        return jnp.sum(y.astype(h.dtype) * g.astype(h.dtype)) + jnp.sum(h * h0), (y, h)

    (_, (y, h)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(args,
                                                                                         h0)
    return [y, h] + jax.tree.leaves(grads)


def check_op():
    """Section 2: the whole Mosaic op against the sequential reference."""
    cases = [((2, 1000, 96, 16), False, "float32", {}), ((1, 777, 64, 48), True, "float32", {}),
             ((2, 300, 32, 256), False, "float32", {}), ((1, 1000, 64, 32), True, "bfloat16", {}),
             ((1, 600, 64, 16), True, "float32", dict(fused_replay=True)),
             ((1, 40, 16, 8), False, "float64", {})]
    for backend in ("mosaic",):  # Triton's: docs/benchmarks.md, tests -m gpu
        if (reason := backends.unavailable_reason(backend)) and not INTERPRET:
            emit(op=backend, error=f"unavailable: {reason}")
            continue
        for (b, l, d, n), reverse, dtype, kw in SMOKE["op"] if INTERPRET else cases:
            dtype = jnp.dtype(dtype)
            label = dict(op=backend, shape=(b, l, d, n), reverse=reverse, dtype=dtype.name, **kw)
            starting(str(label))
            t = time.perf_counter()
            try:
                with jax.enable_x64(dtype == jnp.float64):
                    a, g, h0 = inputs(jax.random.key(l), b, l, d, n, dtype)
                    if dtype == jnp.float64:
                        a = {k: v.astype(dtype) for k, v in a.items()}
                        h0 = h0.astype(dtype)
                    ref_args = {k: v.astype(jnp.promote_types(v.dtype, jnp.float32))
                                for k, v in a.items()}
                    fn = functools.partial(ks.selective_scan_pallas, backend=backend,
                                           interpret=INTERPRET, **kw)
                    got = _op_grads(fn, a, h0, g, reverse)
                    want = _op_grads(selective_scan_reference, ref_args, h0, g, reverse)
                    errs = [rel(x, y) for x, y in zip(got, want, strict=True)]
                    finite = all(bool(np.isfinite(np.asarray(x, np.float64)).all()) for x in got)
                emit(**label, compile_run_s=round(time.perf_counter() - t, 2),
                     max_rel_err=max(errs), finite=finite,
                     rel_errs=[float(f"{e:.2e}") for e in errs])
            except Exception as err:
                emit(**label, error=err_text(err))


def timed(fn, args, iters):
    """(median ms, temp GiB, compile s, result)."""
    t = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t
    mem = compiled.memory_analysis()
    out = jax.block_until_ready(compiled(*args))
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t)
    temp = None if mem is None else mem.temp_size_in_bytes / 2**30
    return float(np.median(times)) * 1e3, temp, compile_s, out


def time_backends(iters, **variant):
    """Section 3: fwd and fwd+bwd per backend; Mosaic's results against Triton's."""
    label = variant.pop("label", None)
    block_rows = variant.pop("block_rows", None)
    knobs = dict(APPROX_MATH=variant.pop("approx_math", False),
                 LOWERING_SEMANTICS=variant.pop("lowering_semantics", None))
    if any(getattr(mb, k) != v for k, v in knobs.items()):
        for k, v in knobs.items():
            setattr(mb, k, v)
        jax.clear_caches()  # the kernels read the knobs when traced
    for name, (b, l, d, n) in (SMOKE["timed"] if INTERPRET else TIMED).items():
        a, g, _ = inputs(jax.random.key(0), b, l, d, n)
        results = {}
        for backend in (("mosaic",) if label else ("mosaic", "triton")):
            row = dict(time=name, shape=(b, l, d, n), backend=label or backend)
            if (reason := backends.unavailable_reason(backend)) and not INTERPRET:
                emit(**row, error=f"unavailable: {reason}")
                continue

            tiling = None if block_rows is None else dataclasses.replace(
                default_mosaic_tiling(b, l, d, n), block_rows=block_rows)

            def run(a, backend=backend, tiling=tiling):
                return ks.selective_scan_pallas(**a, backend=backend, interpret=INTERPRET,
                                                tiling=tiling, **variant)[0]

            def fwdbwd(a, g, run=run):
                return jax.grad(lambda a: jnp.sum(run(a) * g))(a)

            starting(str(row))
            try:
                row["fwd_ms"], row["fwd_temp_GiB"], row["fwd_compile_s"], y = timed(
                    run, (a,), iters)
                row["fwdbwd_ms"], row["fwdbwd_temp_GiB"], row["fwdbwd_compile_s"], grads = \
                    timed(fwdbwd, (a, g), iters)
                results[backend] = [y] + [grads[k] for k in sorted(grads)]
                if backend == "triton" and "mosaic" in results:
                    row["mosaic_vs_triton_rel"] = dict(zip(
                        ["y"] + sorted(grads), (float(f"{rel(m, t):.2e}") for m, t in zip(
                            results["mosaic"], results["triton"], strict=True)), strict=True))
                del y, grads
            except Exception as err:
                row["error"] = err_text(err)
            emit(**row)
        results.clear()


def time_phases(iters):
    """Section 4: each Mosaic kernel alone (and K2) at the timed shapes."""
    for name, shape in (SMOKE["timed"] if INTERPRET else TIMED).items():
        time_phase_shape(name, *shape, iters=iters)


def time_phase_shape(name, b, l, d, n, *, iters):
    t = default_mosaic_tiling(b, l, d, n)
    st = sc.ScanStatics(tiling=t, length=l, padded_length=l, delta_softplus=True,
                        reverse=False, has_z=True, interpret=INTERPRET)
    a, g, _ = inputs(jax.random.key(0), b, l, d, n)
    u, dt, z, A, B, C, D, bias = (a[k] for k in ("u", "delta", "z", "A", "B", "C", "D",
                                                 "delta_bias"))
    row = dict(phase_time=name, tiling=dataclasses.asdict(t))
    try:
        h_loc, sdt = jax.jit(lambda *x: mfw.chunk_states(st, *x, jnp.float32))(
            u, dt, A, B, bias)
        h_in, _ = chunk_carries(chunk_decay(A, sdt), h_loc, jnp.zeros((b, d, n)),
                                reverse=False)
        h_fine, q = jax.jit(lambda *x: mbw.chunk_adjoints(st, *x))(u, dt, z, g, A, B, C,
                                                                  bias, h_in)
    except Exception as err:
        emit(**row, error=err_text(err))
        return
    phases = {
        "K1_states": (lambda *x: mfw.chunk_states(st, *x, jnp.float32), (u, dt, A, B, bias)),
        "K2_carries": (lambda A, s, h: chunk_carries(chunk_decay(A, s), h, jnp.zeros(
            (b, d, n)), reverse=False), (A, sdt, h_loc)),
        "K3_outputs": (lambda *x: mfw.chunk_outputs(st, *x),
                       (u, dt, z, A, B, C, D, bias, h_in)),
        "B1_adjoints": (lambda *x: mbw.chunk_adjoints(st, *x),
                        (u, dt, z, g, A, B, C, bias, h_in)),
        "B3_gradients": (lambda *x: mbw.chunk_gradients(st, *x),
                         (u, dt, z, g, A, B, C, D, bias, h_fine, q)),
    }
    for key, (fn, args) in phases.items():
        starting(f"phase_time {name} {key}")
        try:
            ms, _, compile_s, _ = timed(fn, args, iters)
            row[key] = round(ms, 3)
            row[key + "_compile_s"] = round(compile_s, 1)
        except Exception as err:
            row[key] = err_text(err)
    emit(**row)


def table():
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d')}, {time.perf_counter() - T0:.0f} s; default backend "
          f"here: {backends.compiled_backend()}")
    print("| shape | backend | fwd ms | fwd+bwd ms | fwd+bwd temp GiB | compile s (fwd+bwd) |")
    print("|---|---|---|---|---|---|")
    for r in ROWS:
        if "time" in r:
            cells = [r["time"], r["backend"], r.get("fwd_ms", r.get("error", "")[:70]),
                     r.get("fwdbwd_ms", ""), r.get("fwdbwd_temp_GiB", ""),
                     r.get("fwdbwd_compile_s", "")]
            print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c)
                                    for c in cells) + " |")
    for r in ROWS:
        if "phase_time" in r:
            print(r["phase_time"], {k: v for k, v in r.items()
                                    if k[:2] in ("K1", "K2", "K3", "B1", "B3")
                                    and not k.endswith("_s")})
    tol = {"bfloat16": 8e-3, "float64": 1e-10}  # else 1e-4 (the contract's fp32 gradients)
    fails = [r for r in ROWS if ("phase" in r or "op" in r) and (
        "error" in r or r.get("max_rel_err", 0) > tol.get(r.get("dtype"), 1e-4))]
    print(f"# checks: {sum('phase' in r or 'op' in r for r in ROWS)} rows, "
          f"{len(fails)} failed or above tolerance (1e-4; bf16 8e-3; f64 1e-10): "
          + "; ".join(f"{r.get('phase') or r.get('op')}{r.get('shape')}:"
                      f"{r.get('error', r.get('max_rel_err'))}"[:160] for r in fails))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="folder for mosaic_check.json")
    p.add_argument("--iters", type=int, default=5, help="timed repetitions (median)")
    p.add_argument("--budget", type=float, default=200.0,
                   help="seconds after which optional sections are skipped")
    p.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    args = p.parse_args(argv)
    global INTERPRET
    INTERPRET = args.smoke
    dev = jax.devices()[0]
    emit(env=dict(device=dev.device_kind, jax=jax.__version__,
                  capability=getattr(dev, "compute_capability", None),
                  mosaic=mb.unavailable_reason() or "ok",
                  triton=backends.unavailable_reason("triton") or "ok",
                  default=backends.compiled_backend()))
    check_phases()
    check_op()
    time_backends(args.iters)
    if time.perf_counter() - T0 < args.budget - 60:
        time_phases(args.iters)
    for label, knobs in [("mosaic[Lane]", dict(lowering_semantics="Lane")),
                         ("mosaic[block_rows=16]", dict(block_rows=16)),
                         ("mosaic[approx_math]", dict(approx_math=True))]:
        if time.perf_counter() - T0 < args.budget - 40:
            time_backends(args.iters, label=label, **knobs)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "mosaic_check.json").write_text(json.dumps(ROWS, indent=1, default=str))
    table()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
