"""The names commands accept, importable without PyTorch (so that ``--help`` answers at once).

The method layer (:mod:`cdfsl_core.methods`) validates against the same tuples.
"""

from __future__ import annotations

ADAPTATIONS = ("zeroshot", "lora", "coop", "coop+lora")  # what trains: nothing, LoRA, CoOp context, both
INTERVENTIONS = ("none", "atha", "tir")  # token interventions on the visual residual stream
