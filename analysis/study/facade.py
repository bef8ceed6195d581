"""The :class:`Study` facade: one object over the context and every step of a study.

The top layer of the study: it imports the steps, which import the context and settings below.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from analysis.study import domains, gallery, inside, runs
from analysis.study.context import StudyContext

__all__ = ["Study"]


class Study(StudyContext):
    """What to run and measure, where its results live, and every step as a method."""

    # ------------------------------------------------------------------ the parts, each in its own module
    def run_all(self, labels=None, shots=None) -> pd.DataFrame:
        return runs.run_grid(self, labels, shots)

    def accuracy_table(self, episodes: pd.DataFrame) -> pd.DataFrame:
        return runs.accuracy_table(self, episodes)

    def diagnostics(self) -> dict[str, pd.DataFrame]:
        return inside.diagnostics(self)

    def controls(self, layer: int | None = None) -> pd.DataFrame:
        return inside.controls(self, layer)

    def intervention_stats(self) -> pd.DataFrame:
        return inside.intervention_stats(self)

    def cka_finetuned(self) -> pd.DataFrame:
        return inside.cka_finetuned(self)

    def register_neurons(self) -> pd.DataFrame:
        return inside.register_neurons(self)

    def register_control(self, images: int = 8) -> tuple[pd.DataFrame, dict]:
        return inside.register_control(self, images)

    def domain_similarity(self, pool: str = "cls") -> pd.DataFrame:
        return domains.domain_similarity(self, pool)

    def similarity(self) -> dict[str, float]:
        return domains.similarity(self)

    def feature_view(self, method: str = "pca", per_domain: int = 150) -> pd.DataFrame:
        return domains.feature_view(self, method, per_domain)

    def samples(self, per_domain: int = 8) -> dict[str, list]:
        return domains.samples(self, per_domain)

    def causal(self) -> dict[str, pd.DataFrame]:
        return inside.causal(self)

    def trajectories(self) -> pd.DataFrame:
        return inside.trajectories(self)

    def token_map_figure(self, target: str | None = None, block: int | None = None,
                         quantities=gallery.TOKEN_MAP_QUANTITIES, images=None):
        return gallery.token_map_figure(self, target, block, quantities, images)

    def trajectory_figure(self, target: str | None = None, statistics=None, block: int | None = None):
        return gallery.trajectory_figure(self, target, statistics, block)

    def figures(self, folder: str | os.PathLike[str] | None = None) -> dict[str, list[Path]]:
        return gallery.figures(self, folder)
