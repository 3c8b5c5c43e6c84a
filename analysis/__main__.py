"""`python -m analysis ARGS` is `vlmerge analyze ARGS`."""

import sys

from vlmerge.cli import main

sys.exit(main(["analyze", *sys.argv[1:]]))
