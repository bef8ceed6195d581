"""Token-to-text math shared by the interventions (ATHA, TIR) and the diagnostics.

Shapes: ``x`` is a residual stream ``[batch, tokens, width]``, ``text`` class text features
``[n_classes, embed_dim]``. Everything here is pure tensor math on the vision tower's per-token
read-out, which its adapter gives (:mod:`cdfsl_core.towers`: ``ln_post(x) P`` for open_clip);
nothing registers hooks. ``visual`` is a tower module or its adapter.

ATHA's class vectors come from one function, :func:`atha_class_vectors`, which both the
intervention and the diagnostics call: the text read-out exactly as the text tower gives it
(not L2-normalised, as in the authors' code; ``text_norm="unit"`` normalises it first).
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from cdfsl_core.errors import ConfigError
from cdfsl_core.towers import vision_tower

__all__ = [
    "TEXT_NORMS",
    "atha_class_vectors",
    "class_vectors_in_residual",
    "head_tail_sets",
    "project_tokens",
    "sum_score",
    "tir_weights",
    "token_class_similarity",
]


def project_tokens(visual: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """f_j = the tower's read-out of every token (``ln_post(x_j) P`` for open_clip):
    [batch, tokens, width] -> [batch, tokens, embed_dim].

    Used to rank tokens (TIR's Sum score, the diagnostics), so computed in fp32 whatever the
    autocast context."""
    return vision_tower(visual).readout(x)


TEXT_NORMS = ("none", "unit")  # ATHA's read-out as the text tower gives it (authors), or L2-normalised

class _PerTensor:
    """A value derived from a tensor, kept while that tensor lives and is not modified in place
    (its version counter is unchanged); keyed by identity, since tensors compare elementwise."""

    def __init__(self) -> None:
        self._store: dict[int, tuple[weakref.ref, int, object]] = {}

    def get(self, tensor: torch.Tensor) -> object | None:
        entry = self._store.get(id(tensor))
        if entry is not None and entry[0]() is tensor and entry[1] == tensor._version:
            return entry[2]
        return None

    def put(self, tensor: torch.Tensor, value: object) -> None:
        key = id(tensor)
        self._store[key] = (weakref.ref(tensor, lambda _: self._store.pop(key, None)), tensor._version, value)


# pinv(P^T) of the frozen visual projection: the solve depends neither on the block nor on the
# text, so it runs once per projection, not every forward.
_PINV = _PerTensor()
_GAIN_CHECKED = _PerTensor()


def _projection_pinv(proj: torch.Tensor) -> torch.Tensor:
    """pinv(P^T) [width, embed_dim] in fp32, recomputed only when ``proj`` changes (a parameter, or a
    projection composed of several layers, which its tower adapter keeps while its weights stay)."""
    cached = _PINV.get(proj)
    if cached is not None and cached.device == proj.device:  # module.to() swaps .data without a new version
        return cached
    with torch.no_grad(), torch.autocast(proj.device.type, enabled=False):
        pinv = torch.linalg.pinv(proj.detach().float().T)  # min-norm solution of P^T u = t is pinv(P^T) t
    _PINV.put(proj, pinv)
    return pinv


def _check_gain(gamma: torch.Tensor) -> None:
    """ln_post's gain divides the class vectors: a zero or near-zero gain gives inf or NaN tokens.
    Checked once per gain tensor and version (not every forward)."""
    if _GAIN_CHECKED.get(gamma) is not None:
        return
    magnitude = gamma.detach().abs()
    smallest, channel = magnitude.min(dim=0)
    if float(smallest) <= 1e-6 * max(float(magnitude.max()), 1e-30):
        raise ConfigError(
            f"The vision tower's ln_post (the layer norm after its last block) has gain |gamma| = "
            f"{float(smallest):.3g} at channel {int(channel)} (largest |gamma| {float(magnitude.max()):.3g}). "
            "ATHA undoes ln_post by dividing by gamma, which would give infinite or NaN tokens. "
            "Check the checkpoint (a pruned or corrupted ln_post?), or use another intervention."
        )
    _GAIN_CHECKED.put(gamma, True)


def class_vectors_in_residual(visual: nn.Module, text: torch.Tensor) -> torch.Tensor:
    """ATHA's class vectors in the residual space, [n_classes, width], fp32.

    u_c is the minimum-norm solution of P^T u = t_c - b (P the width x embed_dim projection of
    the tower's read-out, b the bias after it, none for open_clip), then the read-out's layer-norm
    affine (``ln_post``) is undone: u~_c = (u_c - beta) / gamma. So ``u~_c * gamma + beta``
    projected by P (plus b) gives back t_c. Computed in fp32 whatever the autocast context; differentiable in
    ``text`` (the CoOp context and the text adapters train through it).
    """
    affine = vision_tower(visual).readout_affine()
    gamma, beta = affine.gamma, affine.beta
    _check_gain(gamma)
    with torch.autocast(text.device.type, enabled=False):
        target = text.float() if affine.bias is None else text.float() - affine.bias.float()
        u = target @ _projection_pinv(affine.projection).T if affine.projection is not None else target
        return (u - beta.float()) / gamma.float()


def atha_class_vectors(visual: nn.Module, readout: torch.Tensor, text_norm: str = "none") -> torch.Tensor:
    """The class vectors ATHA pushes with and the diagnostics compare with: [n_classes, width].

    ``readout`` is the text tower's read-out ``ln_final(h[EOT]) @ text_projection`` after the
    read-out block, [n_classes, embed_dim], as the tower gives it. ``text_norm="none"`` (the
    authors' code) solves with it as it is, so its norm (about 8 to 12 for CLIP) sets the size of
    ATHA's edit; ``"unit"`` L2-normalises it first. The two differ in direction too, since the
    ln_post bias is subtracted after the solve.
    """
    if text_norm not in TEXT_NORMS:
        raise ConfigError(f"ATHA text_norm={text_norm!r}; expected one of {TEXT_NORMS}.")
    text = F.normalize(readout.float(), dim=-1) if text_norm == "unit" else readout
    return class_vectors_in_residual(visual, text)


def token_class_similarity(tokens: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every token with every class vector: [batch, L, dim] x [C, dim] -> [batch, L, C]
    (or, for E episodes, [E, batch, L, dim] x [E, 1, C, dim] -> [E, batch, L, C]).

    A ranking quantity: computed in fp32 whatever the autocast context (bf16 would reorder
    near-ties, so Sum scores and head/tail sets would depend on the precision)."""
    with torch.autocast(tokens.device.type, enabled=False):
        return F.normalize(tokens.float(), dim=-1) @ F.normalize(vectors.float(), dim=-1).mT


def head_tail_sets(max_similarity: torch.Tensor, rho_head: float, rho_tail: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Boolean masks [batch, L] of the floor(rho_head L) tokens with the largest and the
    floor(rho_tail L) tokens with the smallest ``max_similarity`` [batch, L]."""
    batch, length = max_similarity.shape
    n_head, n_tail = int(rho_head * length), int(rho_tail * length)
    values = max_similarity.float()
    head = torch.zeros(batch, length, dtype=torch.bool, device=values.device)
    tail = torch.zeros_like(head)
    if n_head:
        head.scatter_(1, values.topk(n_head, dim=-1, largest=True).indices, True)
    if n_tail:
        tail.scatter_(1, values.topk(n_tail, dim=-1, largest=False).indices, True)
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
    top = similarity.float().topk(k, dim=1).indices  # [batch, k, C]
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
        raise ConfigError(f"TIR needs at least 2 classes; got {n_classes}.")
    scaled = lam * 4.0 / (n_classes - 1)
    weights = 1.0 - scaled * (counts.float() - (n_classes + 1) / 2)
    return torch.where(counts == 0, torch.ones_like(weights), weights)
