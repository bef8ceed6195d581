"""How a block's tokens become one image representation, as a registry (``cka --pool``, domain
similarity, paired CKA). ``register_pooling(Pooling(...))`` adds one; it then appears in the
commands' choices and every function that takes ``pool=``. Imports no torch (``--help``).

Built in:

- ``cls``: the CLS token of each block's output;
- ``mean``: the mean of the patch tokens;
- ``mean-no-simple``: the mean of the patch tokens without TIR's simple tokens, those in the
  top set of every class (Sum score m = N), computed per block against class text features
  (the read-out the interventions use); an image whose every patch token is simple keeps the
  plain mean.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from cdfsl_core import protocol
from cdfsl_core.errors import ConfigError

__all__ = ["Pooling", "list_poolings", "pooling", "register_pooling"]


@dataclass(frozen=True)
class Pooling:
    """One pooling: ``pool(x, visual, unit_text, rho)`` -> ([B, D], simple-token counts [B] or None)
    for a block's output ``x`` [B, 1 + L, D]."""

    name: str
    pool: Callable[[Any, Any, Any, float], tuple[Any, Any]]
    needs_text: bool = False  # needs the class text features (unit_text)
    description: str = ""


_REGISTRY: dict[str, Pooling] = {}


def register_pooling(spec: Pooling) -> None:
    _REGISTRY[spec.name] = spec


def list_poolings() -> dict[str, Pooling]:
    return dict(_REGISTRY)


def pooling(name: str) -> Pooling:
    if name not in _REGISTRY:
        raise ConfigError(f"pool={name!r}; expected one of {tuple(_REGISTRY)}.")
    return _REGISTRY[name]


def _tower(visual: Any) -> Any:
    from cdfsl_core.towers import vision_tower

    return vision_tower(visual)


def _cls(x: Any, visual: Any, unit_text: Any, rho: float) -> tuple[Any, Any]:
    return _tower(visual).cls(x), None


def _mean(x: Any, visual: Any, unit_text: Any, rho: float) -> tuple[Any, Any]:
    return _tower(visual).patches(x).mean(dim=1), None


def _mean_no_simple(x: Any, visual: Any, unit_text: Any, rho: float = protocol.TIR_RHO) -> tuple[Any, Any]:
    import torch
    import torch.nn.functional as F

    from cdfsl_core.token_text import project_tokens, sum_score

    patches = _tower(visual).patches(x)
    with torch.autocast(x.device.type, enabled=False):
        projected = F.normalize(project_tokens(visual, patches.float()), dim=-1)
        counts = sum_score(projected @ unit_text.to(projected.device).T, rho)  # [B, L]
    simple = counts == unit_text.shape[0]
    keep = (~simple).to(patches.dtype)  # [B, L]: 0 for simple tokens
    kept = keep.sum(dim=1, keepdim=True)
    pooled = (patches * keep.unsqueeze(-1)).sum(dim=1) / kept.clamp_min(1)
    return torch.where(kept > 0, pooled, patches.mean(dim=1)), simple.sum(dim=1)


register_pooling(Pooling("cls", _cls, description="the CLS token"))
register_pooling(Pooling("mean", _mean, description="the mean patch token"))
register_pooling(Pooling("mean-no-simple", _mean_no_simple, needs_text=True,
                         description="the mean patch token without TIR's simple tokens (m = N)"))
