"""Per-layer image representations from the recorder, pooled over tokens.

Pooling: any registered in :mod:`analysis.poolings` (``cls``, ``mean``, ``mean-no-simple``: the
mean of the patch tokens without TIR's simple tokens; the TIR paper reports that leaving these
tokens out changes source-target similarity).

Shapes: ``images`` [n, 3, H, W]; each layer's result [n, width], fp32, on the CPU.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from analysis.keys import act_name
from analysis.poolings import list_poolings, pooling
from analysis.recorder import record, vision_tower
from cdfsl_core import protocol
from cdfsl_core.errors import ConfigError
from cdfsl_core.towers import text_tower
from cdfsl_core.towers import vision_tower as tower_of

__all__ = ["class_readout", "layer_features", "pool_tokens", "sample_layer_features"]



def __getattr__(name: str) -> Any:
    if name == "POOLS":  # the registered poolings, as they are now
        return tuple(list_poolings())
    raise AttributeError(name)


def pool_tokens(x: torch.Tensor, pool: str, visual: Any = None, unit_text: torch.Tensor | None = None,
                rho: float = protocol.TIR_RHO) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pool a block's output ``x`` [B, 1 + L, D] to [B, D] with the registered pooling ``pool``
    (:mod:`analysis.poolings`); for ``mean-no-simple`` also the number of simple tokens left out
    of each image [B] (else None)."""
    return pooling(pool).pool(x, visual, unit_text, rho)


@torch.no_grad()
def layer_features(model: torch.nn.Module, images: torch.Tensor | None = None, dataset=None, indices=None,
                   transform=None, layers: Sequence[int] | None = None, pool: str = "cls", batch_size: int = 128,
                   progress: bool = False, text: torch.Tensor | None = None,
                   excluded: dict[int, float] | None = None) -> dict[int, torch.Tensor]:
    """Per-layer image representations [n, width] of ``images`` or of ``dataset[indices]`` (with a
    ``transform``). ``model`` is a CLIP, a vision tower, or a
    :class:`~cdfsl_core.methods.FewShotCLIP`, whose intervention (ATHA, TIR) is then active.
    ``pool='mean-no-simple'`` needs ``text`` [C, embed_dim] (:func:`class_readout`), and fills
    ``excluded`` (when given) with the mean number of simple tokens left out per image, per layer."""
    from tqdm import tqdm

    if pooling(pool).needs_text and text is None:
        raise ConfigError(f"pool={pool!r} needs the class text features (text=class_readout(...)).")
    visual = vision_tower(model)
    n_blocks = tower_of(visual).n_blocks
    layers = list(range(n_blocks)) if layers is None else list(layers)
    bad = [layer for layer in layers if not 0 <= layer < n_blocks]
    if bad:
        raise ConfigError(f"layers {bad} out of range: this vision tower has blocks 0..{n_blocks - 1}.")
    if images is None:
        indices = list(range(len(dataset))) if indices is None else list(indices)
        batches = [indices[i:i + batch_size] for i in range(0, len(indices), batch_size)]
        load = lambda ids: torch.stack([transform(dataset.load_image(i)) for i in ids])  # noqa: E731
    else:
        batches = [list(range(i, min(i + batch_size, len(images)))) for i in range(0, len(images), batch_size)]
        load = lambda ids: images[ids[0]:ids[-1] + 1]  # noqa: E731
    device = next(visual.parameters()).device
    forward = visual
    if hasattr(model, "encode_image") and hasattr(model, "text_features"):  # a FewShotCLIP: its intervention too
        was_training = model.training
        model.eval()
        readout = model.text_features()[1]
        model.train(was_training)
        forward = lambda x: model.encode_image(x, readout)  # noqa: E731
    unit_text = F.normalize(text.float(), dim=-1) if text is not None else None
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    left_out = {layer: 0.0 for layer in layers}
    was_training = model.training
    model.eval()  # features are measured, not sampled: no LoRA dropout (the mode is given back)
    try:
        for ids in tqdm(batches, desc="recording features", disable=not progress, leave=False):
            with record(visual, layers=layers, what=("resid_post",)) as cache:
                forward(load(ids).to(device))
            for layer in layers:
                pooled, simple = pool_tokens(cache[act_name("resid_post", layer)], pool, visual, unit_text)
                out[layer].append(pooled.float().cpu())
                if simple is not None:
                    left_out[layer] += float(simple.sum())
    finally:
        model.train(was_training)
    features = {layer: torch.cat(parts) for layer, parts in out.items()}
    if excluded is not None and pool == "mean-no-simple":
        excluded.update({layer: total / len(features[layer]) for layer, total in left_out.items()})
    return features


def sample_indices(n_images: int, n: int, seed: int = 0) -> list[int]:
    """``min(n, n_images)`` indices drawn without replacement from ``seed``, sorted."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_images, min(n, n_images), replace=False)).tolist()


def sample_layer_features(model: torch.nn.Module, dataset, n: int, transform, seed: int = 0, pool: str = "cls",
                          progress: bool = False, text: torch.Tensor | None = None,
                          layers: Sequence[int] | None = None,
                          excluded: dict[int, float] | None = None) -> dict[int, torch.Tensor]:
    """:func:`layer_features` of ``n`` images of ``dataset`` drawn without replacement from ``seed``."""
    return layer_features(model, dataset=dataset, indices=sample_indices(len(dataset), n, seed), transform=transform,
                          pool=pool, progress=progress, text=text, layers=layers, excluded=excluded)


@torch.no_grad()
def class_readout(bundle: Any, class_names: Sequence[str]) -> torch.Tensor:
    """The text read-out the interventions compare tokens with (after text block n - 2, not
    normalised), for ``class_names`` with the papers' prompt, [C, embed_dim]."""
    from cdfsl_core.methods import MethodConfig
    from cdfsl_core.text import PromptLearner, encode_text_embeddings

    model = bundle.model
    prompts = PromptLearner(model, bundle.tokenizer, list(class_names), MethodConfig().template)
    block = text_tower(model).n_blocks - 2
    _, readouts = encode_text_embeddings(model, prompts.embeddings(), prompts.tokens, readout_blocks=(block,))
    return readouts[block].float()
