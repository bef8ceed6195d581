"""What every vision-tower adapter answers, and the registry that picks one for a module.

A *tower adapter* is the only code that knows a tower family's internals (DESIGN: "no file outside
``cdfsl_core/towers`` names a tower's internals"). The methods, interventions, recorder,
diagnostics and causal tools ask it for:

- the blocks (``blocks``), where a forward pre-hook sees each block's input
  (``block_input`` / ``with_block_input``);
- the token layout: ``n_prefix`` tokens first (CLS and/or register tokens), then the patch tokens
  on a ``grid`` (rows, columns); ``patches(x)``, ``registers(x)`` and ``cls(x)`` cut a residual
  stream ``[..., tokens, width]`` accordingly;
- the attention's queries and keys of a block (``query_key``: pre-norm, projections, per-head
  norms and rotary embeddings where the family has them) and the probabilities recomputed from
  them (``attention_probs``);
- the per-token read-out into the joint image-text space (``readout``) and its affine parts
  (``readout_affine``: ATHA solves through them);
- the patch embedding module (attribution).

Adding a family is one new adapter module that subclasses :class:`VisionTower` and registers it
with :func:`register_tower`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from cdfsl_core.errors import ConfigError
from cdfsl_core.softmax_one import attention_weights

__all__ = ["LoRASite", "ReadoutAffine", "VisionTower", "register_tower", "tower_families", "vision_tower"]


@dataclass(frozen=True)
class LoRASite:
    """Where LoRA adapts a block: the module ``parent.<attribute>`` (an ``nn.MultiheadAttention``,
    adapted as a whole, or an ``nn.Linear``) and, per LoRA target, the rows of its output that
    target's adapter adds to (None: all of them)."""

    parent: nn.Module
    attribute: str
    targets: dict

    @property
    def module(self) -> nn.Module:
        return getattr(self.parent, self.attribute)


