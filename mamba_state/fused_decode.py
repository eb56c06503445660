"""Compatibility path: the fused decode step moved to :mod:`mamba_state.generation.fused_decode` in 0.2.

``import mamba_state.fused_decode`` keeps working and gives that module itself, so attributes set on it reach the code
that reads them.
"""

import sys

from mamba_state.generation import fused_decode as _moved
from mamba_state.generation.fused_decode import *  # noqa: F401,F403  (the public names, for type checkers and star imports)

sys.modules[__name__] = _moved
