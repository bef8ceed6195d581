"""The layering is a contract that CI checks: ``lint-imports`` keeps it (``make test`` runs it), and
an import that runs back up breaks it. The positive control copies the packages, adds one upward
import (``cdfsl_core.config`` importing ``cdfsl_core.runner``) and must see the contract broken."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed (make test installs it)")


def _lint(folder: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(folder)}
    return subprocess.run([str(LINT), "--config", str(folder / "pyproject.toml"), "--no-cache"], cwd=folder, env=env,
                          capture_output=True, text=True, timeout=300)


def test_the_layers_contract_is_kept() -> None:
    done = _lint(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


def test_an_upward_import_breaks_the_contract(tmp_path: Path) -> None:
    for name in ("cdfsl_core", "analysis"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "weights"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    config = tmp_path / "cdfsl_core" / "config.py"
    config.write_text(config.read_text() + "\n\ndef _up():\n    from cdfsl_core.runner import run  # lazy, still up\n    return run\n")
    done = _lint(tmp_path)
    assert done.returncode != 0
    assert "cdfsl_core.config -> cdfsl_core.runner" in done.stdout and "BROKEN" in done.stdout
