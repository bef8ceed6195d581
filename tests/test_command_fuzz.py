"""Every command, every checked option, generated bad values: no traceback, no silent result.

Part one walks the parser of each ``python -m`` entry point and, for every option whose values
are checked (a project argument type or a list of choices), runs the command in-process through
its ``main(argv)`` with values Hypothesis draws from outside the option's range (negative, zero,
huge, not a number, NaN, infinite, junk text, an unknown choice). Each must end in argparse's
exit 2 with one message that names the option, and no file may be created or changed.

Part two gives the commands' path arguments what a new user gives them: a missing path, a file
where a folder belongs, a folder where a file belongs, a corrupt JSON or TOML file. Each must end
in exit 1 with one ``error:`` line that names the path, without a traceback, and leave the
folder as it was. The cases of the reliability probe that need a finished run are in
``tests/test_damaged_inputs.py`` and ``tests/test_reliability.py``.
"""

from __future__ import annotations

import argparse
import importlib
import io
import string
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdfsl_core import cli

# Every entry point users type, with arguments that parse (they need not lead anywhere: part one
# fails in argparse, before any work).
COMMANDS: dict[str, list[str]] = {
    "cdfsl_core.finetune": ["--out", "{tmp}/run"],
    "cdfsl_core.episodes": ["--dataset", "synthetic-crops", "--out", "{tmp}/ep.json"],
    "cdfsl_core.compare": ["{tmp}/a", "{tmp}/b"],
    "cdfsl_core.sweep": [],
    "cdfsl_core.pretrain": ["--out", "{tmp}/pretrain"],
    "cdfsl_core.world_report": [],
    "cdfsl_core.models": ["list"],
    "cdfsl_core.data": ["list"],
    "analysis.cka": ["--target", "synthetic-crops"],
    "analysis.run_diagnostics": ["{tmp}/run"],
    "analysis.run_causal": ["{tmp}/run"],
    "analysis.run_vision": ["cdfsl-test-vit", "--out", "{tmp}/vision"],
    "analysis.trajectory": ["{tmp}/run"],
    "analysis.organism": ["{tmp}/organism-run", "--out", "{tmp}/organism"],
    "analysis.report": ["{tmp}/study"],
    "analysis.demo": ["--out", "{tmp}/demo"],
}

_JUNK = st.text(alphabet=string.ascii_letters + "!#%&*,:;?@^_~", min_size=1, max_size=8).filter(
    lambda s: s.lower() not in ("nan", "inf", "infinity", "auto", "learned", "none"))


def _outside(low: float | None, high: float | None, integer: bool, low_open: bool = False,
             high_open: bool = False) -> st.SearchStrategy[str]:
    """Numbers just outside, and far outside, [low, high] (open ends excluded too), as text."""
    numbers = st.integers if integer else (lambda **k: st.floats(allow_nan=False, allow_infinity=False, **k))
    parts = []
    if low is not None:
        parts.append(numbers(max_value=(low if low_open else (low - 1 if integer else low - 1e-9))))
    if high is not None:
        parts.append(numbers(min_value=(high if high_open else (high + 1 if integer else high + 1e-9))))
    values = st.one_of(*parts).map(repr)
    if integer:
        return st.one_of(values, _JUNK, st.sampled_from(["1.5", "1e3"]))
    return st.one_of(values, _JUNK, st.sampled_from(["nan", "inf", "-inf"]))


# the project's argument types and what lies outside each
BAD_VALUES = {
    cli.positive_int: _outside(1, None, True),
    cli.non_negative_int: _outside(0, None, True),
    cli.positive_float: _outside(0.0, None, False, low_open=True),
    cli.non_negative_float: _outside(0.0, None, False),
    cli.share: _outside(0.0, 1.0, False),
    cli.fraction: _outside(0.0, 1.0, False, low_open=True, high_open=True),
    cli.logit_scale: _outside(0.0, None, False, low_open=True),
    cli.episode_batch_arg: _outside(1, None, True),
    cli.pretrained_arg: st.sampled_from(["", " ", "\t"]),
}


def _module(name: str):
    return importlib.import_module(name if name != "cdfsl_core.data" else "cdfsl_core.data.__main__")


