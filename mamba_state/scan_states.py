"""Compatibility path: the every-state scan moved to :mod:`mamba_state.kernels.selective_scan.all_states` in 0.2.

``import mamba_state.scan_states`` keeps working and gives that module itself, so attributes set on it reach the code
that reads them.
"""

import sys

from mamba_state.kernels.selective_scan import all_states as _moved
from mamba_state.kernels.selective_scan.all_states import *  # noqa: F401,F403  (the public names, for type checkers and star imports)

sys.modules[__name__] = _moved
