"""LoRA on open_clip's attention, one adapter per projection.

open_clip's blocks hold an ``nn.MultiheadAttention`` whose q, k and v share one fused
in-projection. CLIP-LoRA and the ATHA/TIR code put a separate rank-r adapter on each of q, k and
v; one rank-r adapter on the fused matrix (what peft does for ``nn.MultiheadAttention``) is a
different, smaller model. :class:`LoRAAttention` replaces a block's ``attn`` with the same
computation plus ``scale * B_t A_t dropout(x)`` on each chosen projection ``t`` in ``q, k, v, o``;
``fused`` is offered as the option ``targets=("qkv",)``.

With B = 0 (the initial state) the outputs equal the original module's; :meth:`merge` folds
the adapters into the weights and :meth:`unmerge` takes them out again.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.errors import ConfigError

__all__ = ["LoRAAttention", "LoRAConfig", "apply_lora", "lora_modules", "remove_lora"]

_SLICES = {"q": 0, "k": 1, "v": 2}
VALID_TARGETS = ("q", "k", "v", "o", "qkv")


@dataclass(frozen=True)
class LoRAConfig:
    """Where and how LoRA adapts the model. Defaults: the ATHA/TIR authors' code."""

    rank: int = 16  # r
    alpha: float = 8.0  # scaling numerator
    scaling: str = "sqrt"  # 'sqrt': alpha / sqrt(r) (= 2, the authors'); 'linear': alpha / r (CLIP-LoRA)
    dropout: float = 0.25  # dropout on the adapter input
    targets: tuple[str, ...] = ("q", "k", "v")  # projections; ('qkv',) = one adapter on the fused matrix
    towers: tuple[str, ...] = ("visual", "text")  # which towers
    blocks: tuple[int, ...] | None = None  # block indices (None: all)

    @property
    def scale(self) -> float:
        if self.scaling == "sqrt":
            return self.alpha / math.sqrt(self.rank)
        if self.scaling == "linear":
            return self.alpha / self.rank
        raise ConfigError(f"LoRA scaling={self.scaling!r}; expected 'sqrt' or 'linear'.")

    def validate(self) -> None:
        bad = [t for t in self.targets if t not in VALID_TARGETS]
        if bad or not self.targets:
            raise ConfigError(f"LoRA targets {self.targets}: expected a non-empty subset of {VALID_TARGETS}.")
        if "qkv" in self.targets and set(self.targets) & {"q", "k", "v"}:
            raise ConfigError("LoRA targets: 'qkv' (fused) excludes 'q', 'k' and 'v'.")
        bad_towers = [t for t in self.towers if t not in ("visual", "text")]
        if bad_towers or not self.towers:
            raise ConfigError(f"LoRA towers {self.towers}: expected 'visual' and/or 'text'.")
        if self.rank < 1:
            raise ConfigError(f"LoRA rank={self.rank}: expected >= 1.")
        self.scale  # noqa: B018 - validates the scaling rule


