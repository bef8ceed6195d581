"""The episodic runner: run folder, resume after a kill, NaN handling, paired comparison, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import TINY

import cdfsl_core.episode_loop as episode_loop
import cdfsl_core.runner as runner
from cdfsl_core.compare import main as compare_main
from cdfsl_core.compare import paired_difference
from cdfsl_core.config import RunConfig, TrainConfig
from cdfsl_core.errors import RunFolderError
from cdfsl_core.finetune import main as finetune_main
from cdfsl_core.models import load_clip
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import run


def _rows(folder: Path) -> list[dict]:
    return RunFolder(folder).lines()[0]


def test_a_run_folder_holds_config_manifest_episodes_and_summary(tmp_path):
    summary = run(TINY, tmp_path / "run", progress=False)
    folder = tmp_path / "run"
    assert RunConfig.from_dict(json.loads((folder / "config.json").read_text())) == TINY
    manifest = json.loads((folder / "manifest.json").read_text())
    assert {"torch", "open_clip", "git_revision", "device", "episode_file_sha256"} <= set(manifest)
    rows = _rows(folder)
    assert [r["episode"] for r in rows] == [0, 1, 2, 3] and all(r["status"] == "ok" for r in rows)
    assert all(r["steps"] == 3 and r["loss_first"] is not None for r in rows)
    accuracies = [r["accuracy"] for r in rows]
    assert summary["mean_accuracy"] == pytest.approx(sum(accuracies) / 4)
    assert summary["episodes"] == 4 and summary["episode_file_sha256"] == manifest["episode_file_sha256"]


def test_an_interrupted_run_resumes_to_the_same_results(tmp_path, monkeypatch):
    reference = run(TINY, tmp_path / "whole", progress=False)
    real_train = episode_loop.train_episode
    calls = {"n": 0}

    def dies_on_the_third_episode(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_train(*args, **kwargs)

    monkeypatch.setattr(episode_loop, "train_episode", dies_on_the_third_episode)
    with pytest.raises(KeyboardInterrupt):
        run(TINY, tmp_path / "resumed", progress=False)
    assert len(_rows(tmp_path / "resumed")) == 2 and not (tmp_path / "resumed" / "summary.json").exists()
    monkeypatch.setattr(episode_loop, "train_episode", real_train)
    resumed = run(TINY, tmp_path / "resumed", progress=False)
    assert resumed == reference
    strip = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert strip(_rows(tmp_path / "resumed")) == strip(_rows(tmp_path / "whole"))


@pytest.mark.slow
def test_a_killed_process_resumes_to_the_same_results(tmp_path):
    """SIGKILL a real run (2 episodes trained together) after its first lines, rerun the same command, compare."""
    args = ["--model", "cdfsl-test-vit", "--pretrained", "none", "--dataset", "synthetic-crops",
            "--ways", "3", "--queries", "2", "--episodes", "6", "--steps", "60", "--device", "cpu",
            "--episode-file", str(tmp_path / "episodes.json"), "--episode-batch", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "cdfsl_core.finetune", *args]
    subprocess.run([*command, "--out", str(tmp_path / "whole")], check=True, env=env, capture_output=True)
    killed = tmp_path / "killed"
    process = subprocess.Popen([*command, "--out", str(killed)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    results = killed / "episodes.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished_at_kill = results.read_text().count("\n")
    assert 1 <= finished_at_kill < 6
    subprocess.run([*command, "--out", str(killed)], check=True, env=env, capture_output=True)
    whole = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert json.loads((killed / "summary.json").read_text()) == whole


def test_a_non_finite_loss_stops_the_episode_and_is_recorded(tmp_path, monkeypatch, capsys):
    nan_loss = lambda logits, labels: (logits * float("nan")).sum()  # noqa: E731
    monkeypatch.setattr(episode_loop, "F", SimpleNamespace(cross_entropy=nan_loss))
    summary = run(replace(TINY, episodes=replace(TINY.episodes, n_episodes=2)), tmp_path / "nan", progress=False)
    rows = _rows(tmp_path / "nan")
    assert [r["status"] for r in rows] == ["non-finite-loss"] * 2
    assert "loss is nan at step 0" in rows[0]["message"] and rows[0]["accuracy"] is None
    assert summary["episodes"] == 0 and summary["failed_episodes"] == [0, 1]


def test_another_config_in_the_same_folder_is_refused(tmp_path):
    run(replace(TINY, episodes=replace(TINY.episodes, n_episodes=1)), tmp_path / "r", progress=False)
    with pytest.raises(RunFolderError, match=r"another config: episodes.n_episodes: 1 \(the run\) vs 2 \(now\)"):
        run(replace(TINY, episodes=replace(TINY.episodes, n_episodes=2)), tmp_path / "r", progress=False)


def test_class_names_must_match_the_episode(tmp_path):
    from cdfsl_core.methods import create_method

    bundle = load_clip("cdfsl-test-vit")
    method = create_method(bundle, ["a", "b", "c"], "lora", "none")
    images = torch.randn(4, 3, 32, 32)
    with pytest.raises(ValueError, match=r"3 class names .* labels are 0..3 \(4-way\)"):
        episode_loop.train_episode(method, images, torch.tensor([0, 1, 2, 3]), TrainConfig(steps=1))


def test_compare_pairs_runs_on_the_same_episode_file(tmp_path, capsys):
    shared = str(tmp_path / "episodes.json")
    base = replace(TINY, data=replace(TINY.data, episode_file=shared))
    run(base, tmp_path / "a", progress=False)
    run(replace(base, method=replace(base.method, intervention="none")), tmp_path / "b", progress=False)
    result = paired_difference(tmp_path / "a", tmp_path / "b")
    a = {r["episode"]: r["accuracy"] for r in _rows(tmp_path / "a")}
    b = {r["episode"]: r["accuracy"] for r in _rows(tmp_path / "b")}
    assert result["episodes"] == 4
    assert result["mean_difference"] == pytest.approx(sum(a[i] - b[i] for i in a) / 4)
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "paired episodes" in capsys.readouterr().out
    other = replace(TINY, episodes=replace(TINY.episodes, seed=1))
    run(other, tmp_path / "c", progress=False)
    with pytest.raises(ValueError, match="different episode files"):
        paired_difference(tmp_path / "a", tmp_path / "c")


def test_finetune_cli_runs_a_few_episodes(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "cdfsl-test-vit", "--pretrained", "none", "--dataset", "synthetic-xray",
            "--adaptation", "coop+lora", "--intervention", "atha", "--ways", "3", "--queries", "3",
            "--episodes", "2", "--steps", "2", "--device", "cpu", "--out", "runs/x"]
    assert finetune_main(argv) == 0
    assert "over 2 episodes" in capsys.readouterr().out
    assert (tmp_path / "episodes" / "synthetic-xray_3w1s3q_2ep_seed0.json").exists()
    rows = _rows(tmp_path / "runs" / "x")
    assert len(rows[0]["intervention_log"]["alpha"]) == 2 and set(rows[0]["intervention_stats"]) == {"init", "trained"}
    config = json.loads((tmp_path / "runs" / "x" / "config.json").read_text())
    assert config["method"]["logit_scale"] == 2.0  # 'auto' for 1-shot


def test_saved_states_rebuild_each_episode_without_changing_results(tmp_path):
    plain = run(TINY, tmp_path / "plain", progress=False)
    saved = run(TINY, tmp_path / "saved", progress=False, save_states=True)
    assert [r["accuracy"] for r in _rows(tmp_path / "plain")] == [r["accuracy"] for r in _rows(tmp_path / "saved")]
    assert plain["mean_accuracy"] == saved["mean_accuracy"]
    assert not (tmp_path / "plain" / "states").exists()
    config, bundle, dataset, episodes = runner.load_run(tmp_path / "saved")
    method, _, _, query, query_labels = episode_loop.prepare_episode(config, bundle, dataset, episodes, 2)
    episode_loop.load_state(method, runner.state_path(tmp_path / "saved", 2))
    assert episode_loop.evaluate(method, query, query_labels, 64) == _rows(tmp_path / "saved")[2]["accuracy"]
    assert any(p.abs().sum() > 0 for n, p in method.trainable_state().items() if "lora_B" in n)  # trained, not initial
    with pytest.raises(ValueError, match="does not fit this method: missing"):
        method.load_trainable_state({})
