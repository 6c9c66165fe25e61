"""`jaxmamba crossval`: the final validations of fold runs merged and scored as one
cross-validation (`jaxmamba.infer.crossval`), and nnU-Net's postprocessing decided on them."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxmamba.console import progress_enabled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories of one dataset, plan and network, one per fold "
                             "(data.fold=0..4), each with its final validation")
    parser.add_argument("-o", "--output", required=True, type=Path, metavar="OUT",
                        help="folder for summary.json, summary.csv, the merged predictions "
                             "(validation/) and crossval.json; an earlier crossval's folder is "
                             "replaced")
    parser.add_argument("--postprocessing", action="store_true",
                        help="decide nnU-Net's postprocessing (keep the largest connected "
                             "component: all foreground, then each class) on the merged "
                             "predictions: OUT/postprocessing.json and OUT/postprocessed/")
    parser.add_argument("-g", "--ground-truth", type=Path, default=None, metavar="LABELS",
                        help="ground-truth label maps (default: labelsTr of the runs' "
                             "data.raw_dir)")
    parser.add_argument("-j", "--workers", type=int, default=1,
                        help="processes computing metrics in parallel (default 1)")


def run(args: argparse.Namespace) -> int:
    from jaxmamba.infer.crossval import crossval

    result = crossval(args.runs, args.output, ground_truth=args.ground_truth,
                      postprocessing=args.postprocessing, workers=args.workers,
                      progress=progress_enabled())
    summary = result.summary
    for fold, f in summary["folds"].items():
        print(f"fold {fold}: {f['run_dir']} ({len(f['cases'])} cases): {_dice(f['mean'])}")
    n_cases = len(summary["metric_per_case"])
    folds = [r.fold for r in result.runs]
    print(f"cross-validation of {result.runs[0].variant} on {result.runs[0].plan.dataset_name}, "
          f"{n_cases} cases of fold(s) {', '.join(map(str, folds))}: {_dice(summary['mean'])}")
    if result.missing:
        print(f"missing fold(s) {', '.join(map(str, result.missing))} of {result.n_folds}: the "
              f"summary covers the folds above only; train the others (data.fold=N) and run "
              f"this again with all runs")
    elif result.n_folds is None:
        print("the split (splits_final.json in the runs' preprocessing cache) could not be "
              "read: whether folds are missing is unknown")
    for note in result.notes:
        print(f"note: {note}")
    written = [result.out / "summary.json", result.out / "summary.csv"]
    if result.decision is not None:
        for d in result.decision.postprocessing.decisions:
            key = "foreground mean" if d["compared"] == "foreground_mean" else d["compared"]
            before, after = d["dice_before"][d["compared"]], d["dice_after"][d["compared"]]
            print(f"keep the largest component of {d['name']} {d['labels']}: {key} Dice "
                  f"{_num(before)} -> {_num(after)}: "
                  f"{'applied' if d['applied'] else 'not applied'}")
        print(result.decision.postprocessing.describe())
        print(f"postprocessed: {_dice(result.decision.summary['mean'])}")
        written += [result.out / "postprocessing.json", result.out / "postprocessed"]
    print(f"wrote {', '.join(map(str, written))}")
    runs = " ".join(str(r.run_dir) for r in result.runs)
    pp = (f" --postprocessing {result.out / 'postprocessing.json'}"
          if result.decision is not None else "")
    print(f"Next: jaxmamba predict -m {runs} -i IMAGES -o PREDICTIONS{pp}; "
          f"jaxmamba report {result.out}")
    return 0


def _num(v) -> str:
    return "nan" if v is None or v != v else f"{v:.4f}"


def _dice(mean: dict) -> str:
    per_class = ", ".join(f"{k} {_num(v['Dice'])}" for k, v in mean.items() if k != "mean")
    return f"mean Dice {_num(mean['mean']['Dice'])} ({per_class})"
