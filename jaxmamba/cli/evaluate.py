"""`jaxmamba evaluate`: Dice / HD95 / NSD of a folder of predictions against the ground truth
(`jaxmamba.infer.evaluate`); prints the per-case table, writes summary.json and summary.csv."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from jaxmamba.console import progress_enabled
from jaxmamba.infer.evaluate import (
    GEOMETRY_TOLERANCE,
    evaluate_folder,
    format_table,
    read_dataset_json,
    write_previews,
    write_summary,
)
from jaxmamba.infer.metrics import BRATS_REGIONS, parse_regions


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--predictions", required=True, type=Path,
                        help="folder of predicted label maps (CASE.nii.gz)")
    parser.add_argument("-g", "--ground-truth", required=True, type=Path,
                        help="folder of ground-truth label maps with the same file names")
    parser.add_argument("-d", "--dataset-json", required=True, type=Path,
                        help="the dataset's dataset.json (labels, file_ending)")
    parser.add_argument("-o", "--output", type=Path, default=None,
                        help="folder for summary.json, summary.csv and previews "
                             "(default: the predictions folder)")
    parser.add_argument("--regions", default=None,
                        help="evaluate regions instead of classes, e.g. 'WT=1,2,3;TC=2,3;ET=3' "
                             "(or 'brats' for exactly that)")
    parser.add_argument("--spacing", action="store_true",
                        help="HD95 in mm using each ground truth's voxel spacing (default: in "
                             "voxels, as the reference's evaluation)")
    parser.add_argument("--nsd-tolerance", type=float, default=None, metavar="MM",
                        help="also compute the normalised surface Dice at this tolerance in mm")
    parser.add_argument("--paper-semantics", action="store_true",
                        help="as the reference's scripts: Dice 1 when both masks are empty, HD95 0 "
                             "when either is (default: NaN, left out of the means, as nnU-Net)")
    parser.add_argument("--partial", action="store_true",
                        help="evaluate only the predicted cases when some ground truths have no "
                             "prediction")
    parser.add_argument("--preview", action="store_true",
                        help="write previews/CASE.png: three slices through the largest structure")
    parser.add_argument("-i", "--images", type=Path, default=None,
                        help="raw images folder (CASE_0000.nii.gz) to draw under the previews")
    parser.add_argument("-j", "--workers", type=int, default=1,
                        help="processes computing metrics in parallel (default 1)")
    parser.add_argument("--geometry-tolerance", type=float, default=GEOMETRY_TOLERANCE,
                        metavar="MM", help="refuse a prediction whose spacing, origin or "
                        f"direction differs from its ground truth's by more (default "
                        f"{GEOMETRY_TOLERANCE})")
    parser.add_argument("--ignore-geometry", action="store_true",
                        help="compare the voxels even when the grids differ (e.g. predictions "
                             "written without the input's header)")


def run(args: argparse.Namespace) -> int:
    from jaxmamba.config import ConfigError

    if args.nsd_tolerance is not None and not 0 < args.nsd_tolerance < math.inf:
        raise ConfigError(f"--nsd-tolerance {args.nsd_tolerance}: must be a distance in mm > 0 "
                          f"(how far a boundary voxel may be and still count as on the surface)")
    output = args.output or args.predictions
    regions = None
    if args.regions:
        regions = (BRATS_REGIONS if args.regions.lower() == "brats"
                   else parse_regions(args.regions))
    summary = evaluate_folder(
        args.predictions, args.ground_truth, args.dataset_json, regions=regions,
        hd95_in_mm=args.spacing, nsd_tolerance=args.nsd_tolerance,
        empty_dice=1.0 if args.paper_semantics else math.nan,
        empty_hd95=0.0 if args.paper_semantics else math.nan,
        partial=args.partial, workers=args.workers,
        geometry_tolerance=None if args.ignore_geometry else args.geometry_tolerance,
        progress=progress_enabled())
    print(format_table(summary))
    json_path, csv_path = write_summary(summary, output)
    print(f"wrote {json_path} and {csv_path}")
    if args.preview:
        write_previews(summary, output / "previews", args.images,
                       read_dataset_json(args.dataset_json), progress=progress_enabled())
        print(f"previews in {output / 'previews'}")
    return 0
