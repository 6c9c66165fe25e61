"""Selective-scan benchmark: pallas vs xla at SegMamba's stage shapes, against mamba_ssm's CUDA.

Run on a GPU machine from the repository root:

    python benchmarks/scan.py --json scan.json

For each shape of `../shared/reference/peer/h100_mamba_ssm_scan.json` (Synapse stages 0–5,
BraTS stage 0, (2, 262144, 64, 16)) it times forward and forward+backward (fp32 inputs with z, D,
delta_bias and softplus; gradients of `sum(y·g)` for all eight inputs) as device-synchronised
medians after warm-up, reads the compiled temporary memory (`memory_analysis`), and prints
percent of the HBM floor (each input read once, each output written once, jax_mamba_anchors §4)
and the ratio to the recorded mamba_ssm times. `--layer` adds a whole `MambaLayer` at Synapse
stage 0; `--check` first compares pallas with the reference on small shapes; `--sweep` times
tilings of the pallas kernels.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxmamba.kernels.selective_scan import selective_scan_pallas  # noqa: E402
from jaxmamba.kernels.tiling import ScanTiling, default_tiling  # noqa: E402
from jaxmamba.ops import selective_scan  # noqa: E402

SHARED = Path(os.environ.get("JAXMAMBA_SHARED", Path(__file__).resolve().parents[2] / "shared"))
PEER = SHARED / "reference" / "peer" / "h100_mamba_ssm_scan.json"
#: Device-to-device copy bandwidth of an H100 80GB HBM3 (bytes read + written), KINDS.md.
HBM_BYTES_PER_S = 3.0e12


def make_inputs(key, b, l, d, n, dtype=jnp.float32):
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


def floor_ms(b, l, d, n, itemsize=4):
    """HBM floor of fwd and fwd+bwd with the z gate (y recomputed in the backward), ms."""
    bld, bln = b * l * d, b * l * n
    fwd = itemsize * (4 * bld + 2 * bln)
    bwd = itemsize * (7 * bld + 4 * bln)
    return fwd / HBM_BYTES_PER_S * 1e3, (fwd + bwd) / HBM_BYTES_PER_S * 1e3


def timed(fn, args, iters, warmup=2):
    """(median ms, compiled temp GiB, compile s) of a jitted fn, device-synchronised."""
    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    temp = None if mem is None else mem.temp_size_in_bytes / 2**30
    for _ in range(warmup):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3, temp, compile_s


def scan_fns(impl, tiling=None):
    if impl == "pallas" and tiling is not None:
        def run(a):
            return selective_scan_pallas(**a, tiling=tiling)[0]
    else:
        def run(a):
            return selective_scan(**a, implementation=impl)

    def fwdbwd(a, g):
        return jax.grad(lambda a: jnp.sum(run(a) * g))(a)

    return run, fwdbwd


def bench_shape(name, b, l, d, n, impls, peer, iters, tiling=None):
    args, g = make_inputs(jax.random.key(0), b, l, d, n)
    f_fwd, f_all = floor_ms(b, l, d, n)
    rows = []
    for impl in impls:
        run, fwdbwd = scan_fns(impl, tiling)
        n_it = iters if impl == "pallas" or l * d * n <= 2**28 else max(3, iters // 4)
        row = dict(shape=name, B=b, L=l, D=d, N=n, impl=impl)
        if impl == "pallas":
            row["tiling"] = dataclasses.asdict(tiling or default_tiling(b, l, d, n))
        try:
            row["fwd_ms"], row["fwd_temp_GiB"], row["fwd_compile_s"] = timed(run, (args,), n_it)
            row["fwdbwd_ms"], row["fwdbwd_temp_GiB"], row["fwdbwd_compile_s"] = timed(
                fwdbwd, (args, g), n_it)
            row["fwd_floor_pct"] = 100 * f_fwd / row["fwd_ms"]
            row["fwdbwd_floor_pct"] = 100 * f_all / row["fwdbwd_ms"]
            if peer:
                row["vs_cuda_fwd"] = row["fwd_ms"] / peer["fwd_ms"]
                row["vs_cuda_fwdbwd"] = row["fwdbwd_ms"] / peer["fwdbwd_ms"]
        except Exception as err:  # report and go on: one failing variant must not end the table
            row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def bench_phases(name, b, l, d, n, iters, tiling=None):
    """Milliseconds of each kernel and XLA phase alone (shapes that need no padding)."""
    from jaxmamba.kernels import scan_backward as kb
    from jaxmamba.kernels import scan_common as sc
    from jaxmamba.kernels import scan_forward as kf
    from jaxmamba.kernels import selective_scan as ks

    t = tiling or default_tiling(b, l, d, n)
    st = sc.ScanStatics(tiling=t, length=l, padded_length=l, delta_softplus=True, reverse=False,
                        has_z=True, interpret=jax.default_backend() != "gpu")
    a, g = make_inputs(jax.random.key(0), b, l, d, n)
    u, dt, z, A, B, C, D, bias = (a[k] for k in ("u", "delta", "z", "A", "B", "C", "D",
                                                 "delta_bias"))
    h0 = jnp.zeros((b, d, n))
    h_loc, sdt = kf.chunk_states(st, u, dt, A, B, bias, jnp.float32)
    decay = ks._chunk_decay(A, sdt)
    h_in, _ = ks.chunk_carries(decay, h_loc, h0, reverse=False)
    h_fine, q = kb.chunk_adjoints(st, u, dt, z, g, A, B, C, bias, h_in)
    phases = {  # (function, its array arguments): arrays passed as arguments, not constants
        "K1_states": (lambda *x: kf.chunk_states(st, *x, jnp.float32), (u, dt, A, B, bias)),
        "K2_carries": (lambda A, s, h, h0: ks.chunk_carries(ks._chunk_decay(A, s), h, h0,
                                                           reverse=False), (A, sdt, h_loc, h0)),
        "K3_outputs": (lambda *x: kf.chunk_outputs(st, *x),
                       (u, dt, z, A, B, C, D, bias, h_in)),
        "B1_adjoints": (lambda *x: kb.chunk_adjoints(st, *x), (u, dt, z, g, A, B, C, bias, h_in)),
        "B3_gradients": (lambda *x: kb.chunk_gradients(st, *x),
                         (u, dt, z, g, A, B, C, D, bias, h_fine, q)),
    }
    row = dict(phases=name, tiling=dataclasses.asdict(t))
    for key, (fn, fn_args) in phases.items():
        try:
            row[key] = timed(fn, fn_args, iters)[0]
        except Exception as err:
            row[key] = f"{type(err).__name__}: {str(err)[:300]}"
    print(json.dumps(row), flush=True)
    return [row]


def check(dtype):
    """Relative errors of pallas vs the reference (output and all gradients) on small shapes."""
    from jaxmamba.ops.scan_reference import selective_scan_reference

    out = []
    for (b, l, d, n, rev) in [(2, 1000, 96, 16, False), (1, 777, 64, 48, True),
                              (2, 300, 32, 256, False)]:
        args, g = make_inputs(jax.random.key(l), b, l, d, n, dtype)
        h0 = jax.random.normal(jax.random.key(1), (b, d, n))

        def loss(fn, a, h0, rev=rev, g=g):
            y, h = fn(**a, reverse=rev, initial_state=h0)
            return jnp.sum(y.astype(jnp.float32) * g) + jnp.sum(h), (y, h)

        res = {}
        for impl, fn in [("pallas", selective_scan_pallas), ("ref", selective_scan_reference)]:
            vg = jax.jit(jax.value_and_grad(lambda a, h0, fn=fn: loss(fn, a, h0), argnums=(0, 1),
                                            has_aux=True))
            (_, (y, h)), grads = vg(args, h0)
            res[impl] = jax.tree.leaves((y, h, grads))
        errs = [float(np.linalg.norm(np.asarray(p, np.float64) - np.asarray(r, np.float64))
                      / np.linalg.norm(np.asarray(r, np.float64)))
                for p, r in zip(res["pallas"], res["ref"], strict=True)]
        row = dict(check=str(dtype.dtype if hasattr(dtype, "dtype") else dtype), shape=(b, l, d, n),
                   reverse=rev, max_rel_err=max(errs), rel_errs=errs)
        print(json.dumps(row), flush=True)
        out.append(row)
    return out


def bench_layer(iters):
    """Whole `MambaLayer` (SegMamba, not bidirectional) at Synapse stage 0: fwd+bwd, pallas."""
    from flax import nnx

    from jaxmamba.layers import MambaLayer

    layer = MambaLayer(32, bidirectional=False, scan_implementation="pallas", rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(layer)
    x = jax.random.normal(jax.random.key(0), (2, 48, 192, 192, 32))

    def fwd(p, x):
        return nnx.merge(graphdef, p)(x)

    def fwdbwd(p, x):
        return jax.grad(lambda p: jnp.sum(fwd(p, x) ** 2))(p)

    row = dict(shape="MambaLayer synapse_s0 (2, 48x192x192, C=32)", impl="pallas")
    try:
        row["fwd_ms"], row["fwd_temp_GiB"], _ = timed(fwd, (params, x), iters)
        row["fwdbwd_ms"], row["fwdbwd_temp_GiB"], _ = timed(fwdbwd, (params, x), iters)
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:400]}"
    print(json.dumps(row), flush=True)
    return [row]


def save(path, env, rows):
    if path:
        path.write_text(json.dumps(dict(env=env, rows=rows), indent=1))


def print_table(rows):
    cols = ["shape", "impl", "fwd_ms", "fwdbwd_ms", "fwdbwd_temp_GiB", "fwdbwd_floor_pct",
            "vs_cuda_fwd", "vs_cuda_fwdbwd"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if "check" in r or "phases" in r:
            continue
        cells = [r.get("error", "")[:60] if c == "fwd_ms" and "error" in r else r.get(c, "")
                 for c in cols]
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c)
                                for c in cells) + " |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", type=Path, default=PEER, help="mamba_ssm peer times (JSON)")
    p.add_argument("--shapes", default="all", help="comma-separated peer shape names, or 'all'")
    p.add_argument("--impls", default="pallas,xla", help="comma-separated implementations")
    p.add_argument("--iters", type=int, default=20, help="timed repetitions (median)")
    p.add_argument("--json", type=Path, help="write every row to this JSON file")
    p.add_argument("--check", action="store_true", help="pallas vs reference first (fp32, bf16)")
    p.add_argument("--layer", action="store_true", help="also time MambaLayer at synapse_s0")
    p.add_argument("--sweep", default="", help="tilings to time with pallas, "
                   "'T,BD,fwd_warps,bwd_BD,S,bwd_warps;...' (applied to every shape)")
    p.add_argument("--phases", action="store_true", help="time each kernel alone (per tiling)")
    args = p.parse_args(argv)
    peers = {s["name"]: s for s in json.loads(args.peer.read_text())["scan"]}
    names = list(peers) if args.shapes == "all" else args.shapes.split(",")
    dev = jax.devices()[0]
    env = dict(device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__,
               date=time.strftime("%Y-%m-%d"))
    print(json.dumps(env), flush=True)
    rows = []
    if args.check:
        rows += check(jnp.float32) + check(jnp.bfloat16)
    for name in names:
        s = peers[name]
        b, l, d, n = s["B"], s["L"], s["D"], s["N"]
        if args.impls:
            rows += bench_shape(name, b, l, d, n, args.impls.split(","), s, args.iters)
        if args.phases:
            rows += bench_phases(name, b, l, d, n, args.iters)
        for spec in filter(None, args.sweep.split(";")):
            t = ScanTiling(*map(int, spec.split(",")))
            if args.phases:
                rows += bench_phases(name, b, l, d, n, args.iters, tiling=t)
            else:
                rows += bench_shape(name, b, l, d, n, ["pallas"], s, args.iters, tiling=t)
        save(args.json, env, rows)
    if args.layer:
        rows += bench_layer(args.iters)
    save(args.json, env, rows)
    print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
