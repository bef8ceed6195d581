"""Token-to-text math shared by the interventions (ATHA, TIR) and the diagnostics.

Shapes: ``x`` is a residual stream ``[batch, 1 + L, width]`` (CLS first), ``text`` class text
features ``[n_classes, embed_dim]``. Everything here is pure tensor math on an open_clip
``VisionTransformer`` (its ``ln_post`` and ``proj``); nothing registers hooks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "class_vectors_in_residual",
    "head_tail_sets",
    "project_tokens",
    "sum_score",
    "tir_weights",
    "token_class_similarity",
]


def project_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f_j = ln_post(x_j) P for every token: [batch, tokens, width] -> [batch, tokens, embed_dim]."""
    out = visual.ln_post(x)
    return out @ visual.proj if visual.proj is not None else out


def class_vectors_in_residual(visual: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """ATHA's class vectors in the residual space, [n_classes, width].

    u_c is the minimum-norm solution of P^T u = t_c (P the width x embed_dim projection), then
    the ln_post affine is undone: u~_c = (u_c - beta) / gamma. So ``u~_c * gamma + beta`` projected
    by P gives back t_c.
    """
    proj = visual.proj.float()  # [width, embed_dim]
    u = torch.linalg.pinv(proj.T) @ text.float().T  # [width, n_classes]
    gamma, beta = visual.ln_post.weight.float(), visual.ln_post.bias.float()
    return ((u.T - beta) / gamma).to(text.dtype)


def token_class_similarity(tokens: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token with every class vector: [batch, L, dim] x [C, dim] -> [batch, L, C]."""
    return F.normalize(tokens, dim=-1) @ F.normalize(vectors, dim=-1).T


def head_tail_sets(max_similarity: torch.Tensor, rho_head: float, rho_tail: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks [batch, L] of the floor(rho_head L) tokens with the largest and the
    floor(rho_tail L) tokens with the smallest ``max_similarity`` [batch, L]."""
    batch, length = max_similarity.shape
    n_head, n_tail = int(rho_head * length), int(rho_tail * length)
    order = max_similarity.argsort(dim=-1, descending=True)
    head = torch.zeros_like(max_similarity, dtype=torch.bool)
    tail = torch.zeros_like(max_similarity, dtype=torch.bool)
    if n_head:
        head.scatter_(1, order[:, :n_head], True)
    if n_tail:
        tail.scatter_(1, order[:, length - n_tail :], True)
    return head, tail


def sum_score(similarity: torch.Tensor, rho: float) -> torch.Tensor:
    """TIR's Sum score: for each token, the number of classes whose top-k tokens include it.

    ``similarity`` [batch, L, C]; k = floor(rho L). Returns integer counts [batch, L] in 0..C.
    """
    batch, length, n_classes = similarity.shape
    k = int(rho * length)
    counts = torch.zeros(batch, length, dtype=torch.long, device=similarity.device)
    if k == 0:
        return counts
    top = similarity.topk(k, dim=1).indices  # [batch, k, C]
    counts.scatter_add_(1, top.reshape(batch, -1), torch.ones_like(top.reshape(batch, -1)))
    return counts


def tir_weights(counts: torch.Tensor, n_classes: int, lam: float = 0.5) -> torch.Tensor:
    """TIR's token weights from Sum scores: w(0) = 1; for m >= 1,
    ``w(m) = 1 - lam' (m - (N + 1) / 2)`` with ``lam' = lam * 4 / (N - 1)``.

    For N = 5 this is the authors' ``1 - lam (m - 3)``: m = 1..5 -> 2.0, 1.5, 1.0, 0.5, 0 with
    lam = 0.5. For any N the weights run linearly from w(1) = 1 + 2 lam to w(N) = 1 - 2 lam
    (0 at the default), so a token relevant to every class is removed and one relevant to a
    single class is doubled.
    """
    if n_classes < 2:
        raise ValueError(f"TIR needs at least 2 classes; got {n_classes}.")
    scaled = lam * 4.0 / (n_classes - 1)
    weights = 1.0 - scaled * (counts.float() - (n_classes + 1) / 2)
    return torch.where(counts == 0, torch.ones_like(weights), weights)