def _checked_options() -> list[tuple[str, str]]:
    """(command, flag) for every option of every command whose values are checked."""
    found = []
    for name in COMMANDS:
        for action in _module(name).build_parser()._actions:
            if not action.option_strings or action.dest in ("help", "debug"):
                continue
            if action.choices is not None or action.type in BAD_VALUES or getattr(action.type, "__name__", "") == "ways":
                found.append((name, action.option_strings[-1]))
    return found


CHECKED = _checked_options()


def _snapshot(folder: Path) -> dict[str, tuple[int, float]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime) for p in folder.rglob("*")}


def _run(name: str, argv: list[str]) -> tuple[int, str]:
    """``main(argv)`` of command ``name`` in-process: (exit status, stderr); a traceback fails."""
    err, out = io.StringIO(), io.StringIO()
    with redirect_stderr(err), redirect_stdout(out):
        try:
            status = _module(name).main(argv)
        except SystemExit as exit_:
            status = exit_.code if isinstance(exit_.code, int) else 1
    text = err.getvalue()
    assert "Traceback" not in text, text
    return status, text


def _action(name: str, flag: str) -> argparse.Action:
    return next(a for a in _module(name).build_parser()._actions if flag in a.option_strings)


def test_every_entry_point_is_covered_and_parses_its_base_arguments(tmp_path):
    for name, base in COMMANDS.items():
        module = _module(name)
        module.build_parser().parse_args([a.format(tmp=tmp_path) for a in base])
    assert len(CHECKED) > 80  # every typed option of the 16 commands
    unchecked = [(name, action.option_strings) for name in COMMANDS for action in _module(name).build_parser()._actions
                 if action.type in (int, float)]
    assert unchecked == []  # a bare int or float takes -1, 0 and nan: every number goes through a project type


def _bad_values(action: argparse.Action) -> st.SearchStrategy[str]:
    if action.choices is not None:
        return _JUNK.filter(lambda s: s not in action.choices)
    if getattr(action.type, "__name__", "") == "ways":
        return _outside(2, None, True)
    return BAD_VALUES[action.type]


@pytest.mark.parametrize("name, flag", CHECKED, ids=[f"{n.split('.')[-1]}{f}" for n, f in CHECKED])
@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_bad_value_is_refused_by_argparse_naming_the_option(tmp_path, name, flag, data):
    value = data.draw(_bad_values(_action(name, flag)), label=flag)
    base = [a.format(tmp=tmp_path) for a in COMMANDS[name]]
    if name in ("cdfsl_core.models", "cdfsl_core.data"):
        base = []  # their options belong to a subcommand; the top level has none checked
    before = _snapshot(tmp_path)
    status, err = _run(name, [*base, f"{flag}={value}"])
    assert status == 2, (flag, value, err)
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and flag in lines[0], err
    assert _snapshot(tmp_path) == before  # nothing created or changed


def _files(tmp: Path) -> dict[str, Path]:
    """What part two hands the commands: a file, a corrupt JSON, a corrupt TOML, a run folder
    whose config and manifest are garbage, a study folder with a garbage study.json."""
    (tmp / "a-file.txt").write_text("not a folder\n")
    (tmp / "broken.json").write_text('{"episodes": [1, 2,')
    (tmp / "broken.toml").write_text("datasets = [\n")
    run = tmp / "broken-run"
    run.mkdir()
    (run / "config.json").write_text("{not json")
    (run / "manifest.json").write_text("\x00\x01garbage")
    study = tmp / "broken-study"
    study.mkdir()
    (study / "study.json").write_text("[1, 2")
    (tmp / "a-folder").mkdir()
    return {"file": tmp / "a-file.txt", "json": tmp / "broken.json", "toml": tmp / "broken.toml", "run": run,
            "study": study, "folder": tmp / "a-folder", "missing": tmp / "no-such-thing"}


