"""cdfsl_core: what happens to the model.

Load CLIP (:func:`load_clip`), the datasets (:func:`load_dataset`), fixed episode files
(:mod:`cdfsl_core.episodes`). The analysis layer (:mod:`analysis`) builds on this package; this
package never imports it.
"""

from cdfsl_core.errors import CDFSLError, CheckpointError, DatasetError, EpisodeError, ImageReadError
from cdfsl_core.models import ClipBundle, list_architectures, load_clip, save_checkpoint
from cdfsl_core.data import list_datasets, load_dataset

__all__ = [
    "CDFSLError",
    "CheckpointError",
    "ClipBundle",
    "DatasetError",
    "EpisodeError",
    "ImageReadError",
    "list_architectures",
    "list_datasets",
    "load_clip",
    "load_dataset",
    "save_checkpoint",
]
__version__ = "0.1.0"
