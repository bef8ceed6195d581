"""Figure functions: the expected series, labels and panels are there."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest

from analysis.figures import (
    accuracy_by_domain,
    attention_maps,
    cka_finetuned,
    domain_similarity_by_layer,
    feature_view,
    head_tail_similarity,
    intervention_strengths,
    paired_differences,
    positive_controls,
    save_figure,
    sink_counts,
    token_norms_by_bucket,
    world_samples,
)


@pytest.fixture(autouse=True)
def _close_figures():
    """Every test's figures are closed after it (matplotlib keeps them otherwise)."""
    yield
    plt.close("all")


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
    assert panels[0].get_legend() is None  # one legend below the panels, off the bars
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["zero-shot", "tir", "similarity to source"]
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


def _lines(ax) -> dict[str, tuple[list, list]]:
    """Labelled series of a panel: plotted lines and error-bar containers."""
    def values(line):
        return list(line.get_xdata()), [round(float(v), 6) for v in line.get_ydata()]
    series = {line.get_label(): values(line) for line in ax.lines if not line.get_label().startswith("_")}
    series.update({c.get_label(): values(c.lines[0]) for c in ax.containers if hasattr(c, "has_xerr")})
    return series


def test_token_norms_by_bucket_pools_episodes_by_token_count():
    rows = []
    for model in ("pretrained", "fine-tuned"):
        for episode, (count, mean) in enumerate(((1, 10.0), (3, 20.0))):
            for layer in (0, 1):
                for bucket in range(3):
                    rows.append({"model": model, "episode": episode, "layer": layer, "bucket": bucket, "count": count,
                                 "mean": mean + layer + bucket, "space": "residual", "transform": "none", "rho": 0.3})
    figure = token_norms_by_bucket(pd.DataFrame(rows))
    panels = figure.axes
    assert [ax.get_title() for ax in panels] == ["pretrained", "fine-tuned"]
    lines = _lines(panels[0])
    assert list(lines) == ["m = 0", "m = 1", "m = 2"]
    assert lines["m = 1"] == ([0, 1], [18.5, 19.5])  # (1 x 11 + 3 x 21) / 4, then one more per layer
    assert "Sum bucket" in figure._suptitle.get_text() and "residual" in panels[0].get_ylabel()


def test_sink_counts_one_panel_per_definition_with_its_threshold():
    rows = [{"model": model, "layer": layer, "definition": d, "label": f"{d} (> 2 x median)", "images": 4,
             "mean_count": float(layer + (model == "fine-tuned"))}
            for d in ("sum-all", "high-norm") for model in ("pretrained", "fine-tuned") for layer in range(3)]
    figure = sink_counts(pd.DataFrame(rows))
    assert [ax.get_title() for ax in figure.axes] == ["sum-all (> 2 x median)", "high-norm (> 2 x median)"]
    lines = _lines(figure.axes[1])
    assert lines["pretrained"] == ([0, 1, 2], [0.0, 1.0, 2.0]) and lines["fine-tuned"][1] == [1.0, 2.0, 3.0]


def test_head_tail_similarity_histograms_and_cut_lines():
    edges = np.linspace(-1, 1, 5)
    rows = [{"model": m, "layer": layer, "bin_left": edges[b], "bin_right": edges[b + 1], "count": [0, 1, 3, 0][b],
             "head_cut": 0.4, "tail_cut": -0.2, "rho_head": 0.3, "rho_tail": 0.2}
            for m in ("pretrained", "fine-tuned") for layer in range(4) for b in range(4)]
    table = pd.DataFrame(rows)
    figure = head_tail_similarity(table)
    assert [ax.get_title() for ax in figure.axes] == ["block 0", "block 2", "block 3"]
    steps = _lines(figure.axes[0])
    assert steps["pretrained"][1] == [0.0, 0.25, 0.75, 0.0]
    cut_positions = sorted({round(float(line.get_xdata()[0]), 6) for line in figure.axes[0].lines
                            if line.get_label().startswith("_")})
    assert cut_positions == [-0.2, 0.4]
    assert "top 0.3" in figure._suptitle.get_text()
    with pytest.raises(ValueError, match=r"layers \[7\] are not in the table"):
        head_tail_similarity(table, layers=[7])


