"""Attention maps from the recorder's ``attn.pattern``: per head, CLS maps over the image, rollout."""

from __future__ import annotations

import math
from typing import Any, Sequence

import pandas as pd
import torch

from analysis.keys import act_name
from analysis.recorder import ActivationCache

__all__ = ["attention_rollout", "attention_table", "cls_attention_maps"]


def _grid(tokens: int, prefix: int = 1) -> int:
    side = math.isqrt(tokens - prefix)
    if side * side != tokens - prefix:
        raise ValueError(f"{tokens - prefix} patch tokens do not form a square grid.")
    return side


def cls_attention_maps(cache: ActivationCache, layers: Sequence[int], prefix: int = 1) -> torch.Tensor:
    """Attention from CLS (token 0) to every patch, per head: [layer, batch, head, grid, grid];
    ``prefix``: the tokens before the patches (CLS and registers; the tower adapter's ``n_prefix``)."""
    maps = []
    for layer in layers:
        pattern = cache[act_name("attn.pattern", layer)]  # [B, H, T, T]
        side = _grid(pattern.shape[-1], prefix)
        maps.append(pattern[:, :, 0, prefix:].reshape(*pattern.shape[:2], side, side))
    return torch.stack(maps)


def attention_rollout(cache: ActivationCache, layers: Sequence[int], residual: float = 0.5,
                      prefix: int = 1) -> torch.Tensor:
    """Attention rollout (Abnar and Zuidema 2020) through ``layers`` in order: heads averaged,
    ``residual * I + (1 - residual) * A``, rows renormalised, multiplied. Returns the CLS row over
    patches as [batch, grid, grid]."""
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual={residual}; expected a weight in [0, 1].")
    result = None
    for layer in sorted(layers):
        attention = cache[act_name("attn.pattern", layer)].float().mean(dim=1)  # [B, T, T]
        eye = torch.eye(attention.shape[-1], device=attention.device)
        attention = residual * eye + (1 - residual) * attention
        attention = attention / attention.sum(dim=-1, keepdim=True)
        result = attention if result is None else attention @ result
    if result is None:
        raise ValueError("attention_rollout needs at least one layer.")
    side = _grid(result.shape[-1], prefix)
    return result[:, 0, prefix:].reshape(-1, side, side)


def attention_table(maps: torch.Tensor, layers: Sequence[int], **labels: Any) -> pd.DataFrame:
    """Tidy rows (layer, image, head, row, col, value) of CLS attention maps."""
    n_layers, batch, heads, side, _ = maps.shape
    index = pd.MultiIndex.from_product(
        [list(layers), range(batch), range(heads), range(side), range(side)],
        names=["layer", "image", "head", "row", "col"])
    table = pd.DataFrame({"value": maps.reshape(-1).cpu().numpy()}, index=index).reset_index()
    for key, value in labels.items():
        table[key] = value
    table["definition"] = "attention from CLS, per head"
    return table
