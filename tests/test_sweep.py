"""The sweep on a local Ray of 2 workers: the same numbers as the single-process runner, a killed
worker retried, a stopped sweep resumed, two writers on one run folder, and bad input before any
task starts. Ray starts once for the module (about 10 s)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from cdfsl_core.config import episode_config, episode_file_name, run_config
from cdfsl_core.errors import ConfigError, RunFolderError
from cdfsl_core.run_folder import RunFolder
from cdfsl_core.runner import run
from cdfsl_core.sweep import SweepGrid, load_grid, main, plan_sweep, sweep

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

GRID = SweepGrid(datasets=("synthetic-crops",), shots=(1,), methods=("coop+lora/none", "coop+lora/tir"), episodes=4,
                 steps=3, shard=2, cpus_per_task=1)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _lines(folder: Path) -> list[dict]:
    return RunFolder(folder).lines()[0]


def _cell(out: Path, method: str) -> Path:
    return out / "synthetic-crops" / "1shot" / method.replace("/", "_") / "seed0"


def _sequential(out: Path, method: str, threads: int = 1) -> list[dict]:
    """The same run through the single-process runner, on the sweep's episode file."""
    adaptation, _, intervention = method.partition("/")
    episodes = episode_config(1, 4, 0)
    config = run_config("synthetic-crops", 1, adaptation, intervention, episodes=4, steps=3, device="cpu",
                                 episode_file=str(out / "episodes" / episode_file_name("synthetic-crops", episodes)))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        run(config, out / "sequential" / method.replace("/", "_"), progress=False)
    finally:
        torch.set_num_threads(before)
    return sorted(_lines(out / "sequential" / method.replace("/", "_")), key=lambda r: r["episode"])


KEYS = ("episode", "classes", "accuracy", "accuracy_init", "status", "steps", "episode_file_sha256")


def test_a_sweep_gives_the_single_process_runners_numbers(tmp_path, local_ray, capsys):
    grid = replace(GRID, out=str(tmp_path))
    table = sweep(grid, progress=False)
    assert set(table["method"]) == set(GRID.methods) and table["episodes"].eq(4).all()
    for method in GRID.methods:
        swept = sorted(_lines(_cell(tmp_path, method)), key=lambda r: r["episode"])
        assert [r["episode"] for r in swept] == [0, 1, 2, 3]
        sequential = _sequential(tmp_path, method)
        assert [{k: r[k] for k in KEYS} for r in swept] == [{k: r[k] for k in KEYS} for r in sequential]
        assert [r["loss_last"] for r in swept] == pytest.approx([r["loss_last"] for r in sequential], rel=1e-5)
    # the folders are ordinary run folders: compare reads them
    from cdfsl_core.compare import main as compare_main

    assert compare_main([str(_cell(tmp_path, "coop+lora/tir")), str(_cell(tmp_path, "coop+lora/none"))]) == 0
    assert "paired episodes" in capsys.readouterr().out


def test_a_killed_worker_is_retried_and_nothing_is_lost_or_duplicated(tmp_path, local_ray):
    grid = replace(GRID, out=str(tmp_path), methods=("coop+lora/tir",), episodes=6, steps=40, shard=3)
    killed = []

    def kill_a_worker():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            for claim in (tmp_path).rglob(".claims/*.lock"):
                text = claim.read_text().strip()
                if text and int(text) != os.getpid():
                    os.kill(int(text), signal.SIGKILL)  # a worker, mid-episode
                    killed.append(int(text))
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_a_worker)
    watcher.start()
    table = sweep(grid, progress=False)
    watcher.join()
    assert killed
    lines = _lines(_cell(tmp_path, "coop+lora/tir"))
    assert sorted(r["episode"] for r in lines) == list(range(6))  # each once
    assert table["episodes"].iloc[0] == 6


def test_a_stopped_sweep_resumes_without_repeating_a_finished_episode(tmp_path, local_ray):
    grid = replace(GRID, out=str(tmp_path))
    cells = plan_sweep(grid)
    from cdfsl_core.runner import load_plan, run_episodes

    plan = load_plan(cells[0].folder)
    run_episodes(plan, plan.load_model(), [0, 1], progress=False)  # what a stopped sweep had finished
    before = _lines(cells[0].folder)
    sweep(grid, progress=False)
    after = _lines(cells[0].folder)
    assert after[:2] == before and sorted(r["episode"] for r in after) == [0, 1, 2, 3]


def test_two_commands_on_one_run_folder_at_once_record_each_episode_once(tmp_path):
    args = [sys.executable, "-m", "cdfsl_core.finetune", "--model", "cdfsl-test-vit", "--pretrained", "none",
            "--ways", "3", "--queries", "2", "--episodes", "6", "--steps", "30", "--device", "cpu",
            "--episode-file", str(tmp_path / "episodes.json"), "--out", str(tmp_path / "run")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    outputs = [p.communicate(timeout=300) for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [err[-2000:] for _, err in outputs]
    lines = _lines(tmp_path / "run")
    assert sorted(r["episode"] for r in lines) == list(range(6))  # 6 lines for 6 episodes
    assert outputs[0][0].splitlines()[-1] == outputs[1][0].splitlines()[-1]  # the same summary


def test_bad_grids_fail_before_any_task(tmp_path, local_ray):
    with pytest.raises(ConfigError, match="grid datasets \\['imagenet-x'\\] are not registered"):
        sweep(replace(GRID, datasets=("imagenet-x",), out=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match="grid method 'coop/sink'"):
        sweep(replace(GRID, methods=("coop/sink",), out=str(tmp_path)), progress=False)
    with pytest.raises(ConfigError, match="no node of the cluster has more than 0 GPU"):
        sweep(replace(GRID, gpus_per_task=0.5, out=str(tmp_path)), progress=False)
    run(run_config("synthetic-crops", 1, "coop+lora", "none", episodes=2, steps=1, device="cpu"),
        _cell(tmp_path, "coop+lora/none"), progress=False)  # another run in one of the grid's folders
    with pytest.raises(RunFolderError, match="another config"):
        sweep(replace(GRID, out=str(tmp_path)), progress=False)
    assert not _cell(tmp_path, "coop+lora/tir").joinpath("episodes.jsonl").exists()  # no task started


def test_a_cluster_that_does_not_answer_is_an_error_within_seconds(tmp_path, capsys):
    if ray.is_initialized():
        ray.shutdown()
    start = time.time()
    code = main(["--datasets", "synthetic-crops", "--shots", "1", "--episodes", "2", "--address", "127.0.0.1:1",
                 "--out", str(tmp_path)])
    assert code == 1 and time.time() - start < 15
    assert "does not answer" in capsys.readouterr().err


def test_a_grid_file(tmp_path):
    path = tmp_path / "grid.toml"
    path.write_text('datasets = ["synthetic-xray"]\nshots = [5]\nmethods = ["coop/tir"]\nepisodes = 3\n')
    assert load_grid(path, steps=7) == SweepGrid(datasets=("synthetic-xray",), shots=(5,), methods=("coop/tir",),
                                                 episodes=3, steps=7)
    path.write_text("datasets = ['a']\nwidth = 3\n")
    with pytest.raises(ConfigError, match="unknown keys \\['width'\\]"):
        load_grid(path)