@dataclass(frozen=True)
class ReadoutAffine:
    """The per-token read-out ``z = ((x - mean) / std * gamma + beta) @ P + bias`` of a linear head:
    a layer norm's gain and bias, the projection ``P`` [width, embed_dim] (None: the identity), and
    the bias added after it (None: none)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    projection: torch.Tensor | None
    bias: torch.Tensor | None = None
    exact: bool = True  # False: the linear part of a non-linear read-out (an attention-pooling head's MLP left out)
    eps: float = 1e-5  # the layer norm's epsilon


class VisionTower:
    """The adapter of one vision tower module; subclasses implement one family."""

    family: ClassVar[str] = ""
    description: ClassVar[str] = ""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        # tokens appended after the patches for the current forward (a test-time register): set by
        # the intervention that appends them, for as long as its hooks are in the forward
        self.appended = 0

    # -- which modules this family handles ------------------------------------------------------
    @classmethod
    def matches(cls, module: nn.Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- structure ------------------------------------------------------------------------------
    @property
    def blocks(self) -> Sequence[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def has_cls(self) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def n_registers(self) -> int:
        return 0

    @property
    def n_prefix(self) -> int:
        """Tokens before the patches: CLS (if any) then the registers."""
        return int(self.has_cls) + self.n_registers

    @property
    def grid(self) -> tuple[int, int]:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def width(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def patch_embedding(self) -> nn.Module:  # pragma: no cover - abstract
        raise NotImplementedError

    def patch_channels_summed(self, values: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """A tensor shaped like the patch embedding's output (e.g. attributions to it), summed over
        channels: ``[batch, rows, cols]``."""
        raise NotImplementedError

    # -- token layout ---------------------------------------------------------------------------
    def patches(self, x: torch.Tensor) -> torch.Tensor:
        """The patch tokens of a residual stream ``[..., tokens, width]`` (appended tokens excluded)."""
        return self.image_tokens(x)[..., self.n_prefix:, :]

    def registers(self, x: torch.Tensor) -> torch.Tensor:
        """The register tokens (empty along the token axis when the tower has none)."""
        return x[..., int(self.has_cls):self.n_prefix, :]

    def cls(self, x: torch.Tensor) -> torch.Tensor:
        """The CLS token ``[..., width]``."""
        if not self.has_cls:
            raise ConfigError(f"the {self.family} tower has no CLS token; use its patch tokens or its pooled output.")
        return x[..., 0, :]

    def image_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """A residual stream without the tokens appended after the patches (test-time registers):
        ``[..., prefix + L, width]``, the layout every patch statistic reads."""
        return x[..., :x.shape[-2] - self.appended, :] if self.appended else x

    def appended_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens appended after the patches (empty along the token axis when there are none)."""
        return x[..., x.shape[-2] - self.appended:, :]

    # -- the MLP's hidden units (register neurons) ----------------------------------------------
    def mlp_activation(self, block: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        """The module whose output is ``block``'s MLP hidden activation ``[batch, tokens, hidden]``
        (after the non-linearity, before the output projection): where a forward hook reads or
        edits single neurons. A gated MLP (SwiGLU) has no such module and raises."""
        raise NotImplementedError

    def mlp_output(self, block: nn.Module) -> nn.Linear:  # pragma: no cover - abstract
        """The MLP's output projection (``weight`` [width, hidden]: column n is what neuron n writes)."""
        raise NotImplementedError

    def sequence_end_hook(self, fn) -> torch.utils.hooks.RemovableHandle:  # pragma: no cover - abstract
        """Register ``fn(x) -> x`` on the token sequence after the last block, before the pooling and
        the final norm (where appended tokens are removed again); returns the hook's handle."""
        raise NotImplementedError

    # -- the hook point at a block's input ------------------------------------------------------
    def block_input(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """The residual stream a block's forward receives, from a forward pre-hook's arguments."""
        return args[0] if args else kwargs[self.input_keyword]

    def with_block_input(self, args: tuple, kwargs: dict, x: torch.Tensor) -> tuple[tuple, dict]:
        """A forward pre-hook's (args, kwargs) with the block's input replaced by ``x``."""
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, self.input_keyword: x}

    input_keyword: ClassVar[str] = "x"

    # -- attention ------------------------------------------------------------------------------
    def pre_norm(self, block: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        """The layer norm ahead of ``block``'s attention (its output is what the attention reads)."""
        raise NotImplementedError

    def query_key(self, block: nn.Module, z: torch.Tensor, kwargs: dict | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, float]:  # pragma: no cover - abstract
        """Queries and keys ``[batch, heads, tokens, d_head]`` of ``block`` for ``z``, the output
        of its pre-norm, with the scale multiplying q k^T. ``kwargs`` are the block's forward
        keyword arguments (rotary embeddings for EVA/PE)."""
        raise NotImplementedError

    def attention_probs(self, block: nn.Module, x: torch.Tensor, kwargs: dict | None = None,
                        normalised: bool = False) -> torch.Tensor:
        """softmax(scale q k^T) per head ``[batch, heads, query, key]`` for the block input ``x``
        (or, ``normalised=True``, its pre-norm's output), recomputed in fp32 whatever the autocast
        context (thresholds on these probabilities must not depend on the forward's precision)."""
        with torch.autocast(x.device.type, enabled=False):
            z = x.float() if normalised else self.pre_norm(block)(x.float())
            q, k, scale = self.query_key(block, z.float(), kwargs)
            return attention_weights(getattr(block, "attn", None), (q.float() @ k.float().transpose(-2, -1)) * scale)

    def key_affine(self, block: nn.Module, z: torch.Tensor, position: int, kwargs: dict | None = None,
                   chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """The key of token ``position`` as an affine map of that token's pre-norm output ``z_t``:
        ``k = z_t @ weight + offset`` (``[width, heads * d_head]`` and ``[heads * d_head]``, heads
        first), probed through :meth:`query_key` (adapters and rotary embeddings included) with
        the first sequence of ``z`` [B, T, width] as the other tokens. Exact when a token's key is
        affine in its own input (linear projections, rotations); a q/k norm makes it approximate,
        which callers check. Families whose keys do not depend on the position override this with
        a one-token probe."""
        width = z.shape[-1]
        with torch.no_grad(), torch.autocast(z.device.type, enabled=False):
            probes = torch.cat([z.new_zeros(1, width, dtype=torch.float32),
                                torch.eye(width, device=z.device, dtype=torch.float32)])
            rows = []
            for part in probes.split(chunk):
                sequence = z[:1].float().expand(len(part), -1, -1).clone()
                sequence[:, position] = part
                _, k, _ = self.query_key(block, sequence, kwargs)  # [n, heads, T, d_head]
                rows.append(k[:, :, position].reshape(len(part), -1).float())
            keys = torch.cat(rows)
        return keys[1:] - keys[0], keys[0]

    # -- the block decomposition (direct logit attribution) --------------------------------------
    @property
    def pools_cls(self) -> bool:  # pragma: no cover - abstract
        """Whether the pooled image feature is the read-out of the CLS token alone (what direct
        logit attribution decomposes)."""
        raise NotImplementedError

    def mlp_norm(self, block: nn.Module) -> nn.Module:  # pragma: no cover - abstract
        """The layer norm ahead of ``block``'s MLP: its input is the stream after the attention."""
        raise NotImplementedError

    def head_writes(self, block: nn.Module, z: torch.Tensor, kwargs: dict | None = None,
                    query: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:  # pragma: no cover - abstract
        """What each attention head of ``block`` writes into token ``query``'s stream for ``z``,
        the pre-norm's output: ``[B, heads, width]`` through the output projection and the layer
        scale (adapters included), and the output bias through the layer scale ``[width]`` (None
        without one). The block's attention branch at ``query`` is their sum. A layer norm inside
        the attention (EVA02's sub-LN) is linearised with its scale frozen on the joined heads, as
        direct logit attribution freezes the final norm's, so the sum stays exact; a block whose
        branch does not split so (a post-norm block, a gate) raises."""
        raise NotImplementedError

    def attention_dropout(self, block: nn.Module) -> float:  # pragma: no cover - abstract
        """The dropout probability on ``block``'s attention probabilities."""
        raise NotImplementedError

    def lora_sites(self, block: nn.Module, targets: Sequence[str]) -> list[LoRASite]:  # pragma: no cover
        """Where LoRA's ``targets`` (q, k, v, o or the fused qkv) sit in ``block``."""
        raise NotImplementedError

    # -- read-out into the joint space ----------------------------------------------------------
    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Every token through the tower's head as if it were the pooled token:
        ``[..., tokens, width] -> [..., tokens, embed_dim]``, in fp32."""
        affine = self.readout_affine()
        with torch.autocast(x.device.type, enabled=False):
            x = x.float()
            z = torch.nn.functional.layer_norm(x, x.shape[-1:], affine.gamma.float(), affine.beta.float(),
                                               self.readout_eps)
            if affine.projection is not None:
                z = z @ affine.projection.float()
            if affine.bias is not None:
                z = z + affine.bias.float()
            return z

    readout_eps: float = 1e-5

    def readout_affine(self) -> ReadoutAffine:  # pragma: no cover - abstract
        raise NotImplementedError


_FAMILIES: list[type[VisionTower]] = []
_ADAPTERS: weakref.WeakKeyDictionary[nn.Module, VisionTower] = weakref.WeakKeyDictionary()


def register_tower(cls: type[VisionTower]) -> type[VisionTower]:
    """Register an adapter class (a decorator); later registrations are tried first."""
    if cls not in _FAMILIES:
        _FAMILIES.insert(0, cls)
    return cls


_BUILTIN = ("cdfsl_core.towers.openclip", "cdfsl_core.towers.timm_trunks")
_loaded = False


def _load_builtin() -> None:
    """Import the built-in families on first use (open_clip and timm are slow to import, and the
    commands' ``--help`` must not pay for them), then the installed plug-ins' families (entry-point
    group ``cdfsl.towers``: a module whose adapter class is decorated with :func:`register_tower`),
    which are tried before the built-in ones."""
    global _loaded
    if not _loaded:
        import importlib

        from cdfsl_core.plugins import load_plugins

        for name in _BUILTIN:
            importlib.import_module(name)
        _loaded = True
        load_plugins("cdfsl.towers")


def tower_families() -> list[type[VisionTower]]:
    """The registered adapter classes, the most recently registered first."""
    _load_builtin()
    return list(_FAMILIES)


def _find_module(model: nn.Module) -> nn.Module:
    _load_builtin()
    for candidate in (model, getattr(model, "visual", None), getattr(getattr(model, "model", None), "visual", None)):
        if isinstance(candidate, nn.Module) and any(f.matches(candidate) for f in _FAMILIES):
            return candidate
    families = ", ".join(f.family for f in _FAMILIES)
    raise ConfigError(f"{type(model).__name__} holds no vision tower of a supported family ({families}); "
                      "pass a CLIP (its .visual), a FewShotCLIP (its .model.visual) or the tower itself.")


def vision_tower(model: nn.Module | VisionTower) -> VisionTower:
    """The adapter of the vision tower in ``model`` (a CLIP, a FewShotCLIP, the tower itself, or an
    adapter already), one per tower module."""
    if isinstance(model, VisionTower):
        return model
    module = _find_module(model)
    adapter = _ADAPTERS.get(module)
    if adapter is None:
        adapter = next(f for f in _FAMILIES if f.matches(module))(module)
        _ADAPTERS[module] = adapter
    return adapter
