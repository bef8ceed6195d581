"""TIR: token re-weighting against the attention sink (CVPR 2026), as forward pre-hooks.

Before vision blocks 8 and 10 of 12 (``round(8n/12)``, ``round(10n/12)`` for other depths), each
patch token is scaled by the number m of classes whose top-k tokens contain it (the Sum score):
w(m) = 2, 1.5, 1, 0.5, 0 for m = 1..5 (5-way), w(0) = 1. See docs/concepts/methods.md, TIR.
"""

from __future__ import annotations

import torch

from cdfsl_core.config import TIRConfig
from cdfsl_core.interventions.base import Intervention, check_blocks, register_intervention
from cdfsl_core.token_text import project_tokens, sum_score, tir_weights, token_class_similarity
from cdfsl_core.towers import vision_tower

__all__ = ["TIR", "TIRConfig"]


class TIR(Intervention):
    """Re-weight patch tokens by their Sum score: tokens relevant to every class (sinks) are removed."""

    name = "tir"
    supports_episode_batch = True

    def __init__(self, config: TIRConfig = TIRConfig()) -> None:
        super().__init__()
        self.config = config

    def blocks(self, n_blocks: int) -> list[int]:
        if self.config.blocks is not None:
            return check_blocks("TIR", self.config.blocks, n_blocks)
        return sorted({min(n_blocks - 1, round(n_blocks * f)) for f in (8 / 12, 10 / 12)})

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        # The Sum score only selects (its counts carry no gradient): computed without autograd,
        # in fp32 whatever the autocast context.
        # x is [batch, prefix + L, width], or [E, batch, prefix + L, width] with text [E, 1, C, dim];
        # the prefix tokens (CLS, registers) are not ranked and keep weight 1.
        tower = state["tower"] if "tower" in state else vision_tower(state["visual"])
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            projected = project_tokens(tower, tower.patches(x).float())
            similarity = token_class_similarity(projected, state["text"])  # [..., L, C]
            counts = sum_score(similarity.reshape(-1, *similarity.shape[-2:]), self.config.rho)
            weights = tir_weights(counts.reshape(similarity.shape[:-1]), state["text"].shape[-2], self.config.lam)
            weights = torch.cat([weights.new_ones(*weights.shape[:-1], tower.n_prefix), weights,
                                 weights.new_ones(*weights.shape[:-1], tower.appended)], dim=-1)  # appended: kept
        return x * weights.unsqueeze(-1).to(x.dtype)




register_intervention("tir", lambda n_blocks, config: TIR(config), TIRConfig,
                      "token re-weighting by Sum score before two late blocks (TIR, CVPR 2026)")
