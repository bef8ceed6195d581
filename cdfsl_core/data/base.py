"""Dataset base classes shared by the real layouts and the synthetic world."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Sequence

from PIL import Image, UnidentifiedImageError

from cdfsl_core.errors import DatasetError, ImageReadError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")

Transform = Callable[[Image.Image], Any]


# Integer modes wider than 8 bits, and the largest value of each (16-bit PNGs and TIFFs are common
# for radiographs): PIL's convert("RGB") clips them at 255, which turns almost every pixel white.
_WIDE_MODES = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535}


def to_rgb(image: Image.Image) -> Image.Image:
    """An image of any mode as 8-bit RGB. Integer images wider than 8 bits are **scaled** to 0..255
    by their type's range (16 bit: x * 255 / 65535), not clipped; 32-bit integer images (``I``, as
    PIL opens some 16-bit files) by 65535 when their values fit 16 bits, else by their maximum;
    floating-point images (``F``) by their own minimum and maximum."""
    if image.mode in ("RGB",):
        return image
    if image.mode in _WIDE_MODES or image.mode in ("I", "F"):
        import numpy as np

        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            low, high = float(values.min()), float(values.max())
            scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
        else:
            top = _WIDE_MODES.get(image.mode) or (65535 if values.max() <= 65535 and values.min() >= 0
                                                  else float(max(values.max(), 1)))
            scaled = np.clip(values, 0, None) / top
        return Image.fromarray(np.round(scaled * 255).astype(np.uint8), mode="L").convert("RGB")
    return image.convert("RGB")


def _open(path: str | os.PathLike[str], decode: bool) -> Image.Image | None:
    """Open ``path``: the full decode as 8-bit RGB (``decode``), or its header only; a missing,
    empty, foreign or truncated file is the one error that names it and the fix."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            if not decode:
                return None  # the header is parsed by open
            image.load()
            return to_rgb(image)
    except FileNotFoundError as err:
        raise DatasetError(
            f"Image {path} does not exist. Expected it because the dataset lists it; restore the "
            "file or remove it from the list (CSV / JSON) it came from."
        ) from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageReadError(
            f"Image {path} cannot be decoded ({err}). Expected a complete JPEG/PNG file; it is "
            "unreadable or truncated. Re-download it, or delete it and its entry in the dataset's "
            "list. `python -m cdfsl_core.data check NAME --root ...` scans a whole dataset."
        ) from err


def read_image(path: str | os.PathLike[str]) -> Image.Image:
    """Open an image fully (so truncation is caught here, not in a worker) as 8-bit RGB
    (:func:`to_rgb`: images of more than 8 bits are scaled, not clipped)."""
    return _open(path, decode=True)


class FewShotDataset:
    """A labelled image collection as episodes see it (a map-style dataset: ``torch.utils.data``
    loaders take it as it is; it does not import torch, so commands that only list data start fast).

    Attributes:
        name: registry name (``eurosat``, ``synthetic-crops``, ...).
        classes: readable class names, as prompts use them; ``classes[label]``.
        targets: one integer label per image, in a fixed, documented order.
        transform: applied to the PIL image in ``__getitem__``; ``None`` returns PIL images.
    """

    name: str
    classes: list[str]
    targets: list[int]
    transform: Transform | None

    def __len__(self) -> int:
        return len(self.targets)

    def load_image(self, index: int) -> Image.Image:  # pragma: no cover - abstract
        raise NotImplementedError

    def image_key(self, index: int) -> str:
        """A stable identifier of image ``index`` (relative path, or generator coordinates)."""
        raise NotImplementedError  # pragma: no cover - abstract

    def check_images(self, indices: Sequence[int]) -> None:
        """Fail, naming the file, when an image of ``indices`` cannot be read; cheap (headers only
        where images are files). A generated dataset has nothing to check."""

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {self.name} with {len(self)} images")
        image = self.load_image(index)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]

    def fingerprint(self) -> str:
        """sha256 over (image key, label) pairs: episode files record it, so ids cannot drift."""
        digest = hashlib.sha256()
        for i, label in enumerate(self.targets):
            digest.update(f"{self.image_key(i)}\t{label}\n".encode())
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, images={len(self)}, classes={len(self.classes)})"


class ImageListDataset(FewShotDataset):
    """Images on disk, given as a list of paths with labels."""

    def __init__(
        self,
        name: str,
        root: Path,
        paths: Sequence[Path],
        targets: Sequence[int],
        classes: Sequence[str],
        transform: Transform | None = None,
        source: str = "",
    ) -> None:
        if len(paths) != len(targets):
            raise DatasetError(f"{name}: {len(paths)} paths but {len(targets)} labels in {source or root}.")
        if not paths:
            raise DatasetError(
                f"{name}: no images found under {root}. Expected the layout documented in the "
                "documentation (docs/how-to/real-data.md); check the data root."
            )
        bad = sorted({t for t in targets if not 0 <= t < len(classes)})
        if bad:
            raise DatasetError(
                f"{name}: labels {bad[:5]} in {source or root} are outside 0..{len(classes) - 1} "
                f"for {len(classes)} classes."
            )
        self.name = name
        self.root = Path(root)
        self.paths = [Path(p) for p in paths]
        self.targets = [int(t) for t in targets]
        self.classes = list(classes)
        self.transform = transform
        self.source = source or str(root)

    def load_image(self, index: int) -> Image.Image:
        return read_image(self.paths[index])

    def check_images(self, indices: Sequence[int]) -> None:
        for index in sorted(set(indices)):
            check_image_header(self.paths[index])

    def image_key(self, index: int) -> str:
        path = self.paths[index]
        try:
            return path.relative_to(self.root).as_posix()
        except ValueError:
            return path.as_posix()


def check_image_header(path: str | os.PathLike[str]) -> None:
    """Fail as :func:`read_image` would when ``path`` is missing, empty or not an image, reading
    only its header (cheap: a run checks every image of its episode file this way before it
    writes anything; the full decode, which also finds a truncated body, happens when the image
    is used, with the same error)."""
    _open(path, decode=False)


def check_files_exist(name: str, paths: Sequence[Path], listed_in: Path | str) -> None:
    """Fail with one clear message when images listed in a CSV/JSON are absent."""
    missing = [p for p in paths if not p.is_file()]
    if missing:
        shown = ", ".join(str(p) for p in missing[:3])
        raise DatasetError(
            f"{name}: {len(missing)} of {len(paths)} images listed in {listed_in} are missing "
            f"(e.g. {shown}). Expected every listed image on disk; restore them (re-extract the "
            "dataset archive) or remove their rows from the list."
        )


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder``, sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
