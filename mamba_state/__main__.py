"""``python -m mamba_state`` is the ``mamba-state`` command."""

import sys

from .cli import main

sys.exit(main())
