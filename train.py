"""Train a network: `python train.py [CONFIG] [key=value ...]` (no argument: configs/demo.yaml).

See `python train.py --help`; the work is in `jaxmamba.train`.
"""

import sys

from jaxmamba.train.cli import main

if __name__ == "__main__":  # grain's worker processes re-import this file
    sys.exit(main())
