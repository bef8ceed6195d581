"""Figure functions: the expected series, labels and panels are there."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.figures import accuracy_by_domain, save_figure, world_samples


def test_accuracy_by_domain_draws_one_panel_per_shot_and_one_bar_per_method_and_domain():
    table = pd.DataFrame({
        "domain": ["a"] * 4 + ["b"] * 4,
        "shots": [1, 1, 5, 5] * 2,
        "method": ["zero-shot", "tir"] * 4,
        "accuracy": [0.9, 0.8, 0.9, 1.0, 0.3, 0.4, 0.5, 0.2],
    })
    figure = accuracy_by_domain(table, {"a": 0.9, "b": 0.4})
    panels = [ax for ax in figure.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == ["1-shot", "5-shot"]
    heights = [round(p.get_height(), 6) for p in panels[0].patches]
    assert heights == [90.0, 30.0, 80.0, 40.0]  # zero-shot on a, b; then tir on a, b
    assert [t.get_text() for t in panels[0].get_xticklabels()] == ["a", "b"]
    assert [t.get_text() for t in panels[0].get_legend().get_texts()] == ["zero-shot", "tir"]
    twins = [ax for ax in figure.axes if not ax.get_title()]
    assert list(twins[0].lines[0].get_ydata()) == [0.9, 0.4]
    assert "95% CI" in figure._suptitle.get_text()


def test_accuracy_by_domain_names_missing_columns():
    with pytest.raises(ValueError, match="method"):
        accuracy_by_domain(pd.DataFrame({"domain": ["a"], "shots": [1], "accuracy": [0.5]}))


def test_world_samples_grid_and_saving(tmp_path):
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    figure = world_samples({"src": [(image, "red circle")] * 3, "tgt": [(image, "blue ring")] * 2})
    assert len(figure.axes) == 6
    assert figure.axes[0].get_title() == "red circle" and figure.axes[0].get_ylabel() == "src"
    paths = save_figure(figure, tmp_path, "grid")
    assert all(p.stat().st_size > 0 for p in paths)
