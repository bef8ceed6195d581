"""The study report: notebooks executed on a study folder, as HTML pages that fetch nothing."""

from __future__ import annotations

import json
import re

import pytest

from analysis.report import chosen_notebooks, main, notebook_parameters, offline_html
from analysis.study import Study
from cdfsl_core.errors import ConfigError

EXTERNAL = re.compile(r"""(src|href)=["']https?://|import\(\s*["']https?://""")


def test_the_parameters_reproduce_the_study_and_other_settings_are_refused(tmp_path):
    study = Study.create(tmp_path / "a", targets=("synthetic-xray",), episodes=1, steps=2, progress=False)
    study.check_folder()
    parameters = notebook_parameters(tmp_path / "a")
    assert parameters["TARGETS"] == ["synthetic-xray"] and parameters["EPISODES"] == 1 and parameters["STEPS"] == 2
    other = Study.create(tmp_path / "b", targets=("synthetic-xray",), episodes=1, steps=2, rho=0.25, progress=False)
    other.check_folder()
    with pytest.raises(ConfigError, match=r"analysis.rho"):
        notebook_parameters(tmp_path / "b")
    with pytest.raises(ConfigError, match="no study.json"):
        notebook_parameters(tmp_path)
    assert [p.stem for p in chosen_notebooks(["01", "04"])] == ["01_attention_sink", "04_accuracy"]
    with pytest.raises(ConfigError, match="no such notebook"):
        chosen_notebooks(["09"])


def test_offline_html_drops_what_would_be_fetched_and_keeps_figures():
    import nbformat

    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A title")])
    output = nbformat.v4.new_output("display_data", data={"image/png": "iVBORw0KGgo=", "text/plain": "<Figure>"})
    notebook.cells.append(nbformat.v4.new_code_cell("1", outputs=[output]))
    page = offline_html(notebook)
    assert 'src="data:image/png;base64,iVBORw0KGgo=' in page
    assert not EXTERNAL.search(page)
    from nbconvert import HTMLExporter

    assert EXTERNAL.search(HTMLExporter(template_name="lab").from_notebook_node(notebook)[0])  # what was removed


@pytest.mark.slow
def test_a_report_of_a_small_study(tmp_path, monkeypatch):
    study = Study.create(tmp_path / "study", model="cdfsl-test-vit", pretrained=None, targets=("synthetic-xray",),
                         episodes=1, steps=2, progress=False)
    study.check_folder()
    monkeypatch.setenv("CDFSL_NOTEBOOK_QUICK", str(tmp_path / "elsewhere"))  # the report ignores the test switch
    assert main([str(tmp_path / "study"), "--notebooks", "04"]) == 0
    report = tmp_path / "study" / "report"
    index = (report / "index.html").read_text()
    assert 'href="04_accuracy.html"' in index and not EXTERNAL.search(index)
    page = (report / "04_accuracy.html").read_text()
    assert "data:image/png;base64" in page and not EXTERNAL.search(page)
    assert json.loads((tmp_path / "study" / "study.json").read_text())["grid"]["episodes"] == 1
    assert (tmp_path / "study" / "accuracy_table.csv").exists()  # the notebook ran on the study folder
    assert not (tmp_path / "elsewhere").exists()
    # another choice of notebooks never mixes its pages into this report
    assert main([str(tmp_path / "study"), "--notebooks", "00"]) == 1
    assert not (report / "00_domain_shift_primer.html").exists()
