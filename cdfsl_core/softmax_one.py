"""Attention that need not sum to one: softmax with an extra zero logit ("softmax plus one").

``softmax1(s)_j = exp(s_j) / (1 + sum_k exp(s_k))``: a head can attend to nothing, as if a key of
logit 0 with a zero value were always present. Sinks on a fixed token are how softmax heads do
nothing (Gu et al. 2024, "When Attention Sink Emerges in Language Models", find no sinks once the
weights need not sum to one), so this is the second mechanistic control of the model organism
beside registers: if a sink that emerges in the organism is a head's way of being dormant, a model
pretrained with this attention should have none.

An architecture named ``<config>-softmax1`` (a JSON config of that name in ``model_configs``) is
built by :func:`cdfsl_core.models.load_clip` with every vision block's attention converted; its
weights have the same names and shapes as the plain model's. The tower adapters compute attention
probabilities with :func:`attention_weights`, which follows the conversion, so the recorder, the
sink definitions and the monitors see the weights the model uses. Self-attention only, for
pretraining and measurement; LoRA and the methods expect the standard module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SoftmaxOneAttention", "attention_weights", "softmax1", "softmax_one_in_name", "to_softmax_one"]

SUFFIX = "-softmax1"


def softmax_one_in_name(name: str) -> bool:
    """Whether an architecture's name asks for softmax-plus-one attention in the vision tower."""
    return name.endswith(SUFFIX)


def softmax1(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``exp(s_j) / (1 + sum_k exp(s_k))`` along ``dim``, computed stably."""
    shift = logits.amax(dim=dim, keepdim=True).clamp_min(0).detach()
    weights = torch.exp(logits - shift)
    return weights / (torch.exp(-shift) + weights.sum(dim=dim, keepdim=True))


def attention_weights(module: nn.Module | None, logits: torch.Tensor) -> torch.Tensor:
    """The attention weights a block's attention ``module`` makes of ``logits``: softmax plus one
    for a converted module, softmax otherwise."""
    if isinstance(module, SoftmaxOneAttention):
        return softmax1(logits)
    return torch.softmax(logits, dim=-1)


class SoftmaxOneAttention(nn.MultiheadAttention):
    """``nn.MultiheadAttention`` (batch first, self-attention) with softmax plus one; the same
    parameters under the same names."""

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask=None,
                need_weights: bool = True, attn_mask: torch.Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or not self.batch_first:
            raise NotImplementedError("softmax-plus-one attention: batch-first self-attention without padding masks")
        batch, tokens, width = query.shape
        heads = self.num_heads
        q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (t.reshape(batch, tokens, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        logits = q @ k.transpose(-2, -1) * (width // heads) ** -0.5
        if attn_mask is not None:
            logits = logits + attn_mask
        probs = softmax1(logits)
        mixed = F.dropout(probs, self.dropout, self.training) @ v  # [B, H, T, dh]
        out = self.out_proj(mixed.transpose(1, 2).reshape(batch, tokens, width))
        if not need_weights:
            return out, None
        return out, probs.mean(dim=1) if average_attn_weights else probs


def to_softmax_one(visual: nn.Module) -> nn.Module:
    """Convert every ``nn.MultiheadAttention`` of a vision tower to softmax plus one, in place (the
    parameters stay where they are)."""
    for module in visual.modules():
        if type(module) is nn.MultiheadAttention:
            module.__class__ = SoftmaxOneAttention
    return visual
