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
import torch.nn.functional as F
from torch import nn

from cdfsl_core.errors import ConfigError
from cdfsl_core.token_text import (
    TEXT_NORMS,
    atha_class_vectors,
    head_tail_sets,
    project_tokens,
    sum_score,
    tir_weights,
    token_class_similarity,
)

__all__ = ["ATHA", "ATHAConfig", "EDIT_STATISTICS", "Intervention", "NoIntervention", "TIR", "TIRConfig"]

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
    def measuring(self) -> Iterator[dict[int, dict[str, float]]]:
        """Within the block, forwards add what the intervention measures about its own action,
        per block (e.g. ATHA's edit size); the yielded dict is filled as forwards run. Nothing by
        default."""
        yield {}

    @contextmanager
    def active(self, visual: nn.Module, text: torch.Tensor | None) -> Iterator[None]:
        resblocks = visual.transformer.resblocks
        indices = self.blocks(len(resblocks))
        if not indices:
            yield
            return
        if text is None:
            raise ConfigError(f"{self.name} needs class text features.")
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
        raise ConfigError(f"{name} blocks {bad} out of range for a vision tower of {n_blocks} blocks (0..{n_blocks - 1}).")
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
        # The Sum score only selects (its counts carry no gradient): computed without autograd,
        # in fp32 whatever the autocast context.
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            projected = project_tokens(state["visual"], x[:, 1:].float())
            counts = sum_score(token_class_similarity(projected, state["text"]), self.config.rho)
            weights = tir_weights(counts, state["text"].shape[0], self.config.lam)
            weights = torch.cat([weights.new_ones(len(x), 1), weights], dim=1)  # CLS keeps weight 1
        return x * weights.unsqueeze(-1).to(x.dtype)


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
    text_norm: str = "none"  # class vectors from the read-out as it is ('none', the authors') or L2-normalised ('unit')


EDIT_STATISTICS = ("token_norm", "head_vector_norm", "tail_vector_norm", "head_edit", "tail_edit")


