"""Vision-tower adapters: the one place that knows each tower family's internals.

``vision_tower(model)`` gives the adapter of the vision tower inside a CLIP, a FewShotCLIP or a
bare tower (see :mod:`cdfsl_core.towers.base` for what an adapter answers). Built-in families,
imported on first use: :mod:`~cdfsl_core.towers.openclip` (open_clip's VisionTransformer) and
:mod:`~cdfsl_core.towers.timm_trunks` (timm VisionTransformer and Eva trunks). ``text_tower(model)``
gives the text side's (:mod:`~cdfsl_core.towers.text`).
"""

from cdfsl_core.towers.base import LoRASite, ReadoutAffine, VisionTower, register_tower, tower_families, vision_tower
from cdfsl_core.towers.text import TextTower, text_tower

__all__ = ["LoRASite", "ReadoutAffine", "TextTower", "VisionTower", "register_tower", "text_tower", "tower_families", "vision_tower"]
