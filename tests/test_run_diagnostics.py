"""Diagnostics of a finished run: pretrained and fine-tuned model on the same queries."""

from __future__ import annotations

import pytest
from helpers import TINY

from analysis.config import AnalysisConfig
from analysis.run_diagnostics import diagnose_run, main
from cdfsl_core.runner import run


def test_diagnose_run_reproduces_the_episode_and_writes_every_table(tmp_path, capsys):
    folder = tmp_path / "run"
    run(TINY, folder, progress=False)
    tables = diagnose_run(folder, episodes=[1], analysis=AnalysisConfig(attribution_steps=4))
    assert set(tables) == {"norms", "sinks", "head_tail", "attention", "rollout", "attribution", "token_maps"}
    for name, table in tables.items():
        assert set(table["model"]) == {"pretrained", "fine-tuned coop+lora/tir"}, name
        assert set(table["episode"]) == {1} and set(table["dataset"]) == {"synthetic-crops"}
        assert table["reproduced"].all(), name  # re-training gave the recorded accuracy
        assert set(table["fine_tuned_from"]) == {"re-trained"}
        assert (folder / "diagnostics" / f"{name}.csv").exists()
    sinks = tables["sinks"]
    assert set(sinks["definition"]) == {"sum-all", "high-norm", "attention-mass", "massive-activation"}
    assert sinks["images"].eq(6).all()  # 3-way x 2 queries
    assert main([str(folder), "--episodes", "0", "--out", str(tmp_path / "d")]) == 0
    assert "mean sink tokens per image" in capsys.readouterr().out


def test_episode_out_of_range(tmp_path):
    run(TINY, tmp_path / "run", progress=False)
    with pytest.raises(ValueError, match=r"episode 9 out of range.*0..3"):
        diagnose_run(tmp_path / "run", episodes=[9])


def test_diagnose_run_rebuilds_the_fine_tuned_model_from_a_saved_state(tmp_path):
    folder = tmp_path / "run"
    run(TINY, folder, progress=False, save_states=True)
    tables = diagnose_run(folder, episodes=[3], analysis=AnalysisConfig(attribution_steps=2))
    sinks = tables["sinks"]
    assert set(sinks["fine_tuned_from"]) == {"saved state"} and sinks["reproduced"].all()
