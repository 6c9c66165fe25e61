"""`python -m jaxmamba.cli COMMAND ...`: the `jaxmamba` command."""

import sys

from jaxmamba.cli import main

if __name__ == "__main__":  # spawned worker processes re-import this file
    sys.exit(main())
