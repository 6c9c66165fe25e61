"""`jaxmamba convert-torch`: PyTorch/nnU-Net checkpoint -> jaxmamba run directory, and back
(`jaxmamba.interop`).

JAX, orbax and the networks are imported in `run`, so `--help` answers without them.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxmamba.choices import PRECISIONS, VARIANTS
from jaxmamba.plans import Plan

EXAMPLES = """examples:
  jaxmamba convert-torch checkpoint_final.pth --plans nnUNetPlans.json --variant segmamba \\
      -o runs/from_torch --trust-checkpoint
  jaxmamba convert-torch state_dict.npz --plans nnUNetPlans.json --dataset-json dataset.json \\
      --variant multisegmamba -o runs/multi
  jaxmamba convert-torch runs/from_torch --to-torch -o segmamba_state_dict.pth
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("source", type=Path,
                        help="a PyTorch checkpoint (.pth/.pt/.model: nnU-Net checkpoint_final.pth "
                             "or a plain state_dict), an .npz state dict (keys sd/<name>), or "
                             "with --to-torch a jaxmamba run directory")
    parser.add_argument("-o", "--output", type=Path, required=True,
                        help="new jaxmamba run directory; with --to-torch a .pth or .npz file")
    parser.add_argument("--plans", type=Path,
                        help="nnUNetPlans.json the network was trained with (3d_fullres is used)")
    parser.add_argument("--dataset-json", type=Path,
                        help="its dataset.json (default: beside the plans file)")
    parser.add_argument("--variant", choices=sorted(VARIANTS),
                        help="network of the checkpoint; PanSegMamba is bisegmamba, and "
                             "SegMambaSkip's state dict looks like BiSegMamba's: name it")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="float32",
                        help="convolution/norm precision the run directory records "
                             "(default float32)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="allow a full unpickle of a .pth that holds more than tensors "
                             "(nnU-Net checkpoints do); only for files from a source you trust")
    parser.add_argument("--to-torch", action="store_true",
                        help="export a jaxmamba run directory to a PyTorch-named state dict")


def run(args: argparse.Namespace) -> int:
    from jaxmamba.interop.torch import export_state_dict, load_torch, write_state_dict
    from jaxmamba.models import count_parameters
    from jaxmamba.rundir import BEST, load_run, save_run

    if args.to_torch:
        model = load_run(args.source, BEST, allow_non_finite=True).model
        sd = export_state_dict(model)
        write_state_dict(sd, args.output)
        print(f"wrote {args.output}: {len(sd)} tensors of {model.variant} "
              f"({count_parameters(model):,} parameters) with PyTorch names and layouts; "
              f"load it with network.load_state_dict(torch.load(path))")
        return 0
    missing = [f"--{n}" for n in ("plans", "variant") if getattr(args, n) is None]
    if missing:
        print(f"convert-torch: {' and '.join(missing)} required to import a checkpoint "
              f"(see --help)")
        return 2
    plan = Plan.load(args.plans, args.dataset_json)
    model = load_torch(args.source, args.variant, plan, precision=args.precision,
                       trust=args.trust_checkpoint)
    out = save_run(args.output, model, plan, source=str(args.source.absolute()))
    print(f"wrote {out}: {model.variant} ({count_parameters(model):,} parameters) for "
          f"{plan.dataset_name}, patch {list(plan.patch_size)}. Predict with it next "
          f"(`jaxmamba predict -m {out} ...`).")
    return 0
