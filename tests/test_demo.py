"""The main job of `make demo`, at its smallest size."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from analysis.demo import main
from analysis.study import METHODS as DEMO_METHODS


@pytest.mark.slow
def test_demo_writes_the_table_the_runs_and_the_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--out", str(out), "--episodes", "1", "--steps", "1"]) == 0
    printed = capsys.readouterr().out
    assert "paired differences against coop+lora" in printed and "figures:" in printed
    table = pd.read_csv(out / "accuracy_table.csv")
    assert len(table) == 4 * 2 * len(DEMO_METHODS)  # targets x shots x methods
    assert table["episodes"].eq(1).all() and table["mean"].between(0, 1).all()
    assert (table.loc[table["method"] == "coop+lora", "diff_vs_baseline"] == 0).all()
    for name in ("world_samples", "accuracy_by_domain", "paired_differences", "token_norms_by_bucket", "sink_counts",
                 "head_tail_similarity", "attention_maps", "domain_similarity", "domain_estimators", "cka_finetuned",
                 "atha_strengths", "positive_controls", "token_maps", "trajectories", "register_neurons", "register_control"):  # atha_strengths: what ATHA reports
        assert (out / "figures" / f"{name}.png").stat().st_size > 0, name
        assert (out / "figures" / f"{name}.pdf").exists(), name
    sinks = pd.read_csv(out / "diagnostics" / "sinks.csv")
    fine_tuned = {"coop+lora", "coop+lora+atha", "coop+lora+tir", "coop+lora+test-time-register"}
    assert set(sinks["model"]) == {"pretrained", *fine_tuned}
    assert sinks["reproduced"].all() and set(sinks["fine_tuned_from"]) == {"saved state"}
    controls = pd.read_csv(out / "diagnostics" / "controls.csv")
    unplanted = controls[controls["plant"] == "none"].set_index("definition")["mean_count"]
    block = int(controls["layer"].iloc[0])
    pretrained = sinks[(sinks["model"] == "pretrained") & (sinks["dataset"] == controls["dataset"].iloc[0])
                       & (sinks["layer"] == block)].set_index("definition")["mean_count"]
    assert np.allclose(unplanted.sort_index(), pretrained.sort_index())  # the same images, classes and block
    assert set(pd.read_csv(out / "trajectories.csv")["method"]) == fine_tuned
    neurons = pd.read_csv(out / "register_neurons.csv")
    assert set(neurons["model"]) == {"pretrained", *fine_tuned} and set(neurons["target"]) == set(table["domain"])
    maps = pd.read_csv(out / "diagnostics" / "token_maps.csv")
    assert set(maps["model"]) == set(sinks["model"]) and maps["image"].nunique() == 4
    domains = pd.read_csv(out / "domain_similarity.csv")
    assert set(domains["target"].dropna()) == set(table["domain"]) and domains["estimator"].nunique() == 5
    assert (out / "runs" / "synthetic-xray" / "5shot_1ep" / "coop+lora+tir" / "summary.json").exists()
