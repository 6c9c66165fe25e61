"""`jaxmamba report`: one row per network and dataset, Dice beside memory and time
(`jaxmamba.infer.report`): markdown on stdout, CSV with -o, a bar plot with --plot."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("paths", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (training's) and crossval folders "
                             "(`jaxmamba crossval -o`); runs of one network and dataset form "
                             "one row")
    parser.add_argument("-o", "--output", type=Path, default=None, metavar="CSV",
                        help="also write the table as CSV (unrounded numbers)")
    parser.add_argument("--plot", type=Path, default=None, metavar="PNG",
                        help="also draw mean Dice beside train-step memory and training time, "
                             "a bar per row")


def run(args: argparse.Namespace) -> int:
    from jaxmamba.atomic import write_text
    from jaxmamba.infer import report_format
    from jaxmamba.infer.report import collect

    rows = collect(args.paths)
    print(report_format.markdown(rows))
    if any(r.source == "runs" and len(r.folds) > 1 for r in rows):
        print("\nDice of rows of several runs: over their final-validation cases together (run "
              "`jaxmamba crossval` on them for the cross-validation's files and postprocessing)")
    if any(not r.epochs or r.memory_bytes is None for r in rows):
        print("\nempty cells: not recorded by the run (runs trained before training.json was "
              "written have no memory or card; runs without a final validation no Dice)")
    if args.output is not None:
        write_text(args.output, report_format.to_csv(rows))
        print(f"wrote {args.output}")
    if args.plot is not None:
        report_format.plot(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0
