"""The documentation: the site builds in strict mode (and fails on a broken link), every path and
module the docs cite exists, no file cites a document the repository lacks, the README is short and
its Python example runs, and the benchmarks README lists what benchmarks/results holds."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
MKDOCS = Path(sys.executable).parent / "mkdocs"
needs_mkdocs = pytest.mark.skipif(not MKDOCS.exists(), reason="mkdocs is not installed (make test installs it)")


def _build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run([str(MKDOCS), "build", "--strict", "-f", str(config), "-d", str(site)],
                          cwd=config.parent, capture_output=True, text=True, env=env, timeout=600)


def _doc_files() -> list[Path]:
    return sorted(p for p in DOCS.rglob("*.md") if "notebooks" not in p.parts and "figures" not in p.parts
                  and not p.is_symlink()) + [ROOT / "README.md", ROOT / "CHANGELOG.md"]


@pytest.mark.slow
@needs_mkdocs
def test_the_site_builds_in_strict_mode_with_every_page(tmp_path):
    result = _build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert result.returncode == 0, result.stderr[-3000:]
    for page in ("index.html", "getting-started.html", "concepts/methods.html", "concepts/diagnostics.html",
                 "reference/core.html", "notebooks/01_attention_sink.html", "changelog.html"):
        assert (tmp_path / "site" / page).is_file(), page
    api = (tmp_path / "site" / "reference" / "core.html").read_text()
    assert "load_clip" in api and "Build an open_clip model" in api  # generated from the docstring
    index = (tmp_path / "site" / "index.html").read_text()
    assert "fonts.googleapis" not in index  # offline: no web fonts


@pytest.mark.slow
@needs_mkdocs
def test_a_broken_link_fails_the_build(tmp_path):
    """The positive control of the strict build: a copy of the docs with one broken link."""
    copy = tmp_path / "repo"
    shutil.copytree(DOCS, copy / "docs", symlinks=False, ignore=shutil.ignore_patterns("*.pdf"))
    for name in ("mkdocs.yml", "CHANGELOG.md"):
        shutil.copy(ROOT / name, copy / name)
    for package in ("cdfsl_core", "analysis"):
        (copy / package).symlink_to(ROOT / package)
    page = copy / "docs" / "getting-started.md"
    page.write_text(page.read_text() + "\nSee [the missing page](concepts/no-such-page.md).\n")
    result = _build(copy / "mkdocs.yml", tmp_path / "site")
    assert result.returncode != 0
    assert "no-such-page.md" in result.stderr


_PATH = re.compile(r"`((?:cdfsl_core|analysis|tests|benchmarks|notebooks|docs|requirements|figures)/[\w./*<>-]*)`")
_MODULE = re.compile(r"`((?:cdfsl_core|analysis)(?:\.\w+)+)")


def test_every_path_and_module_the_docs_cite_exists():
    missing = []
    for doc in _doc_files():
        text = doc.read_text()
        for path in _PATH.findall(text):
            if "<" in path or "*" in path:  # a pattern (runs/<target>/..., weights/*.safetensors)
                continue
            if not (ROOT / path.rstrip("/")).exists():
                missing.append(f"{doc.relative_to(ROOT)}: {path}")
        for dotted in _MODULE.findall(text):
            parts = dotted.split(".")
            # the longest importable prefix must exist, and what follows must be an attribute of it
            for n in range(1, len(parts) + 1):  # the longest prefix that is a module
                try:
                    found = importlib.util.find_spec(".".join(parts[:n])) is not None
                except ModuleNotFoundError:  # a prefix that is a module, not a package
                    found = False
                if not found:
                    n -= 1
                    break
            name = ".".join(parts[:n])
            if n == 0:
                missing.append(f"{doc.relative_to(ROOT)}: {dotted}")
                continue
            if n < len(parts):
                module = importlib.import_module(name)
                if not hasattr(module, parts[n]):
                    missing.append(f"{doc.relative_to(ROOT)}: {dotted}")
    assert not missing, "the docs cite what does not exist:\n" + "\n".join(missing)


def test_the_path_check_catches_a_missing_file(tmp_path):
    """Positive control of the check above: a made-up path and module are found by its patterns."""
    text = "see `cdfsl_core/no_such_module.py` and `analysis.no_such_module.thing`"
    assert _PATH.findall(text) == ["cdfsl_core/no_such_module.py"]
    assert not (ROOT / "cdfsl_core/no_such_module.py").exists()
    assert _MODULE.findall(text) == ["analysis.no_such_module.thing"]
    assert importlib.util.find_spec("analysis.no_such_module") is None


def test_no_file_cites_a_document_the_repository_lacks():
    cited = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
    files = [p for p in ROOT.rglob("*") if p.suffix in {".py", ".md", ".ipynb", ".toml", ".yml"}
             and ".venv" not in p.parts and "site" not in p.parts and p.is_file()]
    present = {p.name for p in ROOT.rglob("*.md") if ".venv" not in p.parts}
    missing = sorted({f"{p.relative_to(ROOT)}: {name}" for p in files for name in cited.findall(p.read_text())
                      if name not in present})
    assert not missing, "cited documents that are not in the repository:\n" + "\n".join(missing)


def test_readme_is_a_short_front_page_whose_example_runs():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    for link in re.findall(r"\]\(((?:docs/|CHANGELOG)[^)#]*)", readme):
        assert (ROOT / link).exists(), link
    example = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)  # noqa: S102 - the README's own example
    assert namespace["logits"].shape[1] == 7  # xray's 7 classes
    assert namespace["cache"]["blocks.5.attn.pattern"].ndim == 4


def test_benchmarks_readme_lists_every_result_file():
    text = (ROOT / "benchmarks" / "README.md").read_text()
    results = sorted(p.name for p in (ROOT / "benchmarks" / "results").iterdir())
    unlisted = [name for name in results if f"`{name}`" not in text and f"`{name}/`" not in text]
    assert not unlisted, f"benchmarks/README.md does not describe {unlisted}"
    scripts = sorted(p.name for p in (ROOT / "benchmarks").glob("*.py") if p.name != "benchmark_report.py")
    assert not [s for s in scripts if f"`{s}" not in text]
