"""A study as a self-contained HTML report: ``python -m analysis.report STUDY_FOLDER [--out REPORT]``.

Executes the notebooks with papermill on the study folder (their parameters read from its
``study.json``, so every table the folder holds is reused and nothing is recomputed), converts
each to HTML with nbconvert, figures embedded as data URIs and no script or style fetched from the
network, and writes an index page linking them: the folder (default ``STUDY/report``) opens offline
and can be shared as files. The executed notebooks are kept beside the pages (``*.ipynb``).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Sequence

from cdfsl_core.atomic import write_json, write_text
from cdfsl_core.cli import command, parser, positive_int
from cdfsl_core.errors import ConfigError
from cdfsl_core.paths import check_settings, check_writable_folder, read_json_file

NOTEBOOK_FOLDER = Path(__file__).resolve().parent.parent / "notebooks"
_EXTERNAL = re.compile(r"""<(script|link)\b[^>]*(src|href)=["']https?://[^>]*>(\s*</script>)?""", re.IGNORECASE)
# inline scripts that would fetch a library from the network when they run (the template's mermaid loader)
_FETCHING_SCRIPT = re.compile(r"<script\b[^>]*>(?:(?!</script>).)*?import\(\s*[\"']https?://(?:(?!</script>).)*?</script>",
                              re.IGNORECASE | re.DOTALL)


def build_parser() -> argparse.ArgumentParser:
    result = parser("python -m analysis.report", __doc__)
    result.add_argument("study", type=Path, help="a study folder (with study.json), e.g. outputs/demo after make demo")
    result.add_argument("--out", type=Path, default=None, help="the report folder (default STUDY/report)")
    result.add_argument("--notebooks", nargs="+", default=None,
                        help="notebook names or prefixes to include (default: all), e.g. 01 02")
    result.add_argument("--timeout", type=positive_int, default=1800, help="seconds a notebook cell may take")
    return result


def notebook_parameters(study: Path) -> dict[str, Any]:
    """The notebooks' parameters that reproduce the study of ``study/study.json``; a study that also
    sets what the notebooks cannot pass (shots, methods, analysis settings) is refused, naming it."""
    path = study / "study.json"
    if not path.is_file():
        raise ConfigError(f"{study} has no study.json: expected a study folder (make demo writes outputs/demo).")
    saved = read_json_file(path, "a study's settings (an object)", "Restore it, or run the study into a new folder.")
    parameters = {
        "OUT": str(study.resolve()), "MODEL": saved["model"]["name"],
        "CHECKPOINT": "none" if saved["model"]["pretrained"] is None else saved["model"]["pretrained"],
        "DATA_ROOT": saved["data"]["root"], "SOURCE": saved["data"]["source"], "TARGETS": saved["data"]["targets"],
        "DEVICE": saved["model"]["device"], "EPISODES": saved["grid"]["episodes"], "STEPS": saved["grid"]["steps"],
    }
    from analysis.study import Study

    again = Study.create(study, model=parameters["MODEL"], pretrained=parameters["CHECKPOINT"],
                         data_root=parameters["DATA_ROOT"], source=parameters["SOURCE"],
                         targets=tuple(parameters["TARGETS"]), device=parameters["DEVICE"],
                         episodes=parameters["EPISODES"], steps=parameters["STEPS"]).settings()
    differ = sorted(f"{part}.{key}" for part in saved for key in set(saved[part]) | set(again.get(part, {}))
                    if saved[part].get(key) != again.get(part, {}).get(key))
    if differ:
        raise ConfigError(f"{study}: the study sets {differ}, which the notebooks' parameters cannot pass; the "
                          "notebooks would refuse its folder. Make the report of a study with those at their defaults.")
    return parameters


def chosen_notebooks(names: Sequence[str] | None) -> list[Path]:
    every = sorted(NOTEBOOK_FOLDER.glob("[0-9][0-9]_*.ipynb"))
    if not names:
        return every
    chosen = [path for path in every if any(path.stem.startswith(name) or path.stem == name for name in names)]
    unknown = [name for name in names if not any(p.stem.startswith(name) for p in every)]
    if unknown:
        raise ConfigError(f"--notebooks {unknown}: no such notebook; expected names or prefixes of "
                          f"{[p.stem for p in every]}.")
    return chosen


def offline_html(notebook: Any) -> str:
    """The executed notebook as one HTML page that fetches nothing: figures are data URIs already,
    and the CDN scripts of nbconvert's template (MathJax, require.js) are removed."""
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(template_name="lab", embed_images=True)
    body, _ = exporter.from_notebook_node(notebook)
    return _FETCHING_SCRIPT.sub("", _EXTERNAL.sub("", body))


def write_report(study: Path, out: Path, notebooks: Sequence[Path], timeout: int = 1800) -> Path:
    import nbformat
    import papermill

    parameters = notebook_parameters(study)
    check_writable_folder(out, "--out")
    settings = {"study": str(Path(study).resolve()), "notebooks": [path.stem for path in notebooks]}
    check_settings(out / "settings.json", settings, "report pages")  # never mix pages of two reports
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for path in notebooks:
        start = time.perf_counter()
        executed = out / path.name
        papermill.execute_notebook(str(path), str(executed), parameters=parameters, cwd=str(path.parent),
                                   kernel_name="python3", progress_bar=False, execution_timeout=timeout)
        notebook = nbformat.read(str(executed), as_version=4)
        page = out / f"{path.stem}.html"
        write_text(page, offline_html(notebook))
        title = next((c.source.splitlines()[0].lstrip("# ") for c in notebook.cells if c.cell_type == "markdown"),
                     path.stem)
        pages.append((page.name, title, time.perf_counter() - start))
        print(f"{page} ({pages[-1][2]:.0f} s)")
    items = "\n".join(f'<li><a href="{html.escape(name)}">{html.escape(title)}</a></li>' for name, title, _ in pages)
    settings = html.escape(json.dumps(read_json_file(study / "study.json", "a study's settings (an object)", "Restore it, or run the study into a new folder."), indent=2))
    index = out / "index.html"
    write_text(index, f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>Study report: {html.escape(study.name)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}}pre{{background:#f4f4f4;padding:1em}}</style>
</head><body>
<h1>Study report: {html.escape(study.name)}</h1>
<p>The notebooks executed on the study folder; every figure is embedded, nothing is fetched.</p>
<ol>
{items}
</ol>
<h2>Settings (study.json)</h2>
<pre>{settings}</pre>
</body></html>
""")
    write_json(out / "settings.json", settings)  # last: the pages beside it are complete
    return index


@command
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    notebooks = chosen_notebooks(args.notebooks)
    out = args.out or args.study / "report"
    # the study folder's settings decide, not the test suite's switch: off while the notebooks run
    # (and back afterwards: a command called in-process must not change its caller's environment)
    saved = os.environ.pop("CDFSL_NOTEBOOK_QUICK", None)
    try:
        index = write_report(args.study, out, notebooks, args.timeout)
    finally:
        if saved is not None:
            os.environ["CDFSL_NOTEBOOK_QUICK"] = saved
    print(f"report: {index} (open it in a browser; it needs no network)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
