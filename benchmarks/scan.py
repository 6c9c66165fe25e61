"""Selective-scan benchmark: pallas (Triton and Mosaic GPU kernels) and xla at SegMamba's stage
shapes, against mamba_ssm's CUDA; with `--check`, the kernels' correctness on the same GPU.

Run on a GPU machine from the repository root (the whole table, 10 timed runs per row):

    python benchmarks/scan.py --backend triton,mosaic

For each shape of `SHAPES` (Synapse stages 0-5, BraTS stage 0, (2, 262144, 64, 16)) and each
backend it times forward and forward+backward (fp32 inputs with z, D, delta_bias and softplus;
gradients of `sum(y·g)` for all eight inputs) as device-synchronised medians after warm-up, reads
the compiled temporary memory (`memory_analysis`), and prints percent of the HBM floor (each
input read once, each output written once), the ratio to mamba_ssm's CUDA times and issue 27's
fwd+bwd goals. With several backends the later ones' rows carry their relative difference from
the first's y and gradients. Every row goes, as a JSON line with the card, JAX version, date and
commit, to `--out` (default benchmarks/results/, one file per run: `result_rows.py`).

`--backend`: comma-separated of triton, mosaic (default: the one a GPU gets here,
`jaxmamba.kernels.backends`). `--check` first compares the op with the sequential reference on
small shapes, `--check-phases` each kernel with its phase's reference (`scan_kernels.py`);
`--baseline DIR` times the pallas rows again with the `jaxmamba` package of another checkout
(e.g. `git archive OLD | tar -x -C DIR`) in a subprocess; `--strides 2,4` adds rows whose backward
saves a state every `sub_chunk·stride` rows; `--fused` adds rows with `fused_replay`; `--sweep`
times tilings; `--phases` times each kernel alone; `--variants` Mosaic GPU compiler options;
`--layer` a whole `MambaLayer` at Synapse stage 0 (on the default backend); `--smoke` runs tiny
shapes in interpret mode, to try the script on a CPU. Imports only jax, numpy, flax (`--layer`)
and jaxmamba's `kernels`, `ops` and `layers`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp


def _tree() -> Path:
    """The checkout whose `jaxmamba` is timed: `--tree DIR` (set by `--baseline`), else this one."""
    argv = sys.argv[1:]
    if "--tree" in argv:
        return Path(argv[argv.index("--tree") + 1]).resolve()
    return Path(__file__).resolve().parents[1]


sys.path.insert(0, str(_tree()))

import result_rows  # noqa: E402
import scan_kernels  # noqa: E402
from scan_kernels import timed  # noqa: E402

from jaxmamba.kernels.selective_scan import selective_scan_pallas  # noqa: E402
from jaxmamba.kernels.tiling import ScanTiling  # noqa: E402
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
#: `--smoke`: interpret mode on a CPU (no CUDA times).
SMOKE_SHAPES = {"smoke_n16": (1, 64, 64, 16), "smoke_n32": (1, 32, 64, 32)}
#: fwd+bwd goals in ms, issue 27's (H100, or H200 against a baseline on that card).
GOALS_MS = {"synapse_s0": 38.0, "synapse_s1": 38.0, "std_L256k_N16": 2.4}
#: Device-to-device copy bandwidth of an H100 80GB HBM3 (bytes read + written).
HBM_BYTES_PER_S = 3.0e12
#: `--variants`: Mosaic GPU options (`jaxmamba/kernels/mosaic_backend.py`, read when a kernel is
#: traced) or tiling fields.
MOSAIC_VARIANTS = {"lane": dict(LOWERING_SEMANTICS="Lane"), "approx_math": dict(APPROX_MATH=True),
                   "rows16": dict(block_rows=16)}
INTERPRET: bool | None = None  # None: compiled on a GPU; True with --smoke


def floor_ms(b, l, d, n, itemsize=4):
    """HBM floor of fwd and fwd+bwd with the z gate (y recomputed in the backward), ms."""
    bld, bln = b * l * d, b * l * n
    fwd = itemsize * (4 * bld + 2 * bln)
    bwd = itemsize * (7 * bld + 4 * bln)
    return fwd / HBM_BYTES_PER_S * 1e3, (fwd + bwd) / HBM_BYTES_PER_S * 1e3


def default_backend() -> str:
    """The backend `backend=None` runs here (older checkouts, `--baseline`, have only Triton)."""
    try:
        from jaxmamba.kernels.selective_scan import default_backend as pick
    except ImportError:
        return "triton"
    return pick(bool(INTERPRET))


def default_tiling_of(backend: str | None, b, l, d, n):
    return scan_kernels.phase_modules(backend or default_backend())[2](b, l, d, n)


@contextlib.contextmanager
def mosaic_options(**options):
    """`mosaic_backend`'s module options set while the block traces (caches cleared around)."""
    if not options:
        yield
        return
    from jaxmamba.kernels import mosaic_backend as mb

    before = {k: getattr(mb, k) for k in options}
    for k, v in options.items():
        setattr(mb, k, v)
    jax.clear_caches()
    try:
        yield
    finally:
        for k, v in before.items():
            setattr(mb, k, v)
        jax.clear_caches()


