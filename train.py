"""Train a network: `python train.py [CONFIG] [key=value ...]` (no argument: configs/demo.yaml).

See `python train.py --help`; the command is `jaxmamba.cli.train`, the work is in
`jaxmamba.train`.
"""

import sys

from jaxmamba.cli.train import main

if __name__ == "__main__":  # grain's worker processes re-import this file
    sys.exit(main())
