"""Old import paths that still work for a while: ``module.__getattr__`` forwards a name to its
new home and says where that is, once, as a DeprecationWarning."""
from __future__ import annotations

import importlib
import warnings
from typing import Any, Callable, Dict


def forwarder(old: str, homes: Dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``old`` that serves each name of ``homes`` from its new module."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {old!r} has no attribute {name!r}")
        warnings.warn(f"{old}.{name} moved: import it from {homes[name]}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(homes[name]), name)

    return __getattr__
