"""Atomic writes that two processes can do at once, and the one CI convention pinned by hand.

The race: two processes finish the same run folder together and both write ``summary.json``.
With a fixed temporary name (``summary.json.tmp``) the second rename finds nothing to rename;
with a unique name per writer the last rename wins and nothing fails.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cdfsl_core.atomic import atomic_path, write_json, write_table
from cdfsl_core.compare import accuracy_table, paired_difference
from cdfsl_core.runner import summary_of_lines
from cdfsl_core.stats import format_mean_ci, mean_ci95

ROOT = Path(__file__).resolve().parents[1]


def _fixed_name_write(path: Path, content: dict) -> None:
    """The old way (a fixed temporary name): the positive control of the race test."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content))
    tmp.replace(path)


def _writer(kind: str, path: str, rounds: int, barrier, who: int, failures) -> None:
    write = write_json if kind == "atomic" else _fixed_name_write
    errors = 0
    for round_ in range(rounds):
        content = {"writer": who, "round": round_, "padding": "x" * 4096}
        try:
            barrier.wait(timeout=30)
        except Exception:  # the other writer died: stop
            break
        try:
            write(Path(path), content)
        except OSError:
            errors += 1
    failures[who] = errors


def _race(kind: str, path: Path, rounds: int) -> list[int]:
    """Two processes that write ``path`` ``rounds`` times, released together by a barrier each
    round; the number of failed writes of each."""
    context = mp.get_context("fork")
    barrier = context.Barrier(2)
    failures = context.Manager().dict()
    workers = [context.Process(target=_writer, args=(kind, str(path), rounds, barrier, who, failures))
               for who in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    return [failures[who] for who in range(2)]


def test_two_writers_finishing_together_never_fail(tmp_path: Path) -> None:
    path = tmp_path / "summary.json"
    assert _race("atomic", path, rounds=200) == [0, 0]
    content = json.loads(path.read_text())  # whole, and one writer's last round
    assert content["round"] == 199 and content["writer"] in (0, 1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]  # no temporary file left behind


def test_the_race_test_catches_a_fixed_temporary_name(tmp_path: Path) -> None:
    """Positive control: the same race with the old fixed name fails (87 of 2,000 writes in five
    runs of 200 rounds, measured on a 2-core machine), so the test above could fail."""
    # Under a busy machine the two writers overlap less (one full CI run saw no failure in 200 rounds),
    # so the race is repeated until a failure shows, up to 10 x 200 rounds.
    failures = 0
    for _ in range(10):
        failures += sum(_race("fixed", tmp_path / "summary.json", rounds=200))
        if failures:
            break
    assert failures > 0


def test_an_exception_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    path = tmp_path / "table.csv"
    write_table(pd.DataFrame({"a": [1, 2]}), path)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed midway")
    assert pd.read_csv(path)["a"].tolist() == [1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv"]


def test_written_files_get_the_usual_permissions(tmp_path: Path) -> None:
    import os

    path = tmp_path / "config.json"
    write_json(path, {"a": 1})
    mask = os.umask(0)
    os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask


def test_json_refuses_nan(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_json(tmp_path / "summary.json", {"ci95": float("nan")})
    assert not (tmp_path / "summary.json").exists()


FIXED_TMP = re.compile(r"""(["'])[^"'\n]*\.tmp\1""")


def test_no_source_file_spells_a_fixed_temporary_name() -> None:
    """Every atomic write goes through cdfsl_core.atomic (unique names); the old spellings
    (``path.with_suffix(".tmp")``, ``path.name + ".tmp"``) appear nowhere else."""
    assert FIXED_TMP.search('tmp = path.with_name(path.name + ".tmp")')  # the pattern finds the old spelling
    offenders = []
    for folder in ("cdfsl_core", "analysis", "benchmarks"):
        for source in (ROOT / folder).rglob("*.py"):
            for number, line in enumerate(source.read_text().splitlines(), 1):
                if FIXED_TMP.search(line):
                    offenders.append(f"{source.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


# ----------------------------------------------------------------- the CI convention, by hand
# values 0.6, 0.8, 1.0: mean 0.8; population std sqrt((0.04 + 0 + 0.04) / 3) = 0.1632993;
# half-width 1.96 * 0.1632993 / sqrt(3) = 0.3200666 / 1.7320508 = 0.1847906 (the sample std, 0.2, would give 0.2263163)
VALUES = [0.6, 0.8, 1.0]
MEAN, HALF_WIDTH = 0.8, 0.1847906


def test_mean_ci95_is_the_population_std_convention() -> None:
    mean, ci = mean_ci95(VALUES)
    assert mean == pytest.approx(MEAN, abs=1e-12)
    assert ci == pytest.approx(HALF_WIDTH, abs=1e-7)
    assert mean_ci95([0.5, 0.5]) == (0.5, 0.0)


def test_one_observation_has_an_undefined_interval() -> None:
    mean, ci = mean_ci95([0.7])
    assert mean == 0.7 and math.isnan(ci)
    assert all(math.isnan(v) for v in mean_ci95([]))
    assert format_mean_ci(0.7, ci) == "70.0 (no CI: 1 value)"
    assert format_mean_ci(0.8, HALF_WIDTH) == "80.0 +- 18.5"
    assert format_mean_ci(-0.02, 0.01, signed=True, digits=2) == "-2.00 +- 1.00"


class _Episodes:
    sha256 = "abc"

    def __len__(self) -> int:
        return 4


def test_a_run_summary_uses_the_convention() -> None:
    rows = [{"episode": i, "accuracy": a, "status": "ok"} for i, a in enumerate(VALUES)]
    rows.append({"episode": 3, "accuracy": None, "status": "non-finite-loss"})
    summary = summary_of_lines(rows, _Episodes())
    assert summary["mean_accuracy"] == pytest.approx(MEAN)
    assert summary["ci95"] == pytest.approx(HALF_WIDTH, abs=1e-7)
    assert summary["failed_episodes"] == [3]
    one = summary_of_lines(rows[:1], _Episodes())
    assert one["mean_accuracy"] == 0.6 and one["ci95"] is None  # null in summary.json, not 0
    json.dumps(one, allow_nan=False)


def _run_folder(folder: Path, accuracies: list[float], sha: str = "f" * 64) -> Path:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"episode_file_sha256": sha}))
    (folder / "episodes.jsonl").write_text("".join(
        json.dumps({"episode": i, "accuracy": a, "status": "ok", "episode_file_sha256": sha}) + "\n"
        for i, a in enumerate(accuracies)))
    return folder


def test_the_paired_difference_and_the_study_table_use_the_convention(tmp_path: Path) -> None:
    # A - B per episode = 0.6, 0.8, 1.0 (the hand-computed values above)
    base = [0.1, 0.0, 0.0]
    a = _run_folder(tmp_path / "a", [b + d for b, d in zip(base, VALUES)])
    b = _run_folder(tmp_path / "b", base)
    result = paired_difference(a, b)
    assert result["mean_difference"] == pytest.approx(MEAN)
    assert result["ci95"] == pytest.approx(HALF_WIDTH, abs=1e-7)
    table = accuracy_table({("crops", 5, "tir"): [a], ("crops", 5, "base"): [b]}, baseline="base").set_index("method")
    assert table.loc["tir", "diff_vs_baseline"] == pytest.approx(MEAN)
    assert table.loc["tir", "diff_ci95"] == pytest.approx(HALF_WIDTH, abs=1e-7)
    # the accuracy of A itself: 0.7, 0.8, 1.0
    expected = np.array([0.7, 0.8, 1.0])
    assert table.loc["tir", "mean"] == pytest.approx(expected.mean())
    assert table.loc["tir", "ci95"] == pytest.approx(1.96 * np.sqrt(((expected - expected.mean()) ** 2).mean() / 3))
    one = accuracy_table({("crops", 5, "tir"): [_run_folder(tmp_path / "c", [0.9])]}, baseline="base")
    assert math.isnan(one.loc[0, "ci95"])
