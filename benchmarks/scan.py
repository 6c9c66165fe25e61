"""Selective-scan benchmark: pallas (and xla) at SegMamba's stage shapes, against mamba_ssm's CUDA.

Run on a GPU machine from the repository root (the whole table, 10 timed runs per row):

    python benchmarks/scan.py --json scan.json

For each shape of `SHAPES` (Synapse stages 0-5, BraTS stage 0, (2, 262144, 64, 16)) it times
forward and forward+backward (fp32 inputs with z, D, delta_bias and softplus; gradients of
`sum(y·g)` for all eight inputs) as device-synchronised medians after warm-up, reads the compiled
temporary memory (`memory_analysis`), and prints percent of the HBM floor (each input read once,
each output written once), the ratio to mamba_ssm's CUDA times and the fwd+bwd goals.

`--baseline DIR` times the pallas rows again with the `jaxmamba` package of another checkout
(e.g. the previous commit: `git archive OLD | tar -x -C DIR`) in a subprocess and prints both
side by side. `--strides 1,4` adds pallas rows whose backward saves a state every
`sub_chunk·stride` rows (default 2; 1 is the old layout, twice the memory); `--fused` adds pallas
rows with `fused_replay` (the forward saves those states, the backward replays nothing before
its gradient kernel); `--layer` adds a whole `MambaLayer` at Synapse stage 0; `--check` first
compares pallas with the reference on small shapes; `--sweep` times tilings; `--phases` times
each kernel alone. Imports only jax, numpy, flax (`--layer`) and jaxmamba's `kernels`, `ops` and
`layers` (no data or training packages).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _tree() -> Path:
    """The checkout whose `jaxmamba` is timed: `--tree DIR` (set by `--baseline`), else this one."""
    argv = sys.argv[1:]
    if "--tree" in argv:
        return Path(argv[argv.index("--tree") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


sys.path.insert(0, str(_tree()))

from jaxmamba.kernels.selective_scan import selective_scan_pallas  # noqa: E402
from jaxmamba.kernels.tiling import ScanTiling, default_tiling  # noqa: E402
from jaxmamba.ops import selective_scan  # noqa: E402

#: name: (B, L, D, N, mamba_ssm `selective_scan_cuda` fwd ms, fwd+bwd ms), timed on one H100
#: 80GB HBM3 with PyTorch 2.11 (docs/benchmarks.md); L = tokens of the stage's patch.
SHAPES = {
    "synapse_s0": (2, 1769472, 64, 32, 36.99, 120.43),
    "synapse_s1": (2, 442368, 128, 64, 19.15, 62.96),
    "synapse_s2": (2, 55296, 256, 128, 11.45, 37.92),
    "synapse_s3": (2, 6912, 512, 256, 4.668, 18.45),
    "synapse_s4": (2, 864, 640, 256, 0.609, 2.656),
    "synapse_s5": (2, 216, 640, 256, 0.243, 1.051),
    "brats_s0": (2, 2097152, 64, 32, 44.65, 139.06),
    "std_L256k_N16": (2, 262144, 64, 16, 3.110, 9.796),
}
#: fwd+bwd goals in ms (H100), the scan issue's.
GOALS_MS = {"std_L256k_N16": 2.5, "synapse_s0": 30.0}
#: Device-to-device copy bandwidth of an H100 80GB HBM3 (bytes read + written).
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


def scan_fns(impl, tiling=None, **pallas_kw):
    """(forward, forward+backward); pallas with a tiling or options calls the kernels directly."""
    if impl == "pallas" and (tiling is not None or pallas_kw):
        def run(a):
            return selective_scan_pallas(**a, tiling=tiling, **pallas_kw)[0]
    else:
        def run(a):
            return selective_scan(**a, implementation=impl)

    def fwdbwd(a, g):
        return jax.grad(lambda a: jnp.sum(run(a) * g))(a)

    return run, fwdbwd


def bench_shape(name, b, l, d, n, impls, peer, iters, tiling=None, label=None, **pallas_kw):
    args, g = make_inputs(jax.random.key(0), b, l, d, n)
    f_fwd, f_all = floor_ms(b, l, d, n)
    rows = []
    for impl in impls:
        run, fwdbwd = scan_fns(impl, tiling, **pallas_kw)
        n_it = iters if impl == "pallas" or l * d * n <= 2**28 else max(3, iters // 4)
        row = dict(shape=name, B=b, L=l, D=d, N=n, impl=label or impl)
        if name in GOALS_MS:
            row["goal_fwdbwd_ms"] = GOALS_MS[name]
        if impl == "pallas":
            row["tiling"] = dataclasses.asdict(tiling or default_tiling(b, l, d, n))
        try:
            row["fwd_ms"], row["fwd_temp_GiB"], row["fwd_compile_s"] = timed(run, (args,), n_it)
            row["fwdbwd_ms"], row["fwdbwd_temp_GiB"], row["fwdbwd_compile_s"] = timed(
                fwdbwd, (args, g), n_it)
            row["fwd_floor_pct"] = 100 * f_fwd / row["fwd_ms"]
            row["fwdbwd_floor_pct"] = 100 * f_all / row["fwdbwd_ms"]
            if peer:
                row["vs_cuda_fwd"] = row["fwd_ms"] / peer[0]
                row["vs_cuda_fwdbwd"] = row["fwdbwd_ms"] / peer[1]
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

    from jaxmamba.layers import MambaLayer, MambaOptions

    layer = MambaLayer(32, bidirectional=False, options=MambaOptions("pallas"),
                       rngs=nnx.Rngs(0))
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
    cols = ["shape", "impl", "fwd_ms", "fwdbwd_ms", "goal_fwdbwd_ms", "vs_baseline",
            "fwdbwd_temp_GiB", "fwdbwd_floor_pct", "vs_cuda_fwd", "vs_cuda_fwdbwd"]
    base = {r["shape"]: r for r in rows if r.get("impl") == "pallas@baseline" and "error" not in r}
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if "check" in r or "phases" in r:
            continue
        r = dict(r)
        if r["shape"] in base and r["impl"] != "pallas@baseline" and "fwdbwd_ms" in r:
            r["vs_baseline"] = r["fwdbwd_ms"] / base[r["shape"]]["fwdbwd_ms"]
        cells = [r.get("error", "")[:60] if c == "fwd_ms" and "error" in r else r.get(c, "")
                 for c in cols]
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else str(c)
                                for c in cells) + " |")


def run_baseline(tree: Path, names, iters, peer: Path | None) -> list[dict]:
    """The pallas rows again with `tree`'s jaxmamba, in a subprocess (one package per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "baseline.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--tree", str(tree), "--impls",
               "pallas", "--shapes", ",".join(names), "--iters", str(iters), "--json", str(out),
               "--no-table"] + (["--peer", str(peer)] if peer else [])
        print(f"# baseline: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, text=True)
        if proc.returncode or not out.exists():
            return [dict(shape=n, impl="pallas@baseline", error=f"exit {proc.returncode}")
                    for n in names]
        rows = json.loads(out.read_text())["rows"]
    for r in rows:
        r["impl"] = "pallas@baseline"
        r["tree"] = str(tree)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", type=Path, help="other CUDA times: JSON {'scan': [{name, B, L, D, "
                   "N, fwd_ms, fwdbwd_ms}]} (default: the H100 times in SHAPES)")
    p.add_argument("--shapes", default="all", help=f"comma-separated of {', '.join(SHAPES)}, "
                   "or 'all'")
    p.add_argument("--impls", default="pallas", help="comma-separated implementations "
                   "(pallas, xla, reference)")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--json", type=Path, help="write every row to this JSON file")
    p.add_argument("--baseline", type=Path, help="another checkout (folder holding jaxmamba/): "
                   "time its pallas kernels too, side by side")
    p.add_argument("--tree", type=Path, help=argparse.SUPPRESS)  # read by _tree()
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strides", default="", help="also time pallas with these backward "
                   "state strides, e.g. '1,4' (default tiling otherwise)")
    p.add_argument("--fused", action="store_true", help="also time pallas with fused_replay "
                   "(the forward saves the backward's states; more memory kept)")
    p.add_argument("--check", action="store_true", help="pallas vs reference first (fp32, bf16)")
    p.add_argument("--layer", action="store_true", help="also time MambaLayer at synapse_s0")
    p.add_argument("--sweep", default="", help="tilings to time with pallas, "
                   "'T,BD,fwd_warps,bwd_BD,S,bwd_warps[,stride];...' (applied to every shape)")
    p.add_argument("--phases", action="store_true", help="time each kernel alone (per tiling)")
    args = p.parse_args(argv)
    shapes = dict(SHAPES)
    if args.peer:
        for s in json.loads(args.peer.read_text())["scan"]:
            shapes[s["name"]] = (s["B"], s["L"], s["D"], s["N"], s["fwd_ms"], s["fwdbwd_ms"])
    names = list(shapes) if args.shapes == "all" else args.shapes.split(",")
    unknown = [n for n in names if n not in shapes]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected names from {list(shapes)}")
    dev = jax.devices()[0]
    env = dict(device=getattr(dev, "device_kind", str(dev)), jax=jax.__version__,
               date=time.strftime("%Y-%m-%d"), tree=str(_tree()))
    print(json.dumps(env), flush=True)
    t_start = time.perf_counter()
    rows = []
    if args.check:
        rows += check(jnp.float32) + check(jnp.bfloat16)
    for name in names:
        b, l, d, n, *peer = shapes[name]
        if args.impls:
            rows += bench_shape(name, b, l, d, n, args.impls.split(","), peer, args.iters)
        if args.phases:
            rows += bench_phases(name, b, l, d, n, args.iters)
        if args.fused:
            rows += bench_shape(name, b, l, d, n, ["pallas"], peer, args.iters,
                                label="pallas[fused]", fused_replay=True)
        for stride in filter(None, args.strides.split(",")):
            t = dataclasses.replace(default_tiling(b, l, d, n), state_stride=int(stride))
            rows += bench_shape(name, b, l, d, n, ["pallas"], peer, args.iters, tiling=t,
                                label=f"pallas[stride={stride}]")
        for spec in filter(None, args.sweep.split(";")):
            t = ScanTiling(*map(int, spec.split(",")))
            if args.phases:
                rows += bench_phases(name, b, l, d, n, args.iters, tiling=t)
            else:
                rows += bench_shape(name, b, l, d, n, ["pallas"], peer, args.iters, tiling=t,
                                    label=f"pallas[{spec}]")
        save(args.json, env, rows)
    if args.layer:
        rows += bench_layer(args.iters)
    if args.baseline:
        rows += run_baseline(args.baseline, names, args.iters, args.peer)
    save(args.json, env, rows)
    if not args.no_table:
        print(f"# {env['device']}, jax {env['jax']}, {env['date']}, "
              f"{time.perf_counter() - t_start:.0f} s")
        print_table(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
