"""Compatibility path: pinned host pools moved to :mod:`mamba_state.state.offload` in 0.2.

``import mamba_state.offload`` keeps working and gives that module itself, so attributes set on it reach the code
that reads them.
"""

import sys

from mamba_state.state import offload as _moved
from mamba_state.state.offload import *  # noqa: F401,F403  (the public names, for type checkers and star imports)

sys.modules[__name__] = _moved
