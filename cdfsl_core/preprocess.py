"""Images for an episode: the protocol's preprocessing and the authors' support augmentation.

:class:`ImageCache` keeps each image, decoded, resized and centre-cropped once, as uint8 on the
model's device, and does the transform's last two steps (``ToTensor``, ``Normalize``) there: the
same tensors as the transform, bit for bit, with the decoding and resizing done once per image of a
run instead of once per episode that shows it (the runner uses one per run).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from cdfsl_core import protocol
from cdfsl_core.models import ClipBundle

__all__ = ["ImageCache", "load_images", "protocol_transform", "support_views"]

CACHE_BYTES = 2**30  # an ImageCache's default budget: 1 GiB of uint8 images (about 7,000 at 224 px)


def protocol_transform(bundle: ClipBundle, resize_ratio: float = protocol.RESIZE_RATIO) -> T.Compose:
    """Resize the short side to ratio x size, centre-crop, normalise with the model's mean/std."""
    cfg = bundle.model.visual.preprocess_cfg
    size = cfg["size"] if isinstance(cfg["size"], int) else cfg["size"][0]
    return T.Compose([
        T.Resize(int(round(size * resize_ratio)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(cfg["mean"], cfg["std"]),
    ])


def support_views(image: Image.Image) -> list[Image.Image]:
    """The authors' augmentation: plain; rotation 45 + colour jitter + flip; rotation; jitter; flip."""
    jitter = T.ColorJitter(0.4, 0.4, 0.4, 0.1)
    rotate = T.RandomRotation((45, 45))
    flip = T.RandomHorizontalFlip(p=1.0)
    return [image, flip(jitter(rotate(image))), rotate(image), jitter(image), flip(image)]


class ImageCache:
    """The images of ``dataset`` through ``transform`` (the protocol's: PIL steps, then ``ToTensor``
    and ``Normalize``), each decoded and put through the PIL steps once and kept as uint8
    [3, H, W] on ``device``; :meth:`load` converts and normalises a batch of them there. Images past
    ``max_bytes`` are not kept (converted each time, as without a cache)."""

    def __init__(self, dataset: Any, transform: T.Compose, device: torch.device | str,
                 max_bytes: int = CACHE_BYTES) -> None:
        steps = list(transform.transforms)
        if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
            raise ValueError("ImageCache needs a transform that ends with ToTensor and Normalize (protocol_transform).")
        self.dataset, self.transform, self.device = dataset, transform, torch.device(device)
        self.pil_steps, self.tensor_steps = T.Compose(steps[:-2]), T.Compose(steps[-2:])
        normalize = steps[-1]
        self.mean = torch.as_tensor(normalize.mean, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)
        self.std = torch.as_tensor(normalize.std, dtype=torch.float32, device=self.device).reshape(-1, 1, 1)
        self.max_bytes = max_bytes
        self.bytes = 0
        self._images: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._images)

    def _uint8(self, index: int) -> torch.Tensor | Image.Image:
        """Image ``index`` after the PIL steps: as uint8 [3, H, W] on the device (kept within the
        budget), or the PIL image itself when it is not 8-bit RGB (ToTensor would give other
        channels or values: the transform's own last steps convert it)."""
        cached = self._images.get(index)
        if cached is not None:
            return cached
        picture = self.pil_steps(self.dataset.load_image(index))
        if picture.mode != "RGB":
            return picture
        image = torch.from_numpy(np.array(picture, dtype=np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        image = image.to(self.device)
        if self.bytes + image.numel() <= self.max_bytes:
            self._images[index] = image
            self.bytes += image.numel()
        return image

    def load(self, ids: Sequence[int]) -> torch.Tensor:
        """Images ``ids`` as ``transform`` makes them, [n, 3, H, W] float32 on the device."""
        kept = [self._uint8(i) for i in ids]
        if all(isinstance(image, torch.Tensor) for image in kept):
            images = torch.stack(kept).to(torch.float32).div(255)  # ToTensor's and Normalize's operations
            return images.sub_(self.mean).div_(self.std)
        return torch.stack([self.tensor_steps(image) if isinstance(image, Image.Image) else
                            image.to(torch.float32).div(255).sub_(self.mean).div_(self.std) for image in kept]).to(self.device)


def load_images(dataset: Any, ids: list[int], transform: T.Compose | ImageCache, augment: bool = False) -> torch.Tensor:
    """Images ``ids`` of ``dataset`` through ``transform`` as one [n (x5 views), 3, H, W] tensor
    (an :class:`ImageCache` of ``dataset``: its images, on its device; augmented views are drawn
    from the decoded image each time, as they are random)."""
    if isinstance(transform, ImageCache):
        if not augment:
            return transform.load(ids)
        transform = transform.transform
    images = []
    for i in ids:
        image = dataset.load_image(i)
        views = support_views(image) if augment else [image]
        images.extend(transform(v) for v in views)
    return torch.stack(images)