class LoRAAttention(nn.Module):
    """``nn.MultiheadAttention`` (batch_first) with LoRA adapters; the base weights stay frozen."""

    def __init__(self, base: nn.MultiheadAttention, config: LoRAConfig) -> None:
        super().__init__()
        if not base.batch_first or not base._qkv_same_embed_dim:
            raise ValueError("LoRAAttention expects open_clip's batch_first attention with a fused in-projection.")
        self.base = base
        self.config = config
        self.scale = config.scale
        width = base.embed_dim
        self.dropout = nn.Dropout(config.dropout)
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for target in config.targets:
            out_features = 3 * width if target == "qkv" else width
            self.lora_A[target] = nn.Parameter(torch.zeros(config.rank, width, device=base.in_proj_weight.device))
            self.lora_B[target] = nn.Parameter(torch.zeros(out_features, config.rank, device=base.in_proj_weight.device))
        self.merged = False
        self.reset_parameters()

    @property
    def num_heads(self) -> int:
        return self.base.num_heads

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform (as nn.Linear), B zero: the adapted model equals the base one."""
        if self.merged:
            self.unmerge()
        with torch.no_grad():
            for target in self.lora_A:
                a = self.lora_A[target]
                bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) on [r, D]
                a.copy_(torch.rand(a.shape, generator=generator, device="cpu").mul_(2 * bound).sub_(bound))
                self.lora_B[target].zero_()

    def delta_weight(self, target: str) -> torch.Tensor:
        return self.scale * self.lora_B[target] @ self.lora_A[target]

    def _rows(self, target: str) -> slice:
        width = self.base.embed_dim
        if target == "qkv":
            return slice(0, 3 * width)
        start = _SLICES[target] * width
        return slice(start, start + width)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold ``scale * B A`` into the base weights (faster inference; no dropout path)."""
        if self.merged:
            return
        for target in self.lora_A:
            if target == "o":
                self.base.out_proj.weight += self.delta_weight(target)
            else:
                self.base.in_proj_weight[self._rows(target)] += self.delta_weight(target)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        for target in self.lora_A:
            if target == "o":
                self.base.out_proj.weight -= self.delta_weight(target)
            else:
                self.base.in_proj_weight[self._rows(target)] -= self.delta_weight(target)
        self.merged = False

    def _adapter(self, x: torch.Tensor, target: str) -> torch.Tensor:
        a, b = self.lora_A[target], self.lora_B[target]
        return self.scale * F.linear(F.linear(self.dropout(x), a.to(x.dtype)), b.to(x.dtype))

    def project_qkv(
        self, query: torch.Tensor, key: torch.Tensor | None = None, value: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k, v as the block computes them, [batch, token, width] each (adapters included)."""
        key = query if key is None else key
        value = query if value is None else value
        weight, bias = self.base.in_proj_weight, self.base.in_proj_bias
        width = self.base.embed_dim
        if key is query and value is query:
            q, k, v = F.linear(query, weight, bias).chunk(3, dim=-1)
        else:
            b = bias if bias is not None else torch.zeros(3 * width, device=query.device, dtype=query.dtype)
            q = F.linear(query, weight[:width], b[:width])
            k = F.linear(key, weight[width : 2 * width], b[width : 2 * width])
            v = F.linear(value, weight[2 * width :], b[2 * width :])
        if not self.merged:
            if "qkv" in self.lora_A:
                dq, dk, dv = self._adapter(query, "qkv").chunk(3, dim=-1)
                q, k, v = q + dq, k + dk, v + dv
            if "q" in self.lora_A:
                q = q + self._adapter(query, "q")
            if "k" in self.lora_A:
                k = k + self._adapter(key, "k")
            if "v" in self.lora_A:
                v = v + self._adapter(value, "v")
        return q, k, v

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor | None = None,
        value: torch.Tensor | None = None,
        need_weights: bool = False,
        attn_mask: torch.Tensor | None = None,
        **_: object,
    ) -> tuple[torch.Tensor, None]:
        q, k, v = self.project_qkv(query, key, value)
        batch, tokens, width = q.shape
        heads = self.base.num_heads
        q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        dropout = self.base.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        result = self.base.out_proj(out)
        if "o" in self.lora_A and not self.merged:
            result = result + self._adapter(out, "o")
        return result, None


def _towers(model: nn.Module, towers: Sequence[str]) -> Iterator[tuple[str, nn.Module]]:
    for tower in towers:
        transformer = model.visual.transformer if tower == "visual" else model.transformer
        yield tower, transformer


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[LoRAAttention]:
    """Replace the attention of the chosen blocks with :class:`LoRAAttention`; returns them."""
    config.validate()
    added = []
    for tower, transformer in _towers(model, config.towers):
        n_blocks = len(transformer.resblocks)
        indices = range(n_blocks) if config.blocks is None else config.blocks
        for i in indices:
            if not 0 <= i < n_blocks:
                raise ConfigError(f"LoRA block {i} out of range for the {tower} tower (0..{n_blocks - 1}).")
            block = transformer.resblocks[i]
            if isinstance(block.attn, LoRAAttention):
                raise ConfigError(f"{tower} block {i} already has LoRA.")
            block.attn = LoRAAttention(block.attn, config)
            added.append(block.attn)
    return added


def lora_modules(model: nn.Module) -> list[LoRAAttention]:
    return [m for m in model.modules() if isinstance(m, LoRAAttention)]


def remove_lora(model: nn.Module) -> None:
    """Put the original attention modules back (adapters are discarded, weights unmerged)."""
    for module in model.modules():
        for name, child in list(module.named_children()):
            if isinstance(child, LoRAAttention):
                child.unmerge()
                setattr(module, name, child.base)
