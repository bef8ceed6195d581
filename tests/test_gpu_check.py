"""The prepared GPU check runs end to end in its dry mode (the CPU, a tiny model), so the first lent
GPU runs a script that is known to work; its JSON holds every step, and refuses to pretend: without
a GPU and without --dry-run it stops with a message."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.slow
def test_the_dry_run_writes_every_step(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--ray", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["dry_run"] is True and report["device"]["device"] == "cpu"
    assert report["gpu_tests"]["returncode"] == 0 and "skipped" in report["gpu_tests"]["summary"]
    assert (tmp_path / report["profile"]["file"]).exists() and report["profile"]["share_by_kind"]
    searches = report["search"]["settings"]
    assert [s["shots"] for s in searches] == [1, 5]
    assert all(set(s["by_episode_batch"]) == {"1", "2"} and s["best_episode_batch"] in (1, 2) for s in searches)
    runs = report["protocol"]["runs"]
    assert [(r["shots"], r["method"]) for r in runs] == [(shots, f"coop+lora/{i}") for shots in (1, 5)
                                                         for i in ("none", "atha", "tir")]
    assert report["protocol"]["protocol_hours_one_device"] > 0
    assert report["agreement"]["fp32"]["episodes_differing_between_E1_and_Ek"] == 0
    assert report["ray_sweep"]["episodes"] == 4 and report["ray_sweep"]["episodes_per_hour"] > 0
    assert "error" not in json.dumps(report)


def test_a_step_past_the_budget_is_skipped_and_says_so(tmp_path):
    out = tmp_path / "check.json"
    assert gpu_check.main(["--dry-run", "--budget", "0", "--skip", "gpu_tests", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["gpu_tests"] == {"skipped": True}
    assert all("out of time" in report[step]["skipped"] for step in ("profile", "search", "protocol", "agreement"))
    assert report["ray_sweep"] == {"skipped": True}  # only with --ray


def test_without_a_gpu_it_says_how_to_run_it(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main([]) == 2
    assert "--dry-run" in capsys.readouterr().err