class ATHA(Intervention):
    """Adaptive tail-head alignment: pull head tokens toward their best class vector and push tail
    tokens away from a class vector, with learnable per-block strengths alpha and beta.

    The edit before block i is ``x_j + alpha_i u~_{c+_j}`` for head tokens and
    ``x_j - beta_i u~_{c-_j}`` for tail tokens. It is computed as one product of a small
    ``[batch, tokens, classes]`` coefficient tensor with the class vectors ``[classes, width]``:
    no per-token copy of the vectors. The selection (similarities, head and tail sets, c+ and c-)
    carries no gradient and runs in fp32; the gradient reaches alpha, beta and, through the class
    vectors, the text side.
    """

    name = "atha"

    def __init__(self, n_blocks: int, config: ATHAConfig = ATHAConfig()) -> None:
        super().__init__()
        if config.tail_class not in TAIL_CLASS_CHOICES:
            raise ConfigError(f"ATHA tail_class={config.tail_class!r}; expected one of {TAIL_CLASS_CHOICES}.")
        if config.text_norm not in TEXT_NORMS:
            raise ConfigError(f"ATHA text_norm={config.text_norm!r}; expected one of {TEXT_NORMS}.")
        self.config = config
        self.n_blocks = n_blocks
        init_block = config.alpha_init_block if config.alpha_init_block is not None else n_blocks // 2
        _check_blocks("ATHA alpha_init_block", (init_block,), n_blocks)
        self.init_block = init_block
        self.alpha = nn.Parameter(torch.zeros(n_blocks))  # one per vision block
        self.beta = nn.Parameter(torch.zeros(n_blocks))
        self._measured: dict[int, dict[str, float]] | None = None
        self.reset_parameters()

    def blocks(self, n_blocks: int) -> list[int]:
        if n_blocks != self.n_blocks:
            raise ConfigError(f"ATHA was built for {self.n_blocks} blocks, the model has {n_blocks}.")
        blocks = self.config.blocks if self.config.blocks is not None else tuple(range(n_blocks))
        return _check_blocks("ATHA", blocks, n_blocks)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.alpha.zero_()
        self.alpha[self.init_block] = self.config.alpha_init
        self.beta.zero_()

    def prepare(self, visual: nn.Module, text: torch.Tensor) -> dict:
        vectors = atha_class_vectors(visual, text, self.config.text_norm)  # [C, width] fp32, once per forward
        with torch.no_grad():
            unit = F.normalize(vectors.detach(), dim=-1)
        return {"vectors": vectors, "unit": unit}

    def selection(self, tokens: torch.Tensor, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head and tail coefficients for ``tokens`` [B, L, width] and unit class vectors [C, width]:
        ``[B, L, C]`` one-hot (or 1/C for ``tail_class='mean'``) rows on head tokens' best class
        and on tail tokens' pushed class, zero elsewhere. fp32, no gradient."""
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            tokens = tokens.float()
            similarity = (tokens @ unit.T) / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [B, L, C] cosines
            best, best_class = similarity.max(dim=-1)
            head, tail = head_tail_sets(best, self.config.rho_head, self.config.rho_tail)
            n_classes = unit.shape[0]
            head_coef = F.one_hot(best_class, n_classes).float() * head.unsqueeze(-1)
            if self.config.tail_class == "least":
                tail_coef = F.one_hot(similarity.argmin(dim=-1), n_classes).float()
            elif self.config.tail_class == "most":
                tail_coef = F.one_hot(best_class, n_classes).float()
            else:
                tail_coef = torch.full_like(similarity, 1.0 / n_classes)
            return head_coef, tail_coef * tail.unsqueeze(-1)

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        start = 0 if self.config.include_cls else 1
        head_coef, tail_coef = self.selection(x[:, start:], state["unit"])
        if start:  # CLS gets a zero row: one product and one add edit the whole stream, no concatenation
            head_coef, tail_coef = F.pad(head_coef, (0, 0, 1, 0)), F.pad(tail_coef, (0, 0, 1, 0))
        if self._measured is not None:
            self._measure(block, x, start, head_coef, tail_coef, state["vectors"])
        coefficients = self.alpha[block] * head_coef - self.beta[block] * tail_coef  # [B, 1 + L, C]
        return x + (coefficients @ state["vectors"]).to(x.dtype)

    @torch.no_grad()
    def _measure(self, block: int, x: torch.Tensor, start: int, head_coef: torch.Tensor, tail_coef: torch.Tensor,
                 vectors: torch.Tensor) -> None:
        """Accumulate the mean norm of the ranked tokens entering ``block`` and the mean norm of the
        class vector each head / tail token is moved along."""
        sums = self._measured.setdefault(block, {"tokens": 0.0, "token_norm": 0.0, "head": 0.0, "head_vector_norm": 0.0,
                                                 "tail": 0.0, "tail_vector_norm": 0.0})
        ranked = x[:, start:].float()
        sums["tokens"] += ranked.shape[0] * ranked.shape[1]
        sums["token_norm"] += float(ranked.norm(dim=-1).sum())
        for kind, coef in (("head", head_coef), ("tail", tail_coef)):
            moved = coef.sum(dim=-1) > 0  # [B, T]
            sums[kind] += float(moved.sum())
            sums[f"{kind}_vector_norm"] += float((coef @ vectors.float()).norm(dim=-1)[moved].sum())

    @contextmanager
    def measuring(self) -> Iterator[dict[int, dict[str, float]]]:
        """How hard ATHA pushes, per block, over the forwards run within the block: the mean norm
        of the ranked tokens entering the block (``token_norm``), the mean norm of the class
        vector a head / tail token moves along (``head_vector_norm``, ``tail_vector_norm``), and
        the edit relative to the tokens it edits, ``head_edit = |alpha_i| head_vector_norm /
        token_norm`` and ``tail_edit = |beta_i| tail_vector_norm / token_norm``, with the
        strengths as they are when the block exits."""
        result: dict[int, dict[str, float]] = {}
        self._measured = {}
        try:
            yield result
        finally:
            sums, self._measured = self._measured, None
            alpha, beta = self.alpha.detach().cpu().tolist(), self.beta.detach().cpu().tolist()
            for block, s in sorted(sums.items()):
                token_norm = s["token_norm"] / s["tokens"] if s["tokens"] else float("nan")
                head_norm = s["head_vector_norm"] / s["head"] if s["head"] else float("nan")
                tail_norm = s["tail_vector_norm"] / s["tail"] if s["tail"] else float("nan")
                result[block] = {"alpha": alpha[block], "beta": beta[block], "token_norm": token_norm,
                                 "head_vector_norm": head_norm, "tail_vector_norm": tail_norm,
                                 "head_edit": abs(alpha[block]) * head_norm / token_norm,
                                 "tail_edit": abs(beta[block]) * tail_norm / token_norm}
