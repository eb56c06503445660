"""Lazy attributes of a package (PEP 562): a name loads its submodule on first use.

``import mamba_state`` stays cheap (no torch), so the command line's ``--help`` answers at once, while
``ms.StatefulMambaLM``, ``from mamba_state import StatefulMambaLM`` and ``mamba_state.io`` work as before.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any, Mapping


def load_attribute(package: str, exports: Mapping[str, str], name: str) -> Any:
    """The attribute ``name`` of ``package``: an exported name (``exports``: name -> submodule) or a submodule.

    Cached in the package's namespace, so the next look-up does not come here. Raises ``AttributeError`` for
    any other name, as a plain module does (so that ``hasattr`` and ``from package import submodule`` keep
    working).
    """
    namespace = vars(sys.modules[package])
    submodule = exports.get(name)
    if submodule is not None:
        value = getattr(importlib.import_module(f"{package}.{submodule}"), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f"{package}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{package}.{name}":  # the submodule exists but needs something missing: say so
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    namespace[name] = value
    return value


def names(namespace: Mapping[str, Any], public: list[str]) -> list[str]:
    """``dir()`` of a lazy package: what is loaded plus every exported name."""
    return sorted(set(namespace) | set(public))
