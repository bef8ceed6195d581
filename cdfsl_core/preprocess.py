"""Images for an episode: the protocol's preprocessing and the authors' support augmentation."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image
from torchvision import transforms as T

from cdfsl_core import protocol
from cdfsl_core.models import ClipBundle

__all__ = ["load_images", "protocol_transform", "support_views"]


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


def load_images(dataset: Any, ids: list[int], transform: T.Compose, augment: bool = False) -> torch.Tensor:
    """Images ``ids`` of ``dataset`` through ``transform`` as one [n (x5 views), 3, H, W] tensor."""
    images = []
    for i in ids:
        image = dataset.load_image(i)
        views = support_views(image) if augment else [image]
        images.extend(transform(v) for v in views)
    return torch.stack(images)
