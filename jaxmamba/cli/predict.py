"""`jaxmamba predict`: label maps of raw NIfTI cases from trained run directories (an ensemble
when several), with nnU-Net's pipeline (`jaxmamba.infer.predict`).

JAX and the networks are imported in `run`, so `--help` answers without them.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxmamba.choices import ACCUMULATE
from jaxmamba.console import progress_enabled
from jaxmamba.errors import UserError
from jaxmamba.rundir import CHECKPOINTS, DATASET_FILE, PLANS_FILE


def add_arguments(parser) -> None:
    parser.add_argument("-m", "--model", required=True, nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directory (several: an ensemble, e.g. the five folds; their "
                             "logits are averaged)")
    parser.add_argument("-i", "--input", required=True, nargs="+", type=Path,
                        help="folder of CASE_XXXX.nii.gz images (nnU-Net naming), or files")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="folder for CASE.nii.gz label maps")
    parser.add_argument("--checkpoint", choices=CHECKPOINTS, default=None,
                        help="latest (end of training, as nnU-Net's checkpoint_final) or best "
                             "(best EMA pseudo-Dice); default: latest if the run has it, else "
                             "best (converted PyTorch checkpoints)")
    parser.add_argument("--save-probabilities", action="store_true",
                        help="also write CASE.npz with 'probabilities' (K, z, y, x) float32")
    parser.add_argument("--preview", action="store_true",
                        help="also write previews/CASE.png: three slices through the largest "
                             "predicted structure over the image")
    parser.add_argument("--overwrite", action="store_true",
                        help="predict cases whose output already exists (default: skip them)")
    parser.add_argument("--no-mirroring", action="store_true",
                        help="switch mirror test-time augmentation off (8x faster)")
    parser.add_argument("--mirror-axes", default="0,1,2",
                        help="spatial axes to mirror, nnU-Net order (default 0,1,2)")
    parser.add_argument("--step-size", type=float, default=0.5,
                        help="window stride as a fraction of the patch (default 0.5)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="windows per network call (default: one per device, or per N "
                             "devices with --spatial N)")
    parser.add_argument("--accumulate", choices=ACCUMULATE, default="auto",
                        help="where logits are summed: auto picks the device when it fits")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="predict even with a checkpoint whose parameters hold NaN or inf "
                             "(refused by default: its predictions would be meaningless)")
    parser.add_argument("--postprocessing", type=Path, default=None, metavar="FILE",
                        help="apply the postprocessing that `jaxmamba crossval --postprocessing` "
                             "decided (its postprocessing.json) to every label map")
    parser.add_argument("--spatial", type=int, default=1, metavar="N",
                        help="devices sharing each window, split along its first axis (windows "
                             "larger than one device's memory; default 1)")


def run(args) -> int:
    """Predict every case; on several processes (`jaxmamba.distributed`) each predicts its share
    of the cases (round robin) on its own devices and writes its own outputs."""
    from jaxmamba.config import ConfigError
    from jaxmamba.paths import check_apart

    # an output among the inputs would take one case's image for another's finished prediction
    check_apart(args.output, "-o", {f"-i {i}": i if i.is_dir() else i.parent for i in args.input},
                error=ConfigError)
    import jax

    from jaxmamba import compile_cache, distributed
    from jaxmamba.infer.network import network_apply_fn
    from jaxmamba.infer.predict import find_cases, predict_cases
    from jaxmamba.infer.sliding_window import WindowOptions
    from jaxmamba.ops.mesh import check_patch_splits, local_mesh
    from jaxmamba.rundir import check_same_plan, load_run

    written, skipped, error = [], [], None
    compile_cache.enable()  # JAXMAMBA_COMPILE_CACHE, else the user cache directory
    try:
        distributed.initialize()
        say = print if distributed.is_main() else (lambda *a, **k: None)
        mirror_axes = None if args.no_mirroring else _parse_axes(args.mirror_axes)
        runs = [load_run(d, args.checkpoint, allow_non_finite=args.allow_non_finite)
                for d in args.model]
        for r in runs:
            if r.non_finite:
                print(f"WARNING: {r.folder}: {r.non_finite} non-finite parameter value(s); "
                      f"predicting anyway (--allow-non-finite)")
        check_same_plan(runs)
        plan = runs[0].plan
        postprocess = None
        if args.postprocessing is not None:
            from jaxmamba.infer.postprocess import load
            pp = load(args.postprocessing, dataset_name=plan.dataset_name,
                      labels=dict(plan.labels))
            postprocess = pp.apply
            say(pp.describe())
        cases = find_cases(args.input, plan.num_input_channels, plan.file_ending)
        for r in runs:
            say(f"{r.run_dir}: {r.variant}, {r.checkpoint} checkpoint")
        over = (f" over {jax.process_count()} processes" if jax.process_count() > 1 else "")
        say(f"{len(cases)} case(s){over}; patch {list(plan.patch_size)}, mirroring "
            f"{list(mirror_axes) if mirror_axes else 'off'}, {len(jax.local_devices())} "
            f"device(s) per process")
        mesh = local_mesh(spatial=args.spatial)  # this process's devices
        check_patch_splits(plan.patch_size, plan.strides, args.spatial,
                           devices=len(jax.local_devices()), name="--spatial", patch_key=None)
        apply_fns = [network_apply_fn(r.model, mesh) for r in runs]
        try:
            window = WindowOptions(step_size=args.step_size, mirror_axes=mirror_axes,
                                   batch_size=args.batch_size, accumulate=args.accumulate,
                                   mesh=mesh)
            written, skipped = predict_cases(
                apply_fns, plan, distributed.split(cases), args.output, window=window,
                save_probabilities=args.save_probabilities, preview=args.preview,
                postprocess=postprocess, overwrite=args.overwrite, progress=progress_enabled())
        finally:
            if distributed.is_main():  # and dataset.json, for `jaxmamba evaluate`
                plan.save(args.output / PLANS_FILE)
    except (UserError, ValueError) as err:
        if not jax.distributed.is_initialized():
            raise  # one process: the CLI entry reports it in one line
        error = str(err)
    if not jax.distributed.is_initialized():
        reports = [{"written": len(written), "skipped": len(skipped), "error": error}]
    else:  # every process learns how the others did, so all end the same way
        reports = distributed.agree("predicted", {"written": len(written),
                                                  "skipped": len(skipped), "error": error})
    errors = [(i, r["error"]) for i, r in enumerate(reports) if r["error"]]
    if errors:
        for i, e in errors:
            print(f"error: process {i}: {e}", file=sys.stderr)
        return 1
    if jax.process_index() != 0:
        return 0
    n_written, n_skipped = (sum(r[k] for r in reports) for k in ("written", "skipped"))
    if n_skipped:
        print(f"skipped {n_skipped} case(s) already predicted in {args.output} (--overwrite "
              f"to predict them again)")
    print(f"wrote {n_written} prediction(s) to {args.output}. Next: jaxmamba evaluate -p "
          f"{args.output} -g LABELS_FOLDER -d {args.output / DATASET_FILE}")
    return 0


def _parse_axes(text: str) -> tuple[int, ...]:
    try:
        axes = tuple(int(a) for a in text.split(",") if a.strip())
    except ValueError:
        axes = (-1,)
    if not set(axes) <= {0, 1, 2}:
        raise UserError(f"--mirror-axes {text}: expected axes among 0, 1, 2, e.g. 0,1,2")
    return axes
