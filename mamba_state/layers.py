"""Compatibility path: layer discovery moved to :mod:`mamba_state.state.layers` in 0.2.

``import mamba_state.layers`` keeps working and gives that module itself, so attributes set on it reach the code
that reads them.
"""

import sys

from mamba_state.state import layers as _moved
from mamba_state.state.layers import *  # noqa: F401,F403  (the public names, for type checkers and star imports)

sys.modules[__name__] = _moved