def scan_fns(impl, backend=None, tiling=None, **pallas_kw):
    """(forward, forward+backward) of y; pallas calls the kernels with `backend` (None: the
    default here; not passed then, so that a `--baseline` checkout without backends runs)."""
    if impl == "pallas":
        kw = dict(pallas_kw, tiling=tiling)
        if backend is not None:
            kw["backend"] = backend
        if INTERPRET:
            kw["interpret"] = True

        def run(a):
            return selective_scan_pallas(**a, **kw)[0]
    else:
        def run(a):
            return selective_scan(**a, implementation=impl)

    def fwdbwd(a, g):
        return jax.grad(lambda a: jnp.sum(run(a) * g))(a)

    return run, fwdbwd


def bench_shape(name, b, l, d, n, peer, iters, runs, emit):
    """One row per run: `runs` are dicts (implementation, backend, variant, tiling or a function
    making it, kw, options). The default runs of later backends carry their difference from the
    first's."""
    args, g = scan_kernels.make_inputs(jax.random.key(0), b, l, d, n)
    f_fwd, f_all = floor_ms(b, l, d, n)
    first = None
    for run_spec in runs:
        impl, backend = run_spec["implementation"], run_spec.get("backend")
        n_it = iters if impl == "pallas" or l * d * n <= 2**28 else max(3, iters // 4)
        row = dict(shape=name, B=b, L=l, D=d, N=n, implementation=impl,
                   backend=(backend or default_backend()) if impl == "pallas" else None,
                   variant=run_spec.get("variant"), goal_fwdbwd_ms=GOALS_MS.get(name))
        try:
            tiling = run_spec.get("tiling")
            tiling = tiling() if callable(tiling) else tiling  # a bad tiling: this row's error
            run, fwdbwd = scan_fns(impl, backend, tiling, **run_spec.get("kw", {}))
            with mosaic_options(**run_spec.get("options", {})):
                if impl == "pallas":
                    row["tiling"] = dataclasses.asdict(tiling or default_tiling_of(
                        row["backend"], b, l, d, n))
                row["fwd_ms"], row["fwd_temp_GiB"], row["fwd_compile_s"], y = timed(
                    run, (args,), n_it)
                row["fwdbwd_ms"], row["fwdbwd_temp_GiB"], row["fwdbwd_compile_s"], grads = \
                    timed(fwdbwd, (args, g), n_it)
            row["fwd_floor_pct"] = 100 * f_fwd / row["fwd_ms"]
            row["fwdbwd_floor_pct"] = 100 * f_all / row["fwdbwd_ms"]
            if peer:
                row["vs_cuda_fwd"] = row["fwd_ms"] / peer[0]
                row["vs_cuda_fwdbwd"] = row["fwdbwd_ms"] / peer[1]
            if impl == "pallas" and row["variant"] is None:
                results = [y] + [grads[k] for k in sorted(grads)]
                if first is None:
                    first = (row["backend"], results)
                elif first[0] != row["backend"]:
                    row[f"rel_diff_vs_{first[0]}"] = dict(zip(
                        ["y"] + sorted(grads), (float(f"{scan_kernels.rel(x, y0):.2e}")
                                                for x, y0 in zip(results, first[1], strict=True)),
                        strict=True))
            del y, grads
        except Exception as err:  # report and go on: one failing variant must not end the table
            row["error"] = scan_kernels.err_text(err)
        emit(**row)


def bench_layer(iters, emit):
    """Whole `MambaLayer` (SegMamba, not bidirectional) at Synapse stage 0: fwd+bwd, pallas on
    the default backend (`JAXMAMBA_PALLAS_BACKEND` picks another)."""
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

    row = dict(shape="MambaLayer synapse_s0 (2, 48x192x192, C=32)", implementation="pallas",
               backend=default_backend())
    try:
        row["fwd_ms"], row["fwd_temp_GiB"], _, _ = timed(fwd, (params, x), iters)
        row["fwdbwd_ms"], row["fwdbwd_temp_GiB"], _, _ = timed(fwdbwd, (params, x), iters)
    except Exception as err:
        row["error"] = scan_kernels.err_text(err)
    emit(**row)


def run_baseline(tree: Path, commit: str, names, iters, peer: Path | None, emit):
    """The pallas rows again with `tree`'s jaxmamba, in a subprocess (one package per process)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--tree", str(tree), "--impls",
               "pallas", "--backend", "", "--shapes", ",".join(names), "--iters", str(iters),
               "--out", tmp, "--commit", commit, "--no-table"] + (
                   ["--peer", str(peer)] if peer else []) + (["--smoke"] if INTERPRET else [])
        print(f"# baseline: {' '.join(cmd)}", flush=True)
        proc = subprocess.run(cmd, text=True)
        files = sorted(Path(tmp).glob("*.jsonl"))
        if proc.returncode or not files:
            for name in names:
                emit(shape=name, implementation="pallas", variant="baseline", commit=commit,
                     error=f"baseline exit {proc.returncode}")
            return
        for row in result_rows.read_rows(files[0]):
            emit(**dict(row, variant="baseline"))


def print_table(rows):
    cols = ["shape", "implementation", "backend", "variant", "fwd_ms", "fwdbwd_ms",
            "goal_fwdbwd_ms", "vs_baseline", "fwdbwd_temp_GiB", "fwdbwd_floor_pct",
            "vs_cuda_fwd", "vs_cuda_fwdbwd"]
    base = {r["shape"]: r for r in rows if r.get("variant") == "baseline" and "fwdbwd_ms" in r}
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        if "check" in r or "phases" in r:
            continue
        r = dict(r)
        if r["shape"] in base and r.get("variant") != "baseline" and "fwdbwd_ms" in r:
            r["vs_baseline"] = r["fwdbwd_ms"] / base[r["shape"]]["fwdbwd_ms"]
        cells = [r.get("error", "")[:60] if c == "fwd_ms" and "error" in r else r.get(c, "")
                 for c in cols]
        print("| " + " | ".join(f"{c:.3g}" if isinstance(c, float) else
                                ("" if c is None else str(c)) for c in cells) + " |")
    for r in rows:
        if "phases" in r:
            print(r["phases"], r["backend"], {k: round(v, 3) if isinstance(v, float) else v
                                              for k, v in r.items() if k[:2] in ("K1", "K2", "K3",
                                                                                  "B1", "B3")})


def runs_of(args, backends, b, l, d, n):
    """What `bench_shape` times at one shape, from the command line."""
    impls = args.impls.split(",")
    runs = [dict(implementation="pallas", backend=bk) for bk in backends if "pallas" in impls]
    runs += [dict(implementation=i) for i in impls if i and i != "pallas"]
    for bk in backends if "pallas" in impls else []:
        if args.fused:
            runs.append(dict(implementation="pallas", backend=bk, variant="fused",
                             kw=dict(fused_replay=True)))
        for stride in filter(None, args.strides.split(",")):
            runs.append(dict(implementation="pallas", backend=bk, variant=f"stride={stride}",
                             tiling=lambda bk=bk, s=int(stride): dataclasses.replace(
                                 default_tiling_of(bk, b, l, d, n), state_stride=s)))
        for spec in filter(None, args.sweep.split(";")):
            runs.append(dict(implementation="pallas", backend=bk, variant=f"tiling={spec}",
                             tiling=lambda spec=spec: ScanTiling(*map(int, spec.split(",")))))
        for name in filter(None, args.variants.split(",")) if bk == "mosaic" else []:
            opts = dict(MOSAIC_VARIANTS[name])
            rows_ = opts.pop("block_rows", None)
            runs.append(dict(implementation="pallas", backend=bk, variant=name, options=opts,
                             tiling=None if rows_ is None else lambda bk=bk, r=rows_:
                             dataclasses.replace(default_tiling_of(bk, b, l, d, n),
                                                 block_rows=r)))
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--peer", type=Path, help="other CUDA times: JSON {'scan': [{name, B, L, D, "
                   "N, fwd_ms, fwdbwd_ms}]} (default: the H100 times in SHAPES)")
    p.add_argument("--shapes", default="all", help=f"comma-separated of {', '.join(SHAPES)}, "
                   "or 'all'")
    p.add_argument("--impls", default="pallas", help="comma-separated implementations "
                   "(pallas, xla, reference)")
    p.add_argument("--backend", default=None, help="comma-separated Pallas backends (triton, "
                   "mosaic); default: the one a GPU gets on this JAX")
    p.add_argument("--iters", type=int, default=10, help="timed repetitions (median)")
    p.add_argument("--out", type=Path, default=result_rows.RESULTS, help="folder for this run's "
                   "JSON-lines file (default: benchmarks/results/)")
    p.add_argument("--commit", help="what tree is measured, for the rows (default: its git "
                   "branch@sha, +uncommitted when tracked files changed)")
    p.add_argument("--baseline", type=Path, help="another checkout (folder holding jaxmamba/): "
                   "time its pallas kernels too, side by side")
    p.add_argument("--baseline-commit", help="what --baseline is (e.g. main@1b6c7b0); default: "
                   "its git state")
    p.add_argument("--tree", type=Path, help=argparse.SUPPRESS)  # read by _tree()
    p.add_argument("--no-table", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--strides", default="", help="also time pallas with these backward "
                   "state strides, e.g. '2,4' (default tiling otherwise)")
    p.add_argument("--fused", action="store_true", help="also time pallas with fused_replay "
                   "(the forward saves the backward's states; more memory kept)")
    p.add_argument("--check", action="store_true", help="each backend's op vs the reference "
                   "first (fp32, bf16, float64, padded, reversed, fused)")
    p.add_argument("--check-phases", action="store_true", help="each backend's kernels vs "
                   "their phases' references first")
    p.add_argument("--layer", action="store_true", help="also time MambaLayer at synapse_s0")
    p.add_argument("--sweep", default="", help="tilings to time with pallas, "
                   "'T,BD,fwd_warps,bwd_BD,S,bwd_warps[,stride];...' (applied to every shape)")
    p.add_argument("--phases", action="store_true", help="time each kernel alone")
    p.add_argument("--variants", default="", help="Mosaic GPU variants to time too: "
                   f"comma-separated of {', '.join(MOSAIC_VARIANTS)}")
    p.add_argument("--smoke", action="store_true", help="tiny shapes in interpret mode (CPU)")
    args = p.parse_args(argv)
    global INTERPRET
    INTERPRET = True if args.smoke else None
    shapes = dict(SHAPES)
    if args.peer:
        for s in json.loads(args.peer.read_text())["scan"]:
            shapes[s["name"]] = (s["B"], s["L"], s["D"], s["N"], s["fwd_ms"], s["fwdbwd_ms"])
    if args.smoke:
        shapes = {k: (*v, None, None) for k, v in SMOKE_SHAPES.items()}
    names = list(shapes) if args.shapes == "all" or args.smoke else args.shapes.split(",")
    unknown = [n for n in names if n not in shapes]
    if unknown:
        p.error(f"--shapes: unknown {unknown}; expected names from {list(shapes)}")
    backends = [None] if not args.backend else args.backend.split(",")
    bad = [b for b in backends if b not in (None, "triton", "mosaic")]
    bad += [v for v in filter(None, args.variants.split(",")) if v not in MOSAIC_VARIANTS]
    if bad:
        p.error(f"--backend/--variants: unknown {bad}")
    out = result_rows.RunFile(args.out, "scan", args.commit or result_rows.commit_of(_tree()))
    rows = []

    def emit(**row):
        rows.append(out.write(row))
        print(json.dumps(rows[-1], default=str), flush=True)

    print(f"# {out.stamp}; rows to {out.partial}", flush=True)
    t_start = time.perf_counter()
    for bk in [b or default_backend() for b in backends]:
        if args.check_phases:
            scan_kernels.check_phases(bk, interpret=bool(INTERPRET), emit=emit)
        if args.check:
            scan_kernels.check_op(bk, interpret=bool(INTERPRET), emit=emit)
    for name in names:
        b, l, d, n, *peer = shapes[name]
        peer = peer if peer and peer[0] else None
        bench_shape(name, b, l, d, n, peer, args.iters, runs_of(args, backends, b, l, d, n),
                    emit)
        for bk in [b_ or default_backend() for b_ in backends] if args.phases else []:
            for spec in [None, *filter(None, args.sweep.split(";"))]:  # --sweep: per tiling too
                try:
                    tiling = spec and ScanTiling(*map(int, spec.split(",")))
                except ValueError as err:
                    emit(phases=name, backend=bk, variant=f"tiling={spec}", error=str(err))
                    continue
                scan_kernels.time_phases(name, b, l, d, n, args.iters, bk, emit,
                                         interpret=bool(INTERPRET), tiling=tiling)
    if args.layer:
        bench_layer(args.iters, emit)
    if args.baseline:
        run_baseline(args.baseline, args.baseline_commit or result_rows.commit_of(args.baseline),
                     names, args.iters, args.peer, emit)
    path = out.close()
    if not args.no_table:
        print(f"# {out.stamp['card']}, jax {out.stamp['jax']}, {out.stamp['date']}, "
              f"{time.perf_counter() - t_start:.0f} s; rows: {path}")
        print_table(rows)
        if args.check or args.check_phases:
            print(scan_kernels.summary(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
