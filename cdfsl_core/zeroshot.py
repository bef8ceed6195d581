"""Zero-shot classification with CLIP: text features of class prompts, image features, accuracy.

These are the building blocks the episodic runner and the world report share.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from cdfsl_core import protocol
from cdfsl_core.models import ClipBundle, resolve_precision
from cdfsl_core.stats import mean_ci95  # noqa: F401  (re-exported: one CI convention)

DEFAULT_TEMPLATE = protocol.PROMPT


def autocast_for(device: torch.device | str, precision: str = "auto"):
    """The autocast context of a forward: bf16 when ``precision`` resolves to it (``"auto"``: on
    CUDA), nothing otherwise (fp32)."""
    device = torch.device(device)
    if resolve_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


@torch.no_grad()
def text_features(bundle: ClipBundle, class_names: Sequence[str], template: str = DEFAULT_TEMPLATE) -> torch.Tensor:
    """L2-normalised class text features, [n_classes, embed_dim], fp32."""
    device = next(bundle.model.parameters()).device
    tokens = bundle.tokenizer([template.format(name) for name in class_names]).to(device)
    with autocast_for(device):
        features = bundle.model.encode_text(tokens)
    return F.normalize(features.float(), dim=-1)


@torch.no_grad()
def image_features(
    bundle: ClipBundle,
    dataset: Any,
    indices: Sequence[int] | None = None,
    batch_size: int = 128,
    progress: bool = False,
) -> torch.Tensor:
    """L2-normalised image features of ``dataset[indices]`` (preprocessed with the bundle's
    transform when the dataset has none), [n, embed_dim], fp32, in the order of ``indices``."""
    device = next(bundle.model.parameters()).device
    borrowed = getattr(dataset, "transform", None) is None
    if borrowed:  # preprocess with the model's transform for this call only
        dataset.transform = bundle.preprocess
    try:
        subset = dataset if indices is None else Subset(dataset, list(indices))
        loader = DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=0)
        chunks = []
        for images, _ in tqdm(loader, desc="encoding images", disable=not progress, leave=False):
            with autocast_for(device):
                chunks.append(bundle.model.encode_image(images.to(device)).float())
    finally:
        if borrowed:
            dataset.transform = None
    return F.normalize(torch.cat(chunks), dim=-1)


def accuracy(logits: torch.Tensor, labels: Sequence[int] | torch.Tensor) -> float:
    labels = torch.as_tensor(labels, device=logits.device)
    return (logits.argmax(-1) == labels).float().mean().item()


@torch.no_grad()
def zero_shot_episodes(
    bundle: ClipBundle, dataset: Any, episodes: Any, template: str = DEFAULT_TEMPLATE, progress: bool = False
) -> list[float]:
    """Zero-shot accuracy of every episode of an episode file (queries only; support unused)."""
    all_text = text_features(bundle, dataset.classes, template)
    needed = sorted({i for ep in episodes.episodes for i in ep.query_ids})
    feats = image_features(bundle, dataset, needed, progress=progress)
    row = {image_id: k for k, image_id in enumerate(needed)}
    result = []
    for ep in episodes.episodes:
        queries = feats[[row[i] for i in ep.query_ids]]
        logits = queries @ all_text[ep.classes].T
        result.append(accuracy(logits, ep.query_labels))
    return result
