"""A study: every method on every target, every diagnostic, every figure, from one folder.

The demo (``make demo``), ``make figures`` and the notebooks share it, so a figure is made one way
wherever it is shown. A :class:`Study` is its settings in parts (the model, the data, the run
grid, the analysis) and a folder; each part of the work is a module of functions over it, each
callable on its own and reusing what the folder already holds:

Layers, each importing only those below it::

    facade      Study: the context with every step as a method
    gallery     every figure (uses the steps below)
    domains     domain similarity with references, feature similarity, a 2-D view, examples
    inside      token diagnostics, positive controls, interventions' own statistics, paired CKA
    runs        the run grid through the episodic runner; the accuracy table with paired differences
    context     study.json, the one caching rule of every table, the model, datasets, run configs
    settings    the settings in parts

Folder layout::

    out/
      study.json                              the settings; another study is refused
      runs/<target>/<k>shot_<n>ep/<method>/   run folders of the episodic runner (with states)
      episodes/                               one episode file per target and shot setting
      episodes.csv, accuracy_table.csv        one row per episode; mean, 95% CI, paired differences
      diagnostics/<table>.csv                 pretrained and fine-tuned models, episode 0; controls
      domain_similarity.csv                   every estimator per layer: source vs targets, references, null
      cka_finetuned.csv                       paired CKA per layer: pretrained vs fine-tuned, same images
      intervention_stats.csv                  what each intervention reports of itself, per block
      register_neurons.csv                    register neurons of the pretrained and fine-tuned models
      figures/                                every figure as PNG and PDF
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from analysis.study.facade import Study
from analysis.study.settings import BASELINE, METHODS, StudyData, StudyGrid

__all__ = ["BASELINE", "METHODS", "QUICK_ENV", "Study", "StudyData", "StudyGrid", "notebook_study"]

QUICK_ENV = "CDFSL_NOTEBOOK_QUICK"  # the test suite's switch: a folder for a quick study of every notebook


def notebook_study(out: str | os.PathLike[str] = "../outputs/demo", *, model: str = "cdfsl-synth-vit",
                   checkpoint: str = "synthetic", data_root: str | None = None, source: str = "synthetic",
                   targets: tuple[str, ...] | None = None, device: str = "cpu", episodes: int | None = None,
                   steps: int | None = None, **settings: Any) -> Study:
    """The study of a notebook's parameter cell; ``None``: the demo's settings. With the environment
    variable ``CDFSL_NOTEBOOK_QUICK`` set to a folder (the test suite), a quick study there: the first
    and last target, one episode, two steps, trajectories at steps 0 and 2, 10 queries for the causal
    tools."""
    given = {"episodes": episodes, "steps": steps, "targets": None if targets is None else tuple(targets)}
    given = {key: value for key, value in given.items() if value is not None}
    if os.environ.get(QUICK_ENV):
        chosen = tuple(targets) if targets is not None else StudyData().targets
        given.update(targets=(chosen[0], chosen[-1]), episodes=1, steps=2, trajectory_points=2, causal_queries=10)
        out = Path(os.environ[QUICK_ENV])
    return Study.create(out, model=model, pretrained=checkpoint, data_root=data_root, source=source, device=device,
                        progress=False, **given, **settings)
