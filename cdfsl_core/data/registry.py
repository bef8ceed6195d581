"""Dataset registry: ``list_datasets()`` and ``load_dataset(name, root)``."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from cdfsl_core.data.base import FewShotDataset, Transform
from cdfsl_core.errors import DatasetError

DATA_ROOT_ENV = "CDFSL_DATA_ROOT"


@dataclass(frozen=True)
class DatasetSpec:
    """One registered dataset."""

    name: str
    loader: Callable[..., FewShotDataset]  # loader(root, transform=..., **options)
    description: str  # one line: what it is
    layout: str  # expected on-disk layout under the data root ("" for generated datasets)
    download: str  # where to get it ("" for generated datasets)
    needs_root: bool = True  # False for generated datasets


_REGISTRY: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str, *, description: str, layout: str = "", download: str = "", needs_root: bool = True
) -> Callable[[Callable[..., FewShotDataset]], Callable[..., FewShotDataset]]:
    """Decorator that registers a loader under ``name``."""

    def wrap(loader: Callable[..., FewShotDataset]) -> Callable[..., FewShotDataset]:
        if name in _REGISTRY:
            raise ValueError(f"dataset {name!r} is registered twice")
        _REGISTRY[name] = DatasetSpec(name, loader, description, layout, download, needs_root)
        return loader

    return wrap


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`."""
    return sorted(_REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise DatasetError(
            f"Unknown dataset {name!r}. Expected one of: {', '.join(list_datasets())}."
        ) from None


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None = None,
    *,
    transform: Transform | None = None,
    **options: Any,
) -> FewShotDataset:
    """Load a registered dataset.

    Args:
        name: a name from :func:`list_datasets`.
        root: the data root holding the dataset folders (``CropDiseases/``, ``EuroSAT/``,
            ``ISIC/``, ``chestX/``, ``miniImageNet/``), or the dataset's own folder. Defaults to
            the environment variable ``CDFSL_DATA_ROOT``. Generated datasets need none.
        transform: applied to each PIL image (e.g. a model's preprocess).
        options: loader-specific options (``split`` for miniimagenet, ``seed`` for synthetic...).
    """
    spec = dataset_spec(name)
    resolved: Path | None = None
    if root is not None:
        resolved = Path(root).expanduser()
    elif os.environ.get(DATA_ROOT_ENV):
        resolved = Path(os.environ[DATA_ROOT_ENV]).expanduser()
    if spec.needs_root:
        if resolved is None:
            raise DatasetError(
                f"No data root for {name!r}: pass root=... (CLI: --data-root) or set "
                f"{DATA_ROOT_ENV}. Expected layout: {spec.layout}. Download: {spec.download}."
            )
        if not resolved.exists():
            raise DatasetError(
                f"Data root {resolved} for {name!r} does not exist. Expected layout: {spec.layout}. "
                f"Fix the path (argument or {DATA_ROOT_ENV}); download: {spec.download}."
            )
    return spec.loader(resolved, transform=transform, **options)
