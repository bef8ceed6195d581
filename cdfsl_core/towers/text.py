"""The text tower: open_clip's text transformer, on the CLIP itself (OpenAI CLIP, the embedded
CLIP: ``model.transformer``, ``model.ln_final``, ...) or as ``model.text`` (open_clip's
``CustomTextCLIP``: PE-Core, EVA02, SigLIP2).

What the methods need from it: the token embedding, the positional embedding, the blocks and their
attention mask, and the read-out of a block's output (``ln_final``, the pooling of the EOT, last or
argmax token, the text projection). Like the vision adapters, this is the only code that names
the text tower's internals.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from cdfsl_core.errors import ConfigError

__all__ = ["TextTower", "text_tower"]


class TextTower:
    """The adapter of an open_clip text transformer (the holder of its parts: a CLIP or a TextTransformer)."""

    def __init__(self, holder: nn.Module) -> None:
        self.holder = holder
        if getattr(holder, "cls_emb", None) is not None:
            raise ConfigError("this text tower appends a CLS embedding (CoCa-style); its read-outs are not supported.")

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.holder.transformer.resblocks

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    def lora_sites(self, block: nn.Module, targets: Sequence[str]) -> list:
        from cdfsl_core.towers.base import LoRASite

        return [LoRASite(block, "attn", {t: None for t in targets})]  # nn.MultiheadAttention, adapted whole

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.holder.token_embedding

    @property
    def context_length(self) -> int:
        return int(self.holder.positional_embedding.shape[0])

    @property
    def cast_dtype(self) -> torch.dtype:
        return self.holder.transformer.get_cast_dtype()

    def forward_blocks(self, embeddings: torch.Tensor, readout_blocks: Sequence[int] = (),
                       tokens: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The stream after the last block from token ``embeddings`` [C, ctx, width], and the read-out
        (:meth:`readout`, needing ``tokens``) after each block of ``readout_blocks``."""
        cast = self.cast_dtype
        x = embeddings.to(cast) + self.holder.positional_embedding.to(cast)
        mask = getattr(self.holder, "attn_mask", None)
        readouts: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x, attn_mask=mask)
            if i in readout_blocks:
                readouts[i] = self.readout(x, tokens)
        return x, readouts

    def readout(self, h: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """``ln_final`` of the pooled token (EOT/argmax, last, ...) of stream ``h``, projected: [C, embed_dim]."""
        from open_clip.transformer import text_global_pool

        holder = self.holder
        pool_type = getattr(holder, "text_pool_type", None) or getattr(holder, "pool_type", "argmax")
        eos = getattr(holder, "text_eos_id", None)
        eos = getattr(holder, "eos_id", None) if eos is None else eos
        pooled = text_global_pool(holder.ln_final(h), tokens, pool_type, eos_token_id=eos)
        if isinstance(pooled, tuple):  # older open_clip returns (pooled, tokens)
            pooled = pooled[0]
        projection = holder.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Module) else pooled @ projection


_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, TextTower] = weakref.WeakKeyDictionary()


def text_tower(model: nn.Module) -> TextTower:
    """The text adapter of a CLIP (its own text parts, or ``.text``) or a FewShotCLIP (``.model``)."""
    if isinstance(model, TextTower):
        return model
    for candidate in (model, getattr(model, "model", None)):
        if candidate is None:
            continue
        holder = candidate.text if isinstance(getattr(candidate, "text", None), nn.Module) else candidate
        if hasattr(holder, "token_embedding") and hasattr(holder, "transformer") and hasattr(holder, "ln_final"):
            adapter = _ADAPTERS.get(holder)
            if adapter is None:
                adapter = _ADAPTERS[holder] = TextTower(holder)
            return adapter
    raise ConfigError(f"{type(model).__name__} has no text tower (a vision-only model?): what needs class text "
                      "features (zero-shot, CoOp, ATHA, TIR, the token-to-text diagnostics) cannot run on it.")
