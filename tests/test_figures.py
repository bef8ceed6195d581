"""Figure functions: the expected series, labels and panels are there."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.figures import save_figure, world_samples, zero_shot_by_domain


def test_zero_shot_by_domain_draws_one_bar_per_domain_and_shot():
    table = pd.DataFrame({
        "domain": ["a"] * 4 + ["b"] * 4,
        "shots": [1, 1, 5, 5] * 2,
        "accuracy": [0.9, 0.8, 0.9, 1.0, 0.3, 0.4, 0.5, 0.2],
    })
    figure = zero_shot_by_domain(table, {"a": 0.9, "b": 0.4})
    ax = figure.axes[0]
    heights = sorted(round(p.get_height(), 6) for p in ax.patches)
    assert heights == sorted([85.0, 95.0, 35.0, 35.0])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert "95% CI" in ax.get_title()
    assert list(figure.axes[1].lines[0].get_ydata()) == [0.9, 0.4]


def test_zero_shot_by_domain_names_missing_columns():
    with pytest.raises(ValueError, match="accuracy"):
        zero_shot_by_domain(pd.DataFrame({"domain": ["a"], "shots": [1]}))


def test_world_samples_grid_and_saving(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    figure = world_samples({"src": [(image, "red circle")] * 3, "tgt": [(image, "blue ring")] * 2})
    assert len(figure.axes) == 6
    assert figure.axes[0].get_title() == "red circle" and figure.axes[0].get_ylabel() == "src"
    paths = save_figure(figure, tmp_path, "grid")
    assert all(p.stat().st_size > 0 for p in paths)