def test_intervention_strengths_draw_atha_strengths_and_edit_sizes_before_and_after_training():
    rows = [{"domain": d, "shots": 5, "episode": e, "block": b, "stage": stage,
             "alpha": 0.1 * b + e if stage == "trained" else 0.0, "beta": 0.0,
             "head_edit": 0.2 * e if stage == "trained" else 0.05, "tail_edit": 0.0, "setting_text_norm": "none"}
            for d in ("synthetic-crops", "synthetic-xray") for e in (0, 1) for b in range(3) for stage in ("init", "trained")]
    figure = intervention_strengths(pd.DataFrame(rows))
    alpha, beta, head, tail = figure.axes
    assert "alpha" in alpha.get_title() and "beta" in beta.get_title() and "head edit" in head.get_title()
    lines = _lines(alpha)
    assert lines["crops"] == ([0, 1, 2], [0.5, 0.6, 0.7]) and "xray" in lines  # mean over episodes 0 and 1
    # the head edit after training: mean of 0.0 and 0.2; the dotted line before training: 0.05
    edits = [c.lines[0] for c in head.containers]
    assert sorted({round(float(v), 6) for line in edits for v in line.get_ydata()}) == [0.05, 0.1]
    title = figure._suptitle.get_text()
    assert "95% CI" in title and "5-shot" in title and "unnormalised" in title


def test_cka_finetuned_panels_per_target():
    rows = [{"target": t, "method": m, "layer": layer, "cka": 1.0 - 0.1 * layer, "kernel": "linear",
             "estimator": "biased", "pool": "cls"} for t in ("a", "b") for m in ("x", "y") for layer in range(3)]
    figure = cka_finetuned(pd.DataFrame(rows))
    assert [ax.get_title() for ax in figure.axes] == ["a", "b"]
    assert _lines(figure.axes[0])["x"] == ([0, 1, 2], [1.0, 0.9, 0.8])
    assert "kernel=linear" in figure._suptitle.get_text()


def test_paired_differences_in_points_without_the_baseline():
    summary = pd.DataFrame({"domain": ["a", "a", "a"], "shots": [1, 1, 1], "method": ["coop+lora", "tir", "atha"],
                            "diff_vs_baseline": [0.0, 0.05, -0.02], "diff_ci95": [0.0, 0.01, 0.03]})
    figure = paired_differences(summary)
    ax = figure.axes[0]
    assert [t.get_text() for t in figure.legends[0].get_texts()] == ["tir", "atha"]
    series = _lines(ax)
    assert series["tir"][0] == [5.0] and series["atha"][0] == [-2.0]


def test_attention_maps_rows_per_model_and_columns_per_layer():
    cells = [(r, c) for r in range(2) for c in range(2)]
    attention = pd.DataFrame([{"model": m, "layer": layer, "head": h, "row": r, "col": c, "value": float(r == c) + h}
                              for m in ("pretrained", "fine-tuned") for layer in range(3) for h in range(2)
                              for r, c in cells])
    rollout = pd.DataFrame([{"model": m, "row": r, "col": c, "value": 1.0, "definition": "rollout def"}
                            for m in ("pretrained", "fine-tuned") for r, c in cells])
    figure = attention_maps(attention, rollout=rollout)
    assert len([ax for ax in figure.axes if ax.get_images()]) == 2 * 4
    assert len(figure.axes) == 2 * 4 * 2  # every heat map has its colour bar
    assert [ax.get_title() for ax in figure.axes[:4]] == ["CLS attention, block 0", "CLS attention, block 1",
                                                          "CLS attention, block 2", "rollout"]
    assert figure.axes[4].get_ylabel() == "fine-tuned"
    image = figure.axes[0].get_images()[0].get_array()
    assert np.allclose(image, [[1.5, 0.5], [0.5, 1.5]])  # mean over heads
    assert "rollout def" in figure._suptitle.get_text()


def test_feature_view_one_scatter_per_domain_with_the_variance_it_shows():
    table = pd.DataFrame({"domain": ["src", "src", "synthetic-xray"], "x": [0.0, 1.0, 2.0], "y": [0.0, 1.0, -1.0],
                          "method": "pca", "explained_variance": 0.42})
    figure = feature_view(table)
    ax = figure.axes[0]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["src", "xray"]
    assert [len(c.get_offsets()) for c in ax.collections] == [2, 1]
    assert "PCA" in ax.get_title() and "42%" in ax.get_title()


def test_importing_the_figures_keeps_a_notebooks_backend():
    import os
    import subprocess
    import sys

    inline = "module://matplotlib_inline.backend_inline"
    code = "import analysis.figures, matplotlib; print(matplotlib.get_backend())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "MPLBACKEND": inline})
    assert out.stdout.strip() == inline  # figures show in notebooks, not only in files


def test_positive_controls_frame_the_definition_meant_for_each_plant():
    rows = [{"plant": p, "definition": d, "mean_count": float(p != "none" and d == "high-norm") + 0.5 * (d == "attention-mass"),
             "found_by": p == "high-norm" and d == "high-norm", "layer": 3, "label": f"{d} (x)"}
            for p in ("none", "high-norm") for d in ("high-norm", "attention-mass")]
    figure = positive_controls(pd.DataFrame(rows))
    ax = figure.axes[0]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["0.00", "0.50", "1.00", "0.50"]  # row 'none', then the planted row
    frames = [p for p in ax.patches if isinstance(p, plt.Rectangle) and p.get_edgecolor()[0] > 0.5 and not p.get_fill()]
    assert [(f.get_x(), f.get_y()) for f in frames] == [(0, 1)]  # high-norm column, planted row
    assert "block 3" in ax.get_title()


