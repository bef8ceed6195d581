"""analysis: what we measure inside CLIP (recorder, token statistics, figures).

Builds on :mod:`cdfsl_core`; ``cdfsl_core`` never imports this package.
"""

from analysis.recorder import ActivationCache, record, vision_tower

__all__ = ["ActivationCache", "record", "vision_tower"]
