"""Token interventions on the visual residual stream: ATHA and TIR, as forward pre-hooks.

An intervention is an ``nn.Module`` (it owns its trainable parameters, if any) that edits the
residual stream entering chosen vision blocks. ``with intervention.active(visual, text):``
registers the pre-hooks for one forward and removes them on exit, also when the forward raises.
``text`` is the class text features the tokens are compared with ([n_classes, embed_dim]; by
default the text tower's read-out after its second-to-last block, see :mod:`cdfsl_core.text`).

Block defaults are the papers' choices for ViT-B/16 (12 blocks) carried to other depths:
TIR before blocks ``round(8n/12)`` and ``round(10n/12)`` (8 and 10 of 12; 4 and 5 of 6), ATHA's
initial alpha at block ``n // 2`` (6 of 12). Each can be set explicitly.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from cdfsl_core.token_text import (
    class_vectors_in_residual,
    head_tail_sets,
    project_tokens,
    sum_score,
    tir_weights,
    token_class_similarity,
)

__all__ = ["ATHA", "ATHAConfig", "Intervention", "NoIntervention", "TIR", "TIRConfig"]

TAIL_CLASS_CHOICES = ("least", "most", "mean")


class Intervention(nn.Module):
    """Base class: edits the patch tokens entering some vision blocks."""

    name = "none"

    def blocks(self, n_blocks: int) -> list[int]:
        return []

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def prepare(self, visual: nn.Module, text: torch.Tensor) -> dict:
        """Per-forward state computed once (e.g. class vectors), handed to every ``edit``."""
        return {"visual": visual, "text": text}

    def reset_parameters(self) -> None:
        """Back to the initial state (between episodes)."""

    @contextmanager
    def active(self, visual: nn.Module, text: torch.Tensor | None) -> Iterator[None]:
        resblocks = visual.transformer.resblocks
        indices = self.blocks(len(resblocks))
        if not indices:
            yield
            return
        if text is None:
            raise ValueError(f"{self.name} needs class text features.")
        state = self.prepare(visual, text)
        handles = []

        def make_hook(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict):
                x = args[0] if args else kwargs["q_x"]
                x = self.edit(index, x, state)
                if args:
                    return (x, *args[1:]), kwargs
                return args, {**kwargs, "q_x": x}

            return hook

        try:
            for i in indices:
                handles.append(resblocks[i].register_forward_pre_hook(make_hook(i), with_kwargs=True))
            yield
        finally:
            for handle in handles:
                handle.remove()


class NoIntervention(Intervention):
    name = "none"


def _check_blocks(name: str, blocks: tuple[int, ...], n_blocks: int) -> list[int]:
    bad = [b for b in blocks if not 0 <= b < n_blocks]
    if bad:
        raise ValueError(f"{name} blocks {bad} out of range for a vision tower of {n_blocks} blocks (0..{n_blocks - 1}).")
    return sorted(set(blocks))


@dataclass(frozen=True)
class TIRConfig:
    """TIR settings; defaults from the paper and the authors' code."""

    blocks: tuple[int, ...] | None = None  # before these vision blocks; None: round(8n/12), round(10n/12): 8, 10 of 12
    rho: float = 0.3  # top-k fraction per class, k = floor(rho L)
    lam: float = 0.5  # lambda of the weight rule (see token_text.tir_weights)


class TIR(Intervention):
    """Re-weight patch tokens by their Sum score: tokens relevant to every class (sinks) are removed."""

    name = "tir"

    def __init__(self, config: TIRConfig = TIRConfig()) -> None:
        super().__init__()
        self.config = config

    def blocks(self, n_blocks: int) -> list[int]:
        if self.config.blocks is not None:
            return _check_blocks("TIR", self.config.blocks, n_blocks)
        return sorted({min(n_blocks - 1, round(n_blocks * f)) for f in (8 / 12, 10 / 12)})

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        patches = x[:, 1:]
        similarity = token_class_similarity(project_tokens(state["visual"], patches), state["text"])
        counts = sum_score(similarity, self.config.rho)
        weights = tir_weights(counts, state["text"].shape[0], self.config.lam).to(x.dtype)
        return torch.cat([x[:, :1], patches * weights.unsqueeze(-1)], dim=1)


@dataclass(frozen=True)
class ATHAConfig:
    """ATHA settings; defaults from the paper and the authors' code (deviations are options)."""

    blocks: tuple[int, ...] | None = None  # before these vision blocks; None: all
    rho_head: float = 0.3  # head set: floor(rho_head L) tokens with the largest max-class similarity
    rho_tail: float = 0.2  # tail set: floor(rho_tail L) tokens with the smallest
    alpha_init: float = 0.8  # initial alpha at alpha_init_block, 0 elsewhere
    alpha_init_block: int | None = None  # None: n // 2 (6 of 12)
    tail_class: str = "least"  # push tail tokens away from the 'least' (code), 'most' similar class, or the 'mean'
    include_cls: bool = False  # True: rank CLS with the patches (the authors' code; we exclude it)


class ATHA(Intervention):
    """Adaptive tail-head alignment: pull head tokens toward their best class vector and push tail
    tokens away from a class vector, with learnable per-block strengths alpha and beta."""

    name = "atha"

    def __init__(self, n_blocks: int, config: ATHAConfig = ATHAConfig()) -> None:
        super().__init__()
        if config.tail_class not in TAIL_CLASS_CHOICES:
            raise ValueError(f"ATHA tail_class={config.tail_class!r}; expected one of {TAIL_CLASS_CHOICES}.")
        self.config = config
        self.n_blocks = n_blocks
        init_block = config.alpha_init_block if config.alpha_init_block is not None else n_blocks // 2
        _check_blocks("ATHA alpha_init_block", (init_block,), n_blocks)
        self.init_block = init_block
        self.alpha = nn.Parameter(torch.zeros(n_blocks))  # one per vision block
        self.beta = nn.Parameter(torch.zeros(n_blocks))
        self.reset_parameters()

    def blocks(self, n_blocks: int) -> list[int]:
        if n_blocks != self.n_blocks:
            raise ValueError(f"ATHA was built for {self.n_blocks} blocks, the model has {n_blocks}.")
        blocks = self.config.blocks if self.config.blocks is not None else tuple(range(n_blocks))
        return _check_blocks("ATHA", blocks, n_blocks)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.alpha.zero_()
        self.alpha[self.init_block] = self.config.alpha_init
        self.beta.zero_()

    def prepare(self, visual: nn.Module, text: torch.Tensor) -> dict:
        return {"vectors": class_vectors_in_residual(visual, text)}  # [C, width], once per forward

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        vectors = state["vectors"].to(x.dtype)
        start = 0 if self.config.include_cls else 1
        tokens = x[:, start:]
        similarity = token_class_similarity(tokens, vectors)  # [B, L, C]
        best, best_class = similarity.max(dim=-1)
        head, tail = head_tail_sets(best, self.config.rho_head, self.config.rho_tail)
        if self.config.tail_class == "least":
            tail_vectors = vectors[similarity.argmin(dim=-1)]
        elif self.config.tail_class == "most":
            tail_vectors = vectors[best_class]
        else:
            tail_vectors = vectors.mean(dim=0).expand_as(tokens)
        edit = (self.alpha[block] * head.unsqueeze(-1) * vectors[best_class]
                - self.beta[block] * tail.unsqueeze(-1) * tail_vectors)
        tokens = tokens + edit.to(x.dtype)
        return torch.cat([x[:, :start], tokens], dim=1)
