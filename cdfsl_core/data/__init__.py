"""Datasets by name: the real CDFSL layouts and the embedded synthetic world.

>>> from cdfsl_core.data import list_datasets, load_dataset
>>> ds = load_dataset("eurosat", root="/data")          # doctest: +SKIP
>>> ds.classes[:2], ds.targets[:2], len(ds), ds[0]      # doctest: +SKIP
"""

from cdfsl_core.data import real as _real  # noqa: F401  (registers the real datasets)
from cdfsl_core.data import synthetic as _synthetic  # noqa: F401  (registers the embedded world)
from cdfsl_core.data.base import FewShotDataset, ImageListDataset, read_image
from cdfsl_core.data.registry import DATA_ROOT_ENV, dataset_spec, list_datasets, load_dataset, register_dataset

__all__ = [
    "DATA_ROOT_ENV",
    "FewShotDataset",
    "ImageListDataset",
    "dataset_spec",
    "list_datasets",
    "load_dataset",
    "read_image",
    "register_dataset",
]
