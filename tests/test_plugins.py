"""Registries every vocabulary goes through, and plug-ins from installed packages.

1. A sink definition registered from this file alone appears in the diagnostics' tables, the
   ``sink_counts`` figure and ``run_diagnostics``' flags, and finds its planted control.
2. A tiny package installed into the environment with pip declares an intervention and a sink
   definition as entry points; the real commands (``finetune``, ``run_diagnostics``) and a sweep's
   Ray workers use them with no import in user code.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis import figures
from analysis.config import AnalysisConfig
from analysis.controls import Plant, planted
from analysis.diagnostics import TokenDiagnostics
from analysis.recorder import record
from analysis.run_diagnostics import build_parser as diagnostics_parser
from analysis.sinks import SinkSpec, list_sinks, register_sink, row_median, unregister_sink


def _top_norm(inputs, definition):
    """The largest-norm patch token of each image, when above tau x the median patch norm."""
    top = inputs.norms == inputs.norms.amax(dim=-1, keepdim=True)
    return top & (inputs.norms > definition.tau * row_median(inputs.norms).unsqueeze(-1))


@pytest.fixture
def top_norm():
    register_sink(SinkSpec("top-norm", _top_norm, "median patch norm", 1.5, plant="high-norm",
                           description="the largest-norm patch token, above tau x the median"))
    yield
    unregister_sink("top-norm")


def test_a_sink_definition_is_one_registry_entry(top_norm, bundle, tmp_path):
    assert "top-norm" in list_sinks()
    # the command gets its flag, and the parsed value reaches the config
    from analysis.run_diagnostics import analysis_config

    args = diagnostics_parser().parse_args(["RUN", "--top-norm-tau", "3"])
    config = analysis_config(args)
    assert dict(config.sink_taus) == {"top-norm": 3.0}
    assert [s.tau for s in config.sinks() if s.name == "top-norm"] == [3.0]
    # the tables: found on the planted high-norm token (its positive control), in every image
    torch.manual_seed(0)
    images = torch.randn(4, 3, 32, 32)
    text = bundle.model.encode_text(bundle.tokenizer(["a", "b", "c"]))
    diagnostics = TokenDiagnostics.from_config(bundle.model.visual, text, [1], AnalysisConfig())
    with planted(bundle.model, [Plant("high-norm", layer=1, token=5)]), record(bundle.model, layers=[1]) as cache:
        bundle.model.encode_image(images)
    diagnostics.update(cache)
    mask = diagnostics.sink_masks(cache)[1]["top-norm"]
    assert mask.sum().item() == 4 and mask[:, 5].all()
    sinks = diagnostics.tables(model="pretrained")["sinks"]
    row = sinks[sinks["definition"] == "top-norm"].iloc[0]
    assert row["mean_count"] == 1.0 and row["label"] == "top-norm (> 1.5 x median patch norm)"
    # the figure: one panel per definition, this one among them
    figure = figures.sink_counts(sinks)
    assert "top-norm (> 1.5 x median patch norm)" in [ax.get_title() for ax in figure.axes]
    # the controls' mapping: the built-in definition stays the one the plant is for
    from analysis.controls import FINDS

    assert FINDS["high-norm"] == "high-norm"


PLUGIN = {
    "pyproject.toml": """
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"

        [project]
        name = "cdfsl-toy-plugin"
        version = "0.1"

        [project.entry-points."cdfsl.interventions"]
        halve = "cdfsl_toy_plugin.intervention"

        [project.entry-points."cdfsl.sinks"]
        top-norm-plugin = "cdfsl_toy_plugin.sinks:register"

        [tool.setuptools]
        packages = ["cdfsl_toy_plugin"]
        """,
    "cdfsl_toy_plugin/__init__.py": "",
    "cdfsl_toy_plugin/intervention.py": """
        import torch
        from dataclasses import dataclass
        from cdfsl_core.interventions import Intervention, register_intervention

        @dataclass(frozen=True)
        class HalveConfig:
            block: int = 1

        class Halve(Intervention):
            name = "halve"

            def __init__(self, n_blocks, config):
                super().__init__()
                self.config = config

            def blocks(self, n_blocks):
                return [self.config.block]

            def edit(self, block, x, state):
                return torch.cat([x[:, :1], 0.5 * x[:, 1:]], dim=1)

        register_intervention("halve", lambda n_blocks, config: Halve(n_blocks, config), HalveConfig,
                              "halves the patch tokens before one block")
        """,
    "cdfsl_toy_plugin/sinks.py": """
        from analysis.sinks import SinkSpec, register_sink, row_median

        def _mask(inputs, definition):
            top = inputs.norms == inputs.norms.amax(dim=-1, keepdim=True)
            return top & (inputs.norms > definition.tau * row_median(inputs.norms).unsqueeze(-1))

        def register():
            register_sink(SinkSpec("top-norm-plugin", _mask, "median patch norm", 1.5, plant="high-norm",
                                   description="the largest-norm patch token"))
        """,
}


@pytest.fixture(scope="module")
def installed_plugin(tmp_path_factory):
    source = tmp_path_factory.mktemp("plugin")
    for name, text in PLUGIN.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(textwrap.dedent(text).lstrip())
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "install", "--no-deps", "--no-build-isolation", "--no-index", str(source)], check=True,
                   capture_output=True, timeout=300)
    yield
    subprocess.run([*pip, "uninstall", "--yes", "cdfsl-toy-plugin"], check=True, capture_output=True, timeout=300)


def _command(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *argv], capture_output=True, text=True, timeout=600, cwd=cwd)


@pytest.mark.slow
def test_an_installed_plugin_reaches_the_commands_and_the_sweep_workers(installed_plugin, tmp_path):
    common = ["--dataset", "synthetic-crops", "--ways", "3", "--shots", "1", "--queries", "2", "--episodes", "2",
              "--steps", "1", "--device", "cpu", "--model", "cdfsl-test-vit", "--pretrained", "none"]
    done = _command("cdfsl_core.finetune", *common, "--intervention", "halve", "--out", str(tmp_path / "run"),
                    "--save-states", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["method"]["intervention"] == "halve"  # its settings: the defaults (None in the config)
    assert len((tmp_path / "run" / "episodes.jsonl").read_text().splitlines()) == 2
    done = _command("analysis.run_diagnostics", str(tmp_path / "run"), "--attribution-steps", "2",
                    "--top-norm-plugin-tau", "1.2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    sinks = pd.read_csv(tmp_path / "run" / "diagnostics" / "sinks.csv")
    assert "top-norm-plugin" in set(sinks["definition"])
    assert set(sinks.loc[sinks["definition"] == "top-norm-plugin", "tau"]) == {1.2}
    # a sweep's Ray workers are other processes: they find the plug-in through its entry point too
    pytest.importorskip("ray")
    done = _command("cdfsl_core.sweep", "--datasets", "synthetic-crops", "--shots", "1", "--methods",
                    "coop+lora/halve", "--episodes", "2", "--steps", "1", "--ways", "3", "--queries", "2",
                    "--model", "cdfsl-test-vit", "--pretrained", "none", "--shard", "1", "--cpus-per-task", "1",
                    "--out", str(tmp_path / "sweep"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr + done.stdout
    lines = (tmp_path / "sweep" / "synthetic-crops" / "1shot" / "coop+lora_halve" / "seed0" / "episodes.jsonl")
    assert len(lines.read_text().splitlines()) == 2


def test_a_broken_plugin_is_an_error_naming_it(monkeypatch):
    import cdfsl_core.plugins as plugins
    from cdfsl_core.errors import ConfigError

    class Broken:
        name, value = "broken", "nowhere.module"

        def load(self):
            raise ImportError("No module named 'nowhere'")

    monkeypatch.setattr(plugins, "entry_points", lambda group: [Broken()])
    monkeypatch.setattr(plugins, "_LOADED", set())
    with pytest.raises(ConfigError, match=r"plug-in 'broken' \(nowhere.module\) of entry-point group 'cdfsl.sinks'"):
        plugins.load_plugins("cdfsl.sinks")


def test_a_tower_family_from_an_entry_point_is_tried_first(monkeypatch):
    """The tower registry loads the group cdfsl.towers after the built-in families: a plug-in's
    adapter class, registered by importing its module, is then the first family tried."""
    import cdfsl_core.plugins as plugins
    import cdfsl_core.towers.base as base
    from cdfsl_core.towers import register_tower

    class PluginTower(base.VisionTower):
        family = "plug-in tower"

        @classmethod
        def matches(cls, module):
            return False

    class Entry:
        name, value = "plugin-tower", "my_package.tower"

        def load(self):
            return register_tower(PluginTower)  # what importing the plug-in's module does

    asked = []
    monkeypatch.setattr(plugins, "entry_points", lambda group: asked.append(group) or ([Entry()] if group ==
                                                                                        "cdfsl.towers" else []))
    monkeypatch.setattr(plugins, "_LOADED", set())
    monkeypatch.setattr(base, "_loaded", False)
    monkeypatch.setattr(base, "_FAMILIES", list(base._FAMILIES))
    families = base.tower_families()
    assert asked == ["cdfsl.towers"] and families[0] is PluginTower
    assert {"open_clip", "timm"} <= {f.family for f in families[1:]}  # the built-in ones after it
