"""LoRA on a tower's attention projections, one adapter per projection, owned by the method that
trains it. Where the projections sit is the tower adapter's answer (``lora_sites`` of
:mod:`cdfsl_core.towers`): open_clip's ``nn.MultiheadAttention`` is adapted whole
(:class:`LoRAAttention`), timm's ``nn.Linear`` projections one by one (:class:`LoRALinear`, with
each target's adapter on its rows of a fused ``qkv``).

open_clip's blocks hold an ``nn.MultiheadAttention`` whose q, k and v share one fused
in-projection. CLIP-LoRA and the ATHA/TIR code put a separate rank-r adapter on each of q, k and
v; one rank-r adapter on the fused matrix (what peft does for ``nn.MultiheadAttention``) is a
different, smaller model, so it is only the option ``targets=("qkv",)``. :class:`LoRAAttention`
computes a block's attention plus ``scale * B_t A_t dropout(x)`` on each chosen projection ``t`` in
``q, k, v, o``.

:class:`LoRAAdapters` holds one method's adapters for a model. They are not put into the model:
``with adapters.installed():`` swaps them in for the forwards inside the block and puts the
original attention modules back on exit, also when the forward raises. So any number of methods
adapt one loaded model, each with its own adapters, the frozen weights shared and never copied,
and a method that is built, trained or deleted never changes another's logits. With B = 0 (the
initial state) the adapted model computes what the base model computes.

**Episode axis.** ``LoRAAdapters(model, config, episodes=E)`` holds E independent sets of adapters
stacked along a leading axis (A ``[E, r, width]``, B ``[E, out, r]``): the forwards inside
:meth:`LoRAAdapters.installed` then take a batch whose first dimension is E equal parts, part e
adapted by episode e's matrices through batched matrix products, not E copies of the model
(:mod:`cdfsl_core.episode_batch` trains E episodes this way). Dropout draws each episode's mask
from that episode's own generator (:meth:`LoRAAdapters.set_generators`), in the order one
episode alone draws it, so episode e's masks are the masks it draws when trained alone.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import replace
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.config import LoRAConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.towers import LoRASite, text_tower, vision_tower

__all__ = ["LoRAAdapters", "LoRAAttention", "LoRAConfig", "LoRALinear"]

_SLICES = {"q": 0, "k": 1, "v": 2}


def dropout(x: torch.Tensor, p: float, training: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """``F.dropout(x, p, training)`` with the mask drawn from ``generator`` (None: the default one).

    Computed as PyTorch computes dropout on the CPU (a Bernoulli(1 - p) mask scaled by 1 / (1 - p)),
    so with the default generator it equals ``F.dropout`` bit for bit there; on every device the
    mask depends only on the generator's state and the number of elements, which lets E episodes
    trained together draw the masks each draws alone."""
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return torch.zeros_like(x)
    noise = torch.empty_like(x).bernoulli_(1 - p, generator=generator)
    noise.div_(1 - p)
    return x * noise


class _Adapters(nn.Module):
    """Rank-r adapters ``scale * B_t A_t dropout(x)``, one per target t (A Kaiming-uniform, B zero),
    optionally E sets stacked along a leading episode axis."""

    def __init__(self, shapes: dict[str, tuple[int, int]], config: LoRAConfig, episodes: int | None,
                 device: torch.device) -> None:
        super().__init__()
        self.config = config
        self.scale = config.scale
        self.dropout_p = config.dropout
        self.episodes = episodes  # None: one set of adapters; E: E sets stacked along a leading axis
        self.generators: list[torch.Generator] | None = None  # per-episode dropout generators (episodes only)
        lead = () if episodes is None else (episodes,)
        self.lora_A = nn.ParameterDict()  # target -> [(E,) rank, in_features]
        self.lora_B = nn.ParameterDict()  # target -> [(E,) out_features, rank]
        for target, (in_features, out_features) in shapes.items():
            self.lora_A[target] = nn.Parameter(torch.zeros(*lead, config.rank, in_features, device=device))
            self.lora_B[target] = nn.Parameter(torch.zeros(*lead, out_features, config.rank, device=device))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """A Kaiming-uniform (as nn.Linear), B zero: the adapted model equals the base one."""
        with torch.no_grad():
            for target in self.lora_A:
                a = self.lora_A[target]
                bound = 1 / math.sqrt(a.shape[-1])  # kaiming_uniform_(a=sqrt(5)) on [r, D]
                a.copy_(torch.rand(a.shape, generator=generator, device="cpu").mul_(2 * bound).sub_(bound))
                self.lora_B[target].zero_()

    def delta_weight(self, target: str) -> torch.Tensor:
        """``scale * B A`` of one projection: [(E,) out_features, in_features]."""
        return self.scale * self.lora_B[target] @ self.lora_A[target]

    def _adapter(self, x: torch.Tensor, target: str) -> torch.Tensor:
        a, b = self.lora_A[target], self.lora_B[target]
        if self.episodes is None:
            x = dropout(x, self.dropout_p, self.training)
            return self.scale * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
        # E episodes: [E * batch, ..., width] -> [E, batch * ..., width], episode e's part by its own matrices
        parts = x.reshape(self.episodes, -1, x.shape[-1])
        if self.training and self.dropout_p:
            generators = self.generators or [None] * self.episodes
            parts = torch.stack([dropout(part, self.dropout_p, True, g) for part, g in zip(parts, generators)])
        out = torch.bmm(torch.bmm(parts, a.to(x.dtype).mT), b.to(x.dtype).mT)
        return self.scale * out.reshape(*x.shape[:-1], out.shape[-1])


class LoRALinear(_Adapters):
    """An adapted ``nn.Linear`` (timm's fused ``qkv``, EVA's ``q_proj``, an output ``proj``): the
    base's output plus each target's adapter on its rows of the output (``targets``: target ->
    rows, None for all). The base is shared and frozen, held as a plain attribute."""

    def __init__(self, base: nn.Linear, targets: dict[str, slice | None], config: LoRAConfig,
                 episodes: int | None = None) -> None:
        if not isinstance(base, nn.Linear):
            raise ValueError(f"LoRALinear adapts an nn.Linear, not a {type(base).__name__}.")
        rows = {t: (slice(0, base.out_features) if r is None else r) for t, r in targets.items()}
        super().__init__({t: (base.in_features, r.stop - r.start) for t, r in rows.items()}, config, episodes,
                         base.weight.device)
        self.rows = rows
        object.__setattr__(self, "base", base)  # shared, frozen: not registered as a submodule

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The base's ``weight`` with the adapters folded in (a new tensor)."""
        if self.episodes is not None:
            raise ValueError("merged_weights of stacked adapters: merge one episode's adapters (load them into a "
                             "method first).")
        with torch.no_grad():
            weight = self.base.weight.detach().clone()
            for target, rows in self.rows.items():
                weight[rows] += self.delta_weight(target)
        return {"weight": weight}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        total = out.shape[-1]
        for target, rows in self.rows.items():
            delta = self._adapter(x, target)
            out = out + (delta if delta.shape[-1] == total else F.pad(delta, (rows.start, total - rows.stop)))
        return out


