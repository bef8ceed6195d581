"""Register tokens for open_clip's ``VisionTransformer`` (Darcet et al. 2024, "Vision
Transformers Need Registers").

``k`` learnable tokens are inserted after the CLS token, before ``ln_pre``, with no positional
embedding; the sequence becomes ``[CLS, r_1 .. r_k, patches]``. They take part in every block's
attention and are dropped by the pooling (the image feature is still the CLS token's read-out).
An architecture named ``<config>-reg<k>`` (a JSON config of that name in ``model_configs``) is
built with ``k`` registers by :func:`cdfsl_core.models.load_clip`; the tower adapter reports them
as registers, so patch statistics exclude them and register statistics report them on their own.
This is the mechanistic negative control of the model organism: if high-norm patch tokens are
heads' "nothing to do" slots, giving the model registers should move them there.
"""

from __future__ import annotations

import re

import torch
from open_clip.transformer import VisionTransformer, _expand_token
from torch import nn

__all__ = ["RegisterVisionTransformer", "add_registers", "registers_in_name"]

_SUFFIX = re.compile(r"-reg(\d+)$")


def registers_in_name(name: str) -> int:
    """The number of register tokens an architecture's name asks for (``...-reg4`` -> 4), else 0."""
    match = _SUFFIX.search(name)
    return int(match.group(1)) if match else 0


class RegisterVisionTransformer(VisionTransformer):
    """open_clip's ``VisionTransformer`` with ``register_tokens`` [k, width] after the CLS token."""

    register_tokens: nn.Parameter

    @property
    def n_registers(self) -> int:
        return int(self.register_tokens.shape[0])

    def _embeds(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)  # [B, width, rows, cols]
        x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)  # [B, patches, width]
        x = torch.cat([_expand_token(self.class_embedding, x.shape[0]).to(x.dtype), x], dim=1)
        x = x + self.positional_embedding.to(x.dtype)
        registers = self.register_tokens.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        x = torch.cat([x[:, :1], registers, x[:, 1:]], dim=1)
        x = self.patch_dropout(x)
        return self.ln_pre(x)

    def _pool(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.attn_pool is not None or self.pool_type != "tok":
            raise NotImplementedError("register tokens are implemented for CLS-token pooling only")
        x = self.ln_post(x)
        return x[:, 0], x[:, 1 + self.n_registers:]


def add_registers(visual: VisionTransformer, k: int, generator: torch.Generator | None = None) -> VisionTransformer:
    """Give an open_clip ``VisionTransformer`` ``k`` register tokens, in place (initialised like its
    CLS token: ``width**-0.5`` times a standard normal)."""
    if not isinstance(visual, VisionTransformer):
        raise TypeError(f"register tokens need open_clip's VisionTransformer, not {type(visual).__name__}")
    if k < 1:
        raise ValueError(f"k={k}: a register tower needs at least one register token")
    width = visual.class_embedding.shape[-1]
    reference = visual.class_embedding
    values = torch.randn(k, width, generator=generator, dtype=torch.float32) * width**-0.5
    visual.__class__ = RegisterVisionTransformer
    visual.register_tokens = nn.Parameter(values.to(device=reference.device, dtype=reference.dtype))
    return visual
