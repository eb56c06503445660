"""Compatibility path: backend selection moved to :mod:`mamba_state.kernels.backend` in 0.2.

``import mamba_state.backend`` keeps working and gives that module itself, so attributes set on it reach the code
that reads them.
"""

import sys

from mamba_state.kernels import backend as _moved
from mamba_state.kernels.backend import *  # noqa: F401,F403  (the public names, for type checkers and star imports)

sys.modules[__name__] = _moved