def test_domain_similarity_draws_targets_references_and_the_control_prediction():
    rows = []
    for layer in (0, 1):
        for estimator, higher in (("mmd", False), ("random-pairing-cka", None)):
            base = {"estimator": estimator, "layer": layer, "n": 50, "pool": "cls", "higher_is_similar": higher}
            rows.append({**base, "comparison": "target", "target": "synthetic-xray", "value": 0.4 + layer,
                         "ci_low": 0.3, "ci_high": 0.5, "predicted": 0.04 if higher is None else np.nan})
            rows.append({**base, "comparison": "class-disjoint", "target": None, "value": 0.01, "ci_low": 0.0, "ci_high": 0.02})
            rows.append({**base, "comparison": "within-source", "target": None, "value": 0.0, "ci_low": -0.01, "ci_high": 0.01})
    figure = domain_similarity_by_layer(pd.DataFrame(rows))
    mmd, control = figure.axes
    assert "mmd (lower = more similar)" in mmd.get_title() and "negative control" in control.get_title()
    lines = _lines(mmd)
    assert lines["xray"] == ([0, 1], [0.4, 1.4]) and lines["source: class-disjoint halves"][1] == [0.01, 0.01]
    crosses = [line for line in control.lines if line.get_marker() == "x"]
    assert [round(float(v), 6) for v in crosses[0].get_ydata()] == [0.04, 0.04]
    assert "n = 50 images per side" in figure._suptitle.get_text()
    with pytest.raises(ValueError, match="estimators \\['frechet'\\] are not in the table"):
        domain_similarity_by_layer(pd.DataFrame(rows), "frechet")


def test_a_bucket_without_tokens_breaks_its_line_and_blocks_tick_at_whole_numbers():
    rows = [{"model": "m", "layer": layer, "bucket": bucket, "count": 0 if (bucket == 2 and layer == 1) else 10,
             "mean": float(layer + bucket) if not (bucket == 2 and layer == 1) else np.nan, "std": 0.0,
             "space": "residual", "transform": "none", "rho": 0.3} for layer in range(3) for bucket in range(3)]
    figure = token_norms_by_bucket(pd.DataFrame(rows))
    ax = figure.axes[0]
    line = [ln for ln in ax.lines if ln.get_label() == "m = 2"][0]
    assert list(line.get_xdata()) == [0, 1, 2] and np.isnan(line.get_ydata()[1])  # a gap, not a bridge
    assert all(float(t).is_integer() for t in ax.get_xticks())
    assert ax.get_legend() is None and figure.legends  # the legend is outside the panels


def test_head_tail_axes_span_the_data_and_panels_share_them():
    rows = []
    edges = np.linspace(-1, 1, 41)
    for layer in (0, 1, 2):
        for b in range(40):
            inside = 18 <= b <= 34  # data only in [-0.1, 0.75]
            rows.append({"model": "m", "layer": layer, "bin_left": edges[b], "bin_right": edges[b + 1],
                         "count": 5 if inside else 0, "head_cut": 0.5, "tail_cut": 0.0, "rho_head": 0.3,
                         "rho_tail": 0.2})
    figure = head_tail_similarity(pd.DataFrame(rows))
    low, high = figure.axes[0].get_xlim()
    assert -0.2 < low < -0.1 and 0.75 < high < 0.85
    assert figure.axes[1].get_xlim() == (low, high)


def test_world_samples_is_titled_by_what_it_shows():
    image = np.zeros((4, 4, 3), dtype=np.uint8)
    assert "embedded world" in world_samples({"synthetic": [(image, "a")]})._suptitle.get_text()
    assert "embedded world" not in world_samples({"miniimagenet": [(image, "a")]})._suptitle.get_text()


def test_register_neurons_counts_the_neurons_of_each_block_per_model_and_says_when_there_are_none():
    from analysis.figures import register_neurons

    rows = [{"target": "synthetic-crops", "model": "pretrained", "candidate_blocks": 3, "images": 8,
             "images_with_outliers": 4, "tau": 2.0, "found": True, "block": b, "neuron": n}
            for b, n in ((0, 1), (2, 5), (2, 9))]
    rows.append({"target": "synthetic-xray", "model": "pretrained", "candidate_blocks": 3, "images": 8,
                 "images_with_outliers": 0, "tau": 2.0, "found": False, "block": None, "neuron": None})
    figure = register_neurons(pd.DataFrame(rows))
    crops, xray = figure.axes[:2]
    heights = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in crops.patches}
    assert heights == {0: 1, 2: 2}  # one neuron in block 0, two in block 2
    assert not xray.patches and "no register neuron" in xray.texts[0].get_text()
    plt.close(figure)
