"""Attributions over patch tokens with captum, to set beside sink and tail tokens.

``PatchAttribution(method)(images, target)`` attributes the logit of ``target`` to the patch
embeddings (the output of the vision tower's patch projection ``conv1``) and sums over channels:
one value per patch, ``[batch, grid, grid]``. Interventions and adapters are part of the forward,
so the attribution is of the model as it computes.
"""

from __future__ import annotations

from typing import Callable

import torch
from captum.attr import LayerGradientXActivation, LayerIntegratedGradients
from torch import nn

from cdfsl_core.towers import vision_tower as tower_of

__all__ = ["ATTRIBUTION_METHODS", "PatchAttribution"]

ATTRIBUTION_METHODS = ("integrated-gradients", "gradient-x-activation")


class PatchAttribution:
    """Per-patch attribution of a class logit."""

    def __init__(self, model: nn.Module | Callable[[torch.Tensor], torch.Tensor], method: str = "integrated-gradients",
                 n_steps: int = 16) -> None:
        if method not in ATTRIBUTION_METHODS:
            raise ValueError(f"attribution method {method!r}; expected one of {ATTRIBUTION_METHODS}.")
        self.model = model
        self.method = method
        self.n_steps = n_steps
        self.tower = tower_of(model)
        layer = self.tower.patch_embedding
        if method == "integrated-gradients":
            self._attr = LayerIntegratedGradients(model, layer)
        else:
            self._attr = LayerGradientXActivation(model, layer)

    def __call__(self, images: torch.Tensor, target: torch.Tensor | int) -> torch.Tensor:
        """[batch, 3, H, W] images, target class per image -> [batch, grid, grid] attributions."""
        if self.method == "integrated-gradients":
            attributions = self._attr.attribute(images, target=target, n_steps=self.n_steps,
                                                internal_batch_size=len(images))
        else:
            attributions = self._attr.attribute(images, target=target)
        return self.tower.patch_channels_summed(attributions).detach()  # -> [B, g, g]
