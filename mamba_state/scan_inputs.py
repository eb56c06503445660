"""Compatibility path: the scan's input checks moved to :mod:`mamba_state.kernels.scan_inputs` in 0.2.

``import mamba_state.scan_inputs`` keeps working and gives that module itself, so attributes set on it reach the code
that reads them.
"""

import sys

from mamba_state.kernels import scan_inputs as _moved
from mamba_state.kernels.scan_inputs import *  # noqa: F401,F403  (the public names, for type checkers and star imports)

sys.modules[__name__] = _moved
