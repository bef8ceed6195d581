"""Damaged run folders and out-of-range values are named in one line (exit 1, no traceback) by
every command that meets them, and nothing is changed; each case is a finding of a probe through
the real commands (``main(argv)``)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from test_reliability import RANDOM_TINY, _error, eurosat  # noqa: F401 - the fixture is used by name

from analysis.organism import main as organism_main
from analysis.report import main as report_main
from analysis.run_diagnostics import main as diagnostics_main
from cdfsl_core.compare import main as compare_main
from cdfsl_core.episodes import main as episodes_main
from cdfsl_core.finetune import main as finetune_main
from cdfsl_core.pretrain import main as pretrain_main
from cdfsl_core.run_folder import RunFolder


@pytest.fixture
def finished(tmp_path, eurosat):  # noqa: F811 - the fixture of test_reliability
    """A finished 2-episode run of the random test architecture."""
    out = tmp_path / "run"
    assert finetune_main([*RANDOM_TINY, "--episodes", "2", "--data-root", str(eurosat),
                          "--episode-file", str(tmp_path / "ep.json"), "--out", str(out)]) == 0
    return out


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


@pytest.mark.parametrize("damage", ["manifest", "config", "foreign-line", "junk-line"])
def test_a_damaged_run_folder_is_named_by_every_reader(finished, eurosat, tmp_path, capsys, damage):  # noqa: F811
    if damage == "manifest":
        (finished / "manifest.json").write_text("{not json")
        expected = "manifest.json is not valid JSON"
    elif damage == "config":
        (finished / "config.json").write_text("[1, 2]")
        expected = "config.json holds a JSON list"
    elif damage == "foreign-line":
        with (finished / "episodes.jsonl").open("a") as handle:
            handle.write('{"hello": 1}\n')
        expected = "episodes.jsonl, line 3: a JSON line that is not an episode line"
    else:
        with (finished / "episodes.jsonl").open("a") as handle:
            handle.write("appended by hand\n")
        expected = "episodes.jsonl, line 3: not an episode line"
    before = _snapshot(finished)
    capsys.readouterr()
    commands = [
        lambda: finetune_main([*RANDOM_TINY, "--episodes", "2", "--data-root", str(eurosat),
                               "--episode-file", str(tmp_path / "ep.json"), "--out", str(finished)]),
        lambda: diagnostics_main([str(finished), "--episodes", "0"]),
    ]
    if damage != "config":  # compare reads the lines and the manifest, not the config
        commands.append(lambda: compare_main([str(finished), str(finished)]))
    for run in commands:
        assert run() == 1
        message = _error(capsys)
        assert expected in message and str(finished) in message, message
    assert _snapshot(finished) == before  # nothing changed


def test_a_torn_last_line_is_still_tolerated(finished):
    """The control: a line cut short by a killed writer is skipped, not refused."""
    with (finished / "episodes.jsonl").open("a") as handle:
        handle.write('{"episode": 2, "classes": ["a", "b')
    rows, torn = RunFolder(finished).lines()
    assert torn and [r["episode"] for r in rows] == [0, 1]


@pytest.mark.parametrize("argv, flag", [
    (["pretrain", "--seed", "-1"], "--seed"),
    (["organism", "--seed", "-1"], "--seed"),
    (["organism", "--high-norm-tau", "-1"], "--high-norm-tau"),
    (["organism", "--high-norm-tau", "0"], "--high-norm-tau"),
    (["report", "--timeout", "0"], "--timeout"),
    (["report", "--timeout", "-5"], "--timeout"),
])
def test_out_of_range_values_fail_in_argparse(argv, flag, tmp_path, capsys):
    mains = {"pretrain": pretrain_main, "organism": organism_main, "report": report_main}
    extra = {"pretrain": ["--out", str(tmp_path / "p")], "organism": ["--out", str(tmp_path / "o"), "x"],
             "report": [str(tmp_path)]}[argv[0]]
    with pytest.raises(SystemExit) as exit_:
        mains[argv[0]]([*argv[1:], *extra])
    assert exit_.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing created


def test_episodes_out_an_existing_folder_is_named_before_the_data(tmp_path, capsys):
    (tmp_path / "a_folder").mkdir()
    assert episodes_main(["--dataset", "eurosat", "--data-root", str(tmp_path / "missing"), "--shots", "1",
                          "--out", str(tmp_path / "a_folder")]) == 1
    assert "--out" in (message := _error(capsys)) and "is a folder" in message


@pytest.mark.parametrize("content, expected", [("{broken", "is not valid JSON"), ('"a string"', "holds a JSON str")])
def test_report_names_a_corrupt_study_file(tmp_path, capsys, content, expected):
    (tmp_path / "study.json").write_text(content)
    assert report_main([str(tmp_path)]) == 1
    message = _error(capsys)
    assert "study.json" in message and expected in message


def test_organism_names_a_corrupt_recipe(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "pretrain_config.json").write_text("{}")
    assert organism_main([str(run), "--out", str(tmp_path / "out")]) == 1
    assert "names no architecture" in _error(capsys)
    (run / "pretrain_config.json").write_text("nope")
    assert organism_main([str(run), "--out", str(tmp_path / "out")]) == 1
    assert "is not valid JSON" in _error(capsys)


def test_organism_never_replaces_the_tables_of_other_runs(tmp_path, capsys):
    out = tmp_path / "out"
    assert organism_main(["cdfsl-synth-vit=synthetic", "--domains", "synthetic-crops", "--subsets", "1", "--per-class",
                          "1", "--out", str(out)]) == 0
    table = (out / "organism.csv").read_text()
    capsys.readouterr()
    assert organism_main(["cdfsl-synth-vit=synthetic", "--domains", "synthetic-crops", "--subsets", "2", "--per-class",
                          "1", "--out", str(out)]) == 1
    assert "subsets: 1 (the tables there) vs 2 (now)" in _error(capsys)
    assert (out / "organism.csv").read_text() == table


def test_a_study_folder_with_a_corrupt_settings_file_is_named(tmp_path):
    from analysis.study import Study
    from cdfsl_core.errors import ConfigError

    (tmp_path / "study.json").write_text(json.dumps([1]))
    study = Study.create(tmp_path, targets=("synthetic-crops",), shots=(1,), diagnose_shots=1, episodes=1, steps=1,
                         progress=False)
    with pytest.raises(ConfigError, match="study.json holds a JSON list"):
        study.check_folder()


def test_run_causal_never_replaces_tables_of_other_settings(tmp_path, capsys):
    """The data-loss finding: --sets tail after --sets head replaced ablation.csv without a word."""
    from helpers import TINY

    from analysis.run_causal import main as causal_main
    from cdfsl_core.runner import run

    folder = tmp_path / "run"
    run(TINY, folder, progress=False, save_states=True)
    common = [str(folder), "--episodes", "0", "--block", "1", "--queries", "2"]
    assert causal_main([*common, "--sets", "head"]) == 0
    before = _snapshot(folder / "causal")
    capsys.readouterr()
    assert causal_main([*common, "--sets", "tail"]) == 1
    message = _error(capsys)
    assert "other settings" in message and "sets: ['head'] (the tables there) vs ['tail'] (now)" in message
    assert _snapshot(folder / "causal") == before
    assert causal_main([*common, "--sets", "tail", "--out", str(tmp_path / "tail")]) == 0  # the fix it names
    assert causal_main([*common, "--sets", "head"]) == 0  # the same settings recompute


@pytest.mark.parametrize("name, expected", [("bucket:9", "bucket:0 to bucket:3"), ("bucket:x", "bucket:0 to bucket:3"),
                                            ("sink:nope", "no such sink definition"), ("middle", "expected 'sink:")])
def test_run_causal_refuses_sets_that_cannot_exist_before_any_work(tmp_path, capsys, name, expected):
    from helpers import TINY

    from analysis.run_causal import main as causal_main
    from cdfsl_core.runner import run

    folder = tmp_path / "run"
    run(TINY, folder, progress=False)
    capsys.readouterr()
    assert causal_main([str(folder), "--episodes", "0", "--block", "1", "--sets", name]) == 1
    assert expected in _error(capsys)
    assert not (folder / "causal").exists()


def test_every_error_of_analysis_trajectory_is_one_line(tmp_path, eurosat, capsys):  # noqa: F811
    from analysis.trajectory import main as trajectory_main

    run = tmp_path / "run"
    assert finetune_main([*RANDOM_TINY, "--episodes", "1", "--data-root", str(eurosat), "--trajectory-steps", "0", "1",
                          "--episode-file", str(tmp_path / "ep.json"), "--out", str(run)]) == 0
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    cases = [([str(tmp_path / "missing")], "is not a folder"),
             ([str(tmp_path / "empty")], "config.json is missing"),
             ([str(run), "--out", str(tmp_path / "a_file")], "--out"),
             ([str(run), "--block", "99"], "--block 99: the trajectories have blocks 0..1")]
    for argv, expected in cases:
        capsys.readouterr()
        assert trajectory_main(argv) == 1, argv
        assert expected in _error(capsys), argv
    with pytest.raises(SystemExit) as exit_:
        trajectory_main([str(run), "--block", "-1"])
    assert exit_.value.code == 2 and "argument --block" in capsys.readouterr().err
    assert trajectory_main([str(run), "--block", "1"]) == 0  # the control: a valid block draws
    assert (run / "diagnostics" / "trajectory.csv").is_file()
    # the table of one set of runs is never replaced by another's: the second run is refused there
    table = (run / "diagnostics" / "trajectory.csv").read_text()
    other = tmp_path / "other"
    assert finetune_main([*RANDOM_TINY, "--episodes", "1", "--data-root", str(eurosat), "--trajectory-steps", "0", "1",
                          "--episode-file", str(tmp_path / "ep.json"), "--intervention", "none", "--out",
                          str(other)]) == 0
    capsys.readouterr()
    assert trajectory_main([str(run), str(other)]) == 1
    assert "holds trajectory table of other settings" in _error(capsys)
    assert (run / "diagnostics" / "trajectory.csv").read_text() == table
    assert trajectory_main([str(run), str(other), "--out", str(tmp_path / "both")]) == 0  # elsewhere: fine


def test_export_merged_episode_needs_its_file_and_an_episode_of_the_run(tmp_path, eurosat, capsys):  # noqa: F811
    common = [*RANDOM_TINY, "--episodes", "2", "--data-root", str(eurosat), "--out", str(tmp_path / "run")]
    assert finetune_main([*common, "--export-merged-episode", "1"]) == 1
    assert "needs --export-merged" in _error(capsys)
    assert finetune_main([*common, "--export-merged", str(tmp_path / "m.safetensors"),
                          "--export-merged-episode", "5"]) == 1
    assert "the run has episodes 0..1" in _error(capsys)
    assert not (tmp_path / "run").exists()  # refused before the run, not after training


def test_organism_domains_never_swallow_a_run_silently(tmp_path, capsys):
    assert organism_main(["--out", str(tmp_path / "o"), "--domains", "synthetic-crops", str(tmp_path / "run")]) == 1
    message = _error(capsys)
    assert "not a synthetic domain" in message and "put the runs before --domains" in message


def test_run_vision_names_a_non_vit_tower_a_bad_size_and_takes_none(tmp_path, capsys):
    from analysis.run_vision import main as vision_main

    common = ["--dataset", "synthetic-crops", "--images", "2"]
    assert vision_main(["RN50", *common, "--out", str(tmp_path / "a")]) == 1
    assert "is not a ViT tower" in _error(capsys)
    assert vision_main(["vit_small_patch14_reg4_dinov2", "--image-size", "15", *common, "--out", str(tmp_path / "b")]) == 1
    assert "14-pixel patches; pass a multiple of 14" in _error(capsys)
    # 'none' means random weights here as everywhere
    assert vision_main(["vit_small_patch14_reg4_dinov2", "--pretrained", "none", "--image-size", "28", *common,
                        "--out", str(tmp_path / "c")]) == 0
    assert (tmp_path / "c" / "norms.csv").is_file()


def test_a_finished_run_in_a_read_only_folder_is_summarised(finished, eurosat, tmp_path, capsys, monkeypatch):  # noqa: F811
    """Rerunning a finished run only prints its summary, so a read-only copy works; an unfinished one
    is refused before any work. (Root ignores permission bits, so the check's answer is simulated.)"""
    from cdfsl_core import paths

    before = _snapshot(finished)
    monkeypatch.setattr(paths, "_writable", lambda folder: False)
    command = [*RANDOM_TINY, "--data-root", str(eurosat), "--episode-file", str(tmp_path / "ep.json"), "--out",
               str(finished)]
    assert finetune_main([*command, "--episodes", "2"]) == 0
    assert '"episodes": 2' in capsys.readouterr().out and _snapshot(finished) == before
    assert finetune_main([*command, "--episodes", "3"]) == 1  # one more episode to write: refused
    assert "is not writable" in _error(capsys)


def test_a_run_reached_through_dotdot_resumes_as_the_same_run(tmp_path, eurosat, monkeypatch):  # noqa: F811
    """The notebooks open the demo's study as ``../outputs/demo`` from ``notebooks/``: the same
    episode file spelled through ``..`` is the same file (it was refused as another config)."""
    (tmp_path / "notebooks").mkdir()
    common = [*RANDOM_TINY, "--episodes", "1", "--data-root", str(eurosat)]
    monkeypatch.chdir(tmp_path)
    assert finetune_main([*common, "--episode-file", "runs/ep.json", "--out", "runs/x"]) == 0
    monkeypatch.chdir(tmp_path / "notebooks")
    assert finetune_main([*common, "--episode-file", "../runs/ep.json", "--out", "../runs/x"]) == 0
    config = json.loads((tmp_path / "runs" / "x" / "config.json").read_text())
    assert config["data"]["episode_file"] == str(tmp_path / "runs" / "ep.json")


def test_report_leaves_its_callers_environment_as_it_was(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("CDFSL_NOTEBOOK_QUICK", "somewhere")
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "study.json").write_text("[1, 2")
    assert report_main([str(tmp_path / "study")]) == 1  # fails reading the study, after the switch was taken off
    assert os.environ["CDFSL_NOTEBOOK_QUICK"] == "somewhere"
