"""The run grid of a study: every (method, target, shots) cell through the episodic runner, and
the accuracy table with paired differences against the baseline."""

from __future__ import annotations

from typing import Sequence

import pandas as pd

from analysis.study.context import StudyContext
from cdfsl_core.compare import accuracy_table as compare_accuracy_table
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import run

__all__ = ["accuracy_table", "episodes", "run_grid"]


def run_grid(study: StudyContext, labels: Sequence[str] | None = None, shots: Sequence[int] | None = None) -> pd.DataFrame:
    """Every cell, resumed where finished (or only the methods ``labels`` and shot settings
    ``shots``), all on the study's one model; one row per episode. Methods are independent, so
    the order of the cells does not matter."""
    study.check_folder()
    rows = []
    for label, adaptation, intervention in study.grid.methods:
        if labels is not None and label not in labels:
            continue
        for target in study.data.targets:
            for k in study.grid.shots if shots is None else shots:
                folder = study.run_folder(target, k, label)
                run(study.run_config(target, k, adaptation, intervention), folder, bundle=study.bundle,
                    progress=study.progress, save_states=adaptation != "zeroshot", episode_batch=study.episode_batch)
                for row in RunFolder(folder).lines()[0]:
                    rows.append({"domain": target, "shots": k, "method": label, "episode": row["episode"],
                                 "accuracy": row["accuracy"], "accuracy_init": row.get("accuracy_init"),
                                 "status": row["status"], "seconds": row.get("seconds")})
    return pd.DataFrame(rows)


def episodes(study: StudyContext) -> pd.DataFrame:
    """Every cell's episodes (running what is missing), one row per episode: ``episodes.csv``."""
    return study.cached("episodes.csv", lambda: run_grid(study))


def accuracy_table(study: StudyContext, episodes: pd.DataFrame) -> pd.DataFrame:
    """Mean accuracy and 95% CI per cell (the project's one CI convention), and the paired
    difference against the baseline with its CI (:func:`cdfsl_core.compare.accuracy_table`, as
    the sweep reports it); written to ``accuracy_table.csv``."""
    cells = episodes[["domain", "shots", "method"]].drop_duplicates().itertuples(index=False)
    runs = {(domain, shots, method): [study.run_folder(domain, shots, method)] for domain, shots, method in cells}
    return study.cached("accuracy_table.csv", lambda: compare_accuracy_table(runs, study.grid.baseline))
