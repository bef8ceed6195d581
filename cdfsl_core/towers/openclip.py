"""open_clip's own ``VisionTransformer`` (OpenAI's CLIP, the embedded ``cdfsl-synth-vit``).

Blocks: ``transformer.resblocks`` of ``ResidualAttentionBlock`` (input keyword ``q_x``, pre-norm
``ln_1``, attention ``nn.MultiheadAttention`` with a fused ``in_proj_weight``); one CLS token at
index 0, then the register tokens of ``cdfsl_core.registers`` if any; read-out ``ln_post(x) @ proj``; patch embedding ``conv1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from torch import nn

from cdfsl_core.errors import ConfigError
from cdfsl_core.softmax_one import attention_weights
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
    def n_registers(self) -> int:  # cdfsl_core.registers.RegisterVisionTransformer
        return int(getattr(self.module, "n_registers", 0))

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

    def key_affine(self, block: nn.Module, z: torch.Tensor, position: int, kwargs: dict | None = None,
                   chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        # no position-dependent part: a one-token probe gives the same map, width + 1 rows at once
        return super().key_affine(block, z[:, position:position + 1], 0, kwargs, chunk)

    @property
    def pools_cls(self) -> bool:
        visual = self.module
        return getattr(visual, "attn_pool", None) is None and getattr(visual, "pool_type", "tok") == "tok"

    def mlp_norm(self, block: nn.Module) -> nn.Module:
        return block.ln_2

    def mlp_activation(self, block: nn.Module) -> nn.Module:
        return block.mlp.gelu

    def mlp_output(self, block: nn.Module) -> nn.Linear:
        return block.mlp.c_proj

    def sequence_end_hook(self, fn):
        return self.module.transformer.register_forward_hook(lambda module, args, out: fn(out))

    def head_writes(self, block: nn.Module, z: torch.Tensor, kwargs: dict | None = None,
                    query: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = block.attn
        q, k, _ = self.query_key(block, z, kwargs)
        if hasattr(attn, "project_qkv"):  # a LoRA-adapted attention: its effective projections
            v = attn.project_qkv(z)[2]
            weight, bias = attn.base.out_proj.weight, attn.base.out_proj.bias
            if "o" in attn.lora_A:
                weight = weight + attn.delta_weight("o")
        else:
            width = z.shape[-1]
            v_bias = attn.in_proj_bias[2 * width:] if attn.in_proj_bias is not None else None
            v = F.linear(z, attn.in_proj_weight[2 * width:], v_bias)
            weight, bias = attn.out_proj.weight, attn.out_proj.bias
        heads, d_head = q.shape[1], q.shape[-1]
        v = v.reshape(*v.shape[:2], heads, d_head).transpose(1, 2)  # [B, H, T, dh]
        pattern = attention_weights(attn, q[:, :, query:query + 1] @ k.transpose(-2, -1) * d_head**-0.5)  # [B, H, 1, T]
        mixed = (pattern @ v)[:, :, 0]  # [B, H, dh]
        w = weight.float().reshape(weight.shape[0], heads, d_head)  # out = sum_h mixed_h @ W[:, h].T
        writes = torch.einsum("bhd,whd->bhw", mixed.float(), w)
        return block.ls_1(writes), (block.ls_1(bias.float()) if bias is not None else None)

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
        return ReadoutAffine(visual.ln_post.weight, visual.ln_post.bias, visual.proj, eps=visual.ln_post.eps)
