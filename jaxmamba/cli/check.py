"""`jaxmamba check DATASET`: every problem of an nnU-Net raw folder, one line each
(`jaxmamba.data.dataset.check_dataset`)."""

from __future__ import annotations

from jaxmamba.console import progress_enabled


def add_arguments(parser) -> None:
    parser.add_argument("dataset", help="nnU-Net raw dataset folder (holds dataset.json, imagesTr, "
                                        "labelsTr)")


def run(args) -> int:
    from jaxmamba.data.dataset import check_dataset

    errors, warnings = check_dataset(args.dataset, progress=progress_enabled())
    for w in warnings:
        print(f"warning: {w}")
    for e in errors:
        print(f"error: {e}")
    if errors:
        print(f"{len(errors)} error(s), {len(warnings)} warning(s) in {args.dataset}: fix them, "
              f"then run `jaxmamba check {args.dataset}` again.")
        return 1
    print(f"{args.dataset}: OK ({len(warnings)} warning(s)). Next: `jaxmamba plan {args.dataset}`.")
    return 0
