"""`jaxmamba` command line: one subcommand per job; each lives in the module that does the work.

Each entry of `COMMANDS` names a module with `add_arguments(parser)` and `run(args) -> int`; modules
are imported only when their command runs, so `jaxmamba --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("jaxmamba.data.dataset", "validate an nnU-Net raw dataset folder"),
    "plan": ("jaxmamba.data.planner", "fingerprint a dataset, write a 3d_fullres plan"),
    "preprocess": ("jaxmamba.data.prepare", "preprocess a dataset into a cache"),
    "dataset": ("jaxmamba.datasets", "build the offline real-MRI demo dataset"),
    "train": ("jaxmamba.train.cli", "train a network from a YAML config (+ key=value overrides)"),
    "evaluate": ("jaxmamba.infer.evaluate", "Dice / HD95 / NSD of predictions vs ground truth"),
    "predict": ("jaxmamba.infer.predict", "predict NIfTI cases with trained run directories"),
    "convert-torch": ("jaxmamba.interop.cli", "import (or export) a PyTorch checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxmamba",
        description="Mamba U-Nets for 3D medical image segmentation in JAX. "
                    "Run `jaxmamba COMMAND --help` for the options of a command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Parse the command name first, then let its module add its own arguments.
    known, _ = parser.parse_known_args(argv[:1] if argv and not argv[0].startswith("-") else argv)
    module = importlib.import_module(known._module)
    sub = argparse.ArgumentParser(prog=f"jaxmamba {known.command}",
                                  description=COMMANDS[known.command][1])
    module.add_arguments(sub)
    args = sub.parse_args(argv[1:])
    try:
        status = int(module.run(args) or 0)
    except Exception:
        if "jax" not in sys.modules:
            raise
        from jaxmamba.distributed import leave_after_error
        return leave_after_error()
    if "jax" in sys.modules:  # not imported by every command: only then can it be distributed
        from jaxmamba.distributed import leave
        status = leave(status)
    return status


if __name__ == "__main__":
    sys.exit(main())
