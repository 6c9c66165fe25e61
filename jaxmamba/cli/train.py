"""`python train.py [CONFIG] [key=value ...]` and `jaxmamba train ...` (README "Training"):
the config from the command line, then `jaxmamba.train.loop.run`."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

#: The default run: the offline real-MRI demo (`configs/demo.yaml` of the checkout).
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"

EPILOG = """\
examples:
  python train.py                                   # the demo: builds the dataset, trains on CPU
  python train.py configs/synapse/segmamba.yaml data.raw_dir=/data/Dataset090_SynapseAbdomen
  python train.py configs/tiny.yaml optim.lr=1e-3 train.run_dir=runs/try1
  python train.py configs/demo.yaml --print-config  # the resolved config, nothing else

Overrides are dotted keys with YAML values (lists: data.plan_overrides.patch_size=[32,32,32]).
A run directory that holds a checkpoint is resumed (train.resume=false refuses instead).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("args", nargs="*", metavar="CONFIG | key=value",
                        help=f"a YAML config (default: {DEFAULT_CONFIG.name} of the checkout), "
                             f"then overrides")
    parser.add_argument("--max-epochs", type=int, default=None,
                        help="stop after this many epochs in this call (resume later)")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config and exit")


def run(args: argparse.Namespace) -> int:
    from jaxmamba.config import ConfigError, load_config

    configs = [a for a in args.args if "=" not in a]
    overrides = [a for a in args.args if "=" in a]
    if len(configs) > 1:
        raise ConfigError(f"command line: one config file expected, got {configs}")
    cfg = load_config(Path(configs[0]) if configs else DEFAULT_CONFIG, overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0

    from jaxmamba import compile_cache
    from jaxmamba.distributed import is_main, process_prefix
    from jaxmamba.train.loop import run as train
    from jaxmamba.train.signals import Stopped

    compile_cache.enable(cfg.train.compile_cache)
    try:
        summary = train(cfg, max_epochs=args.max_epochs, say=functools.partial(print, flush=True))
    except Stopped as stop:  # every process says what it did
        print(f"\n{process_prefix()}{stop}", file=sys.stderr)
        return stop.status
    except KeyboardInterrupt:  # before the loop's signal handlers are in place
        return 130
    if is_main():
        run_dir = summary["run_dir"]
        print(f"next: jaxmamba predict -m {run_dir} -i IMAGES_DIR -o PREDICTIONS_DIR, then "
              f"jaxmamba evaluate -p PREDICTIONS_DIR -g LABELS_DIR -d {run_dir}/dataset.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python train.py ...`: the `jaxmamba train` command (errors reported by `jaxmamba.cli`)."""
    from jaxmamba.cli import run_command

    return run_command("train", sys.argv[1:] if argv is None else list(argv), prog="train.py")
