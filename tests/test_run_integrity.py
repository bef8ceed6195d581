"""Runs that cannot lie, and commands that speak plainly: each scenario runs the real command
(``main(argv)`` or a subprocess) on generated data in the real EuroSAT layout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import EUROSAT_FOLDERS, write_image

import cdfsl_core.episode_loop as episode_loop
from cdfsl_core.compare import main as compare_main
from cdfsl_core.episodes import main as episodes_main
from cdfsl_core.finetune import build_parser
from cdfsl_core.finetune import main as finetune_main
from cdfsl_core.run_folder import RunFolder

TINY_ARGS = ["--dataset", "eurosat", "--model", "cdfsl-test-vit", "--pretrained", "none", "--ways", "3",
             "--shots", "1", "--queries", "1", "--episodes", "4", "--steps", "2", "--lora-rank", "2", "--device", "cpu",
             "--episode-batch", "1"]  # one at a time: the interrupts below count episodes trained alone


@pytest.fixture
def eurosat(tmp_path: Path) -> Path:
    for c, name in enumerate(EUROSAT_FOLDERS):
        for i in range(1, 5):
            write_image(tmp_path / "data" / "EuroSAT" / "2750" / name / f"{name}_{i}.jpg", seed=c * 10 + i)
    return tmp_path / "data"


def _interrupt_after(monkeypatch, episodes: int) -> None:
    """Ctrl-C during the training of episode ``episodes`` (0-based)."""
    real = episode_loop.train_episode
    calls = {"n": 0}

    def train(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == episodes + 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(episode_loop, "train_episode", train)


def _lines(folder: Path) -> list[dict]:
    return RunFolder(folder).lines()[0]


def test_kill_remove_images_regenerate_and_resume_is_refused(tmp_path, eurosat, monkeypatch, capsys):
    episode_file = tmp_path / "episodes.json"
    command = [*TINY_ARGS, "--data-root", str(eurosat), "--episode-file", str(episode_file), "--out", str(tmp_path / "run")]
    _interrupt_after(monkeypatch, 1)
    assert finetune_main(command) == 130
    assert "interrupted: 1 of 4 episodes finished" in capsys.readouterr().err
    monkeypatch.undo()
    for i in (1, 2):  # remove some images, then regenerate the episode file with the same settings
        (eurosat / "EuroSAT" / "2750" / "Forest" / f"Forest_{i}.jpg").unlink()
    assert episodes_main(["--dataset", "eurosat", "--data-root", str(eurosat), "--ways", "3", "--shots", "1",
                          "--queries", "1", "--episodes", "4", "--out", str(episode_file)]) == 0
    capsys.readouterr()
    assert finetune_main(command) == 1
    err = capsys.readouterr().err
    assert "Resuming would mix episodes of two files" in err and "sha256" in err and "Traceback" not in err
    assert len(_lines(tmp_path / "run")) == 1  # nothing was appended


def test_compare_refuses_a_run_whose_lines_come_from_two_files(tmp_path, eurosat, capsys):
    episode_file = str(tmp_path / "episodes.json")
    for name, intervention in (("a", "tir"), ("b", "none")):
        assert finetune_main([*TINY_ARGS, "--data-root", str(eurosat), "--episode-file", episode_file,
                              "--intervention", intervention, "--out", str(tmp_path / name)]) == 0
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    lines = (tmp_path / "a" / "episodes.jsonl").read_text().splitlines()
    mixed = json.loads(lines[-1])
    mixed["episode_file_sha256"] = "0" * 64  # a line from another episode file
    (tmp_path / "a" / "episodes.jsonl").write_text("\n".join([*lines[:-1], json.dumps(mixed)]) + "\n")
    capsys.readouterr()
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "its lines come from episode files" in capsys.readouterr().err
    duplicated = json.loads(lines[0])
    duplicated["accuracy"] = 1.0 - duplicated["accuracy"]
    (tmp_path / "a" / "episodes.jsonl").write_text("\n".join([*lines, json.dumps(duplicated)]) + "\n")
    assert compare_main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
    assert "recorded twice with different accuracies" in capsys.readouterr().err


def test_a_failed_start_writes_nothing_and_the_corrected_command_succeeds(tmp_path, eurosat, capsys):
    out = tmp_path / "run"
    command = [*TINY_ARGS, "--episode-file", str(tmp_path / "episodes.json"), "--out", str(out)]
    assert finetune_main([*command, "--data-root", str(tmp_path / "no-such-root")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: Data root") and "does not exist" in err
    assert not out.exists() and not (tmp_path / "episodes.json").exists()
    assert finetune_main([*command, "--data-root", str(eurosat)]) == 0
    assert len(_lines(out)) == 4


def test_a_corrected_command_is_accepted_while_no_episode_finished(tmp_path, eurosat, monkeypatch, capsys):
    out = tmp_path / "run"
    command = [*TINY_ARGS, "--data-root", str(eurosat), "--episode-file", str(tmp_path / "e.json"), "--out", str(out)]
    _interrupt_after(monkeypatch, 0)
    assert finetune_main([*command, "--steps", "3"]) == 130  # config.json written, no episode finished
    monkeypatch.undo()
    assert finetune_main(command) == 0  # another config, accepted: nothing finished under the first
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 2


def test_a_config_difference_names_the_field_and_both_values(tmp_path, eurosat, capsys):
    command = [*TINY_ARGS, "--data-root", str(eurosat), "--episode-file", str(tmp_path / "e.json"), "--out", str(tmp_path / "r")]
    assert finetune_main(command) == 0
    capsys.readouterr()
    assert finetune_main([*command, "--lora-rank", "4"]) == 1
    err = capsys.readouterr().err
    assert "method.lora.rank: 2 (the run) vs 4 (now)" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_a_gpu_says_so_before_loading_weights(tmp_path, eurosat, capsys):
    code = finetune_main([*TINY_ARGS[:-2], "--device", "cuda", "--data-root", str(eurosat), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 1 and "no CUDA device is available" in err and "--device cpu" in err
    assert "Weights" not in err and "architecture" not in err and not (tmp_path / "r").exists()


@pytest.mark.parametrize("flag, value", [("--steps", "-5"), ("--shots", "0"), ("--episodes", "0"), ("--queries", "0"),
                                         ("--ways", "1"), ("--lora-rank", "0"), ("--logit-scale", "abc"),
                                         ("--logit-scale", "-2")])
def test_bad_numbers_fail_in_argparse_with_the_flags_name(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_:
        finetune_main([flag, value, "--out", "unused"])
    assert exit_.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_zero_steps_for_a_method_that_trains_is_refused(tmp_path, eurosat, capsys):
    assert finetune_main([*TINY_ARGS, "--steps", "0", "--data-root", str(eurosat), "--out", str(tmp_path / "r")]) == 1
    assert "steps=0 with adaptation 'coop+lora' trains nothing" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("suffix, expected", [(".safetensors", "is not a valid safetensors file"),
                                              (".pt", "is not a valid torch checkpoint")])
def test_a_corrupt_checkpoint_names_the_file(tmp_path, eurosat, capsys, suffix, expected):
    weights = tmp_path / f"broken{suffix}"
    weights.write_bytes(b"\x93not a checkpoint at all" * 10)
    args = [*TINY_ARGS, "--data-root", str(eurosat), "--out", str(tmp_path / "r")]
    args[args.index("--pretrained") + 1] = str(weights)
    assert finetune_main(args) == 1
    err = capsys.readouterr().err
    assert str(weights) in err and expected in err
    assert "weights_only=False" not in err and "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path, capsys):
    assert finetune_main([*TINY_ARGS, "--data-root", str(tmp_path / "nope"), "--out", str(tmp_path / "r"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "error: Data root" in err


def test_a_run_works_from_any_working_folder_and_a_finished_rerun_writes_nothing(tmp_path, eurosat, monkeypatch, capsys):
    from analysis.run_diagnostics import main as diagnostics_main

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    command = [*TINY_ARGS, "--data-root", os.path.relpath(eurosat), "--out", "runs/tir", "--intervention", "tir"]
    assert finetune_main(command) == 0  # relative root, relative out, the default (relative) episode file
    config = json.loads(Path("runs/tir/config.json").read_text())
    assert Path(config["data"]["episode_file"]).is_absolute() and Path(config["data"]["root"]).is_absolute()
    before = {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path("runs/tir").rglob("*")}
    assert finetune_main(command) == 0  # the finished run, summarised again
    assert {p: (p.stat().st_mtime_ns, p.stat().st_size) for p in Path("runs/tir").rglob("*")} == before
    monkeypatch.chdir(tmp_path / "b")
    assert diagnostics_main([str(tmp_path / "a" / "runs" / "tir"), "--episodes", "1", "--out", "d"]) == 0
    assert (tmp_path / "b" / "d" / "sinks.csv").exists()


def test_every_flag_has_a_help_line_with_its_default():
    from analysis.cka import build_parser as cka_parser
    from analysis.demo import build_parser as demo_parser
    from analysis.run_diagnostics import build_parser as diagnostics_parser
    from analysis.run_vision import build_parser as vision_parser
    from cdfsl_core.compare import build_parser as compare_parser
    from cdfsl_core.episodes import build_parser as episodes_parser

    for make in (build_parser, episodes_parser, compare_parser, diagnostics_parser, cka_parser, demo_parser,
                 vision_parser):
        parser = make()
        text = parser.format_help()
        for action in parser._actions:
            if action.help == "show this help message and exit":
                continue
            assert action.help, f"{parser.prog}: {action.option_strings or action.dest} has no help line"
            if action.option_strings and action.default is not None and action.default is not False:
                assert f"(default: {action.default})" in " ".join(text.split()), (parser.prog, action.dest)


@pytest.mark.parametrize("command", [["cdfsl_core.finetune", "--help"], ["cdfsl_core.models", "list"],
                                     ["cdfsl_core.episodes", "--help"], ["cdfsl_core.compare", "--help"],
                                     ["analysis.run_diagnostics", "--help"], ["analysis.cka", "--help"],
                                     ["analysis.demo", "--help"], ["cdfsl_core.data", "list"],
                                     ["cdfsl_core.sweep", "--help"], ["analysis.run_vision", "--help"]])
def test_help_and_models_list_do_not_import_torch(command):
    # not a timed test: what makes them fast is that PyTorch and open_clip are not imported
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", *command], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    assert "torch" not in imported and "open_clip" not in imported


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_exits_130(tmp_path, eurosat):
    args = [*TINY_ARGS, "--data-root", str(eurosat), "--episodes", "400", "--steps", "40", "--out", str(tmp_path / "r"),
            "--episode-file", str(tmp_path / "episodes.json")]  # 400: the run must outlast a slow poll
    process = subprocess.Popen([sys.executable, "-m", "cdfsl_core.finetune", *args], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               # a parent that ignores SIGINT (an earlier test's Ray) would hand that on
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    results = tmp_path / "r" / "episodes.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (results.exists() and results.read_text().count("\n") >= 1):
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    assert "episodes finished and are saved in" in err and "rerun the same command to resume" in err
