"""``python -m cmoe_adapters.easyvqa DIR``: pretrain the demo's base into DIR (see `pretrain.main`)."""

import sys

from .pretrain import main

sys.exit(main())