# (command, argv with {file} {json} {toml} {run} {study} {folder} {missing}, what the line must name)
PATH_CASES = [
    ("cdfsl_core.compare", ["{missing}", "{run}"], "{missing}"),
    ("cdfsl_core.compare", ["{run}", "{run}"], "{run} is not a run folder"),
    ("cdfsl_core.compare", ["{file}", "{file}"], "{file}"),
    ("cdfsl_core.finetune", ["--out", "{file}", "--model", "cdfsl-test-vit", "--pretrained", "none"], "{file}"),
    ("cdfsl_core.finetune", ["--out", "{run}", "--model", "cdfsl-test-vit", "--pretrained", "none"],
     "{run}/manifest.json is not valid JSON"),
    ("cdfsl_core.finetune", ["--out", "{folder}/r", "--episode-file", "{json}", "--model", "cdfsl-test-vit",
                             "--pretrained", "none"], "{json}"),
    ("cdfsl_core.finetune", ["--out", "{folder}/r", "--pretrained", "{missing}"], "{missing}"),
    ("cdfsl_core.finetune", ["--out", "{folder}/r", "--model", "cdfsl-test-vit", "--pretrained", "none",
                             "--episodes", "100000000"], "n_episodes=100000000"),
    ("cdfsl_core.episodes", ["--dataset", "synthetic-crops", "--out", "{folder}"], "{folder}"),
    ("cdfsl_core.episodes", ["--dataset", "eurosat", "--data-root", "{missing}", "--out", "{folder}/e.json"],
     "{missing}"),
    ("cdfsl_core.sweep", ["--grid", "{missing}"], "{missing}"),
    ("cdfsl_core.sweep", ["--grid", "{toml}"], "{toml}"),
    ("cdfsl_core.pretrain", ["--out", "{file}", "--steps", "1"], "{file}"),
    ("cdfsl_core.world_report", ["--pretrained", "{missing}"], "{missing}"),
    ("cdfsl_core.world_report", ["--json", "{folder}"], "{folder}"),  # was a traceback after the measurement
    ("cdfsl_core.world_report", ["--card", "{folder}"], "{folder}"),
    ("cdfsl_core.data", ["check", "no-such-dataset"], "no-such-dataset"),
    ("cdfsl_core.models", ["download", "no-such-arch", "tag"], "no-such-arch"),
    ("analysis.cka", ["--target", "synthetic-crops", "--out", "{folder}"], "{folder}"),
    ("analysis.cka", ["--target", "synthetic-crops", "--pretrained", "{missing}"], "{missing}"),
    ("analysis.run_diagnostics", ["{missing}"], "{missing}"),
    ("analysis.run_diagnostics", ["{run}"], "config.json"),
    ("analysis.run_causal", ["{missing}"], "{missing}"),
    ("analysis.run_causal", ["{run}"], "config.json"),
    ("analysis.run_vision", ["cdfsl-test-vit", "--pretrained", "none", "--out", "{file}"], "{file}"),
    ("analysis.run_vision", ["cdfsl-test-vit", "--pretrained", "{missing}", "--out", "{folder}/v"], "{missing}"),
    ("analysis.trajectory", ["{missing}"], "{missing}"),
    ("analysis.trajectory", ["{run}"], "config.json"),
    ("analysis.organism", ["{missing}", "--out", "{folder}/o"], "{missing}"),
    ("analysis.organism", ["cdfsl-test-vit=synthetic", "--out", "{file}"], "{file}"),
    ("analysis.report", ["{missing}"], "{missing}"),
    ("analysis.report", ["{study}"], "study.json"),
    ("analysis.demo", ["--out", "{file}"], "{file}"),
    ("analysis.demo", ["--out", "{study}"], "study.json"),
]


@pytest.mark.parametrize("name, argv, named", PATH_CASES, ids=[f"{n.split('.')[-1]}-{i}" for i, (n, _, _) in
                                                               enumerate(PATH_CASES)])
def test_a_bad_path_is_one_line_naming_it_and_changes_nothing(tmp_path, monkeypatch, name, argv, named):
    monkeypatch.chdir(tmp_path)  # anything written to a default place would show up in the snapshot
    paths = {key: str(value) for key, value in _files(tmp_path).items()}
    before = _snapshot(tmp_path)
    status, err = _run(name, [a.format(**paths) for a in argv])
    assert status == 1, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and named.format(**paths) in lines[0], err
    assert _snapshot(tmp_path) == before


def test_a_closed_pipe_stops_quietly():
    """``python -m cdfsl_core.models list | head -1``: the reader goes away; no traceback."""
    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def fileno(self):  # where the command points stdout at the null device
            raise io.UnsupportedOperation("no descriptor")

    err = io.StringIO()
    with redirect_stdout(Closed()), redirect_stderr(err):
        status = _module("cdfsl_core.models").main(["list"])
    assert status == 141 and err.getvalue() == ""
