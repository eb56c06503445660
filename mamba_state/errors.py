"""Errors raised by mamba-state.

Every error is a ``ValueError`` subclass, so code that already guards against bad values keeps working.
Messages name what was expected and what was found.
"""

from __future__ import annotations

__all__ = ["StateError", "StateShapeError", "StateCompatibilityError", "StateFormatError", "LayerNotFoundError"]


class StateError(ValueError):
    """A state (or an operation on one) is invalid: wrong device, dtype, batch, argument."""


class StateShapeError(StateError):
    """A tensor of a state has the wrong rank or shape."""


class StateCompatibilityError(StateError):
    """A state does not fit the model or layer it is used with."""


class StateFormatError(StateError):
    """A state file (or a transferred state header) is not a valid mamba-state file."""


class LayerNotFoundError(StateError, KeyError):
    """A model state has no layer with the requested index (also a ``KeyError``, as a missing dict key is)."""

    def __str__(self) -> str:  # KeyError would show the message quoted, as a key
        return str(self.args[0]) if self.args else ""
