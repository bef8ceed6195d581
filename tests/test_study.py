"""The study folder: settings pinned in study.json, the 2-D feature view."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.study import Study


def test_a_study_folder_refuses_other_settings_and_names_them(tmp_path):
    study = Study(tmp_path, targets=("synthetic-crops",), episodes=1, steps=1, progress=False)
    table = study.feature_view(per_domain=6)
    assert json.loads((tmp_path / "study.json").read_text())["steps"] == 1
    assert list(dict.fromkeys(table["domain"])) == ["synthetic", "synthetic-crops"]
    assert len(table) == 12 and table["explained_variance"].between(0, 1).all()
    pd.testing.assert_frame_equal(study.feature_view(per_domain=6), table, check_dtype=False)  # the cached table
    other = Study(tmp_path, targets=("synthetic-crops",), episodes=1, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['steps'\]"):
        other.feature_view()


def test_bad_study_settings(tmp_path):
    with pytest.raises(ValueError, match="diagnose_shots=5 is not among shots=\\(1,\\)"):
        Study(tmp_path, shots=(1,))
    with pytest.raises(ValueError, match="method='umap'"):
        Study(tmp_path).feature_view("umap")


def test_zero_shot_runs_after_fine_tuned_runs_on_the_shared_model(tmp_path):
    study = Study(tmp_path, targets=("synthetic-crops",), shots=(5,), episodes=1, steps=1, progress=False)
    study.run_all(["coop+lora"])  # puts LoRA on the study's model
    rows = study.run_all(["zero-shot"])
    assert rows["status"].eq("ok").all() and set(rows["method"]) == {"zero-shot"}
