"""The names of recorded activations, spelled in one place (as TransformerLens's ``get_act_name``).

    act_name("resid_post", 3)   -> "blocks.3.resid_post"
    act_name("attn.pattern", 3) -> "blocks.3.attn.pattern"

Every consumer of a recording builds its keys here; a test pins the scheme. Imports nothing.
"""

from __future__ import annotations

__all__ = ["WHAT", "act_name"]

WHAT = ("resid_pre", "resid_post", "attn.pattern")  # what the recorder can capture per block


def act_name(what: str, layer: int) -> str:
    """The cache key of ``what`` (one of :data:`WHAT`) at vision block ``layer``."""
    if what not in WHAT:
        raise ValueError(f"unknown activation {what!r}; expected one of {WHAT}.")
    return f"blocks.{int(layer)}.{what}"
