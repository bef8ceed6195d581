"""analysis: what we measure inside CLIP (recorder, token statistics, figures).

Builds on :mod:`cdfsl_core`; ``cdfsl_core`` never imports this package. The public names are
imported on first use (PEP 562), so that a command's ``--help`` answers without importing PyTorch.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "domain_estimate": "analysis.domain",
    "domain_table": "analysis.domain",
    "list_domain_estimators": "analysis.domain",
    "ActivationCache": "analysis.recorder",
    "record": "analysis.recorder",
    "vision_tower": "analysis.recorder",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
