"""The names commands accept, importable without PyTorch (so that ``--help`` answers at once).

The method layer (:mod:`cdfsl_core.methods`) validates against the same tuples.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Adaptation:
    """What trains in a method (the other choice being its token intervention)."""

    name: str
    lora: bool  # LoRA adapters on q, k, v of both towers
    coop: bool  # a learnable CoOp prompt context
    description: str = ""


ADAPTATION_REGISTRY: dict[str, Adaptation] = {spec.name: spec for spec in (
    Adaptation("zeroshot", False, False, "nothing trains: CLIP's zero-shot classifier"),
    Adaptation("lora", True, False, "LoRA on q, k and v of every block of both towers"),
    Adaptation("coop", False, True, "4 prompt context vectors, from the embeddings of 'a photo of a'"),
    Adaptation("coop+lora", True, True, "both (the papers' setting)"),
)}
ADAPTATIONS = tuple(ADAPTATION_REGISTRY)  # what trains: nothing, LoRA, CoOp context, both


def adaptation(name: str) -> Adaptation:
    """The registered adaptation ``name`` (a ValueError listing them otherwise)."""
    if name not in ADAPTATION_REGISTRY:
        raise ValueError(f"Unknown adaptation {name!r}; expected one of {', '.join(ADAPTATION_REGISTRY)}.")
    return ADAPTATION_REGISTRY[name]
INTERVENTIONS = ("none", "atha", "tir")  # token interventions on the visual residual stream
PRECISIONS = ("auto", "fp32", "bf16")  # forwards in fp32, or under bf16 autocast; auto: bf16 on CUDA, fp32 on CPU
SHORT_CLASS_POLICIES = ("error", "skip", "cycle")  # a class with fewer than shots + queries images


# What works on each vision-tower family (cdfsl_core.towers), as its tests check it; printed by
# `python -m cdfsl_core.models list` and tabled in docs/how-to/backbones.md.
TOWER_FAMILIES: tuple[tuple[str, str, str], ...] = (
    ("open_clip", "open_clip VisionTransformer: OpenAI CLIP ViT-B/16, L/14, the embedded CLIP",
     "everything"),
    ("timm (Eva)", "PE-Core-*, EVA02-* (random weights offline, CLIP's tokenizer)",
     "the 12 methods, every diagnostic table, token maps, ablation, patching, all four controls; direct logit "
     "attribution on EVA02 (CLS pooling), not on PE-Core (an attention-pooling head: a message)"),
    ("timm (VisionTransformer)", "ViT-*-SigLIP2* (a Hugging Face tokenizer: --tokenizer FOLDER or 'none'); "
     "DINOv2 with registers (vision only)",
     "the vision side: recording, attention, the per-token read-out through the attention-pooling head, "
     "python -m analysis.run_vision and analysis.cka (what needs no text); SigLIP2's methods need a tokenizer "
     "folder (untested: none offline)"),
)
