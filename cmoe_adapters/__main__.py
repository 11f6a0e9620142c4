"""``python -m cmoe_adapters``: the ``cmoe`` command line, for environments without the console script."""

import sys

from .cli import main

sys.exit(main())
