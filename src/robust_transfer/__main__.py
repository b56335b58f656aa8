"""``python -m robust_transfer`` is the ``robust-transfer`` command."""

import sys

from .cli import main

sys.exit(main())
