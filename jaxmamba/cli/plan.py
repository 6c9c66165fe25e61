"""`jaxmamba plan DATASET`: fingerprint a raw folder and write its `3d_fullres` plan
(`jaxmamba.data.planner`)."""

from __future__ import annotations

from pathlib import Path

from jaxmamba.console import progress_enabled


def add_arguments(parser) -> None:
    parser.add_argument("dataset", help="nnU-Net raw dataset folder")
    parser.add_argument("-o", "--output", help="output folder for nnUNetPlans.json, dataset.json "
                        "and dataset_fingerprint.json (default: <dataset>_preprocessed beside it)")
    parser.add_argument("--planner", default="ExperimentPlanner",
                        help="nnU-Net 2.8 planner to follow: ExperimentPlanner (default; "
                             "PlainConvUNet, nnUNetPlans), nnUNetPlannerResEncM, "
                             "nnUNetPlannerResEncL or nnUNetPlannerResEncXL (ResidualEncoderUNet; "
                             "also resencm, resencl, resencxl)")
    parser.add_argument("--memory-gb", type=float, default=None,
                        help="GPU memory target for patch and batch size, as nnU-Net's "
                             "-gpu_memory_target (default: the planner's own, 8/8/24/40 GB)")
    parser.add_argument("-j", "--workers", type=int, default=0,
                        help="processes for the fingerprint (default 0: in this process)")


def run(args) -> int:
    from jaxmamba.data.dataset import RawDataset
    from jaxmamba.data.fingerprint import extract_fingerprint, fingerprint_path
    from jaxmamba.data.io import write_json
    from jaxmamba.data.planner import (
        default_output,
        explain_plan,
        get_planner,
        plan_from_fingerprint,
    )

    out = Path(args.output) if args.output else default_output(args.dataset)
    get_planner(args.planner)
    ds = RawDataset.open(args.dataset)
    fp = extract_fingerprint(ds, num_workers=args.workers, progress=progress_enabled())
    write_json(fingerprint_path(out), fp)
    plan = plan_from_fingerprint(fp, ds.meta, name=Path(args.dataset).resolve().name,
                                 planner=args.planner, memory_gb=args.memory_gb)
    plan.save(out / "nnUNetPlans.json")
    print(f"plan: {plan.num_stages} stages, strides {[list(s) for s in plan.strides]}")
    for line in explain_plan(plan, fp, args.memory_gb):
        print(f"  {line}")
    print(f"wrote {out / 'nnUNetPlans.json'}. Next: `jaxmamba preprocess {args.dataset} -o {out}`.")
    return 0
