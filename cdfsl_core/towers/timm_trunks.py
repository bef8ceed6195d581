"""timm vision trunks: ``VisionTransformer`` (SigLIP/SigLIP2, DINOv2 with registers, timm ViTs)
and ``Eva`` (PE-Core, EVA02), bare or inside open_clip's ``TimmModel`` (``.trunk`` and ``.head``).

Blocks: ``trunk.blocks`` (input keyword ``x``; EVA blocks also take ``rope``), pre-norm ``norm1``;
``trunk.num_prefix_tokens`` tokens first (CLS when ``cls_token`` exists, then the registers);
attention with a fused ``qkv`` (or EVA's ``q_proj``/``k_proj``), per-head ``q_norm``/``k_norm``
and, for EVA/PE, rotary embeddings on the patch tokens; patch embedding ``patch_embed``.

Read-out: a trunk that pools a token or the mean ("token", "avg") has a linear head: the one layer
norm (``norm`` or ``fc_norm``), the trunk's ``head`` and open_clip's ``head``; every token passes
through them as if it were the pooled one (exact for the CLS token under "token" pooling; under
"avg" the head normalises the mean, so the mean of the tokens' read-outs approximates the pooled
one).

A trunk with an attention-pooling head ("map": SigLIP2, PE-Core) reads each token out *as if it
were pooled alone*: ``norm``, then the pool on a one-token sequence (its one latent query's
attention over one key is 1 in every head, so the pool gives ``proj(v(z))`` plus its MLP
branch), then ``fc_norm`` and the heads. This equals the model's pooled output for an input whose
only token is that one; for a whole image, the pooled output before the MLP branch is the
attention-weighted mean of the tokens' ``proj(v(z_j))``, so the tokens' read-outs are the terms
that mean is made of. Its affine parts (ATHA's inverse, ``readout_affine``) are the linear part:
``norm``'s gain and bias, then ``v``, ``proj`` and the heads composed, the MLP branch left out
(``exact=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import apply_rot_embed_cat
from timm.models.eva import Eva
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from cdfsl_core.errors import ConfigError
from cdfsl_core.towers.base import LoRASite, ReadoutAffine, VisionTower, register_tower

__all__ = ["TimmVisionTower"]

_TRUNKS = (TimmViT, Eva)


def _trunk(module: nn.Module) -> nn.Module | None:
    if isinstance(module, _TRUNKS):
        return module
    trunk = getattr(module, "trunk", None)
    return trunk if isinstance(trunk, _TRUNKS) else None


def _linear_chain(modules: Sequence[nn.Module]) -> list[nn.Linear]:
    """The linear layers of a head, in order; anything else but identities and dropouts refused."""
    out = []
    for module in modules:
        if isinstance(module, nn.Linear):
            out.append(module)
        elif isinstance(module, nn.Sequential):
            out.extend(_linear_chain(list(module)))
        elif not isinstance(module, (nn.Identity, nn.Dropout)):
            raise ConfigError(f"the tower's head holds a {type(module).__name__}: its per-token read-out is "
                              "defined for linear heads only.")
    return out


def _fused_qkv(attn: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """The fused q, k, v projection of ``z`` as the attention computes it: EVA's separate q/v biases
    (k's is zero) added to the weight's product, otherwise the ``qkv`` module itself (LoRA's
    adapters included)."""
    if getattr(attn, "q_bias", None) is None:
        return attn.qkv(z)
    bias = torch.cat((attn.q_bias, attn.k_bias, attn.v_bias))
    if getattr(attn, "qkv_bias_separate", False) and attn.qkv.bias is not None:
        bias = bias + attn.qkv.bias
    return F.linear(z, attn.qkv.weight, bias)


@register_tower
class TimmVisionTower(VisionTower):
    family = "timm"
    description = "timm VisionTransformer and Eva trunks (SigLIP2, DINOv2-reg, PE-Core, EVA02)"

    def __init__(self, module: nn.Module) -> None:
        super().__init__(module)
        self.trunk = _trunk(module)

    @classmethod
    def matches(cls, module: nn.Module) -> bool:
        return _trunk(module) is not None

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return self.trunk.blocks

    @property
    def has_cls(self) -> bool:
        return getattr(self.trunk, "cls_token", None) is not None

    @property
    def n_registers(self) -> int:
        return int(self.trunk.num_prefix_tokens) - int(self.has_cls)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.trunk.patch_embed.grid_size)

    @property
    def width(self) -> int:
        return int(self.trunk.embed_dim)

    @property
    def patch_embedding(self) -> nn.Module:
        return self.trunk.patch_embed

    def pre_norm(self, block: nn.Module) -> nn.Module:
        return block.norm1

    def patch_channels_summed(self, values: torch.Tensor) -> torch.Tensor:
        if values.dim() == 4:  # an unflattened patch embedding: [B, rows, cols, width] (NHWC) or [B, width, ...]
            return values.sum(dim=-1) if values.shape[1:3] == self.grid else values.sum(dim=1)
        return values.sum(dim=-1).reshape(values.shape[0], *self.grid)  # [B, rows * cols, width]

    def query_key(self, block: nn.Module, z: torch.Tensor, kwargs: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:
        attn = block.attn
        batch, tokens, _ = z.shape
        heads = attn.num_heads
        if getattr(attn, "qkv", None) is not None:
            qkv = _fused_qkv(attn, z).reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
            q, k = qkv[0], qkv[1]
        else:
            q = attn.q_proj(z).reshape(batch, tokens, heads, -1).transpose(1, 2)
            k = attn.k_proj(z).reshape(batch, tokens, heads, -1).transpose(1, 2)
        q, k = attn.q_norm(q), attn.k_norm(k)
        rope = (kwargs or {}).get("rope")
        if rope is not None:  # rotary embeddings on the patch tokens, as EvaAttention applies them
            npt = attn.num_prefix_tokens
            half = getattr(attn, "rotate_half", False)
            q = torch.cat([q[:, :, :npt], apply_rot_embed_cat(q[:, :, npt:], rope, half=half)], dim=2)
            k = torch.cat([k[:, :, :npt], apply_rot_embed_cat(k[:, :, npt:], rope, half=half)], dim=2)
        return q, k, float(attn.scale)

    def key_affine(self, block: nn.Module, z: torch.Tensor, position: int, kwargs: dict | None = None,
                   chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        if (kwargs or {}).get("rope") is None:  # without rotary embeddings a key does not depend on its position
            return super().key_affine(block, z[:, position:position + 1], 0, kwargs, chunk=1024)
        return super().key_affine(block, z, position, kwargs, chunk)

    @property
    def pools_cls(self) -> bool:
        trunk = self.trunk
        return self.has_cls and getattr(trunk, "attn_pool", None) is None and trunk.global_pool == "token"

    def mlp_norm(self, block: nn.Module) -> nn.Module:
        return block.norm2

    def mlp_activation(self, block: nn.Module) -> nn.Module:
        mlp = block.mlp
        if type(mlp).__name__ != "Mlp":  # SwiGLU, GluMlp: the hidden unit is a product of two branches
            raise ConfigError(f"{type(mlp).__name__} is a gated MLP: its hidden units are products of two branches, not "
                              "one activation; register neurons are defined for plain MLPs (Linear, GELU, Linear).")
        return mlp.act

    def mlp_output(self, block: nn.Module) -> nn.Linear:
        return block.mlp.fc2

    def sequence_end_hook(self, fn):
        return self.trunk.norm.register_forward_pre_hook(lambda module, args: (fn(args[0]), *args[1:]))

    @staticmethod
    def _layer_scale(block: nn.Module) -> nn.Module | torch.Tensor | None:
        gamma = getattr(block, "gamma_1", None)  # Eva: a parameter, or None
        return gamma if gamma is not None else getattr(block, "ls1", None)

    def head_writes(self, block: nn.Module, z: torch.Tensor, kwargs: dict | None = None,
                    query: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
        attn = block.attn
        if type(block).__name__ not in ("Block", "EvaBlock"):
            raise ConfigError(f"a {type(block).__name__} block: its attention branch is not split into heads here "
                              "(pre-norm Block and EvaBlock are).")
        inner = getattr(attn, "norm", None)
        if not isinstance(inner, (nn.Identity, nn.LayerNorm, type(None))):
            raise ConfigError(f"{type(attn).__name__} normalises the heads' output with a {type(inner).__name__} "
                              "before its projection: the branch does not split into per-head writes.")
        if getattr(attn, "gate", None) is not None:
            raise ConfigError(f"{type(attn).__name__} gates the heads' output by the input: the branch does not split "
                              "into per-head writes.")
        q, k, scale = self.query_key(block, z, kwargs)
        batch, heads, tokens, d_head = q.shape
        if getattr(attn, "qkv", None) is not None:
            v = _fused_qkv(attn, z).reshape(batch, tokens, 3, heads, d_head)[:, :, 2].transpose(1, 2)
        else:
            v = attn.v_proj(z).reshape(batch, tokens, heads, d_head).transpose(1, 2)
        pattern = torch.softmax(q[:, :, query:query + 1] @ k.transpose(-2, -1) * scale, dim=-1)  # [B, H, 1, T]
        mixed = (pattern @ v)[:, :, 0]  # [B, H, dh]
        spread = torch.einsum("bhd,hg->bhgd", mixed, torch.eye(heads, device=z.device, dtype=mixed.dtype))
        spread = spread.reshape(batch, heads, heads * d_head)  # each head alone, in its own channels
        zero = attn.proj(z.new_zeros(1, heads * d_head))[0]  # the output bias (LoRA adds nothing to zero)
        if isinstance(inner, nn.LayerNorm):  # EVA02's sub-LN, linearised with its scale frozen on all heads
            joined = spread.sum(dim=1, keepdim=True)  # [B, 1, channels]
            sigma = (joined.var(dim=-1, unbiased=False, keepdim=True) + inner.eps).sqrt()
            spread = (spread - spread.mean(dim=-1, keepdim=True)) / sigma
            if inner.weight is not None:
                spread = spread * inner.weight
            if inner.bias is not None:
                zero = attn.proj(inner.bias.unsqueeze(0))[0]  # the norm's bias through proj, and proj's bias
        writes = attn.proj(spread) - attn.proj(z.new_zeros(1, heads * d_head))[0]  # proj's linear part
        scale_of = self._layer_scale(block)
        if isinstance(scale_of, torch.Tensor):
            return writes * scale_of, zero * scale_of
        if scale_of is not None:
            return scale_of(writes), scale_of(zero)
        return writes, zero

    def lora_sites(self, block: nn.Module, targets: Sequence[str]) -> list[LoRASite]:
        attn = block.attn
        if getattr(attn, "q_bias", None) is not None:
            raise ConfigError(f"{type(attn).__name__} adds separate q/v biases to its fused projection outside the "
                              "linear layer; LoRA cannot wrap it.")
        sites = []
        wanted = [t for t in targets if t != "o"]
        if getattr(attn, "qkv", None) is not None:
            width = attn.qkv.out_features // 3
            rows = {"q": slice(0, width), "k": slice(width, 2 * width), "v": slice(2 * width, 3 * width), "qkv": None}
            if wanted:
                sites.append(LoRASite(attn, "qkv", {t: rows[t] for t in wanted}))
        else:
            if "qkv" in wanted:
                raise ConfigError(f"{type(attn).__name__} has separate q/k/v projections: LoRA target 'qkv' needs a "
                                  "fused one; use targets q, k, v.")
            sites += [LoRASite(attn, f"{t}_proj", {t: None}) for t in wanted]
        if "o" in targets:
            sites.append(LoRASite(attn, "proj", {"o": None}))
        return sites

    def attention_dropout(self, block: nn.Module) -> float:
        return float(block.attn.attn_drop.p)

    # -- read-out -------------------------------------------------------------------------------
    def _pool(self) -> nn.Module | None:
        """The attention-pooling head, or None for a token / mean pool."""
        pool = getattr(self.trunk, "attn_pool", None)
        if pool is None:
            return None
        if getattr(pool, "pos_embed", None) is not None or getattr(pool, "latent_len", 1) != 1:
            raise ConfigError("this attention-pooling head has position embeddings or several latent queries; the "
                              "per-token read-out (a token pooled alone) is defined for one query without them.")
        if not isinstance(getattr(self.trunk, "fc_norm", None), (nn.Identity, type(None))):
            raise ConfigError("a layer norm after the attention-pooling head: the read-out's linear part is not defined.")
        return pool

    @staticmethod
    def _value_rows(pool: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The value projection inside the pool's fused ``kv`` (keys first, then values)."""
        width = pool.kv.out_features // 2
        bias = pool.kv.bias[width:] if pool.kv.bias is not None else None
        return pool.kv.weight[width:], bias

    def _pooled_alone(self, pool: nn.Module, z: torch.Tensor) -> torch.Tensor:
        weight, bias = self._value_rows(pool)
        out = pool.proj(F.linear(z, weight.float(), None if bias is None else bias.float()))
        if getattr(pool, "mlp", None) is not None:
            out = out + pool.mlp(pool.norm(out))
        return out

    def _head(self) -> tuple[nn.LayerNorm, list[nn.Linear]]:
        trunk = self.trunk
        if self._pool() is None and trunk.global_pool == "map":
            raise ConfigError(f"the {type(trunk).__name__} trunk pools with 'map' but has no attn_pool module.")
        norms = [m for m in (trunk.norm, getattr(trunk, "fc_norm", None)) if isinstance(m, nn.LayerNorm)]
        if len(norms) != 1:
            raise ConfigError(f"expected one layer norm before the head of {type(trunk).__name__}, found {len(norms)}.")
        outer = getattr(self.module, "head", None) if self.module is not trunk else None
        linears = _linear_chain([trunk.head] + ([outer] if outer is not None else []))
        return norms[0], linears

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        norm, linears = self._head()
        pool = self._pool()
        with torch.autocast(x.device.type, enabled=False):
            z = norm(x.float())
            if pool is not None:  # each token pooled alone (the module doc)
                z = self._pooled_alone(pool, z)
            for linear in linears:
                z = F.linear(z, linear.weight.float(), None if linear.bias is None else linear.bias.float())
            return z

    def readout_affine(self) -> ReadoutAffine:
        """The composed affine parts, recomputed only when a weight they come from changes (ATHA asks
        every forward, and its projection solve is cached on the composed tensor)."""
        norm, linears = self._head()
        pool = self._pool()
        sources = [norm.weight, norm.bias] + [p for m in linears for p in m.parameters()]
        if pool is not None:
            sources += [pool.kv.weight, pool.proj.weight]
        key = tuple((id(p), p._version, p.device) for p in sources)
        cached = getattr(self, "_affine", None)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():  # the frozen head's parts: no graph kept across forwards
            affine = self._compose_affine(norm, linears, pool)
        self._affine = (key, affine)
        return affine

    @staticmethod
    def _compose_affine(norm: nn.LayerNorm, linears: list[nn.Linear], pool: nn.Module | None) -> ReadoutAffine:
        projection, bias = None, None
        if pool is not None:  # the pool's linear part first: v, then proj
            value, value_bias = TimmVisionTower._value_rows(pool)
            linears = [(value, value_bias), (pool.proj.weight, pool.proj.bias)] + linears
        for linear in linears:  # z -> z W^T + b, composed
            linear = linear if isinstance(linear, tuple) else (linear.weight, linear.bias)
            weight = linear[0].T
            projection = weight if projection is None else projection @ weight
            bias = None if bias is None else bias @ weight
            if linear[1] is not None:
                bias = linear[1] if bias is None else bias + linear[1]
        exact = pool is None or getattr(pool, "mlp", None) is None
        return ReadoutAffine(norm.weight, norm.bias, projection, bias, exact=exact, eps=norm.eps)
