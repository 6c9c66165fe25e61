"""`jaxmamba postprocess`: apply a postprocessing that `jaxmamba crossval --postprocessing`
decided (keep the largest connected component, nnU-Net's) to label maps
(`jaxmamba.infer.postprocess`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxmamba.console import progress_enabled


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-i", "--input", required=True, nargs="+", type=Path,
                        help="folder of label maps (CASE.nii.gz), or label-map files")
    parser.add_argument("-o", "--output", required=True, type=Path,
                        help="folder for the postprocessed label maps (same names)")
    parser.add_argument("--postprocessing", required=True, type=Path, metavar="FILE",
                        help="postprocessing.json written by `jaxmamba crossval "
                             "--postprocessing`")
    parser.add_argument("-d", "--dataset-json", type=Path, default=None,
                        help="the predictions' dataset.json, checked against the file's dataset "
                             "(default: dataset.json in the input folder, if there)")


def run(args: argparse.Namespace) -> int:
    from jaxmamba.errors import UserError
    from jaxmamba.infer.evaluate import read_dataset_json
    from jaxmamba.infer.postprocess import apply_to_folder, copy_dataset_files, label_files, load
    from jaxmamba.rundir import DATASET_FILE, PLANS_FILE

    folders = [p for p in args.input if p.is_dir()]
    dataset_json = args.dataset_json
    if dataset_json is None and len(folders) == 1 and (folders[0] / DATASET_FILE).is_file():
        dataset_json = folders[0] / DATASET_FILE
    expected = read_dataset_json(dataset_json) if dataset_json is not None else None
    pp = load(args.postprocessing,
              dataset_name=None if expected is None else expected.get("name"),
              labels=None if expected is None else expected["labels"])
    files = []
    for path in args.input:
        if path.is_dir():
            files += label_files(path, pp.file_ending)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: not found; give a folder of label maps or files")
    if not files:
        raise UserError(f"{', '.join(map(str, args.input))}: no label maps ending in "
                        f"{pp.file_ending}")
    out = args.output.absolute()
    if any(f.absolute().parent == out for f in files):
        raise UserError(f"{args.output}: is the input folder; write to another folder")
    print(pp.describe())
    written = apply_to_folder(pp, files, out, progress=progress_enabled())
    if len(folders) == 1:
        copy_dataset_files(folders[0], out, (DATASET_FILE, PLANS_FILE))
    print(f"wrote {len(written)} postprocessed label map(s) to {args.output}")
    return 0
