"""open_clip's own ``VisionTransformer`` (OpenAI's CLIP, the embedded ``cdfsl-synth-vit``).

Blocks: ``transformer.resblocks`` of ``ResidualAttentionBlock`` (input keyword ``q_x``, pre-norm
``ln_1``, attention ``nn.MultiheadAttention`` with a fused ``in_proj_weight``); one CLS token at
index 0 and no registers; read-out ``ln_post(x) @ proj``; patch embedding ``conv1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from cdfsl_core.errors import ConfigError
from cdfsl_core.towers.base import LoRASite, ReadoutAffine, VisionTower, register_tower

__all__ = ["OpenCLIPVisionTower"]


@register_tower
class OpenCLIPVisionTower(VisionTower):
    family = "open_clip"
    description = "open_clip VisionTransformer (OpenAI CLIP ViT-B/16, L/14, the embedded CLIP)"
    input_keyword = "q_x"

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return isinstance(module, VisionTransformer)

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.module.transformer.resblocks

    @property
    def has_cls(self) -> bool:
        return True

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.module.grid_size)

    @property
    def width(self) -> int:
        return self.module.transformer.width

    @property
    def patch_embedding(self) -> nn.Module:
        return self.module.conv1

    def pre_norm(self, block: nn.Module) -> nn.Module:
        return block.ln_1

    def patch_channels_summed(self, values: torch.Tensor) -> torch.Tensor:
        return values.sum(dim=1)  # conv1's output [B, width, rows, cols]

    def query_key(self, block: nn.Module, z: torch.Tensor, kwargs: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
        attn = block.attn
        if hasattr(attn, "project_qkv"):  # a LoRA-adapted attention: the adapters count
            q, k, _ = attn.project_qkv(z)
        else:  # only q and k: v is not needed
            width = z.shape[-1]
            bias = attn.in_proj_bias[: 2 * width].to(z.dtype) if attn.in_proj_bias is not None else None
            q, k = F.linear(z, attn.in_proj_weight[: 2 * width].to(z.dtype), bias).chunk(2, dim=-1)
        heads = attn.num_heads
        batch, tokens, width = q.shape
        d_head = width // heads
        q = q.reshape(batch, tokens, heads, d_head).transpose(1, 2)
        k = k.reshape(batch, tokens, heads, d_head).transpose(1, 2)
        return q, k, d_head**-0.5

    def lora_sites(self, block: nn.Module, targets: Sequence[str]) -> list[LoRASite]:
        return [LoRASite(block, "attn", {t: None for t in targets})]  # the fused attention, adapted whole

    def attention_dropout(self, block: nn.Module) -> float:
        return float(getattr(block.attn, "dropout", 0.0))

    def _check_linear_head(self) -> None:
        if getattr(self.module, "attn_pool", None) is not None:
            raise ConfigError("this open_clip VisionTransformer pools with attention (attn_pool); its per-token "
                              "read-out is not defined here.")

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        self._check_linear_head()
        visual = self.module
        with torch.autocast(x.device.type, enabled=False):
            out = visual.ln_post(x.float())
            return out @ visual.proj.float() if visual.proj is not None else out

    def readout_affine(self) -> ReadoutAffine:
        self._check_linear_head()
        visual = self.module
        return ReadoutAffine(visual.ln_post.weight, visual.ln_post.bias, visual.proj)
