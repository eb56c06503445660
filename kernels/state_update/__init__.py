"""One decoding step of the selective scan: reference (``naive``), Triton kernel, custom op and launcher."""

from .launcher import selective_state_update
from .naive import selective_state_update_ref

__all__ = ["selective_state_update", "selective_state_update_ref"]
