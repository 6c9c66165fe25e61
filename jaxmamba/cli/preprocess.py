"""`jaxmamba preprocess DATASET`: raw folder -> plan -> cache -> splits
(`jaxmamba.data.prepare.preprocess_dataset`)."""

from __future__ import annotations

from pathlib import Path

from jaxmamba.console import progress_enabled


def add_arguments(parser) -> None:
    parser.add_argument("dataset", help="nnU-Net raw dataset folder")
    parser.add_argument("-o", "--output", help="cache folder (default: <dataset>_preprocessed "
                        "beside it); holds nnUNetPlans.json, splits_final.json and 3d_fullres/")
    parser.add_argument("-p", "--plans", help="an nnUNetPlans.json to use unchanged (default: the "
                        "one in the output folder, else plan now as `jaxmamba plan` does)")
    parser.add_argument("-j", "--workers", type=int, default=4,
                        help="parallel processes (default 4; 0 runs in this process)")


def run(args) -> int:
    from jaxmamba.data.planner import default_output
    from jaxmamba.data.prepare import preprocess_dataset

    out = Path(args.output) if args.output else default_output(args.dataset)
    plan, errors = preprocess_dataset(args.dataset, out, args.plans, num_workers=args.workers,
                                      progress=progress_enabled(), say=print)
    for e in errors:
        print(f"error: {e}")
    if errors:
        print(f"{len(errors)} case(s) failed; the others are in {out}. Run `jaxmamba check "
              f"{args.dataset}`, fix the files and run this command again (finished cases are "
              f"skipped).")
        return 1
    print(f"preprocessed into {out} (patch {list(plan.patch_size)}, spacing "
          f"{[round(s, 4) for s in plan.spacing]}). Next: `python train.py CONFIG "
          f"data.raw_dir={args.dataset} data.preprocessed_dir={out}`.")
    return 0
