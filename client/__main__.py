"""`python -m client`: the nlpserve command line (see client/cli.py)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
