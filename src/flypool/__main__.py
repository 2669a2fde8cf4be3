"""`python -m flypool` is the same as the `flypool` command."""

import sys

from flypool.cli import main

sys.exit(main())
