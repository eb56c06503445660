"""Compatibility path: upstream cache interop moved to :mod:`mamba_state.state.interop` in 0.2.

``import mamba_state.interop`` keeps working and gives that module itself, so attributes set on it reach the code
that reads them.
"""

import sys

from mamba_state.state import interop as _moved
from mamba_state.state.interop import *  # noqa: F401,F403  (the public names, for type checkers and star imports)

sys.modules[__name__] = _moved
