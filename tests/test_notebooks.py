"""Notebooks are committed stripped and thin, parameterised the papermill way; nbmake executes
them all (see notebooks/conftest.py), and one runs here through papermill with parameters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = {"00_domain_shift_primer", "01_attention_sink", "02_tail_tokens", "03_cka_domain_similarity", "04_accuracy",
            "05_causal_tools"}
PARAMETERS = ("MODEL", "CHECKPOINT", "DATA_ROOT", "SOURCE", "TARGETS", "DEVICE", "EPISODES", "STEPS", "OUT")


def _code(path: Path) -> list[dict]:
    return [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]


def test_the_six_notebooks_are_there():
    assert {path.stem for path in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stripped_with_one_tagged_parameter_cell_and_one_library_call(path):
    code = _code(path)
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "outputs must be stripped"
    tagged = [c for c in code if "parameters" in c["metadata"].get("tags", [])]
    assert len(tagged) == 1 and tagged[0] is code[0]
    assigned = {line.split("=")[0].strip() for line in "".join(code[0]["source"]).splitlines()
                if "=" in line and not line.startswith("#")}
    assert assigned == set(PARAMETERS)  # parameters only: no logic in the parameter cell
    assert "notebook_study(OUT, model=MODEL" in "".join(code[1]["source"])  # the one library call
    # thin: the logic lives in the library, not in cells
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in "".join(c["source"]).splitlines())


def test_every_notebook_has_the_same_parameter_cell():
    assert len({"".join(_code(path)[0]["source"]) for path in NOTEBOOKS}) == 1


@pytest.mark.slow
def test_a_notebook_runs_under_papermill_with_parameters(tmp_path, monkeypatch):
    import papermill

    monkeypatch.delenv("CDFSL_NOTEBOOK_QUICK", raising=False)  # the parameters, not the quick switch, decide
    out = tmp_path / "study"
    papermill.execute_notebook(
        str(NOTEBOOKS[0]), str(tmp_path / "primer.ipynb"), cwd=str(NOTEBOOKS[0].parent), kernel_name="python3",
        progress_bar=False,
        parameters={"OUT": str(out), "TARGETS": ["synthetic-xray"], "EPISODES": 1, "STEPS": 2, "DEVICE": "cpu"})
    settings = json.loads((out / "study.json").read_text())
    assert settings["data"]["targets"] == ["synthetic-xray"]
    assert settings["grid"]["episodes"] == 1 and settings["grid"]["steps"] == 2
    executed = json.loads((tmp_path / "primer.ipynb").read_text())
    injected = [c for c in executed["cells"] if "injected-parameters" in c["metadata"].get("tags", [])]
    assert injected and 'TARGETS = ["synthetic-xray"]' in "".join(injected[0]["source"])
