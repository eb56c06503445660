"""The state cache: model states keyed by token prefixes at any position, and parked sessions, in tiers with
byte budgets (device, pinned host, an optional directory that survives restarts).

``StateCache`` (:mod:`.store`) is the cache; :mod:`.keys` checks and hashes token ids and computes a model's
fingerprint; :mod:`.disk` is the directory tier's file layout. See docs/serving.md.
"""

from .keys import model_fingerprint
from .store import CacheCorruptionWarning, StateCache

__all__ = ["StateCache", "CacheCorruptionWarning", "model_fingerprint"]
