"""Lazy access to Opacus, an optional dependency (the ``dpsgd`` extra).

Only DP-SGD needs it (per-sample gradients, module validation), so ``import lightning_blogs``
must work without it; whoever needs it calls :func:`require_opacus` at the moment of use.
"""

from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_HINT = "pip install 'lightning-blogs[dpsgd]'"


def require_opacus(purpose: str) -> ModuleType:
    """Import and return ``opacus``, or raise ``ImportError`` naming ``purpose`` and the extra to install."""
    try:
        return importlib.import_module("opacus")
    except ImportError as error:
        raise ImportError(f"{purpose} needs Opacus (>= 1.5), which is not installed: {INSTALL_HINT}") from error
