"""``python -m torch_pp``: see ``torch_pp.cli``."""

import sys

from .cli import main

sys.exit(main())
