"""Notebooks are committed stripped and thin; nbmake executes them (see notebooks/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))
EXPECTED = {"00_domain_shift_primer", "01_attention_sink", "02_tail_tokens", "03_cka_domain_similarity", "04_accuracy"}


def test_the_five_notebooks_are_there():
    assert {path.stem for path in NOTEBOOKS} == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_stripped_with_a_parameter_cell_and_no_definitions(path):
    cells = json.loads(path.read_text())["cells"]
    code = [c for c in cells if c["cell_type"] == "code"]
    assert all(not c["outputs"] and c["execution_count"] is None for c in code), "outputs must be stripped"
    parameters = "".join(code[0]["source"])
    for name in ("MODEL, CHECKPOINT", "DATA_ROOT", "TARGETS", "CDFSL_NOTEBOOK_QUICK"):
        assert name in parameters
    # thin: the logic lives in the library, not in cells
    assert not any(line.lstrip().startswith(("def ", "class ")) for c in code for line in "".join(c["source"]).splitlines())
