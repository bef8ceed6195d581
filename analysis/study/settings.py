"""What a study is: its settings in parts (the model, the data, the run grid, the analysis).

The bottom layer of the study: it imports no other part of it.
"""

from __future__ import annotations

from dataclasses import dataclass

from cdfsl_core import protocol
from cdfsl_core.data.synthetic import SYNTHETIC_TARGETS

__all__ = ["BASELINE", "METHODS", "StudyData", "StudyGrid"]

# (label, adaptation, intervention): zero-shot CLIP, the baseline, the papers' two methods and a
# test-time register (no training of its own: what removing the sink without TIR does)
METHODS = (
    ("zero-shot", "zeroshot", "none"),
    ("coop+lora", "coop+lora", "none"),
    ("coop+lora+atha", "coop+lora", "atha"),
    ("coop+lora+tir", "coop+lora", "tir"),
    ("coop+lora+test-time-register", "coop+lora", "test-time-register"),  # Jiang et al. 2025, beside TIR
)
BASELINE = "coop+lora"


@dataclass(frozen=True)
class StudyData:
    """Which domains."""

    root: str | None = None  # the real datasets' root (None: $CDFSL_DATA_ROOT; the embedded world needs none)
    source: str = "synthetic"  # the source domain (domain similarity, feature views)
    targets: tuple[str, ...] = SYNTHETIC_TARGETS  # target domains, in order of shift
    domain_images: int = 200  # images drawn per domain for the domain similarity


@dataclass(frozen=True)
class StudyGrid:
    """Which runs: the papers' protocol (:mod:`cdfsl_core.protocol`) with the demo's size by default."""

    shots: tuple[int, ...] = protocol.SHOTS
    episodes: int = protocol.DEMO_EPISODES  # per target, shot setting and method (the papers: 800 / 400)
    steps: int = protocol.DEMO_STEPS  # training steps per episode (the papers: 100)
    seed: int = 0
    methods: tuple[tuple[str, str, str], ...] = METHODS  # (label, adaptation, intervention)
    baseline: str = BASELINE  # paired differences are against this label
    diagnose_shots: int = protocol.SHOTS[-1]  # the shot setting whose episode 0 the diagnostics look inside
    causal_queries: int = 25  # query images per episode the causal tools use (0: all; 25 = 5 per class)
    trajectory_points: int = 5  # training steps measured on the diagnose_shots runs, evenly spaced from 0 (0: none)

    def trajectory_steps(self) -> tuple[int, ...]:
        """The steps the fine-tuned runs at ``diagnose_shots`` measure their queries at: ``trajectory_points``
        evenly spaced from 0 (before training) to ``steps`` (after the last)."""
        if self.trajectory_points <= 0:
            return ()
        if self.trajectory_points == 1:
            return (self.steps,)
        return tuple(sorted({round(i * self.steps / (self.trajectory_points - 1)) for i in range(self.trajectory_points)}))
