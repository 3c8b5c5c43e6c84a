"""`python -m vlmerge.analysis ARGS` is `vlmerge analyze ARGS`, without importing the rest of vlmerge."""

import sys

from vlmerge.analysis.cli import main

sys.exit(main())
