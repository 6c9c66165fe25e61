"""`jaxmamba dataset NAME -o ROOT`: build a bundled dataset as an nnU-Net raw folder
(`jaxmamba.datasets.build`)."""

from __future__ import annotations

from jaxmamba.datasets import BUILDERS, build


def add_arguments(parser) -> None:
    parser.add_argument("name", choices=sorted(BUILDERS), help="which dataset to build")
    parser.add_argument("-o", "--output", required=True, help="folder to write (nnU-Net raw)")


def run(args) -> int:
    root = build(args.name, args.output)
    print(f"wrote {root}. Next: `jaxmamba check {root}`, then `jaxmamba preprocess {root}`.")
    return 0
