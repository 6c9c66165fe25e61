"""`jaxmamba` command line: one subcommand per job, one module of this package per subcommand.

Each entry of `COMMANDS` names a module with `add_arguments(parser)` and `run(args) -> int`: it
parses the command line, calls the library (which takes arguments and returns values or raises)
and prints what the user reads. Modules are imported only when their command runs, and none
imports JAX before its `run`, so `--help` answers fast.

Errors are handled here, once for every command (and `train.py`): an expected error
(`jaxmamba.errors.UserError`, or an `OSError` naming its file) is printed as one line
`error: ...` with exit status 1 (2 for a config or command-line error); `--debug` (or the
environment variable `JAXMAMBA_DEBUG=1`) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time

#: name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "check": ("jaxmamba.cli.check", "validate an nnU-Net raw dataset folder"),
    "plan": ("jaxmamba.cli.plan", "fingerprint a dataset, write a 3d_fullres plan"),
    "preprocess": ("jaxmamba.cli.preprocess", "preprocess a dataset into a cache"),
    "dataset": ("jaxmamba.cli.dataset", "build the offline real-MRI demo dataset"),
    "train": ("jaxmamba.cli.train", "train a network from a YAML config (+ key=value overrides)"),
    "evaluate": ("jaxmamba.cli.evaluate", "Dice / HD95 / NSD of predictions vs ground truth"),
    "predict": ("jaxmamba.cli.predict", "predict NIfTI cases with trained run directories"),
    "convert-torch": ("jaxmamba.cli.convert_torch", "import (or export) a PyTorch checkpoint"),
    "crossval": ("jaxmamba.cli.crossval", "merge and score fold runs as one cross-validation"),
    "postprocess": ("jaxmamba.cli.postprocess", "apply a crossval's postprocessing to label maps"),
    "report": ("jaxmamba.cli.report", "Dice, memory and time of runs and crossvals, one row each"),
}
DEBUG_ENV = "JAXMAMBA_DEBUG"
_DEBUG_HELP = f"show the Python traceback of an error (or set {DEBUG_ENV}=1)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jaxmamba",
        description="Mamba U-Nets for 3D medical image segmentation in JAX. "
                    "Run `jaxmamba COMMAND --help` for the options of a command.",
    )
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = bool(argv) and argv[0] == "--debug"
    argv = argv[1:] if debug else argv
    if not argv or argv[0] not in COMMANDS:
        build_parser().parse_args(argv)  # help, or the usage error naming the choices
        return 2
    return run_command(argv[0], argv[1:], debug=debug)


def run_command(name: str, argv: list[str], *, prog: str | None = None,
                debug: bool = False) -> int:
    """Parse `argv` for command `name` and run it, turning expected errors into one line."""
    from jaxmamba.config import ConfigError
    from jaxmamba.errors import UserError

    module = importlib.import_module(COMMANDS[name][0])
    parser = argparse.ArgumentParser(prog=prog or f"jaxmamba {name}",
                                     description=COMMANDS[name][1])
    module.add_arguments(parser)
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    args = parser.parse_args(argv)
    debug = debug or args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        status = int(module.run(args) or 0)
    except (UserError, OSError) as err:
        if debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        status = 2 if isinstance(err, ConfigError) else 1
    except ValueError as err:  # not one of ours: say so, but still without a wall of text
        if debug:
            raise
        print(f"error: {type(err).__name__}: {err} (run with --debug for the traceback)",
              file=sys.stderr)
        status = 1
    except Exception:
        if "jax" not in sys.modules:
            raise
        from jaxmamba.distributed import leave_after_error
        return leave_after_error()
    if "jax" in sys.modules:  # not imported by every command: only then can it be distributed
        from jaxmamba.distributed import leave
        status = leave(status)
    if status:
        bounded_exit(status)
    return status


def bounded_exit(status: int, grace_s: float = 60.0) -> None:
    """After an error, the interpreter's exit waits for every non-daemon thread: a library's
    background writer that never returns (orbax's save threads) would hang the process after
    its `error:` line. From the exit on, give them `grace_s` seconds, then end with `status`.

    The watching thread starts now, idle until the exit begins: Python 3.12 refuses to start a
    thread from the exit's own hooks ("can't create new thread at interpreter shutdown")."""
    import threading

    if _watching:
        return
    _watching.append(status)
    exiting = threading.Event()

    def watch() -> None:
        exiting.wait()
        time.sleep(grace_s)  # a clean exit ends this daemon thread first
        _leave_now(status, grace_s)

    threading.Thread(target=watch, name="jaxmamba-bounded-exit", daemon=True).start()
    threading._register_atexit(exiting.set)  # noqa: SLF001 (runs before the threads are joined)


_watching: list[int] = []


def _leave_now(status: int, grace_s: float) -> None:
    print(f"(background threads still running {grace_s:.0f} s after the error; leaving without "
          f"them)", file=sys.stderr, flush=True)
    os._exit(status)
