"""Errors raised by mamba-state.

Every error is a ``ValueError`` subclass, so code that already guards against bad values keeps working.
Messages name what was expected and what was found.
"""

from __future__ import annotations

__all__ = ["StateError", "StateShapeError", "StateCompatibilityError", "StateFormatError"]


class StateError(ValueError):
    """A state (or an operation on one) is invalid: wrong device, dtype, batch, argument."""


class StateShapeError(StateError):
    """A tensor of a state has the wrong rank or shape."""


class StateCompatibilityError(StateError):
    """A state does not fit the model or layer it is used with."""


class StateFormatError(StateError):
    """A state file (or a transferred state header) is not a valid mamba-state file."""
