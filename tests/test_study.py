"""The study folder: settings in parts pinned in study.json, flat keywords, parts that run on
their own, and the 2-D feature view."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from analysis.study import Study, StudyGrid, notebook_study
from cdfsl_core import protocol


def test_a_study_folder_refuses_other_settings_and_names_them(tmp_path):
    study = Study.create(tmp_path, targets=("synthetic-crops",), episodes=1, steps=1, progress=False)
    table = study.feature_view(per_domain=6)
    assert json.loads((tmp_path / "study.json").read_text())["grid"]["steps"] == 1
    assert list(dict.fromkeys(table["domain"])) == ["synthetic", "synthetic-crops"]
    assert len(table) == 12 and table["explained_variance"].between(0, 1).all()
    pd.testing.assert_frame_equal(study.feature_view(per_domain=6), table, check_dtype=False)  # the cached table
    other = Study.create(tmp_path, targets=("synthetic-crops",), episodes=1, steps=2, progress=False)
    with pytest.raises(ValueError, match=r"differs in \['grid'\]"):
        other.feature_view()


def test_flat_keywords_fill_the_parts_and_defaults_come_from_the_protocol(tmp_path):
    study = Study.create(tmp_path, model="cdfsl-test-vit", pretrained=None, data_root="/data", rho=0.25, episodes=3)
    assert study.model.name == "cdfsl-test-vit" and study.data.root == "/data"
    assert study.analysis.rho == 0.25 and study.grid.episodes == 3
    assert StudyGrid().steps == protocol.DEMO_STEPS and StudyGrid().shots == protocol.SHOTS
    config = study.run_config("synthetic-crops", 1, "coop+lora", "tir")
    assert config.method.logit_scale == protocol.logit_scale(1) and config.episodes.n_query == protocol.QUERIES
    with pytest.raises(ValueError, match="Study setting 'cka_images' is unknown"):
        Study.create(tmp_path, cka_images=10)


def test_bad_study_settings(tmp_path):
    with pytest.raises(ValueError, match="diagnose_shots=5 is not among shots=\\(1,\\)"):
        Study.create(tmp_path, shots=(1,))
    with pytest.raises(ValueError, match="method='umap'"):
        Study.create(tmp_path).feature_view("umap")


def test_zero_shot_and_fine_tuned_runs_in_any_order_on_the_one_model(tmp_path):
    study = Study.create(tmp_path, targets=("synthetic-crops",), shots=(5,), episodes=1, steps=1, progress=False)
    study.run_all(["coop+lora"])
    first = study.run_all(["zero-shot"])
    again = Study.create(tmp_path / "again", targets=("synthetic-crops",), shots=(5,), episodes=1, steps=1,
                         progress=False).run_all(["zero-shot"])  # zero-shot first in a fresh study
    assert first["status"].eq("ok").all() and first["accuracy"].tolist() == again["accuracy"].tolist()


def test_the_notebook_study_takes_the_quick_switch(tmp_path, monkeypatch):
    monkeypatch.setenv("CDFSL_NOTEBOOK_QUICK", str(tmp_path / "quick"))
    study = notebook_study("unused", targets=["synthetic-crops", "synthetic-lesions", "synthetic-xray"])
    assert study.out == tmp_path / "quick" and study.data.targets == ("synthetic-crops", "synthetic-xray")
    assert (study.grid.episodes, study.grid.steps) == (1, 2)
    monkeypatch.delenv("CDFSL_NOTEBOOK_QUICK")
    plain = notebook_study(tmp_path / "plain", episodes=None, steps=None)
    assert (plain.grid.episodes, plain.grid.steps) == (protocol.DEMO_EPISODES, protocol.DEMO_STEPS)
