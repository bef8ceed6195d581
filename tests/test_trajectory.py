"""Fine-tuning trajectories: measured on the queries at chosen steps, equal to the diagnostics of
the model at that step, and changing nothing about the run."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from helpers import TINY

from analysis import figures as fig
from analysis.config import AnalysisConfig
from analysis.run_diagnostics import diagnose_run
from analysis.trajectory import main, trajectory_table
from cdfsl_core.config import ATHAConfig, RunConfig
from cdfsl_core.errors import ConfigError, RunFolderError
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import run

STEPS = (0, 1, 3)
WITH = replace(TINY, train=replace(TINY.train, trajectory_steps=STEPS))


def _diagnostic(tables: dict[str, pd.DataFrame], model: str) -> dict[tuple, float]:
    """(statistic, block) -> value of the diagnostics' tables, named as the trajectory table names them."""
    values = {}
    for _, row in tables["sinks"][tables["sinks"]["model"] == model].iterrows():
        values[(f"sinks:{row['definition']}", row["layer"])] = row["mean_count"]
    for _, row in tables["norms"][tables["norms"]["model"] == model].iterrows():
        values[(f"norm:m={row['bucket']}", row["layer"])] = row["mean"]
    cuts = tables["head_tail"][tables["head_tail"]["model"] == model].drop_duplicates("layer")
    for _, row in cuts.iterrows():
        values[("head_cut", row["layer"])] = row["head_cut"]
        values[("tail_cut", row["layer"])] = row["tail_cut"]
    return values


def test_the_first_and_last_points_equal_the_diagnostics_of_the_initial_and_trained_model(tmp_path):
    folder = tmp_path / "run"
    run(WITH, folder, progress=False, save_states=True)
    table = trajectory_table(folder)
    assert sorted(table["step"].unique()) == list(STEPS)
    tables = diagnose_run(folder, episodes=[2], analysis=AnalysisConfig(attribution_steps=1, token_map_images=0))
    line = RunFolder(folder).finished()[2]
    episode = table[table["episode"] == 2]
    for step, model in ((0, "pretrained"), (3, "fine-tuned coop+lora/tir")):
        point = episode[episode["step"] == step].set_index(["statistic", "block"])["value"]
        expected = _diagnostic(tables, model)
        compared = 0
        for key, value in expected.items():
            if np.isnan(value):
                assert np.isnan(point[key])
            else:
                assert point[key] == pytest.approx(value, rel=1e-5, abs=1e-6), (step, key)
            compared += 1
        assert compared >= 2 * (4 + 4)  # 2 blocks x (4 definitions + 4 buckets of a 3-way episode), and the cuts
    accuracy = episode[episode["statistic"] == "accuracy"].set_index("step")["value"]
    assert accuracy[0] == pytest.approx(line["accuracy_init"]) and accuracy[3] == pytest.approx(line["accuracy"])


def test_measuring_a_trajectory_changes_nothing_in_the_run(tmp_path):
    run(TINY, tmp_path / "plain", progress=False)
    run(WITH, tmp_path / "measured", progress=False)
    plain, measured = RunFolder(tmp_path / "plain").finished(), RunFolder(tmp_path / "measured").finished()
    for index in plain:
        assert "trajectory" not in plain[index] and len(measured[index]["trajectory"]) == len(STEPS)
        for key in ("accuracy", "accuracy_init", "loss_first", "loss_last"):
            assert measured[index][key] == plain[index][key], (index, key)


def test_the_config_records_trajectories_only_when_on_and_a_resume_with_others_is_refused(tmp_path):
    assert "trajectory_steps" not in TINY.json_dict()["train"]  # older run folders resume as before
    assert WITH.json_dict()["train"]["trajectory_steps"] == list(STEPS)
    assert RunConfig.from_dict(WITH.json_dict()) == WITH
    folder = tmp_path / "run"
    run(WITH, folder, progress=False)
    other = replace(WITH, train=replace(WITH.train, trajectory_steps=(0, 3)))
    with pytest.raises(RunFolderError, match="trajectory_steps"):
        run(other, folder, progress=False)
    for bad in ((0, 4), (3, 1), (1, 1)):
        with pytest.raises(ConfigError, match="trajectory_steps"):
            replace(WITH, train=replace(WITH.train, trajectory_steps=bad)).validate()


def test_atha_strengths_enter_the_trajectory_and_the_figure_and_command_draw_it(tmp_path):
    config = replace(WITH, method=replace(WITH.method, intervention="atha", intervention_config=ATHAConfig()))
    folder = tmp_path / "atha"
    run(config, folder, progress=False)
    table = trajectory_table(folder, method="coop+lora+atha")
    alpha = table[(table["statistic"] == "alpha")]
    assert set(alpha["block"]) == {0, 1}
    start = alpha[alpha["step"] == 0]
    assert sorted(start.groupby("block")["value"].mean().round(6)) == [0.0, 0.8]  # ATHA's init: 0.8 at block n // 2
    figure = fig.trajectories(table)
    titles = [ax.get_title() for ax in figure.axes if ax.get_visible()]
    assert titles[0] == "query accuracy" and "alpha (mean over blocks)" in titles
    with pytest.raises(ValueError, match="not in the trajectory table"):
        fig.trajectories(table, statistics=("nothing",))
    assert main([str(folder), "--out", str(tmp_path / "figs")]) == 0
    written = pd.read_csv(tmp_path / "figs" / "trajectory.csv")
    assert len(written) == len(table) and (tmp_path / "figs" / "trajectories.png").exists()
    line = RunFolder(folder).lines()[0][0]
    assert [p["step"] for p in line["trajectory"]] == list(STEPS)