class LoRAAttention(_Adapters):
    """An adapted ``nn.MultiheadAttention`` (batch_first): the base's computation plus the adapters.

    The base module is shared and frozen: it is held as a plain attribute, not a submodule, so the
    parameters of a :class:`LoRAAttention` are its adapters only."""

    def __init__(self, base: nn.MultiheadAttention, config: LoRAConfig, episodes: int | None = None) -> None:
        if not isinstance(base, nn.MultiheadAttention) or not base.batch_first or not base._qkv_same_embed_dim:
            raise ValueError("LoRAAttention expects open_clip's batch_first attention with a fused in-projection.")
        width = base.embed_dim
        shapes = {t: (width, 3 * width if t == "qkv" else width) for t in config.targets}
        super().__init__(shapes, config, episodes, base.in_proj_weight.device)
        object.__setattr__(self, "base", base)  # shared, frozen: not registered as a submodule

    @property
    def num_heads(self) -> int:
        return self.base.num_heads

    def _rows(self, target: str) -> slice:
        width = self.base.embed_dim
        if target == "qkv":
            return slice(0, 3 * width)
        start = _SLICES[target] * width
        return slice(start, start + width)

    def merged_weights(self) -> dict[str, torch.Tensor]:
        """The base's ``in_proj_weight`` and ``out_proj.weight`` with the adapters folded in, as new
        tensors (the shared base is left as it is): what a merged checkpoint holds."""
        if self.episodes is not None:
            raise ValueError("merged_weights of stacked adapters: merge one episode's adapters (load them into a "
                             "method first).")
        with torch.no_grad():
            in_proj = self.base.in_proj_weight.detach().clone()
            out_proj = self.base.out_proj.weight.detach().clone()
            for target in self.lora_A:
                if target == "o":
                    out_proj += self.delta_weight(target)
                else:
                    in_proj[self._rows(target)] += self.delta_weight(target)
        return {"in_proj_weight": in_proj, "out_proj.weight": out_proj}

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
        q, k, v = self.project_qkv(query, key, value)  # [batch, token, width] each
        batch, tokens, width = q.shape
        heads = self.base.num_heads
        q, k, v = (t.reshape(batch, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
        dropout = self.base.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout)
        out = out.transpose(1, 2).reshape(batch, tokens, width)
        result = self.base.out_proj(out)
        if "o" in self.lora_A:
            result = result + self._adapter(out, "o")
        return result, None


def _tower_blocks(model: nn.Module, tower: str) -> tuple[object, Sequence[nn.Module]]:
    """A tower's adapter (vision or text, :mod:`cdfsl_core.towers`) and its blocks."""
    adapter = vision_tower(model) if tower == "visual" else text_tower(model)
    return adapter, adapter.blocks


def _build(site: LoRASite, config: LoRAConfig, episodes: int | None) -> _Adapters:
    module = site.module
    if isinstance(module, (LoRAAttention, LoRALinear)):
        raise ConfigError("this block has another method's adapters installed; build methods outside another "
                          "method's forward.")
    if isinstance(module, nn.MultiheadAttention):
        return LoRAAttention(module, replace(config, targets=tuple(site.targets)), episodes)
    return LoRALinear(module, site.targets, config, episodes)


class LoRAAdapters(nn.Module):
    """One method's LoRA for a model: an adapter for each chosen block's attention projections
    (where the tower's adapter says they are), installed only within :meth:`installed`. The model
    is held as a plain attribute (shared, never copied)."""

    def __init__(self, model: nn.Module, config: LoRAConfig, episodes: int | None = None) -> None:
        super().__init__()
        config.validate()
        self.episodes = episodes
        self.config = config
        sites: list[LoRASite] = []
        adapters = []
        for tower in config.towers:
            adapter_of_tower, blocks = _tower_blocks(model, tower)
            n_blocks = len(blocks)
            indices = range(n_blocks) if config.blocks is None else config.blocks
            for i in indices:
                if not 0 <= i < n_blocks:
                    raise ConfigError(f"LoRA block {i} out of range for the {tower} tower (0..{n_blocks - 1}).")
                try:
                    for site in adapter_of_tower.lora_sites(blocks[i], config.targets):
                        adapters.append(_build(site, config, episodes))
                        sites.append(site)
                except ConfigError as err:
                    raise ConfigError(f"{tower} block {i}: {err}") from None
        object.__setattr__(self, "_sites", sites)  # where each adapter goes (in the shared model)
        self.adapters = nn.ModuleList(adapters)
        self._depth = 0

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for adapter in self.adapters:
            adapter.reset_parameters(generator)

    def set_generators(self, generators: list[torch.Generator] | None) -> None:
        """Stacked adapters: episode e's dropout masks come from ``generators[e]``."""
        if generators is not None and len(generators) != self.episodes:
            raise ValueError(f"{len(generators)} generators for {self.episodes} episodes.")
        for adapter in self.adapters:
            adapter.generators = generators

    @contextmanager
    def installed(self) -> Iterator[None]:
        """The adapters in the model for the forwards inside the block (re-entrant); the original
        attention modules are back on exit, also when the forward raises."""
        if self._depth:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        swapped = []
        try:
            for site, adapter in zip(self._sites, self.adapters):
                if site.module is not adapter.base:
                    raise RuntimeError("another method's LoRA is installed in this model; methods adapt one model "
                                       "one forward at a time.")
                setattr(site.parent, site.attribute, adapter)
                swapped.append((site, adapter))
            self._depth = 1
            yield
        finally:
            self._depth = 0
            for site, adapter in swapped:
                setattr(site.parent, site.attribute, adapter.base)

    def merged_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """``model``'s state dict with these adapters folded into the attention weights (new tensors;
        the model is left as it is): a checkpoint of the adapted model that loads with ``load_clip``."""
        state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        names = {id(module): name for name, module in model.named_modules()}
        for adapter in self.adapters:
            prefix = names[id(adapter.base)]
            for key, value in adapter.merged_weights().items():
                state[f"{prefix}.{key}"] = value
        return state
