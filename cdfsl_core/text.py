"""The text side of a method: class prompts, CoOp context, and read-outs after any text block.

:class:`PromptLearner` holds the prompt token embeddings of every class; with CoOp it replaces
the embeddings of the template's leading words ("a photo of a") by learnable vectors initialised
from exactly those embeddings, so before training it computes what the zero-shot model computes.
:func:`encode_text_embeddings` runs the text tower (its adapter, :mod:`cdfsl_core.towers.text`) from embeddings and can read the EOT
feature out after chosen blocks (ATHA and TIR compare tokens with the read-out after text block
10 of 12, a setting).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import nn

from cdfsl_core.errors import ConfigError
from cdfsl_core.towers import text_tower

__all__ = ["PromptLearner", "encode_text_embeddings"]


def encode_text_embeddings(
    model: nn.Module,
    embeddings: torch.Tensor,
    tokens: torch.Tensor,
    readout_blocks: Sequence[int] = (),
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """open_clip's ``encode_text`` from token embeddings [C, ctx, width].

    Returns the final text features [C, embed_dim] and, for each block index in
    ``readout_blocks``, ``ln_final`` of the EOT residual after that block times the text
    projection (the same read-out applied early).
    """
    tower = text_tower(model)
    n_blocks = tower.n_blocks
    for i in readout_blocks:
        if not 0 <= i < n_blocks:
            raise ConfigError(f"text read-out block {i} out of range 0..{n_blocks - 1}.")
    x, readouts = tower.forward_blocks(embeddings, readout_blocks, tokens)
    return tower.readout(x, tokens), readouts


class PromptLearner(nn.Module):
    """Class prompts as embeddings, with optional learnable CoOp context."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Callable[[list[str]], torch.Tensor],
        class_names: Sequence[str],
        template: str = "a photo of a {}.",
        n_ctx: int = 4,
        learn_context: bool = False,
    ) -> None:
        super().__init__()
        if "{}" not in template:
            raise ConfigError(f"prompt template {template!r} has no '{{}}' for the class name.")
        embedding = text_tower(model).token_embedding
        device = embedding.weight.device
        tokens = tokenizer([template.format(name) for name in class_names]).to(device)
        self.register_buffer("tokens", tokens, persistent=False)
        self.learn_context = learn_context
        self.n_ctx = n_ctx if learn_context else 0
        with torch.no_grad():
            embeddings = embedding(tokens)  # [C, ctx_len, width]
        # the tokenizer's own special tokens, read off an empty prompt: CLIP's SOT and EOT, an HF
        # tokenizer's BOS (if any) and EOS; the context starts after the leading ones
        empty = [int(t) for t in tokenizer([""])[0].tolist()]
        pad = empty[-1]  # prompts are padded to the context length
        specials = [t for t in empty if t != pad]
        prefix_words = template.split("{}")[0].strip()
        prefix_tokens = [int(t) for t in tokenizer([prefix_words])[0].tolist()]
        lead = 0
        while lead < len(specials) and lead < len(prefix_tokens) and prefix_tokens[lead] == specials[lead]:
            lead += 1
        if learn_context:
            n_prefix = sum(t != pad for t in prefix_tokens) - len(specials)
            if n_prefix != n_ctx:
                raise ConfigError(
                    f"CoOp n_ctx={n_ctx} but the template's leading words {prefix_words!r} are "
                    f"{n_prefix} tokens; the context is initialised from them, so they must match."
                )
            self.context = nn.Parameter(embeddings[0, lead : lead + n_ctx].clone())  # [n_ctx, width]
            self.register_buffer("initial_context", self.context.detach().clone(), persistent=False)
        self.register_buffer("prefix", embeddings[:, :lead].clone(), persistent=False)
        self.register_buffer("suffix", embeddings[:, lead + self.n_ctx :].clone(), persistent=False)

    def embeddings(self) -> torch.Tensor:
        """[C, ctx_len, width] prompt embeddings with the current context."""
        if not self.learn_context:
            return torch.cat([self.prefix, self.suffix], dim=1)
        context = self.context.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)
        return torch.cat([self.prefix, context, self.suffix], dim=1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.learn_context:
            self.context.copy_(self.initial_context)
