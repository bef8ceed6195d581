"""ATHA: adaptive tail-head alignment (ICML 2026), as forward pre-hooks.

Before every vision block, the patch tokens most similar to a class vector (the head) are pulled
toward it and the least similar (the tail) pushed away, with learnable per-block strengths alpha
and beta. The class vectors solve P^T u = t_c for the text read-out t_c as the text tower gives it
(the authors' scale). See docs/concepts/methods.md, ATHA.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.config import ATHAConfig
from cdfsl_core.errors import ConfigError
from cdfsl_core.interventions.base import Intervention, check_blocks, register_intervention
from cdfsl_core.token_text import TEXT_NORMS, atha_class_vectors, head_tail_sets
from cdfsl_core.towers import vision_tower

__all__ = ["ATHA", "ATHAConfig", "EDIT_STATISTICS", "TAIL_CLASS_CHOICES"]

TAIL_CLASS_CHOICES = ("least", "most", "mean")


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
    supports_episode_batch = True
    reported_statistics = ("alpha", "beta", "head_edit", "tail_edit")

    def __init__(self, n_blocks: int, config: ATHAConfig = ATHAConfig()) -> None:
        super().__init__()
        if config.tail_class not in TAIL_CLASS_CHOICES:
            raise ConfigError(f"ATHA tail_class={config.tail_class!r}; expected one of {TAIL_CLASS_CHOICES}.")
        if config.text_norm not in TEXT_NORMS:
            raise ConfigError(f"ATHA text_norm={config.text_norm!r}; expected one of {TEXT_NORMS}.")
        self.config = config
        self.n_blocks = n_blocks
        init_block = config.alpha_init_block if config.alpha_init_block is not None else n_blocks // 2
        check_blocks("ATHA alpha_init_block", (init_block,), n_blocks)
        self.init_block = init_block
        self.alpha = nn.Parameter(torch.zeros(n_blocks))  # one per vision block
        self.beta = nn.Parameter(torch.zeros(n_blocks))
        self._measured: dict[int, dict[str, float]] | None = None
        self.reset_parameters()

    def blocks(self, n_blocks: int) -> list[int]:
        if n_blocks != self.n_blocks:
            raise ConfigError(f"ATHA was built for {self.n_blocks} blocks, the model has {n_blocks}.")
        blocks = self.config.blocks if self.config.blocks is not None else tuple(range(n_blocks))
        return check_blocks("ATHA", blocks, n_blocks)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.alpha.zero_()
        self.alpha[self.init_block] = self.config.alpha_init
        self.beta.zero_()

    def episode_log(self) -> dict[str, list[float]]:
        """The learned strengths per block."""
        return {"alpha": [round(v, 6) for v in self.alpha.tolist()], "beta": [round(v, 6) for v in self.beta.tolist()]}

    def prepare(self, visual: nn.Module, text: torch.Tensor) -> dict:
        vectors = atha_class_vectors(visual, text, self.config.text_norm)  # [C, width] fp32, once per forward
        with torch.no_grad():
            unit = F.normalize(vectors.detach(), dim=-1)
        return {"vectors": vectors, "unit": unit, "tower": vision_tower(visual)}

    def selection(self, tokens: torch.Tensor, unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Head and tail coefficients for ``tokens`` [B, L, width] and unit class vectors [C, width]:
        ``[B, L, C]`` one-hot (or 1/C for ``tail_class='mean'``) rows on head tokens' best class
        and on tail tokens' pushed class, zero elsewhere. fp32, no gradient. (E episodes at once:
        tokens [E, B, L, width], unit [E, 1, C, width], coefficients [E, B, L, C].)"""
        with torch.no_grad(), torch.autocast(tokens.device.type, enabled=False):
            tokens = tokens.float()
            similarity = (tokens @ unit.mT) / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [..., L, C] cosines
            best, best_class = similarity.max(dim=-1)
            head, tail = head_tail_sets(best.reshape(-1, best.shape[-1]), self.config.rho_head, self.config.rho_tail)
            head, tail = head.reshape(best.shape), tail.reshape(best.shape)
            n_classes = unit.shape[-2]
            head_coef = F.one_hot(best_class, n_classes).float() * head.unsqueeze(-1)
            if self.config.tail_class == "least":
                tail_coef = F.one_hot(similarity.argmin(dim=-1), n_classes).float()
            elif self.config.tail_class == "most":
                tail_coef = F.one_hot(best_class, n_classes).float()
            else:
                tail_coef = torch.full_like(similarity, 1.0 / n_classes)
            return head_coef, tail_coef * tail.unsqueeze(-1)

    def edit(self, block: int, x: torch.Tensor, state: dict) -> torch.Tensor:
        # the patch tokens are ranked (and the prefix, CLS and registers, too with include_cls)
        tower = state["tower"]
        start = 0 if self.config.include_cls else tower.n_prefix
        end = tower.appended  # tokens appended after the patches (a test-time register) are not ranked
        head_coef, tail_coef = self.selection(tower.image_tokens(x)[..., start:, :], state["unit"])
        if start or end:  # zero rows for the prefix and the appended tokens: one product and one add edit the stream
            head_coef, tail_coef = F.pad(head_coef, (0, 0, start, end)), F.pad(tail_coef, (0, 0, start, end))
        if self._measured is not None:
            self._measure(block, tower.image_tokens(x), start, tower.image_tokens(head_coef),
                          tower.image_tokens(tail_coef), state["vectors"])
        # the strengths: [n_blocks] (one episode) or [E, n_blocks] (E episodes, x [E, B, 1 + L, width])
        params = state.get("params") or {"alpha": self.alpha, "beta": self.beta}
        alpha, beta = params["alpha"][..., block], params["beta"][..., block]
        shape = alpha.shape + (1,) * (head_coef.dim() - alpha.dim())
        coefficients = alpha.reshape(shape) * head_coef - beta.reshape(shape) * tail_coef  # [..., B, 1 + L, C]
        return x + (coefficients @ state["vectors"]).to(x.dtype)

    @torch.no_grad()
    def _measure(self, block: int, x: torch.Tensor, start: int, head_coef: torch.Tensor, tail_coef: torch.Tensor,
                 vectors: torch.Tensor) -> None:
        """Accumulate, per episode, the norm sum of the ranked tokens entering ``block`` and of the
        class vector each head / tail token is moved along (one episode: x [B, T, width]; E
        episodes: x [E, B, T, width], vectors [E, 1, C, width]); float64 sums on the device, read
        once when the measuring block exits."""
        if x.dim() == 3:  # one episode: an episode axis of 1
            x, head_coef, tail_coef, vectors = x[None], head_coef[None], tail_coef[None], vectors[None, None]
        episodes = x.shape[0]
        zeros = lambda: torch.zeros(episodes, dtype=torch.float64, device=x.device)  # noqa: E731
        sums = self._measured.setdefault(block, {key: zeros() for key in _SUMS})
        ranked = x[..., start:, :].float()
        sums["tokens"] += ranked.shape[1] * ranked.shape[2]
        sums["token_norm"] += ranked.norm(dim=-1).sum(dim=(1, 2)).double()
        for kind, coef in (("head", head_coef), ("tail", tail_coef)):
            moved = coef.sum(dim=-1) > 0  # [E, B, T]
            sums[kind] += moved.sum(dim=(1, 2)).double()
            norms = (coef @ vectors.float()).norm(dim=-1)
            sums[f"{kind}_vector_norm"] += torch.where(moved, norms, 0).sum(dim=(1, 2)).double()

    @contextmanager
    def measuring(self) -> Iterator[dict[int, dict[str, float]]]:
        """How hard ATHA pushes, per block, over the forwards run within the block: the mean norm
        of the ranked tokens entering the block (``token_norm``), the mean norm of the class
        vector a head / tail token moves along (``head_vector_norm``, ``tail_vector_norm``), and
        the edit relative to the tokens it edits, ``head_edit = |alpha_i| head_vector_norm /
        token_norm`` and ``tail_edit = |beta_i| tail_vector_norm / token_norm``, with the
        strengths as they are when the block exits."""
        with self.measuring_episodes(1, {"alpha": self.alpha[None], "beta": self.beta[None]}) as per_episode:
            result: dict[int, dict[str, float]] = {}
            yield result
        result.update(per_episode[0])

    @contextmanager
    def measuring_episodes(self, episodes: int, params: dict[str, torch.Tensor]) -> Iterator[list[dict]]:
        """:meth:`measuring` for E episodes edited together (``active(..., episodes=E, params)``):
        one dict per episode, its strengths from ``params`` ([E, n_blocks])."""
        results: list[dict[int, dict[str, float]]] = [{} for _ in range(episodes)]
        self._measured = {}
        try:
            yield results
        finally:
            sums, self._measured = self._measured, None
            alphas, betas = params["alpha"].detach().cpu().tolist(), params["beta"].detach().cpu().tolist()
            for block, s in sorted(sums.items()):
                values = {key: (v.tolist() if torch.is_tensor(v) else [v] * episodes) for key, v in s.items()}
                for e, result in enumerate(results):
                    result[block] = _statistics(alphas[e][block], betas[e][block],
                                                {key: v[e] for key, v in values.items()})


_SUMS = ("tokens", "token_norm", "head", "head_vector_norm", "tail", "tail_vector_norm")


def _statistics(alpha: float, beta: float, s: dict[str, float]) -> dict[str, float]:
    """One block's statistics of :meth:`ATHA.measuring` from its sums."""
    token_norm = s["token_norm"] / s["tokens"] if s["tokens"] else float("nan")
    head_norm = s["head_vector_norm"] / s["head"] if s["head"] else float("nan")
    tail_norm = s["tail_vector_norm"] / s["tail"] if s["tail"] else float("nan")
    return {"alpha": alpha, "beta": beta, "token_norm": token_norm, "head_vector_norm": head_norm,
            "tail_vector_norm": tail_norm, "head_edit": abs(alpha) * head_norm / token_norm,
            "tail_edit": abs(beta) * tail_norm / token_norm}


register_intervention("atha", lambda n_blocks, config: ATHA(n_blocks, config), ATHAConfig,
                      "adaptive tail-head alignment before every block (ATHA, ICML 2026)")
