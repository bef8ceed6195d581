"""cdfsl_core: what happens to the model.

Load CLIP (:func:`load_clip`), the datasets (:func:`load_dataset`), fixed episode files
(:mod:`cdfsl_core.episodes`). The analysis layer (:mod:`analysis`) builds on this package; this
package never imports it.

The public names are imported on first use (PEP 562), so that a command's ``--help`` answers
without importing PyTorch and open_clip.
"""

from __future__ import annotations

import importlib
from typing import Any

from cdfsl_core.errors import CDFSLError, CheckpointError, DatasetError, DeviceError, EpisodeError, ImageReadError

_LAZY = {
    "ClipBundle": "cdfsl_core.models",
    "list_architectures": "cdfsl_core.models",
    "load_clip": "cdfsl_core.models",
    "save_checkpoint": "cdfsl_core.models",
    "list_datasets": "cdfsl_core.data",
    "load_dataset": "cdfsl_core.data",
}

__all__ = [
    "CDFSLError",
    "CheckpointError",
    "ClipBundle",
    "DatasetError",
    "DeviceError",
    "EpisodeError",
    "ImageReadError",
    "list_architectures",
    "list_datasets",
    "load_clip",
    "load_dataset",
    "save_checkpoint",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'cdfsl_core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
